"""Training that survives the room: restart from the last checkpoint on the hosts that remain.

torchrun's elastic agent, for a room of Macs. One attempt is one launch (launcher.jobs.api.launch). When it
fails — a rank crashed, a host went silent, the watchdog found the run stuck — and restarts are left
(`fault.max_restarts`), every rank is already stopped; the hosts are surveyed again (connect + probe:
unreachable ones and those failing preflight are dropped, ones that answer again are taken back), the
ring is planned afresh (a pulled Thunderbolt cable sends it to the network, and auto mode re-decides
the strategy from new measurements), and every rank resumes from the newest checkpoint with the data
stream re-sharded for the new world size. Fewer than `fault.min_hosts` hosts left stops the run with
EXIT_TOO_FEW_HOSTS, the checkpoint kept and the command that resumes printed.

Planned stops are not faults: a Mac whose battery runs low asks to leave, and (with `fault.rejoin`) a
dropped host that answers again asks to come back; either way the ranks checkpoint at their next sync
and exit, and the next attempt starts at once without using up a restart.

Every attempt, fault, restart and host lost or regained is appended to runs/<name>/events.jsonl.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from distributed.checkpoint import latest_checkpoint
from distributed.config import Config
from distributed.errors import HostError
from launcher.jobs.api import LaunchSpec, launch
from launcher.jobs.events import EventLog, render_summary
from launcher.jobs.results import RankState, RunResult
from launcher.room.hosts import HostSpec
from launcher.room.survey import RejoinWatcher, survey
from launcher.views.display import render_text

EXIT_TOO_FEW_HOSTS = 4
_STEP_LINE = re.compile(r"^\[rank 0 [^\]]*\] step (\d+)/\d+ ")
# Exit codes of rank-side user errors (config, data, env contract: 2) and of hosts that cannot be prepared
# (3): a restart would fail the same way.
NOT_RESTARTABLE = (2, 3)


@dataclass
class _Outcome:
    """What one attempt means for the next: done, a planned change, or a fault."""

    kind: str  # "done" | "planned" | "fault" | "final"
    cause: str = ""
    rank: int | None = None
    host: str | None = None
    reason: str = ""
    detected_after: float | None = None


def _classify(result: RunResult) -> _Outcome:
    if result.interrupted:
        return _Outcome("final", "interrupted")
    if (result.leaving or result.rejoining) and all(r.state is RankState.SUCCEEDED for r in result.ranks):
        return _Outcome("planned")
    if result.exit_code == 0:
        return _Outcome("done")
    first = result.first_failure
    if first is None:
        return _Outcome("fault", "failed", reason="the run failed without a failing rank")
    cause = {RankState.LOST: "lost", RankState.STUCK: "stuck"}.get(first.state, "failed")
    outcome = _Outcome("fault", cause, first.rank, first.host_name, first.reason, first.detected_after)
    if cause == "failed" and first.exit_code in NOT_RESTARTABLE:
        outcome.kind = "final"  # the rank said the input is wrong: a restart would fail alike
    return outcome


def _is_connection_error(exc: BaseException) -> bool:
    """paramiko's errors (a host that went away mid-launch), told apart without importing paramiko here."""
    return any(cls.__module__.startswith("paramiko") for cls in type(exc).__mro__) or isinstance(exc, EOFError)


def _latest_step(run_dir: Path) -> int:
    found, _ = latest_checkpoint(run_dir / "checkpoints")
    return found.step if found is not None else 0


def train_elastic(cfg: Config, plan: Callable[[Sequence[HostSpec] | None, bool], LaunchSpec], *,
                  hosts: Sequence[HostSpec] | None, resume: bool, accept_new_host_keys: bool,
                  emit: Callable[[str], None], resume_command: str) -> RunResult:
    """Run attempts until the training finishes, is interrupted, or cannot go on; returns the last result.

    `plan(hosts, resume)` builds one attempt's LaunchSpec (see launcher.jobs.training.plan_training).
    """
    fault = cfg.fault
    furthest = [0]  # the highest step a rank-0 progress line showed in this attempt (heartbeats lag up to 2 s)

    def watch_lines(line: str) -> None:
        match = _STEP_LINE.match(line)
        if match:
            furthest[0] = max(furthest[0], int(match.group(1)))
        emit(line)

    all_hosts = list(hosts or [])
    active: list[HostSpec] | None = list(all_hosts) if all_hosts else None
    dropped: dict[str, str] = {}
    spec = plan(active, resume)
    events = EventLog(spec.run_dir / "events.jsonl")
    restarts, attempt = 0, 1
    from_step = _latest_step(spec.run_dir) if resume else 0
    while True:
        watcher = None
        if fault.rejoin and dropped:
            watcher = RejoinWatcher([h for h in all_hosts if h.name in dropped],
                                    accept_new_host_keys=accept_new_host_keys, min_battery=fault.min_battery)
        spec = replace(spec, accept_new_host_keys=accept_new_host_keys, heartbeat_timeout=fault.heartbeat_timeout,
                       progress_timeout=fault.progress_timeout, graceful_stop=True, min_battery=fault.min_battery,
                       keep_checkpoints=cfg.train.keep_checkpoints, rejoin=watcher.ready if watcher else None)
        world = sum(h.slots for h in active) if active else spec.nproc
        events.write("start", attempt=attempt, hosts=[h.name for h in active] if active else None,
                     world_size=world, from_step=from_step)
        furthest[0] = 0
        try:
            result: RunResult | None = launch(spec, emit=watch_lines)
        except Exception as exc:
            if attempt == 1 or not isinstance(exc, (HostError, OSError)) and not _is_connection_error(exc):
                raise  # the first launch's errors are the user's to read, as one line; a bug stays a bug
            why = getattr(exc, "message", None) or f"{type(exc).__name__}: {exc}"
            events.write("fault", attempt=attempt, cause="launch", reason=why)
            emit(f"[macrun] the restart could not launch: {why}")
            result, outcome = None, _Outcome("fault", "launch", reason=why)
        finally:
            if watcher is not None:
                watcher.close()
        last = max(furthest[0], result.last_step or 0) if result is not None else furthest[0]
        if result is not None:
            outcome = _classify(result)
            if outcome.kind == "fault":
                events.write("fault", attempt=attempt, cause=outcome.cause, rank=outcome.rank, host=outcome.host,
                             reason=outcome.reason, detected_after_s=outcome.detected_after, step=last or None)
        if outcome.kind in ("done", "final") or (outcome.kind == "fault" and restarts >= fault.max_restarts):
            assert result is not None or outcome.kind == "fault"
            return _finish(result, outcome, events, emit, restarts, fault.max_restarts, resume_command, spec.run_dir)

        # Another attempt: who takes part, from which checkpoint.
        if outcome.kind == "fault":
            restarts += 1
        leaving = dict(result.leaving) if result is not None else {}
        if all_hosts:
            found = survey([h for h in all_hosts if h.name not in leaving], accept_new_host_keys=accept_new_host_keys,
                           min_battery=fault.min_battery)
            found.dropped.update(leaving)
            for name, why in found.dropped.items():
                if name not in dropped:
                    events.write("host_lost", host=name, reason=why)
                    emit(f"[macrun] {name} is left out: {why}")
            for h in found.usable:
                if h.name in dropped:
                    events.write("host_back", host=h.name)
                    emit(f"[macrun] {h.name} answers again: it takes part from now on")
            dropped, active = found.dropped, found.usable
            if len(active) < max(1, fault.min_hosts):
                return _too_few(result, events, emit, len(active), fault.min_hosts, resume_command, spec.run_dir)
        from_step = _latest_step(spec.run_dir)
        attempt += 1
        spec = plan(active, True)
        events.write("restart", restart=restarts, max_restarts=fault.max_restarts, planned=outcome.kind == "planned",
                     hosts=[h.name for h in active] if active else None,
                     world_size=sum(h.slots for h in active) if active else spec.nproc, from_step=from_step,
                     steps_redone=max(0, last - from_step) if last else None)
        emit(f"[macrun] {'continuing' if outcome.kind == 'planned' else f'restart {restarts} of {fault.max_restarts}'}"
             f": {len(active) if active else spec.nproc} {'host' if active else 'rank'}(s), from the checkpoint at "
             f"step {from_step}")


def _finish(result: RunResult | None, outcome: _Outcome, events: EventLog, emit: Callable[[str], None],
            restarts: int, max_restarts: int, resume_command: str, run_dir: Path) -> RunResult:
    if result is None:  # the last restart could not even launch
        result = RunResult(exit_code=1, ranks=[], interrupted=False, first_failure=None)
    if result.interrupted:
        text = "interrupted"
        if result.stopped_gracefully:
            text += f": stopped at a sync with a checkpoint (step {_latest_step(run_dir)})"
            emit(f"[macrun] stopped with a checkpoint; continue with: {resume_command}")
    elif result.exit_code == 0:
        text = "finished"
    elif outcome.kind == "final":
        text = f"failed, not restarted ({outcome.cause}: the same input would fail again)"
    else:
        text = f"failed after {restarts} restart(s), the most --max-restarts allows ({max_restarts})"
        emit(f"[macrun] giving up after {restarts} restart(s); the checkpoint is kept: {resume_command}")
    events.write("end", outcome=text, exit_code=result.exit_code, restarts=restarts)
    _summarise(events, emit)
    return result


def _too_few(result: RunResult | None, events: EventLog, emit: Callable[[str], None], left: int, needed: int,
             resume_command: str, run_dir: Path) -> RunResult:
    step = _latest_step(run_dir)
    text = (f"stopped: {left} host(s) left, fewer than --min-hosts {needed}; the checkpoint at step {step} is kept "
            f"in {run_dir / 'checkpoints'}")
    events.write("end", outcome=text, exit_code=EXIT_TOO_FEW_HOSTS)
    _summarise(events, emit)
    emit(f"[macrun] {text}")
    emit(f"[macrun] when enough Macs are back, resume with: {resume_command}")
    base = result or RunResult(exit_code=1, ranks=[], interrupted=False, first_failure=None)
    return replace(base, exit_code=EXIT_TOO_FEW_HOSTS)


def _summarise(events: EventLog, emit: Callable[[str], None]) -> None:
    if any(e["event"] in ("fault", "restart", "host_lost", "host_back") for e in events.events):
        emit(render_text(render_summary(events.events)))
        emit(f"[macrun] the full account: {events.path}")
