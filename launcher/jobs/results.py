"""How a run ended: rank states, per-rank and per-run results, and the failure table shown to users."""

from __future__ import annotations

import signal
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text


class RankState(Enum):
    """Where a rank is in its life; the last five are final."""

    PENDING = "pending"  # not started (yet)
    RUNNING = "running"
    SUCCEEDED = "succeeded"  # exited 0
    FAILED = "failed"  # exited non-zero, was killed by a signal we did not send, or could not start
    LOST = "lost"  # its SSH channel dropped, or its heartbeats stopped
    STUCK = "stuck"  # no rank made progress for the progress timeout, and this one is furthest behind
    KILLED = "killed"  # we stopped it: another rank failed, or Ctrl-C


@dataclass
class RankResult:
    """How one rank ended. `started`/`ended` are time.monotonic() values (None: never started)."""

    rank: int
    host_name: str
    state: RankState
    exit_code: int | None
    started: float | None
    ended: float | None
    reason: str
    last_lines: list[str]
    log_path: Path
    detected_after: float | None = None  # LOST/STUCK: seconds of silence or stall before it was declared


@dataclass
class RunResult:
    """How the run ended: `exit_code` is 0 only when every rank succeeded."""

    exit_code: int
    ranks: list[RankResult]
    interrupted: bool
    first_failure: RankResult | None
    progress: dict[int, dict] = field(default_factory=dict)  # each rank's last progress report (step, doing)
    stopped_gracefully: bool = False  # the ranks were asked to checkpoint and stop, and they did
    leaving: dict[str, str] = field(default_factory=dict)  # hosts that asked to leave (battery), with why
    rejoining: list[str] = field(default_factory=list)  # dropped hosts that answered again (fault.rejoin)

    @property
    def last_step(self) -> int | None:
        """The furthest step any rank reported finishing (None: no rank reported progress)."""
        steps = [p["step"] for p in self.progress.values() if isinstance(p.get("step"), int)]
        return max(steps) if steps else None


def describe_exit(code: int) -> str:
    """'exit code 3', or 'killed by SIGKILL (exit code 137)' for the shell's 128+N convention."""
    if code > 128:
        try:
            return f"killed by {signal.Signals(code - 128).name} (exit code {code})"
        except ValueError:
            pass
    return f"exit code {code}"


_STATE_ORDER = {RankState.FAILED: 0, RankState.LOST: 0, RankState.STUCK: 0, RankState.KILLED: 1,
                RankState.PENDING: 2, RankState.RUNNING: 2, RankState.SUCCEEDED: 3}
_STATE_STYLE = {RankState.FAILED: "bold red", RankState.LOST: "bold red", RankState.STUCK: "bold red",
                RankState.KILLED: "yellow",
                RankState.SUCCEEDED: "green", RankState.PENDING: "dim", RankState.RUNNING: "dim"}


def render_failure_table(result: RunResult) -> RenderableType:
    """One table of every rank, the root cause (earliest failure) first, then its last output lines."""
    table = Table(title="macrun: ranks", title_justify="left")
    for column in ("rank", "host", "state", "exit code", "reason"):
        table.add_column(column, overflow="fold")
    root = result.first_failure

    def order(r: RankResult) -> tuple[int, int, float, int]:
        ended = r.ended if r.ended is not None else float("inf")
        return (0 if root is not None and r.rank == root.rank else 1, _STATE_ORDER[r.state], ended, r.rank)

    for r in sorted(result.ranks, key=order):
        table.add_row(str(r.rank), r.host_name, Text(r.state.value, style=_STATE_STYLE[r.state]),
                      "" if r.exit_code is None else str(r.exit_code), r.reason)
    parts: list[RenderableType] = [table]
    if root is not None:
        parts.append(Text(f"last lines of rank {root.rank} ({root.host_name}); full log: {root.log_path}",
                          style="bold"))
        parts.append(Text("\n".join(root.last_lines) if root.last_lines else "(no output)", style="dim"))
    return Group(*parts)
