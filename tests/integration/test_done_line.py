"""The worker's last line, `done: step N · loss X · val Y · ...`: its loss is the one the last progress line
printed, and it says what that is (before, it was the final batch's loss alone, unlabelled, and differed)."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import yaml

from distributed import worker
from distributed.config import config_from_dict
from distributed.data import prepare_data
from distributed.progress import PROGRESS
from distributed.train import TrainResult, train

TINY = {
    "model": {"size": "tiny", "activation": "relu2"},
    "data": {"max_bytes": 120_000, "seq_len": 32, "val_share": 0.1},
    "train": {"steps": 10, "batch_size": 4, "warmup_steps": 2, "eval_interval": 0, "eval_batches": 2,
              "checkpoint_interval": 0, "log_interval": 4},
}
# What log readers parse (tests/lab/test_lab_soak.py, DONE); the line must keep matching it.
SOAK_DONE = re.compile(r"\] done: step (\d+) · loss [0-9.]+ · val ([0-9.]+)")
STEP_LINE = re.compile(r"^step (\d+)/\d+ · loss ([0-9.]+)", re.M)
DONE_LINE = re.compile(r"^done: step (\d+) · loss ([0-9.]+) · val ([0-9.]+) · .* \(loss: mean of steps (\d+)-(\d+)\)$",
                       re.M)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("data")
    prepare_data(config_from_dict(TINY).data, out)
    return out


def test_done_line_repeats_the_last_progress_lines_loss_and_says_so(tmp_path: Path, data_dir: Path,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(TINY))
    assert worker.main([str(config), "--data", str(data_dir), "--run-dir", str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out
    steps = STEP_LINE.findall(out)
    assert [int(s) for s, _ in steps] == [4, 8, 10]  # log_interval 4, and the last step
    done = DONE_LINE.search(out)
    assert done, out
    assert done.group(1) == "10" and done.group(2) == steps[-1][1]  # the same number as `step 10/10 · loss X`
    assert (done.group(4), done.group(5)) == ("9", "10")  # the steps since the line at step 8
    assert SOAK_DONE.search(f"[rank 0 h1] {done.group(0)}")


def test_result_keeps_the_final_batch_loss_and_the_recent_mean(tmp_path: Path, data_dir: Path) -> None:
    lines: list[str] = []
    result = train(config_from_dict(TINY), data_dir=data_dir, run_dir=tmp_path, log=lines.append)
    last = [line for line in lines if line.startswith("step 10/10")][0]
    assert f"loss {result.recent_loss:.3f}" in last and result.recent_steps == (9, 10)
    assert math.isfinite(result.loss)  # the final batch's own loss stays in the result (and the checkpoint)
    again = train(config_from_dict(TINY), data_dir=data_dir, run_dir=tmp_path, resume=True, log=lines.append)
    assert again.recent_loss is None and again.recent_steps is None  # resumed at the end: no step trained
    assert worker.done_line(again).startswith("done: step 10 · loss n/a · val ")
    assert "(loss:" not in worker.done_line(again)


def test_a_stop_between_progress_lines_reports_the_steps_since_the_last_one(
        tmp_path: Path, data_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(PROGRESS, "control", {"stop": True})  # the launcher asked for a graceful stop
    result = train(config_from_dict(TINY), data_dir=data_dir, run_dir=tmp_path, log=lambda _line: None)
    assert result.step == 1 and result.recent_steps == (1, 1) and result.recent_loss == pytest.approx(result.loss)
    assert worker.done_line(result).endswith("(loss: step 1)")


@pytest.mark.parametrize(("recent", "steps", "val", "tail"), [
    (2.34567, (191, 200), 2.5, "(loss: mean of steps 191-200)"),
    (2.34567, (200, 200), None, "(loss: step 200)"),
])
def test_done_line_format(recent: float, steps: tuple[int, int], val: float | None, tail: str) -> None:
    result = TrainResult(step=200, loss=9.0, val_loss=val, tokens=1000, seconds=2.0, tokens_per_s=500.0,
                         checkpoint=None, recent_loss=recent, recent_steps=steps)
    line = worker.done_line(result)
    assert line.startswith("done: step 200 · loss 2.346 · val ") and line.endswith(tail)
    assert "9.000" not in line  # the final batch's loss alone is not the figure shown
    assert "500 tok/s over 2.0 s" in line
    assert bool(SOAK_DONE.search("] " + line)) == (val is not None)
