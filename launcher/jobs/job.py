"""Job control: start every rank, stream its output, watch for failure, tear down, report truthfully.

The agent half of torchrun, for one process per rank on local or remote hosts. `run_ranks` starts
each rank's shim (launcher/transport/ranks.py, distributed/rankshim.py), streams every output line to `emit`
as `[rank R host] line` and to `log_dir/rank-R.log`, and watches three things: exits, lost SSH
channels and (when given) rendezvous heartbeats. The first rank to fail is the root cause; every
other rank is then asked to stop ("TERM": SIGTERM to its process group), and after `grace` seconds
stopped hard (SIGKILL to the group, the shim ended). Ctrl-C does the same. Threads read output and
wait for exits (launcher/jobs/rankio.py: shims are started on all hosts at once); they talk to the one
monitor loop through a queue, so all state changes happen in one place.

    result = run_ranks(local_rank_specs(argv, 2, env_for, cwd, sys.executable), log_dir=..., emit=print)
    sys.exit(result.exit_code)   # 0 all succeeded, 1 a rank failed or was lost, 130 Ctrl-C
"""

from __future__ import annotations

import os
import queue
import secrets
import signal
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from distributed.errors import ConfigError
from launcher.jobs.rankio import Event, RankStreams, TrackedRank, start_shims
from launcher.jobs.results import RankResult, RankState, RunResult, describe_exit, render_failure_table
from launcher.jobs.watchdog import Watch, find_stuck
from launcher.transport.ranks import (
    LocalLauncher,
    RankHandle,
    RankLauncher,
    RankSpec,
    SSHLauncher,
    launchers_for,
    shim_request,
)

__all__ = ["RankSpec", "RankState", "RankResult", "RunResult", "RankLauncher", "RankHandle", "LocalLauncher",
           "SSHLauncher", "Watch", "run_ranks", "render_failure_table", "local_rank_specs"]

HARD_STOP_MARGIN_S = 1.0  # after grace, leave the shim a moment to SIGKILL (and report) on its own
KILL_WAIT_S = 5.0  # after a hard stop, how long to wait for an exit before giving the rank up
SIGNAL_POLL_S = 0.1  # how soon the monitor acts on a Ctrl-C (or SIGTERM) that its handler noted
DRAIN_S = 2.0  # after an exit, how long to wait for the last output (a leftover may hold the pipe)
EXIT_INTERRUPTED = 130


class _Monitor:
    """One run: the event loop behind run_ranks."""

    def __init__(self, specs: Sequence[RankSpec], launchers: Mapping[str, RankLauncher] | None,
                 log_dir: Path, emit: Callable[[str], None],
                 heartbeat_ages: Callable[[], dict[int, float]] | None,
                 heartbeat_timeout: float, grace: float, watch: Watch | None = None) -> None:
        ranks = [spec.rank for spec in specs]
        if not specs:
            raise ConfigError("there are no ranks to run", hint="give at least one rank (nproc >= 1)")
        if len(set(ranks)) != len(ranks):
            raise ConfigError(f"rank numbers repeat: {sorted(ranks)}", hint="give every rank its own number")
        self.launchers = launchers_for(list(specs), launchers)
        self.emit = emit
        self.heartbeat_ages = heartbeat_ages
        self.heartbeat_timeout = heartbeat_timeout
        self.grace = grace
        self.watch = watch or Watch()
        self.graceful_requested = False
        self.leaving: dict[str, str] = {}  # host -> why it must leave (its ranks reported it)
        self.rejoining: list[str] = []  # dropped hosts that answer again (fault.rejoin)
        self.events: queue.Queue[Event] = queue.Queue()
        self.emit_lock = threading.Lock()
        # A token only this run knows marks the shim's own report lines, so no rank output can fake one.
        self.report = f"macrun-rankshim-{secrets.token_hex(8)}"
        self.streams = RankStreams(emit, self.emit_lock, self.events, self.report)
        log_dir.mkdir(parents=True, exist_ok=True)
        self.ranks: dict[int, TrackedRank] = {}
        for spec in sorted(specs, key=lambda s: s.rank):
            path = log_dir / f"rank-{spec.rank}.log"
            self.ranks[spec.rank] = TrackedRank(spec=spec, log=path.open("w", encoding="utf-8", buffering=1),
                                                log_path=path)
        self.first_failure: TrackedRank | None = None
        self.interrupted = False
        self.signals_seen = 0  # bumped by the signal handler; nothing else may happen in a handler
        self.signals_handled = 0
        self.last_signal = signal.SIGINT
        self.handles_signals = False
        self.teardown_reason: str | None = None
        self.hard_stop_at: float | None = None
        self.give_up_at: float | None = None
        self.next_heartbeat_check = 0.0

    # -- the loop ---------------------------------------------------------------------------------------

    def _on_signal(self, signum: int, frame: object) -> None:
        # Only count: a handler runs between any two bytecodes of the main thread, maybe while it holds
        # a lock (the event queue's, the console's), so it must neither take one nor raise.
        self.signals_seen += 1
        self.last_signal = signum

    def _install_signal_handlers(self) -> dict[int, object]:
        """SIGINT/SIGTERM become teardown requests the loop acts on, instead of a KeyboardInterrupt that
        could land half-way through handling an event. Only the main thread may install handlers."""
        if threading.current_thread() is not threading.main_thread():
            return {}
        previous = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
        self.handles_signals = True
        return previous

    def run(self) -> RunResult:
        previous = self._install_signal_handlers()
        try:
            try:
                self._start_all()
            except KeyboardInterrupt:  # only without our handlers (not the main thread)
                self._interrupt()
            while not all(r.final for r in self.ranks.values()):
                while self.signals_handled < self.signals_seen:
                    self.signals_handled += 1
                    self._interrupt()
                try:
                    self._step()
                except KeyboardInterrupt:
                    self._interrupt()
        except BaseException:
            # A bug or an error from a callback: never leave ranks running behind an exception.
            for r in self.ranks.values():
                if r.handle is not None and r.exited_at is None:
                    r.handle.hard_stop(r.pgid, r.shim_pid)
            raise
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)  # type: ignore[arg-type]
            self._close()
        if self.signals_handled < self.signals_seen:
            self.interrupted = True  # a signal in the very last moment still counts
        return self._result()

    def _step(self) -> None:
        try:
            kind, rank, value = self.events.get(timeout=self._next_timeout())
        except queue.Empty:
            pass
        else:
            self._on_event(kind, self.ranks[rank], value)
        now = time.monotonic()
        if (self.heartbeat_ages is not None or self.watch.progress is not None) and now >= self.next_heartbeat_check:
            self.next_heartbeat_check = now + min(1.0, self.heartbeat_timeout / 4)
            if self.heartbeat_ages is not None:
                self._check_heartbeats()
            if self.watch.progress is not None:
                self._check_progress()
        self._check_deadlines(now)

    def _next_timeout(self) -> float:
        now = time.monotonic()
        deadlines = [now + (SIGNAL_POLL_S if self.handles_signals else 1.0)]
        if self.heartbeat_ages is not None or self.watch.progress is not None:
            deadlines.append(self.next_heartbeat_check)
        for at in (self.hard_stop_at, self.give_up_at):
            if at is not None:
                deadlines.append(at)
        deadlines += [r.exited_at + DRAIN_S for r in self.ranks.values()
                      if r.exited_at is not None and not r.final]
        return max(0.01, min(deadlines) - now)

    # -- starting ---------------------------------------------------------------------------------------

    def _start_all(self) -> None:
        started = start_shims(list(self.ranks.values()), self.launchers,
                              lambda spec: shim_request(spec, grace=self.grace, report=self.report))
        for rank, r in self.ranks.items():  # in rank order, as if one after another: the first failure leads
            outcome = started.get(rank)
            if outcome is None:
                r.reason = "not started: the run was stopped before its turn"
                r.final = True
            elif isinstance(outcome, Exception):
                r.state, r.reason, r.final = RankState.FAILED, f"could not start: {outcome}", True
                r.started = r.ended = r.exited_at = time.monotonic()
                self._fail(r)
            else:
                r.handle, r.state, r.started, r.open_streams = outcome, RankState.RUNNING, time.monotonic(), 2
                self.streams.follow(r, outcome)
                if self.teardown_reason is not None:  # started on another host while this one failed
                    r.stop_sent = True
                    outcome.request_stop()

    # -- state changes (monitor thread only) --------------------------------------------------------------

    def _on_event(self, kind: str, r: TrackedRank, value: int | None) -> None:
        now = time.monotonic()
        if kind == "eof":
            r.open_streams -= 1
        elif r.exited_at is None and kind == "exit":
            assert value is not None
            r.exited_at, r.exit_code = now, value
            if r.state in (RankState.LOST, RankState.STUCK):
                pass  # lost (heartbeats) or stuck (watchdog) first: that stays the cause
            elif r.stop_sent:
                r.state = RankState.KILLED
            elif value == 0:
                r.state = RankState.SUCCEEDED
            else:
                r.state = RankState.FAILED
                self._fail(r)
        elif r.exited_at is None and kind == "lost":
            r.exited_at = now
            if r.state is not RankState.LOST:
                r.state = RankState.KILLED if r.stop_sent else RankState.LOST
                r.reason = f"lost the connection to host {r.spec.host_name}"
                if r.state is RankState.LOST:
                    self._fail(r)
        if r.exited_at is not None and not r.final and r.open_streams <= 0:
            self._finish(r, now)

    def _check_heartbeats(self) -> None:
        assert self.heartbeat_ages is not None
        ages = self.heartbeat_ages()
        for r in self.ranks.values():
            age = ages.get(r.spec.rank)
            if (age is not None and age > self.heartbeat_timeout and r.state is RankState.RUNNING
                    and r.exited_at is None and not r.stop_sent):
                r.state = RankState.LOST
                r.reason = (f"no heartbeat for {age:.1f} s (timeout {self.heartbeat_timeout:g} s): "
                            f"host {r.spec.host_name} frozen, asleep or cut off")
                r.detected_after = age
                self._fail(r)

    def _check_progress(self) -> None:
        """The watchdog (see launcher/jobs/watchdog.py): a stuck run fails, its furthest-behind rank(s) the cause."""
        assert self.watch.progress is not None
        if self.teardown_reason is not None:
            return
        report = self.watch.progress()
        for rank, p in sorted(report.items()):
            host = self.ranks[rank].spec.host_name if rank in self.ranks else "?"
            if p.get("leave") and host not in self.leaving:  # e.g. a Mac on battery below fault.min_battery
                self.leaving[host] = str(p["leave"])
                self._notice(f"{host} must leave the run: {p['leave']}")
                if not self.graceful_requested and self.watch.request_stop is not None:
                    self.graceful_requested = True
                    self.watch.request_stop()
                    self._notice("stopping: every rank saves a checkpoint at its next sync; the run then goes on "
                                 "without that Mac")
        if self.watch.rejoin is not None and not self.rejoining and not self.graceful_requested:
            self.rejoining = self.watch.rejoin()
            if self.rejoining and self.watch.request_stop is not None:
                self.graceful_requested = True
                self.watch.request_stop()
                self._notice(f"{', '.join(self.rejoining)} answer{'s' if len(self.rejoining) == 1 else ''} again: "
                             "every rank saves a checkpoint at its next sync, then the run goes on with it")
        # The watchdog stays on during a graceful stop: the ranks agree to stop in a collective, and a pulled
        # cable can hang that one as well as any other.
        live = [r for r in self.ranks.values() if r.state is RankState.RUNNING and r.exited_at is None]
        if len(live) != len(self.ranks):
            return  # a rank ended: the run is finishing, or its failure is handled elsewhere
        stuck = find_stuck(report, [r.spec.rank for r in live], self.watch.timeout_for)
        if stuck is None:
            return
        culprits = [self.ranks[rank] for rank in stuck.culprits]
        for r in culprits:
            r.state, r.detected_after, r.reason = RankState.STUCK, stuck.stalled, stuck.reasons[r.spec.rank]
        self._notice(stuck.notice({r.spec.rank: r.spec.host_name for r in live}))
        for r in culprits:
            self._fail(r)

    def _check_deadlines(self, now: float) -> None:
        for r in self.ranks.values():
            if r.exited_at is not None and not r.final and now >= r.exited_at + DRAIN_S:
                self._finish(r, now)  # a leftover process still holds its output open: stop waiting
        if self.hard_stop_at is not None and now >= self.hard_stop_at:
            self.hard_stop_at = None
            self.give_up_at = now + KILL_WAIT_S
            for r in self.ranks.values():
                if r.handle is not None and r.exited_at is None:
                    r.handle.hard_stop(r.pgid, r.shim_pid)
        waiting = [r for r in self.ranks.values() if not r.final]
        if (self.teardown_reason is not None and waiting
                and all(r.state is RankState.LOST and r.exited_at is None for r in waiting)):
            # Only ranks whose hosts stopped answering are left: no exit will be reported. Their shims stop
            # them (a lost channel is EOF, a TERM that arrived escalates), a rank cut off from the launcher
            # ends itself; waiting out the grace period here would only delay the restart.
            for r in waiting:
                if r.handle is not None:
                    r.handle.hard_stop(r.pgid, r.shim_pid)  # in a thread: it may never get through
                r.exited_at = now
                self._finish(r, now)
        if self.give_up_at is not None and now >= self.give_up_at:
            for r in self.ranks.values():
                if not r.final:
                    if r.state is RankState.RUNNING:
                        r.state = RankState.KILLED
                    r.reason = r.reason or f"no exit reported {KILL_WAIT_S:g} s after SIGKILL"
                    r.exited_at = r.exited_at or now
                    self._finish(r, now)

    def _fail(self, r: TrackedRank) -> None:
        if self.first_failure is None:
            self.first_failure = r
        if self.teardown_reason is None:
            self._teardown(f"rank {r.spec.rank} ({r.spec.host_name}) failed")

    def _interrupt(self) -> None:
        tearing_down = self.teardown_reason is not None
        self.interrupted = True
        if not tearing_down and not self.graceful_requested and self.watch.request_stop is not None:
            # First Ctrl-C of a training run: the ranks checkpoint at their next sync and exit on their own.
            self.graceful_requested = True
            self.watch.request_stop()
            self._notice("stopping: every rank saves a checkpoint at its next sync and exits "
                         "(Ctrl-C again to stop at once, losing what is not saved)")
            return
        if tearing_down:  # a second Ctrl-C, or one during a failure's teardown: stop waiting for grace
            if self.give_up_at is None:
                self.hard_stop_at = time.monotonic()
            return
        self._teardown("interrupted (Ctrl-C)" if self.last_signal == signal.SIGINT
                       else f"interrupted ({signal.Signals(self.last_signal).name})")

    def _teardown(self, reason: str) -> None:
        """Ask every running rank to stop; the hard stop follows after the grace period."""
        self.teardown_reason = reason
        self.hard_stop_at = time.monotonic() + self.grace + HARD_STOP_MARGIN_S
        running = [r for r in self.ranks.values() if r.handle is not None and r.exited_at is None]
        for r in running:
            r.stop_sent = True
            assert r.handle is not None
            r.handle.request_stop()
        others = [r for r in running if r is not self.first_failure]
        if others:
            self._notice(f"{reason}; stopping {len(others)} other rank{'s' if len(others) > 1 else ''}")

    def _finish(self, r: TrackedRank, now: float) -> None:
        r.final = True
        r.ended = r.exited_at or now
        if r.state is RankState.FAILED and not r.reason and r.exit_code is not None:
            r.reason = describe_exit(r.exit_code)
            shim_error = next((line for line in reversed(r.lines) if line.startswith("macrun: ")), None)
            if r.exit_code == 127 and shim_error:
                r.reason += f": {shim_error.removeprefix('macrun: ')}"
        elif r.state is RankState.KILLED and not r.reason:
            code = f", {describe_exit(r.exit_code)}" if r.exit_code is not None else ""
            r.reason = f"stopped by macrun: {self.teardown_reason}{code}"
        elif r.state in (RankState.LOST, RankState.STUCK) and r.exit_code is not None:
            r.reason += f"; then {describe_exit(r.exit_code)}"

    def _notice(self, message: str) -> None:
        with self.emit_lock:
            try:
                self.emit(f"[macrun] {message}")
            except Exception:
                pass

    def _close(self) -> None:
        for r in self.ranks.values():
            with r.lock:
                r.detached = True
                r.log.close()
            if r.handle is not None:
                r.handle.close()

    def _result(self) -> RunResult:
        results = {rank: r.result() for rank, r in self.ranks.items()}
        if self.interrupted:
            code = EXIT_INTERRUPTED
        elif all(r.state is RankState.SUCCEEDED for r in results.values()):
            code = 0
        else:
            code = 1
        first = results[self.first_failure.spec.rank] if self.first_failure is not None else None
        progress = {}
        if self.watch.progress is not None:
            try:
                progress = self.watch.progress()
            except Exception:  # the record is best effort; the result itself must come back
                progress = {}
        graceful = (self.graceful_requested and self.teardown_reason is None
                    and all(r.state is RankState.SUCCEEDED for r in results.values()))
        return RunResult(exit_code=code, ranks=list(results.values()), interrupted=self.interrupted,
                         first_failure=first, progress=progress, stopped_gracefully=graceful,
                         leaving=dict(self.leaving), rejoining=list(self.rejoining))


def run_ranks(
    specs: Sequence[RankSpec],
    *,
    launchers: Mapping[str, RankLauncher] | None = None,
    log_dir: Path,
    emit: Callable[[str], None],
    heartbeat_ages: Callable[[], dict[int, float]] | None = None,
    heartbeat_timeout: float = 30.0,
    grace: float = 5.0,
    watch: Watch | None = None,
) -> RunResult:
    """Run every rank to the end and say truthfully how it went.

    `launchers` maps host names to launchers (None: every rank local). `emit` gets each output line as
    `[rank R host] line` (plus `[macrun] ...` notices), one call at a time, from reader threads.
    `heartbeat_ages` (e.g. StoreServer.heartbeat_ages) gives seconds since each rank's last heartbeat;
    a rank that has sent heartbeats and then goes quiet for `heartbeat_timeout` is LOST. The first
    failure stops the others (SIGTERM, SIGKILL after `grace`); so does Ctrl-C, which this function
    absorbs (exit code 130) instead of raising. `watch` adds the progress watchdog and the graceful
    first Ctrl-C of training runs (see Watch).
    """
    monitor = _Monitor(specs, launchers, Path(log_dir), emit, heartbeat_ages, heartbeat_timeout, grace, watch)
    return monitor.run()


def local_rank_specs(argv: Sequence[str], nproc: int, base_env_for_rank: Callable[[int], dict[str, str]],
                     cwd: str, python: str, *, host_name: str = "local") -> list[RankSpec]:
    """`nproc` ranks on this machine, rank r with local rank r and the env `base_env_for_rank(r)`."""
    if nproc < 1:
        raise ConfigError(f"nproc is {nproc}", hint="run at least one process (nproc >= 1)")
    cwd = os.path.abspath(cwd)  # the shim itself runs elsewhere (where `distributed` is importable)
    return [RankSpec(rank=r, host_name=host_name, local_rank=r, argv=list(argv),
                     env=dict(base_env_for_rank(r)), cwd=cwd, python=python) for r in range(nproc)]
