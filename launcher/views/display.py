"""The live training display: rank 0's step lines become a rich progress bar; every other line scrolls above it.

Ranks print plain text (distributed/ never imports rich), so a log file or a pipe gets exactly what the
ranks said; only an interactive terminal gets the bar. Copies made before training (`--push-model`) show
bytes and an ETA per host the same way (`TransferProgress`): a bar on a terminal, a line per tenth elsewhere.
"""

from __future__ import annotations

import re
import threading
import time
from io import StringIO
from types import TracebackType
from typing import TYPE_CHECKING, Protocol

from rich.console import Console

if TYPE_CHECKING:  # rich.progress costs ~20 ms to import: only training's live display needs it
    from collections.abc import Callable

    from rich.progress import Progress, TaskID

# "[rank 0 host] step 40/600 · loss 2.345 · val 2.401 · lr 2.9e-03 · 12.3k tok/s · ..."
_STEP = re.compile(r"^\[rank 0 [^\]]*\] step (\d+)/(\d+) · loss ([0-9.]+)(?: · val ([0-9.]+))?"
                   r".*? · ([0-9.]+[kM]?) tok/s")


class TrainingDisplay:
    """A context manager whose `emit` takes launcher output lines; use it as `launch(..., emit=display.emit)`."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.live = console.is_terminal
        self._lock = threading.Lock()
        self._progress: Progress | None = None
        self._task: TaskID | None = None
        self._val = "-"

    def __enter__(self) -> TrainingDisplay:
        if self.live:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self._progress = Progress(
                TextColumn("[bold]training[/]"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.description}"),
                TimeRemainingColumn(), console=self.console, transient=False)
            self._progress.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if self._progress is not None:
            self._progress.stop()

    def emit(self, line: str) -> None:
        with self._lock:
            match = _STEP.match(line) if self._progress is not None else None
            if match is None or self._progress is None:
                self.console.print(line, markup=False, highlight=False)
                return
            step, total, loss, val, rate = match.groups()
            self._val = val or self._val
            description = f"loss {loss} · val {self._val} · {rate} tok/s"
            if self._task is None:
                self._task = self._progress.add_task(description, total=int(total))
            self._progress.update(self._task, completed=int(step), description=description)
            if val:  # keep evaluation results in the scrollback
                self.console.print(line, markup=False, highlight=False)

    def transfers(self) -> TransferProgress:
        """The progress of copies made before training starts: a bar per host on a terminal, else lines."""
        if self._progress is None:
            return LineProgress(self.emit)
        return BarProgress(self.console, paused=self._progress)


class TransferProgress(Protocol):
    """Bytes copied per host: `add` what a host is to receive, `advance` as it goes; a context manager."""

    def __enter__(self) -> TransferProgress: ...
    def __exit__(self, *exc: object) -> None: ...
    def add(self, host: str, nbytes: int) -> None: ...
    def advance(self, host: str, nbytes: int) -> None: ...


class LineProgress:
    """TransferProgress as plain lines (a pipe, a log): one per host at every tenth of its bytes."""

    def __init__(self, emit: Callable[[str], None], what: str = "model") -> None:
        self.emit, self.what = emit, what
        self._lock = threading.Lock()
        self._hosts: dict[str, list[float]] = {}  # host -> [total, done, started, tenths shown]

    def __enter__(self) -> LineProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def add(self, host: str, nbytes: int) -> None:
        with self._lock:
            self._hosts.setdefault(host, [0, 0, time.monotonic(), 0])[0] += nbytes

    def advance(self, host: str, nbytes: int) -> None:
        with self._lock:
            state = self._hosts.setdefault(host, [0, 0, time.monotonic(), 0])
            state[1] += nbytes
            total, done, started, shown = state
            tenths = int(10 * done / total) if total else 10
            if tenths <= shown:
                return
            state[3] = tenths
        rate = done / max(time.monotonic() - started, 1e-6)
        left = f", about {_clock((total - done) / rate)} left" if done < total and rate > 0 else ""
        self.emit(f"{self.what} -> {host}: {min(100, tenths * 10)}% ({done / 1e6:,.1f} of {total / 1e6:,.1f} MB, "
                  f"{rate / 1e6:,.1f} MB/s{left})")


class BarProgress:
    """TransferProgress as rich bars with bytes, speed and ETA; pauses the training bar while it shows."""

    def __init__(self, console: Console, paused: Progress | None = None, what: str = "model") -> None:
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
            TransferSpeedColumn,
        )

        self._paused = paused
        self._tasks: dict[str, TaskID] = {}
        self._totals: dict[str, int] = {}
        self._bar = Progress(TextColumn(f"[bold]{what}[/] -> {{task.description}}"), BarColumn(), DownloadColumn(),
                             TransferSpeedColumn(), TimeRemainingColumn(), console=console, transient=False)

    def __enter__(self) -> BarProgress:
        if self._paused is not None:
            self._paused.stop()
        self._bar.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._bar.stop()
        if self._paused is not None:
            self._paused.start()

    def add(self, host: str, nbytes: int) -> None:
        if host not in self._tasks:
            self._tasks[host] = self._bar.add_task(host, total=0)
        self._totals[host] = self._totals.get(host, 0) + nbytes
        self._bar.update(self._tasks[host], total=self._totals[host])

    def advance(self, host: str, nbytes: int) -> None:
        self._bar.advance(self._tasks[host], nbytes)


def _clock(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def render_text(renderable: object, width: int = 140) -> str:
    """A rich renderable (a table, a panel) as plain text lines, for `emit`, which takes strings."""
    buffer = StringIO()
    Console(file=buffer, width=width, force_terminal=False, color_system=None).print(renderable)
    return buffer.getvalue().rstrip("\n")

