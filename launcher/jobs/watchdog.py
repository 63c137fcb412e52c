"""The progress watchdog: when no rank finishes a step for too long, the run is stuck; name who holds it up.

A collective that never completes (a pulled cable that leaves TCP waiting, a deadlock in the backend,
a rank that never reached the collective) keeps every rank's heartbeat going while no step finishes.
Ranks report their step, how many collectives they have entered and what they are doing
(distributed/progress.py) with every heartbeat; this module decides, from those reports alone, whether
the run is stuck and which rank(s) are furthest behind: the lowest step, then the fewest collectives
entered, which is the rank the others are waiting for.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

MIN_PROGRESS_TIMEOUT_S = 60.0  # the automatic progress timeout never goes below this
# Until some rank has finished a step of this attempt, the first step (which compiles the step, and on a resume
# follows the checkpoint's hand-out) gets at least this long, whatever fault.progress_timeout says: a short
# timeout is for a hang between steps, and a busy machine can take seconds to compile.
FIRST_STEP_TIMEOUT_S = MIN_PROGRESS_TIMEOUT_S


@dataclass(frozen=True)
class Watch:
    """What job control can watch beyond exits and heartbeats, for ranks that report progress (training).

    `progress` gives each rank's last report (StoreServer.progress_report: step, collectives, doing,
    step_s, max_step_s, stalled). `timeout` is the progress timeout in seconds; 0 means
    max(MIN_PROGRESS_TIMEOUT_S, 20 x the median step, 3 x the longest step so far). `request_stop` asks
    every rank to checkpoint at its next sync and exit; with it, the first Ctrl-C does that, and only a
    second one stops the ranks at once.
    """

    progress: Callable[[], dict[int, dict]] | None = None
    timeout: float = 0.0
    request_stop: Callable[[], None] | None = None
    rejoin: Callable[[], list[str]] | None = None  # dropped hosts that answer again: stop at a sync to take them back

    def timeout_for(self, reports: Iterable[Mapping]) -> float:
        """The progress timeout in force, given the ranks' reports."""
        if self.timeout > 0:
            return self.timeout
        reports = list(reports)
        median = max((p.get("step_s") or 0.0 for p in reports), default=0.0)
        longest = max((p.get("max_step_s") or 0.0 for p in reports), default=0.0)
        return max(MIN_PROGRESS_TIMEOUT_S, 20 * median, 3 * longest)


@dataclass(frozen=True)
class Stuck:
    """A verdict: the run has been stalled for `stalled` s against `timeout`; `culprits` hold it up."""

    stalled: float
    timeout: float
    culprits: list[int]
    reasons: dict[int, str]  # per culprit: the line for the failure table
    where: dict[int, str]  # per culprit: "step N, doing ..."

    def notice(self, hosts: Mapping[int, str]) -> str:
        """One line for the run's output."""
        named = "; ".join(f"rank {r} ({hosts.get(r, '?')}) at {self.where[r]}" for r in self.culprits)
        return f"watchdog: the run is stuck (no step finished for {self.stalled:.0f} s); furthest behind: {named}"


def _position(report: Mapping) -> tuple[int, int]:
    return int(report["step"]), int(report.get("collectives") or 0)


def find_stuck(reports: Mapping[int, Mapping], ranks: Sequence[int],
               timeout_for: Callable[[Iterable[Mapping]], float]) -> Stuck | None:
    """The verdict for `ranks` (all running), or None while they are not stuck or have not all reported.

    Stalled means: seconds since ANY of them last finished a step (each report's "stalled" counts since
    that rank's step changed, on the launcher's clock).
    """
    if not ranks or any(r not in reports for r in ranks):
        return None
    mine = {r: reports[r] for r in ranks}
    stalled = min(float(p["stalled"]) for p in mine.values())
    timeout = timeout_for(mine.values())
    if all(p.get("step_s") is None for p in mine.values()):  # no step of this attempt has finished yet
        timeout = max(timeout, FIRST_STEP_TIMEOUT_S)
    if stalled < timeout:
        return None
    behind = min(_position(p) for p in mine.values())
    culprits = sorted(r for r, p in mine.items() if _position(p) == behind)
    others = sorted(set(ranks) - set(culprits))
    waiting = ""
    if others:
        doing = sorted({str(mine[r].get("doing", "?")) for r in others})
        plural = len(others) > 1
        waiting = (f"; rank{'s' if plural else ''} {', '.join(map(str, others))} "
                   f"wait{'' if plural else 's'} in: {'; '.join(doing)}")
    reasons, where = {}, {}
    for r in culprits:
        p = mine[r]
        where[r] = f"step {p['step']}, doing {p.get('doing', '?')}"
        if others:
            reasons[r] = (f"stuck: no rank finished a step for {stalled:.0f} s (timeout {timeout:.0f} s); this rank "
                          f"is furthest behind at step {p['step']} with {p.get('collectives', 0)} collectives "
                          f"entered, last doing: {p.get('doing', '?')}{waiting}")
        else:  # every rank entered the same collective and none came out: the link (or the backend) failed
            reasons[r] = (f"stuck: no rank finished a step for {stalled:.0f} s (timeout {timeout:.0f} s); every rank "
                          f"is in the same collective at step {p['step']} ({p.get('doing', '?')}): a link between "
                          f"them stopped carrying data")
    return Stuck(stalled=stalled, timeout=timeout, culprits=culprits, reasons=reasons, where=where)
