"""Runs that survive the room, on three emulated hosts: a pulled Thunderbolt cable, a rank killed or frozen, a
host whose Wi-Fi drops and comes back, too few hosts left. Each is a real `macrun train --hosts` run, the fault
injected from outside (tests/lab/faults.py) while it trains; the assertions read what a user reads (exit code,
output) and the run's own account (runs/<name>/events.jsonl).

Model: the tiny GPT, batch 16 x 32 bytes; a step takes ~60 ms with three ranks on this machine's 2 cores.
Timeouts are shortened where a test waits on them (fault.progress_timeout), never where a test checks them
(the heartbeat timeout keeps its default of 10 s).
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from typing import Any

import pytest

from tests.lab.faults import cut_link, link_down, link_up, rank_pids, signal_rank
from tests.lab.labnet import Lab, LabHost, wait_until
from tests.lab.scripts.macrun_proc import MacrunProcess

pytestmark = pytest.mark.timeout(240)

ROOT = Path(__file__).resolve().parents[2]
TINY = ["model.size=tiny", "data.max_bytes=200000", "data.seq_len=32", "train.warmup_steps=5",
        "train.log_interval=10", "train.eval_interval=0", "train.keep_checkpoints=3"]


def start_train(lab: Lab, tmp_path: Path, name: str, *extra: str, link: str = "auto", steps: int = 300,
                options: tuple[str, ...] = ()) -> MacrunProcess:
    hosts = lab.write_hosts_file(tmp_path / "hosts.json")
    args = ["train", "--hosts", str(hosts), "--link", link, *options, str(ROOT / "configs" / "quickstart.yaml")]
    for override in [*TINY, f"train.steps={steps}", f"run.name={name}", *extra]:
        args += ["--set", override]
    return MacrunProcess(args, home=lab.ssh_home, cwd=tmp_path)


def events(tmp_path: Path, name: str) -> list[dict[str, Any]]:
    path = tmp_path / "runs" / name / "events.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def of(evs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [e for e in evs if e["event"] == kind]


def last_checkpoint_step(tmp_path: Path, name: str) -> int:
    steps = [int(p.name.removeprefix("step_")) for p in (tmp_path / "runs" / name / "checkpoints").glob("step_*")]
    return max(steps)


def show(run: MacrunProcess) -> str:
    """The run's output, printed from its first fault on (pytest -s shows it; a failure shows it anyway)."""
    out = run.stdout
    start = out.find("[macrun]")
    print("\n" + out[start:] if start >= 0 else out)
    return out


def no_job_processes_left(lab: Lab, hosts: list[LabHost] | None = None) -> None:
    """Every host ends up with no rank process (bounded wait: a partitioned rank ends itself)."""
    for host in hosts or lab.hosts:
        wait_until(lambda h=host: rank_pids(lab, h) == [], timeout=45, what=f"no rank left on {host.name}")


def test_thunderbolt_cable_pulled_mid_ddp_moves_the_ring_to_the_network_and_finishes(lab: Lab, tmp_path: Path) -> None:
    h1 = lab.hosts[1]
    # Batch 64: a step long enough (~60 ms) that auto mode picks DDP over the cables even when load inflates
    # the measured latency (test_lab_train.py says why).
    run = start_train(lab, tmp_path, "cable", "train.checkpoint_interval=25", "fault.progress_timeout=5",
                      "train.batch_size=64", steps=250)
    try:
        run.wait_for(r"strategy ddp: auto: .* over thunderbolt", timeout=90)
        # The fault comes once the step-50 checkpoint exists (the log line for step 50 can come before it).
        run.wait_for(r"\[rank 0 h0\] checkpoint \S*step_00000050$", timeout=90)
        link_down(lab, h1, "thunderbolt0")
        code = run.finish(timeout=200)
    finally:
        link_up(lab, h1, "thunderbolt0")
        run.kill()
    out = show(run)
    assert code == 0, out + run.stderr
    evs = events(tmp_path, "cable")
    [fault] = of(evs, "fault")
    assert fault["cause"] in ("stuck", "failed"), fault  # a hung collective (watchdog) or a ring error
    [restart] = of(evs, "restart")
    assert restart["world_size"] == 3 and restart["from_step"] >= 50
    # The second attempt planned its ring over Wi-Fi and decided its strategy again from fresh measurements.
    after = out[out.index("restart 1 of"):]
    assert "ring over the network" in after and "strategy " in after and "auto: " in after
    assert "[rank 0 h0] step 250/250" in after
    assert last_checkpoint_step(tmp_path, "cable") == 250
    no_job_processes_left(lab)


def test_kill_9_of_one_rank_mid_diloco_restarts_from_the_last_round_and_finishes(lab: Lab, tmp_path: Path) -> None:
    h2 = lab.hosts[2]
    run = start_train(lab, tmp_path, "kill", "strategy.mode=diloco", "strategy.inner_steps=10",
                      "train.checkpoint_interval=0", link="network", steps=120)
    try:
        # Not rank 0's "step 40" line: DiLoCo ranks run apart within a round, so h2 may not have reached the
        # round-40 sync yet, and killing it then leaves round 30 as the last. The round's checkpoint line says
        # every rank got through it.
        run.wait_for(r"\[rank 0 h0\] checkpoint \S*step_00000040$", timeout=90)
        signal_rank(lab, h2, signal.SIGKILL)
        code = run.finish(timeout=200)
    finally:
        run.kill()
    out = show(run)
    assert code == 0, out + run.stderr
    evs = events(tmp_path, "kill")
    [fault] = of(evs, "fault")
    assert fault["host"] == "h2" or "peer" in fault["reason"], fault  # h2's rank, or a neighbour that saw it go
    [restart] = of(evs, "restart")
    starts = of(evs, "start")
    assert starts[1]["time"] - fault["time"] < 30, (fault, starts)  # restarted within 30 s of the fault
    # DiLoCo checkpoints every round (H=10): the restart redid at most one round.
    assert restart["from_step"] % 10 == 0 and restart["from_step"] >= 40
    assert restart["steps_redone"] is not None and restart["steps_redone"] <= 10, restart
    assert restart["world_size"] == 3  # h2 itself still answers: a new rank runs there
    assert "[rank 0 h0] step 120/120" in out[out.index("restart 1 of"):]
    no_job_processes_left(lab)


def test_a_frozen_rank_is_declared_dead_within_the_heartbeat_timeout_and_the_run_goes_on(
        lab: Lab, tmp_path: Path) -> None:
    h1 = lab.hosts[1]
    run = start_train(lab, tmp_path, "stop", "strategy.mode=diloco", "strategy.inner_steps=10",
                      "train.checkpoint_interval=0", link="network", steps=100)
    stopped: list[int] = []
    try:
        run.wait_for(r"\[rank 0 h0\] step 30/100", timeout=90)
        stopped = signal_rank(lab, h1, signal.SIGSTOP)
        run.wait_for(r"restart 1 of", timeout=60)
        code = run.finish(timeout=200)
    finally:
        for pid in stopped:  # the teardown killed it; SIGCONT is for a test that failed before that
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
        run.kill()
    out = show(run)
    assert code == 0, out + run.stderr
    [fault] = of(events(tmp_path, "stop"), "fault")
    assert fault["cause"] == "lost" and fault["host"] == "h1", fault
    assert "no heartbeat for" in fault["reason"]
    # Declared dead after the 10 s heartbeat timeout, checked about once a second.
    assert 10 <= fault["detected_after_s"] <= 14, fault
    assert "[rank 0 h0] step 100/100" in out[out.index("restart 1 of"):]
    assert all(not lab_pid_alive(pid) for pid in stopped)  # the frozen rank was killed, not left behind
    no_job_processes_left(lab)


def lab_pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False


def test_a_host_off_wifi_is_dropped_then_taken_back_when_it_returns(lab: Lab, tmp_path: Path) -> None:
    h2 = lab.hosts[2]
    run = start_train(lab, tmp_path, "wifi", "strategy.mode=diloco", "strategy.inner_steps=10",
                      "train.checkpoint_interval=0", "fault.rejoin=true", link="network", steps=400)
    try:
        run.wait_for(r"\[rank 0 h0\] step 30/400", timeout=90)
        with cut_link(lab, h2, "wifi0"):
            run.wait_for(r"h2 is left out", timeout=60)
            run.wait_for(r"restart 1 of 3: 2 host\(s\)", timeout=60)
            run.wait_for(r"\[rank 0 h0\] step \d+/400", timeout=60)  # training goes on without h2
        run.wait_for(r"h2 answers again", timeout=60)
        code = run.finish(timeout=200)
    finally:
        link_up(lab, h2, "wifi0")
        run.kill()
    out = show(run)
    assert code == 0, out + run.stderr
    evs = events(tmp_path, "wifi")
    assert [e["host"] for e in of(evs, "host_lost")] == ["h2"]
    assert [e["host"] for e in of(evs, "host_back")] == ["h2"]
    worlds = [e["world_size"] for e in of(evs, "start")]
    assert worlds[0] == 3 and 2 in worlds and worlds[-1] == 3, worlds
    # Taking h2 back was a planned stop at a sync: it used up no restart.
    assert [e["planned"] for e in of(evs, "restart")] == [False, True]
    assert "[rank 0 h0] step 400/400" in out
    no_job_processes_left(lab)  # h2's old rank, cut off from the launcher, ended itself


def test_fewer_hosts_than_min_hosts_stops_with_exit_4_the_checkpoint_and_the_resume_command(
        lab: Lab, tmp_path: Path) -> None:
    h2 = lab.hosts[2]
    run = start_train(lab, tmp_path, "few", "strategy.mode=diloco", "strategy.inner_steps=10",
                      "train.checkpoint_interval=0", link="network", steps=400, options=("--min-hosts", "3"))
    try:
        run.wait_for(r"\[rank 0 h0\] step 30/400", timeout=90)
        with cut_link(lab, h2, "wifi0"):
            code = run.finish(timeout=120)
    finally:
        run.kill()
    out = show(run)
    assert code == 4, out + run.stderr
    step = last_checkpoint_step(tmp_path, "few")
    assert step >= 30 and step % 10 == 0
    assert f"stopped: 2 host(s) left, fewer than --min-hosts 3; the checkpoint at step {step} is kept" in out
    resume = out[out.index("resume with: ") + len("resume with: "):].splitlines()[0]
    assert resume.startswith("macrun train --hosts ") and resume.endswith("--resume") and "--min-hosts 3" in resume
    [end] = of(events(tmp_path, "few"), "end")
    assert end["exit_code"] == 4
    no_job_processes_left(lab)
