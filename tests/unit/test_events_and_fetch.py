"""The run's account (events.jsonl, the summary table) and the checkpoint announcement the fetcher follows."""

from __future__ import annotations

import json
from io import StringIO
from pathlib import Path

import pytest
from rich.console import Console

from launcher.jobs.events import EventLog, render_summary
from launcher.jobs.fetch import _ANNOUNCED

pytestmark = pytest.mark.timeout(30)


def _text(renderable: object) -> str:
    buffer = StringIO()
    Console(file=buffer, width=400, color_system=None, force_terminal=False).print(renderable)
    return buffer.getvalue()


def _a_run(log: EventLog) -> None:
    log.write("start", attempt=1, hosts=["h0", "h1"], world_size=2, from_step=0)
    log.write("fault", attempt=1, cause="stuck", rank=1, host="h1", reason="no step for 4 s",
              detected_after_s=4.25, step=12)
    log.write("host_lost", host="h1", reason="unreachable")
    log.write("restart", restart=1, max_restarts=2, planned=False, hosts=["h0"], world_size=1, from_step=10,
              steps_redone=2)
    log.write("start", attempt=2, hosts=["h0"], world_size=1, from_step=10)
    log.write("host_back", host="h1")
    log.write("end", outcome="finished", exit_code=0, restarts=1)


def test_events_are_appended_one_json_object_per_line(tmp_path: Path) -> None:
    path = tmp_path / "runs" / "r" / "events.jsonl"  # the folder is made on demand
    log = EventLog(path)
    _a_run(log)
    lines = path.read_text(encoding="utf-8").splitlines()
    assert len(lines) == 7 == len(log.events)
    read = [json.loads(line) for line in lines]
    assert read == log.events
    assert [e["event"] for e in read] == ["start", "fault", "host_lost", "restart", "start", "host_back", "end"]
    assert all(isinstance(e["time"], float) for e in read)
    assert [e["time"] for e in read] == sorted(e["time"] for e in read)
    fault = read[1]
    assert (fault["cause"], fault["rank"], fault["detected_after_s"], fault["step"]) == ("stuck", 1, 4.25, 12)

    again = EventLog(path)  # a second launcher on the same run appends, never truncates
    again.write("start", attempt=1, hosts=None, world_size=2, from_step=40)
    assert len(path.read_text(encoding="utf-8").splitlines()) == 8
    assert again.events == [json.loads(path.read_text(encoding="utf-8").splitlines()[-1])]


def test_unserialisable_fields_are_written_as_text(tmp_path: Path) -> None:
    log = EventLog(tmp_path / "events.jsonl")
    log.write("fault", cause="failed", reason="x", where=tmp_path)
    assert json.loads((tmp_path / "events.jsonl").read_text())["where"] == str(tmp_path)


def test_summary_has_one_row_per_event_in_words(tmp_path: Path) -> None:
    log = EventLog(tmp_path / "events.jsonl")
    _a_run(log)
    table = render_summary(log.events)
    assert table.row_count == len(log.events)
    assert [c.header for c in table.columns] == ["after", "event", "what"]
    assert list(table.columns[1].cells) == [e["event"] for e in log.events]
    afters = list(table.columns[0].cells)
    assert afters[0] == "0.0 s" and all(a.endswith(" s") for a in afters)
    what = list(table.columns[2].cells)
    assert what[0] == "2 rank(s) on h0, h1"
    assert what[1] == "stuck: rank 1 (h1): no step for 4 s; detected after 4.2 s"
    assert what[2] == "h1 dropped: unreachable"
    assert what[3] == "restart 1 of 2: 1 rank(s) from step 10, 2 step(s) redone"
    assert what[4] == "1 rank(s) on h0, resuming from step 10"
    assert what[5] == "h1 taken back"
    assert what[6] == "finished"
    text = _text(table)
    assert "macrun: what happened" in text and "2 step(s) redone" in text


def test_summary_of_local_ranks_and_unknown_events() -> None:
    events = [{"time": 10.0, "event": "start", "world_size": 2, "hosts": None, "from_step": 0},
              {"time": 12.5, "event": "fault", "cause": "failed", "rank": None, "host": None, "reason": "no rank",
               "detected_after_s": None},
              {"time": 13.0, "event": "restart", "restart": 1, "max_restarts": 1, "world_size": 2, "from_step": None,
               "steps_redone": None},
              {"time": 14.0, "event": "custom", "a": 1}]
    table = render_summary(events)
    assert list(table.columns[0].cells) == ["0.0 s", "2.5 s", "3.0 s", "4.0 s"]
    assert list(table.columns[2].cells) == ["2 rank(s) on this machine", "failed: the run: no rank",
                                            "restart 1 of 1: 2 rank(s) from step 0", "a=1"]
    assert render_summary([]).row_count == 0


@pytest.mark.parametrize(("line", "name"), [
    ("[rank 0 h0] checkpoint checkpoints/step_00000100", "step_00000100"),
    ("[rank 0 mac-mini.local] checkpoint /Users/a/runs/r/checkpoints/step_00000100", "step_00000100"),
    ("[rank 0 localhost] checkpoint step_123456789", "step_123456789"),
    # Only the last component counts: an announcement cannot point the fetcher outside the job's checkpoints.
    ("[rank 0 h0] checkpoint ../../../etc/step_00000007", "step_00000007"),
])
def test_rank0_checkpoint_announcements_name_the_folder(line: str, name: str) -> None:
    match = _ANNOUNCED.match(line)
    assert match is not None and match.group(1) == name


@pytest.mark.parametrize("line", [
    "[rank 1 h1] checkpoint checkpoints/step_00000100",  # only rank 0 writes checkpoints
    "[rank 10 h0] checkpoint checkpoints/step_00000100",
    "[rank 0 h0] checkpoint checkpoints/step_100",  # not a step folder name (8+ digits)
    "[rank 0 h0] checkpoint checkpoints/step_00000100/model.safetensors",
    "[rank 0 h0] checkpoint checkpoints/step_00000100 written",
    "[rank 0 h0] step 100/400 · loss 2.1",
    "rank 0 checkpoint checkpoints/step_00000100",
    "  [rank 0 h0] checkpoint checkpoints/step_00000100",
])
def test_other_lines_are_not_announcements(line: str) -> None:
    assert _ANNOUNCED.match(line) is None
