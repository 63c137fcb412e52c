"""The live training display: rank 0's step lines become a rich progress bar; every other line scrolls above it.

Ranks print plain text (distributed/ never imports rich), so a log file or a pipe gets exactly what the
ranks said; only an interactive terminal gets the bar.
"""

from __future__ import annotations

import re
import threading
from io import StringIO
from types import TracebackType
from typing import TYPE_CHECKING

from rich.console import Console

if TYPE_CHECKING:  # rich.progress costs ~20 ms to import: only training's live display needs it
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


def render_text(renderable: object, width: int = 140) -> str:
    """A rich renderable (a table, a panel) as plain text lines, for `emit`, which takes strings."""
    buffer = StringIO()
    Console(file=buffer, width=width, force_terminal=False, color_system=None).print(renderable)
    return buffer.getvalue().rstrip("\n")

