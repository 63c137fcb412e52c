"""One rank's side of job control: its book-keeping, starting its shim, and the threads that read and wait on it.

launcher/jobs/job.py owns every decision (failure, teardown, the result) in one monitor loop; what happens
here runs in other threads and only reports: shims are started host by host in parallel (each start is
a channel open and an exec, a round trip or two per rank over SSH), output lines are forwarded and
logged, and exits or lost channels become events on the monitor's queue.
"""

from __future__ import annotations

import queue
import threading
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TextIO

from launcher.jobs.results import RankResult, RankState
from launcher.transport.ranks import RankHandle, RankLauncher, RankSpec

LAST_LINES = 20
LOST_POLL_S = 0.5  # how often a remote rank's channel is checked while waiting for its exit

Event = tuple[str, int, int | None]  # ("eof" | "exit" | "lost", rank, exit code)


@dataclass
class TrackedRank:
    """The monitor's book-keeping for one rank (touched by reader threads only under `lock`)."""

    spec: RankSpec
    log: TextIO
    log_path: Path
    handle: RankHandle | None = None
    state: RankState = RankState.PENDING
    exit_code: int | None = None
    started: float | None = None
    ended: float | None = None
    reason: str = ""
    lines: deque[str] = field(default_factory=lambda: deque(maxlen=LAST_LINES))
    lock: threading.Lock = field(default_factory=threading.Lock)
    detected_after: float | None = None  # LOST/STUCK: the silence or stall that decided it
    pgid: int | None = None  # the rank's process group on its host, as its shim reported it
    shim_pid: int | None = None  # the shim's pid on its host, as it reported it
    open_streams: int = 0
    exited_at: float | None = None  # exit or loss observed
    stop_sent: bool = False
    final: bool = False
    detached: bool = False  # its output is no longer wanted (the run is over)

    def result(self) -> RankResult:
        return RankResult(rank=self.spec.rank, host_name=self.spec.host_name, state=self.state,
                          exit_code=self.exit_code, started=self.started, ended=self.ended,
                          reason=self.reason, last_lines=list(self.lines), log_path=self.log_path,
                          detected_after=self.detected_after)


Started = RankHandle | Exception | None  # a running shim, why it could not start, or None: not tried


def start_shims(ranks: Sequence[TrackedRank], launchers: Mapping[int, RankLauncher],
                request: Callable[[RankSpec], bytes]) -> dict[int, Started]:
    """Start every rank's shim: the ranks of one launcher (one host) in rank order, the hosts in parallel.

    A host stops at its first rank that cannot start: its later ranks are not tried (None), as the run is
    over; ranks already started elsewhere are the monitor's to stop. Only Exceptions are caught.
    """
    groups: dict[int, list[TrackedRank]] = {}
    for r in ranks:
        groups.setdefault(id(launchers[r.spec.rank]), []).append(r)

    def start_group(group: list[TrackedRank]) -> dict[int, Started]:
        out: dict[int, Started] = {}
        for r in group:
            if any(isinstance(v, Exception) for v in out.values()):
                out[r.spec.rank] = None
                continue
            try:
                out[r.spec.rank] = launchers[r.spec.rank].start(r.spec, request(r.spec))
            except Exception as exc:  # an OSError locally, a MacrunError from SSH: this rank failed
                out[r.spec.rank] = exc
        return out

    if len(groups) == 1:
        return start_group(next(iter(groups.values())))
    started: dict[int, Started] = {}
    with ThreadPoolExecutor(max_workers=min(32, len(groups)), thread_name_prefix="rank-start") as pool:
        for part in pool.map(start_group, groups.values()):
            started.update(part)
    return started


class RankStreams:
    """The threads of running ranks: forward each output line, note the shim's report, wait for the exit."""

    def __init__(self, emit: Callable[[str], None], emit_lock: threading.Lock, events: queue.Queue[Event],
                 report: str) -> None:
        self.emit = emit
        self.emit_lock = emit_lock
        self.events = events
        self.report = report  # the token that marks the shim's own report line (see launcher/jobs/job.py)

    def follow(self, r: TrackedRank, handle: RankHandle) -> None:
        """Start reading both streams of `handle` and waiting for its exit."""
        for stream, is_err in ((handle.stdout, False), (handle.stderr, True)):
            threading.Thread(target=self._read, args=(r, stream, is_err), daemon=True,
                             name=f"rank-{r.spec.rank}-{'err' if is_err else 'out'}").start()
        threading.Thread(target=self._wait, args=(r, handle), daemon=True, name=f"rank-{r.spec.rank}-wait").start()

    def _read(self, r: TrackedRank, stream: IO[bytes], is_err: bool) -> None:
        """Forward one output stream line by line; a last line without newline is flushed at EOF."""
        prefix = f"[rank {r.spec.rank} {r.spec.host_name}] "
        try:
            for raw in stream:
                text = raw.decode("utf-8", "replace").rstrip("\n").removesuffix("\r")
                if is_err and self.report in text:
                    text, _, report = text.partition(self.report)
                    fields = dict(item.partition("=")[::2] for item in report.split())
                    if fields.get("pgid", "").isdigit() and fields.get("shim", "").isdigit():
                        r.pgid, r.shim_pid = int(fields["pgid"]), int(fields["shim"])
                    if not text:
                        continue
                with r.lock:
                    if r.detached:
                        continue
                    r.lines.append(text)
                    r.log.write(text + "\n")
                with self.emit_lock:
                    try:
                        self.emit(prefix + text)
                    except Exception:  # a broken console must not stop the log file or the monitor
                        pass
        except (OSError, ValueError):
            pass  # the stream was closed under us: treat it as EOF
        finally:
            try:
                stream.close()
            except (OSError, ValueError):
                pass
            self.events.put(("eof", r.spec.rank, None))

    def _wait(self, r: TrackedRank, handle: RankHandle) -> None:
        """Report the shim's exit, or the loss of its channel."""
        timeout = LOST_POLL_S if handle.may_be_lost else None
        while not r.final:
            code = handle.wait(timeout)
            if code is not None:
                self.events.put(("exit", r.spec.rank, code))
                return
            if handle.is_lost():
                self.events.put(("lost", r.spec.rank, None))
                return
