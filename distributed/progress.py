"""What this rank is doing, for the launcher's watchdog: its last finished step and the collective it is in.

The training loop updates one `Progress` per process with plain attribute writes (nothing on the wire, so
the loop pays nothing measurable); the heartbeat thread (distributed.heartbeat.start_heartbeat) sends a
snapshot every 2 s and brings back the launcher's requests, such as a graceful stop after a first Ctrl-C.

A collective that never completes leaves every rank's step where it was while the heartbeats keep coming:
the launcher sees no step advance for its progress timeout and stops the run as stuck. Which rank is to
blame shows in two numbers each rank reports: its step, and how many collectives it has entered. The rank
furthest behind (lowest step, then fewest collectives) is the one the others wait for, as in PyTorch's
collective-desync report.
"""

from __future__ import annotations

import os
import statistics
import threading
import time
from collections import deque
from typing import Any

# A test hook, never set in real runs: "<rank>:<step>" makes that rank skip its collective of that step and
# wait forever, as a rank stuck outside a collective would (see tests of the watchdog). It fires only in an
# attempt that starts from step 0, so the restart that follows runs clean.
SKIP_COLLECTIVE_ENV = "MACRUN_TEST_SKIP_COLLECTIVE"


class Progress:
    """One process's progress, written by the training loop and read by the heartbeat thread."""

    def __init__(self) -> None:
        self.active = False  # reports are sent once training has started
        self.step = 0  # steps finished (the next step to run is step + 1)
        self.doing = "starting"
        self.collectives = 0  # collectives this rank has entered, counted the same way on every rank
        self._times: deque[float] = deque(maxlen=64)
        self._longest = 0.0
        self._last: float | None = None
        self.control: dict[str, Any] = {}  # the launcher's last requests, from the heartbeat reply
        self.power: str | None = None  # why this Mac should leave the run (battery low), or None
        self._skip = _parse_skip(os.environ.get(SKIP_COLLECTIVE_ENV, ""))

    def start(self, step: int) -> None:
        """Training begins (or resumes) after `step` finished steps."""
        if step > 0:
            self._skip = None  # the test hook plants one fault per run: a resumed attempt runs clean
        self.step, self.active, self._last = step, True, time.monotonic()
        self.doing = f"step {step + 1}"

    def enter(self, what: str) -> None:
        """About to enter a collective (every rank calls this before the same collective)."""
        self.collectives += 1
        self.doing = what

    def finished(self, step: int) -> None:
        """Step `step` (1-based) is done."""
        now = time.monotonic()
        if self._last is not None:
            took = now - self._last
            self._times.append(took)
            self._longest = max(self._longest, took)
        self._last, self.step = now, step
        self.doing = f"step {step + 1}"

    @property
    def stop_requested(self) -> bool:
        """Whether the launcher asked for a graceful stop (checkpoint at the next sync, then exit)."""
        return bool(self.control.get("stop"))

    def snapshot(self) -> dict[str, Any] | None:
        """The report a heartbeat carries; None before training starts."""
        if not self.active:
            return None
        times = list(self._times)
        report = {"step": self.step, "doing": self.doing, "collectives": self.collectives,
                  "step_s": statistics.median(times) if times else None, "max_step_s": self._longest or None}
        if self.power:
            report["leave"] = self.power
        return report

    def maybe_skip(self, rank: int, step: int, what: str) -> None:
        """The test hook: at its planted (rank, step), never join the collective `what`."""
        if self._skip == (rank, step):
            self.doing = f"skipped {what} ({SKIP_COLLECTIVE_ENV}), waiting forever"
            threading.Event().wait()


def _parse_skip(text: str) -> tuple[int, int] | None:
    rank, _, step = text.partition(":")
    return (int(rank), int(step)) if rank.isdigit() and step.isdigit() else None


PROGRESS = Progress()  # this process's one instance
