"""Thunderbolt islands in the lab: h0 and h1 keep their cable, h2's two cables are pulled, so the room is a
cabled pair beside a Mac on Wi-Fi. `macrun train` (auto) must plan the islands {h0 h1} and {h2}, run the
world ring over the network, measure the network too slow for DDP and train as islands: every step's
gradients between h0 and h1 over their cable, the pseudo-gradients between h0 and h2 over Wi-Fi. The
kernel's byte counters show which link carried what; the fetched checkpoint reproduces the run's loss.

Same tiny GPT, 30 steps of H=10 and Wi-Fi batch as tests/lab/test_lab_train.py (whose helpers this uses;
its docstring says why auto's choice holds on a busy machine). Then the island's own cable is pulled mid-run,
with islands asked for by name so that no timing decides the strategy. ~80 s for both.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from distributed.checkpoint import load_checkpoint
from tests.lab.faults import cut_link, link_down, link_up
from tests.lab.labnet import Lab
from tests.lab.test_lab_faults import events, no_job_processes_left, of, show
from tests.lab.test_lab_faults import start_train as start_fault_train
from tests.lab.test_lab_train import (
    STEPS,
    WIFI_BATCH,
    H,
    check_loss_and_checkpoint,
    read_all,
    sent_between,
    start_train,
)

pytestmark = pytest.mark.timeout(240)


def test_a_cabled_pair_beside_a_wifi_mac_trains_as_islands(lab: Lab, lab_hosts_file: Path, tmp_path: Path) -> None:
    h1, h2 = lab.host("h1"), lab.host("h2")
    # ring_pairs(3): h0.thunderbolt0-h1.thunderbolt1, h1.thunderbolt0-h2.thunderbolt1, h2.thunderbolt0-h0.thunderbolt1
    with cut_link(lab, h1, "thunderbolt0"), cut_link(lab, h2, "thunderbolt0"):
        with start_train(lab, lab_hosts_file, tmp_path, "islands", "auto", f"train.batch_size={WIFI_BATCH}") as proc:
            proc.wait_for(r"strategy \w+: auto: ", timeout=60)
            probed = read_all(lab)  # the link probe is over: from here on, training only
            assert proc.finish(timeout=110) == 0, proc.stdout + proc.stderr
        after = read_all(lab)
    out = proc.stdout
    assert "ring over the network: no Thunderbolt link between h1 and h2" in out, out
    assert "islands: {h0 h1} over Thunderbolt, {h2}: DDP inside each, DiLoCo between them over the network" in out
    assert "strategy islands: auto: " in out and "→ DiLoCo, H=10" in out, out
    assert "done: step 30" in out

    run_dir = tmp_path / "runs" / "islands"
    rows = check_loss_and_checkpoint(run_dir, "islands")
    ckpt = load_checkpoint(run_dir / "checkpoints" / f"step_{STEPS:08d}")
    assert int(ckpt.groups["diloco"]["round"].item()) == STEPS // H
    for key, value in ckpt.groups["model"].items():  # ended on a round boundary: the model is theta
        np.testing.assert_array_equal(np.array(value), np.array(ckpt.groups["diloco"][f"params.{key}"]))

    training = sent_between(probed, after)
    grads = rows[-1]["bytes_sent"]  # rank 0's: its island's allreduces, its exchanges, the small votes
    assert grads > STEPS * 250_000, rows[-1]  # 30 allreduces of ~0.5 MB between two ranks
    # The island's gradients went over the h0-h1 cable; h2 sent next to nothing on its (cut) cables.
    for host in ("h0", "h1"):
        assert training[host]["thunderbolt"] >= 0.6 * grads, (host, training[host], grads)
    # h0 also sends the checkpoints to the master over Wi-Fi; h1 has only logs and heartbeats to send there.
    assert training["h1"]["thunderbolt"] > 3 * training["h1"]["wifi"], training
    assert training["h2"]["thunderbolt"] < 64_000, training["h2"]  # as test_lab_train allows an idle cable
    # h1 is no leader: over Wi-Fi it sends only what every rank sends (logs, heartbeats, the world ring's votes).
    # h2 and h0 carry the islands' exchange (3 rounds of ~0.5 MB).
    assert training["h2"]["wifi"] > 3 * 400_000, training["h2"]
    assert training["h1"]["wifi"] < training["h2"]["wifi"], training


def test_the_islands_cable_pulled_mid_run_restarts_as_flat_diloco_from_the_last_round(
        lab: Lab, tmp_path: Path) -> None:
    h0, h1, h2 = lab.hosts
    with cut_link(lab, h1, "thunderbolt0"), cut_link(lab, h2, "thunderbolt0"):
        run = start_fault_train(lab, tmp_path, "islands-cable", "train.checkpoint_interval=0",
                                "fault.progress_timeout=5", "train.batch_size=64", "strategy.inner_steps=10",
                                "strategy.mode=islands", steps=150)  # asked for: no timing decides it
        try:
            run.wait_for(r"strategy islands: strategy.mode=islands", timeout=90)
            run.wait_for(r"\[rank 0 h0\] checkpoint \S*step_00000030$", timeout=90)  # a round's checkpoint
            link_down(lab, h0, "thunderbolt0")  # the h0-h1 cable: the island's own ring
            code = run.finish(timeout=200)
        finally:
            link_up(lab, h0, "thunderbolt0")
            run.kill()
    out = show(run)
    assert code == 0, out + run.stderr
    evs = events(tmp_path, "islands-cable")
    [fault] = of(evs, "fault")
    assert fault["cause"] in ("stuck", "failed"), fault  # the island's ring hung (watchdog) or broke
    [restart] = of(evs, "restart")
    assert restart["world_size"] == 3 and restart["from_step"] >= 30 and restart["from_step"] % 10 == 0
    # No cable left between any two hosts: the re-plan has no islands, and the three Macs train as DiLoCo workers.
    after = out[out.index("restart 1 of"):]
    assert "ring over the network" in after and "islands: {" not in after
    assert ("strategy diloco: strategy.mode=islands, but the launcher found no Thunderbolt islands beside hosts on "
            "the network (the ring runs over the network) → diloco") in after, after
    assert "resumed from" in after
    assert "[rank 0 h0] step 150/150" in after
    no_job_processes_left(lab)
