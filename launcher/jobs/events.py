"""The account of a run: every fault, restart, and host lost or regained, in runs/<name>/events.jsonl.

One JSON object per line, appended as things happen (a crash of the launcher itself leaves the account
up to that moment): `time` (Unix seconds), `event` and the event's own fields. `render_summary` turns a
run's events into the table printed at its end.

    {"time": 1764500000.1, "event": "fault", "attempt": 1, "cause": "lost", "rank": 2, "host": "h2",
     "reason": "no heartbeat for 10.4 s ...", "detected_after_s": 10.4, "step": 180}
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from rich.table import Table


class EventLog:
    """Appends events to a JSON-lines file and keeps them for the summary."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self.events: list[dict[str, Any]] = []

    def write(self, event: str, **fields: Any) -> dict[str, Any]:
        record = {"time": round(time.time(), 3), "event": event, **fields}
        self.events.append(record)
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(record, default=str) + "\n")
        return record


def _describe(e: dict[str, Any]) -> str:
    kind = e["event"]
    if kind == "start":
        return f"{e.get('world_size')} rank(s) on {', '.join(e.get('hosts') or ['this machine'])}" + (
            f", resuming from step {e['from_step']}" if e.get("from_step") else "")
    if kind == "fault":
        where = f"rank {e['rank']} ({e['host']})" if e.get("rank") is not None else "the run"
        detected = f"; detected after {e['detected_after_s']:.1f} s" if e.get("detected_after_s") is not None else ""
        return f"{e['cause']}: {where}: {e.get('reason', '')}{detected}"
    if kind == "host_lost":
        return f"{e['host']} dropped: {e.get('reason', '')}"
    if kind == "host_back":
        return f"{e['host']} taken back" + (f" ({e['reason']})" if e.get("reason") else "")
    if kind == "restart":
        redone = f", {e['steps_redone']} step(s) redone" if e.get("steps_redone") is not None else ""
        what = "planned restart (no fault)" if e.get("planned") else f"restart {e['restart']} of {e['max_restarts']}"
        return f"{what}: {e['world_size']} rank(s) from step {e.get('from_step') or 0}{redone}"
    if kind == "end":
        return e.get("outcome", "")
    return ", ".join(f"{k}={v}" for k, v in e.items() if k not in ("time", "event"))


def render_summary(events: list[dict[str, Any]]) -> Table:
    """One row per event, times relative to the run's first event."""
    table = Table(title="macrun: what happened", title_justify="left")
    for column in ("after", "event", "what"):
        table.add_column(column, overflow="fold")
    t0 = events[0]["time"] if events else 0.0
    for e in events:
        table.add_row(f"{e['time'] - t0:.1f} s", e["event"], _describe(e))
    return table
