"""A soak: 20 faults on a seeded random schedule in one `macrun train --hosts` run on three lab hosts.

Kinds, each five times: SIGKILL a rank, SIGSTOP it, pull a host's Thunderbolt cables (back once the run has
moved on), drop a host's Wi-Fi (back once the run goes on without it; fault.rejoin takes it back at a sync).
Any host may be hit, rank 0's included (its checkpoints are copied to the master as they are written). Each
fault is injected once training has resumed from the previous one. Detection is shortened (heartbeat 6 s,
progress 5 s) to fit 20 faults in the time; tests/lab/test_lab_faults.py checks the defaults.

A host cut off from the launcher (its Wi-Fi down) may go on training over its cables until it is declared
lost, and what it does then cannot be saved: such a restart redoes those steps too.

What must hold: every step is done; every restart resumed from the checkpoint its event names; no job
process is left on any host; the final validation loss is within 5% of a fault-free run of the same
config and seed (run first, in the same test). DDP throughout (strategy.mode=ddp), over the cables or the
network as the ring falls, so the two runs differ only by the faults. Bounded: the run with the faults
at most 15 minutes (the fault-free reference before it at most 8).
"""

from __future__ import annotations

import json
import re
import signal
import time
from pathlib import Path

import pytest

from tests.lab.faults import FAULT_KINDS, Fault, FaultSchedule, link_down, link_up, rank_pids, signal_rank
from tests.lab.labnet import Lab, wait_until
from tests.lab.scripts.macrun_proc import MacrunProcess

pytestmark = pytest.mark.timeout(1440)  # about 10 min on a quiet 2-core box; room for a busy one

ROOT = Path(__file__).resolve().parents[2]
SEED, FAULTS, STEPS = 11, 20, 1600
SOAK_BOUND_S = 900  # the run with the faults, from its start to its end
CONFIG = ["model.size=tiny", "data.max_bytes=200000", "data.seq_len=32", "train.warmup_steps=20",
          f"train.steps={STEPS}", "train.log_interval=10", "train.eval_interval=0", "train.checkpoint_interval=20",
          "train.keep_checkpoints=3", "strategy.mode=ddp", "fault.max_restarts=40", "fault.progress_timeout=5",
          "fault.rejoin=true", "fault.launcher_timeout=15",
          "fault.heartbeat_timeout=6"]
STEP_LINE = r"\[rank 0 \w+\] step (\d+)/" + str(STEPS)
DONE = re.compile(r"\] done: step (\d+) · loss [0-9.]+ · val ([0-9.]+)")


def start(lab: Lab, tmp_path: Path, name: str) -> MacrunProcess:
    hosts = lab.write_hosts_file(tmp_path / "hosts.json")
    args = ["train", "--hosts", str(hosts), str(ROOT / "configs" / "quickstart.yaml")]
    for override in [*CONFIG, f"run.name={name}"]:
        args += ["--set", override]
    return MacrunProcess(args, home=lab.ssh_home, cwd=tmp_path)


def no_adjacent_cables(faults: list[Fault]) -> list[Fault]:
    """A pulled cable moves the ring to the network until the next restart, so a second pull right after it
    would hit a cable the ring no longer uses: keep cable faults apart (deterministically)."""
    out: list[Fault] = []
    pending = list(faults)
    while pending:
        pick = next((f for f in pending if not (f.kind == "cable" and out and out[-1].kind == "cable")), pending[0])
        pending.remove(pick)
        out.append(pick)
    return out


def resumed_by_attempt(output: str) -> list[int | None]:
    """The step each restarted attempt resumed from, in order; None for an attempt a fault stopped before it
    had resumed (on a busy machine a fault can land while the new attempt's ranks are still starting)."""
    attempts = re.split(r"\[macrun\] restart \d+ of", output)[1:]
    found = [re.search(r"resumed from \S+/step_\d+ \(step (\d+)\)", a) for a in attempts]
    return [int(m.group(1)) if m else None for m in found]


def test_twenty_faults_in_one_run_lose_nothing_and_leave_nothing(lab: Lab, tmp_path: Path) -> None:
    began = time.monotonic()
    reference = start(lab, tmp_path, "calm")
    try:
        assert reference.finish(timeout=480) == 0, reference.stdout + reference.stderr
    finally:
        reference.kill()
    calm = DONE.search(reference.stdout)
    assert calm is not None and int(calm.group(1)) == STEPS, reference.stdout

    plan = no_adjacent_cables(FaultSchedule(seed=SEED, count=FAULTS, kinds=FAULT_KINDS, hosts=(0, 1, 2),
                                            min_delay_s=1.0, max_delay_s=3.0).faults())
    soak_began = time.monotonic()
    calm_s = soak_began - began
    run = start(lab, tmp_path, "soak")
    injected: list[tuple[str, str, float]] = []
    down: list[tuple[int, str]] = []  # links to bring back
    try:
        for fault in plan:
            restarts = run.stdout.count("[macrun] restart ")
            seen = len(re.findall(STEP_LINE, run.stdout))
            # Training is going (a new step line since the last fault), then the schedule's pause.
            wait_until(lambda s=seen: len(re.findall(STEP_LINE, run.stdout)) > s or run.proc.poll() is not None,
                       timeout=120, what="training to go on")
            assert run.proc.poll() is None, (f"the run ended before fault {len(injected) + 1}:\n{run.stdout[-8000:]}"
                                             f"\n{run.stderr[-4000:]}")
            time.sleep(fault.delay_s)  # the schedule's pause between faults, not a synchronisation
            # A planned restart (a dropped host taken back at a checkpoint) may be between attempts right now,
            # with no rank on any host: wait for the next attempt's ranks rather than hit nothing.
            wait_until(lambda: any(rank_pids(lab, h) for h in lab.hosts) or run.proc.poll() is not None,
                       timeout=120, what="ranks running on some host")
            assert run.proc.poll() is None, f"the run ended before fault {len(injected) + 1}:\n{run.stdout[-8000:]}"
            host = lab.hosts[fault.host]
            if not rank_pids(lab, host):  # that host is out of the run right now: hit one that is in it
                host = next(h for h in lab.hosts if rank_pids(lab, h))
            restarts = run.stdout.count("[macrun] restart ")  # a planned restart before this point is not this fault's
            kind = fault.kind
            rings = re.findall(r"^ring over (Thunderbolt|the network)", run.stdout, re.MULTILINE)
            if kind == "cable" and rings and rings[-1] != "Thunderbolt":
                kind = "kill"  # the ring runs over Wi-Fi right now (a cable was just pulled): no cable to pull
            t0 = time.monotonic()
            if kind == "kill":
                signal_rank(lab, host, signal.SIGKILL)
            elif kind == "stop":
                signal_rank(lab, host, signal.SIGSTOP)
            else:  # every cable of the host, so the ring's is among them whoever its neighbours are now
                for iface in (["thunderbolt0", "thunderbolt1"] if kind == "cable" else ["wifi0"]):
                    link_down(lab, host, iface)
                    down.append((lab.hosts.index(host), iface))
            wait_until(lambda r=restarts: run.stdout.count("[macrun] restart ") > r or run.proc.poll() is not None,
                       timeout=90, what=f"a restart after {kind} on {host.name}")
            injected.append((kind, host.name, round(time.monotonic() - t0, 1)))
            for index, iface in down:  # the run has moved on: the cable or the Wi-Fi comes back
                link_up(lab, lab.hosts[index], iface)
            down.clear()
        code = run.finish(timeout=max(60.0, SOAK_BOUND_S - (time.monotonic() - soak_began)))
    finally:
        for index, iface in down:
            link_up(lab, lab.hosts[index], iface)
        run.kill()
    out = run.stdout
    events = [json.loads(line) for line in (tmp_path / "runs" / "soak" / "events.jsonl").read_text().splitlines()]
    faults = [e for e in events if e["event"] == "fault"]
    restarts = [e for e in events if e["event"] == "restart"]
    print(f"\nsoak: {len(injected)} faults injected (kind, host, seconds to restart): {injected}")
    print("causes detected: " + ", ".join(f"{e['cause']} {e.get('host')} after {e.get('detected_after_s') or 0:.1f} s"
                                          for e in faults))
    print(f"restarts: {len(restarts)} ({sum(e['planned'] for e in restarts)} planned), steps redone: "
          f"{sum(e['steps_redone'] or 0 for e in restarts)}, fault-free run {calm_s:.0f} s, "
          f"run with faults {time.monotonic() - soak_began:.0f} s")
    assert code == 0, out[-6000:] + run.stderr
    assert len(injected) == FAULTS and len(faults) >= FAULTS
    # Every resume started from the checkpoint its restart event names; the last attempt, which finished, did resume.
    resumed = resumed_by_attempt(out)
    named = [e["from_step"] for e in restarts]
    assert len(resumed) == len(named) and resumed[-1] == named[-1], (resumed, named)
    assert all(r is None or r == n for r, n in zip(resumed, named, strict=True)), (resumed, named)
    done = DONE.search(out[out.rindex("] done: "):] if "] done: " in out else "")
    assert done is not None and int(done.group(1)) == STEPS
    soak_val, calm_val = float(done.group(2)), float(calm.group(2))
    print(f"final validation loss: {soak_val:.4f} with faults, {calm_val:.4f} without ({soak_val / calm_val - 1:+.1%})")
    assert abs(soak_val / calm_val - 1) <= 0.05
    for host in lab.hosts:
        wait_until(lambda h=host: rank_pids(lab, h) == [], timeout=30, what=f"no rank left on {host.name}")
