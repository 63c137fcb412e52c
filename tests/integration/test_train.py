"""The training loop end to end on a tiny model: loss falls, resume equals a straight run, corruption is survived."""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from distributed.checkpoint import latest_checkpoint, load_checkpoint
from distributed.config import Config, config_from_dict
from distributed.data import prepare_data
from distributed.errors import CheckpointError
from distributed.train import lr_at, train

TINY = {
    "model": {"size": "tiny", "activation": "relu2"},
    "data": {"max_bytes": 120_000, "seq_len": 32, "val_share": 0.1},
    "train": {"steps": 16, "batch_size": 4, "lr": 3e-3, "min_lr": 3e-4, "warmup_steps": 3, "eval_interval": 8,
              "eval_batches": 2, "checkpoint_interval": 4, "keep_checkpoints": 5, "log_interval": 4},
}


def tiny_config(**overrides: object) -> Config:
    return config_from_dict(TINY, [f"{k}={v}" for k, v in overrides.items()])


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("data")
    prepare_data(tiny_config().data, out)
    return out


def quiet(_line: str) -> None:
    pass


def test_lr_schedule_warms_up_then_decays() -> None:
    t = tiny_config().train
    values = [lr_at(s, t) for s in range(t.steps)]
    assert 0 < values[0] < values[1] < values[2] <= t.lr  # warm-up, and step 0 already trains
    assert values[-1] == pytest.approx(t.min_lr, rel=0.2)
    assert all(a >= b for a, b in zip(values[3:], values[4:], strict=False))  # cosine decays monotonically
    as_array = [float(lr_at(mx.array(s), t)) for s in range(t.steps)]
    assert np.allclose(values, as_array, rtol=1e-5)


def test_loss_falls_and_outputs_are_written(tmp_path: Path, data_dir: Path) -> None:
    cfg = tiny_config(**{"train.steps": 40, "train.eval_interval": 20})
    result = train(cfg, data_dir=data_dir, run_dir=tmp_path, log=quiet)
    assert result.val_loss is not None and result.val_loss < np.log(256) - 1.0  # well below uniform (5.55)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "val_loss" in r] == [20, 40]
    assert rows[0]["loss"] > rows[-1]["loss"]
    assert all(r["tokens_per_s"] > 0 and r["bytes_sent"] == 0 for r in rows)
    ckpt = load_checkpoint(result.checkpoint)  # type: ignore[arg-type]
    assert ckpt.step == 40 and ckpt.meta["config"]["model"]["size"] == "tiny"
    assert set(ckpt.groups) >= {"model", "optimizer"}


def _weights(run_dir: Path) -> dict[str, np.ndarray]:
    ckpt, warnings = latest_checkpoint(run_dir / "checkpoints")
    assert ckpt is not None and not warnings
    return {k: np.array(v) for k, v in ckpt.groups["model"].items()}


def test_resume_equals_a_straight_run(tmp_path: Path, data_dir: Path) -> None:
    cfg = tiny_config()
    straight, halves = tmp_path / "straight", tmp_path / "halves"
    train(cfg, data_dir=data_dir, run_dir=straight, log=quiet)
    first = train(cfg, data_dir=data_dir, run_dir=halves, stop_at=8, log=quiet)
    assert first.step == 8
    lines: list[str] = []
    second = train(cfg, data_dir=data_dir, run_dir=halves, resume=True, log=lines.append)
    assert second.step == 16 and any("resumed from" in line and "step 8" in line for line in lines)
    a, b = _weights(straight), _weights(halves)
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_allclose(a[key], b[key], rtol=1e-5, atol=1e-6, err_msg=key)


def test_resume_at_ignores_a_later_checkpoint(tmp_path: Path, data_dir: Path) -> None:
    # A restart resumes from the step the launcher names, even where a later checkpoint was left behind.
    cfg = tiny_config()
    train(cfg, data_dir=data_dir, run_dir=tmp_path, stop_at=8, log=quiet)
    lines: list[str] = []
    result = train(cfg, data_dir=data_dir, run_dir=tmp_path, resume=True, resume_at=5, stop_at=6,
                   log=lines.append)
    assert any("resumed from" in line and "step 4" in line for line in lines), lines
    assert result.step == 6 and not (tmp_path / "checkpoints" / "step_00000008").exists()


def test_resume_skips_a_corrupt_checkpoint(tmp_path: Path, data_dir: Path) -> None:
    cfg = tiny_config()
    train(cfg, data_dir=data_dir, run_dir=tmp_path, stop_at=8, log=quiet)
    newest = tmp_path / "checkpoints" / "step_00000008" / "model.safetensors"
    with newest.open("r+b") as f:  # flip one byte in the middle of the weights
        f.seek(newest.stat().st_size // 2)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0xFF]))
    lines: list[str] = []
    result = train(cfg, data_dir=data_dir, run_dir=tmp_path, resume=True, stop_at=6, log=lines.append)
    assert any("sha256 mismatch" in line and "step_00000004" in line for line in lines)
    assert any("resumed from" in line and "step 4" in line for line in lines)
    assert result.step == 6


def test_resume_with_another_model_is_refused(tmp_path: Path, data_dir: Path) -> None:
    train(tiny_config(), data_dir=data_dir, run_dir=tmp_path, stop_at=4, log=quiet)
    with pytest.raises(CheckpointError, match="another model"):
        train(tiny_config(**{"model.n_layer": 3}), data_dir=data_dir, run_dir=tmp_path, resume=True, log=quiet)
