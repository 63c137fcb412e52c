"""Unit tests for atomic, verified checkpoints (distributed/checkpoint.py)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
import pytest

from distributed.checkpoint import (
    TMP_PREFIX,
    flatten_tree,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
    step_dir_name,
    unflatten_tree,
)
from distributed.config import ModelConfig
from distributed.errors import CheckpointError
from distributed.models.gpt import build_model, loss_fn


def _groups(seed: int) -> dict[str, dict[str, mx.array]]:
    rng = np.random.default_rng(seed)
    return {
        "model": {"blocks.0.w": mx.array(rng.standard_normal((4, 3)).astype(np.float32)),
                  "blocks.1.w": mx.array(rng.standard_normal((4, 3)).astype(np.float32)).astype(mx.bfloat16)},
        "optimizer": {"step": mx.array(7, mx.uint64), "learning_rate": mx.array(0.001),
                      "blocks.0.w.m": mx.zeros((4, 3))},
    }


def _assert_groups_equal(a: dict[str, dict[str, mx.array]], b: dict[str, dict[str, mx.array]]) -> None:
    assert a.keys() == b.keys()
    for g in a:
        assert a[g].keys() == b[g].keys(), g
        for k in a[g]:
            assert a[g][k].dtype == b[g][k].dtype and a[g][k].shape == b[g][k].shape, k
            assert mx.array_equal(a[g][k], b[g][k]), k


def test_round_trip(tmp_path: Path) -> None:
    groups = _groups(0)
    meta = {"loss": 1.25, "config": {"model": {"size": "tiny"}}, "versions": {"mlx": mx.__version__}}
    path = save_checkpoint(tmp_path, 100, groups, meta, keep=3)
    assert path == tmp_path / "step_00000100"
    names = sorted(p.name for p in path.iterdir())
    assert names == ["meta.json", "model.safetensors", "optimizer.safetensors"]
    ckpt = load_checkpoint(path)
    assert ckpt.step == 100 and ckpt.meta == meta and ckpt.path == path
    _assert_groups_equal(ckpt.groups, groups)
    # Plain MLX reads the files with the dotted names.
    assert set(mx.load(str(path / "model.safetensors"))) == {"blocks.0.w", "blocks.1.w"}
    record = json.loads((path / "meta.json").read_text())
    assert record["files"]["model.safetensors"]["bytes"] == (path / "model.safetensors").stat().st_size
    assert len(record["files"]["model.safetensors"]["sha256"]) == 64


def test_keep_prunes_the_oldest(tmp_path: Path) -> None:
    for step in (100, 200, 300, 400):
        save_checkpoint(tmp_path, step, _groups(step), {}, keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000300", "step_00000400"]


def test_same_step_is_replaced(tmp_path: Path) -> None:
    save_checkpoint(tmp_path, 5, _groups(1), {"v": 1}, keep=3)
    save_checkpoint(tmp_path, 5, _groups(2), {"v": 2}, keep=3)
    assert [p.name for p in tmp_path.iterdir()] == ["step_00000005"]
    ckpt = load_checkpoint(tmp_path / "step_00000005")
    assert ckpt.meta == {"v": 2}
    _assert_groups_equal(ckpt.groups, _groups(2))


def test_truncated_file_falls_back_to_previous(tmp_path: Path) -> None:
    save_checkpoint(tmp_path, 100, _groups(1), {}, keep=3)
    p200 = save_checkpoint(tmp_path, 200, _groups(2), {}, keep=3)
    model_file = p200 / "model.safetensors"
    model_file.write_bytes(model_file.read_bytes()[:-10])
    with pytest.raises(CheckpointError, match="model.safetensors is .* bytes") as exc:
        load_checkpoint(p200)
    assert "step_00000200" in str(exc.value) and exc.value.hint
    ckpt, warnings = latest_checkpoint(tmp_path)
    assert ckpt is not None and ckpt.step == 100
    _assert_groups_equal(ckpt.groups, _groups(1))
    assert len(warnings) == 1
    assert warnings[0].startswith("step_00000200: model.safetensors")
    assert warnings[0].endswith("; using step_00000100")


def test_at_most_names_the_step_and_drops_later_ones(tmp_path: Path) -> None:
    for step in (100, 200, 300):
        save_checkpoint(tmp_path, step, _groups(step), {}, keep=5)
    ckpt, warnings = latest_checkpoint(tmp_path, at_most=250)
    assert ckpt is not None and ckpt.step == 200 and not warnings
    _assert_groups_equal(ckpt.groups, _groups(200))
    # step_300 belonged to an attempt the launcher never saw: gone, so nothing resumes from it later.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000100", "step_00000200"]
    ckpt, _ = latest_checkpoint(tmp_path, at_most=0)
    assert ckpt is None and list(tmp_path.iterdir()) == []


def test_one_flipped_byte_is_detected(tmp_path: Path) -> None:
    path = save_checkpoint(tmp_path, 1, _groups(1), {}, keep=3)
    f = path / "optimizer.safetensors"
    data = bytearray(f.read_bytes())
    data[-3] ^= 0x01
    f.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="optimizer.safetensors sha256 mismatch"):
        load_checkpoint(path)
    ckpt, warnings = latest_checkpoint(tmp_path)
    assert ckpt is None
    assert warnings == ["step_00000001: optimizer.safetensors sha256 mismatch (file altered or truncated); "
                        "no valid checkpoint left"]


def test_missing_file_and_bad_meta(tmp_path: Path) -> None:
    p1 = save_checkpoint(tmp_path, 1, _groups(1), {}, keep=5)
    p2 = save_checkpoint(tmp_path, 2, _groups(2), {}, keep=5)
    p3 = save_checkpoint(tmp_path, 3, _groups(3), {}, keep=5)
    (p3 / "meta.json").unlink()
    (p2 / "meta.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="meta.json is missing"):
        load_checkpoint(p3)
    with pytest.raises(CheckpointError, match="meta.json is not valid JSON"):
        load_checkpoint(p2)
    ckpt, warnings = latest_checkpoint(tmp_path)
    assert ckpt is not None and ckpt.path == p1
    assert [w.split(":")[0] for w in warnings] == ["step_00000003", "step_00000002"]
    (p1 / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model.safetensors is missing"):
        load_checkpoint(p1)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / step_dir_name(99))


def test_leftover_temp_dirs_are_ignored_and_abandoned_ones_removed(tmp_path: Path) -> None:
    save_checkpoint(tmp_path, 10, _groups(1), {}, keep=3)
    # A crashed writer's temp dir: complete-looking content, newer step, dead pid on this host.
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    crashed = tmp_path / f"{TMP_PREFIX}step_00000020.{socket.gethostname()}.{dead.pid}.abcd"
    crashed.mkdir()
    (crashed / "meta.json").write_text("{}")
    # A temp dir being written by a live process right now must be left alone.
    live = tmp_path / f"{TMP_PREFIX}step_00000030.{socket.gethostname()}.{os.getpid()}.ef01"
    live.mkdir()
    ckpt, warnings = latest_checkpoint(tmp_path)
    assert ckpt is not None and ckpt.step == 10 and warnings == []
    assert not crashed.exists()
    assert live.exists()
    # Pruning counts step dirs only.
    save_checkpoint(tmp_path, 11, _groups(2), {}, keep=1)
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == ["step_00000011"]


def test_unserialisable_meta_leaves_nothing(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="not JSON-serialisable"):
        save_checkpoint(tmp_path, 1, _groups(1), {"bad": object()}, keep=1)
    assert list(tmp_path.iterdir()) == []


def test_flatten_unflatten_restores_lists() -> None:
    tree = {"blocks": [{"w": mx.ones(2)} for _ in range(12)], "step": mx.array(3)}
    flat = flatten_tree(tree)
    assert "blocks.11.w" in flat
    # Key order as a file might return it (lexicographic: 0, 1, 10, 11, 2, ...).
    back = unflatten_tree(dict(sorted(flat.items())))
    assert len(back["blocks"]) == 12 and mx.array_equal(back["step"], mx.array(3))
    assert unflatten_tree({}) == {}


def test_model_and_adamw_round_trip(tmp_path: Path) -> None:
    cfg = ModelConfig(size="tiny", n_layer=2, n_head=2, n_embd=32)
    rng = np.random.default_rng(0)
    batches = [mx.array(rng.integers(0, 256, size=(2, 17)), dtype=mx.int32) for _ in range(4)]

    def make(seed: int) -> tuple[nn.Module, optim.Optimizer]:
        schedule = optim.cosine_decay(1e-2, decay_steps=10, end=1e-3)
        return build_model(cfg, 16, seed=seed), optim.AdamW(learning_rate=schedule, weight_decay=0.1)

    def step(model: nn.Module, opt: optim.Optimizer, batch: mx.array) -> None:
        _, grads = nn.value_and_grad(model, loss_fn)(model, batch[:, :-1], batch[:, 1:])
        opt.update(model, grads)
        mx.eval(model.parameters(), opt.state)

    model, opt = make(0)
    for b in batches[:3]:
        step(model, opt, b)
    path = save_checkpoint(tmp_path, 3, {"model": flatten_tree(model.parameters()),
                                         "optimizer": flatten_tree(opt.state)}, {"loss": 1.0}, keep=2)

    model2, opt2 = make(1)  # other weights, fresh optimizer
    ckpt = load_checkpoint(path)
    model2.update(ckpt.tree("model"))
    opt2.state = ckpt.tree("optimizer")
    assert int(opt2.state["step"]) == 3 and "learning_rate" in opt2.state

    step(model, opt, batches[3])
    step(model2, opt2, batches[3])
    assert int(opt2.state["step"]) == 4
    assert mx.array_equal(opt.state["learning_rate"], opt2.state["learning_rate"])
    for group_a, group_b in ((model.parameters(), model2.parameters()), (opt.state, opt2.state)):
        a, b = flatten_tree(group_a), flatten_tree(group_b)
        assert a.keys() == b.keys()
        for k in a:
            assert mx.array_equal(a[k], b[k]), k


def test_failed_write_leaves_previous_intact_and_no_partial_dir(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    save_checkpoint(tmp_path, 1, _groups(1), {}, keep=3)

    def no_rename(src: object, dst: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("distributed.checkpoint.os.rename", no_rename)
    with pytest.raises(CheckpointError, match="step_00000002.*No space left") as exc:
        save_checkpoint(tmp_path, 2, _groups(2), {}, keep=3)
    assert "disk space" in (exc.value.hint or "")
    monkeypatch.undo()
    assert [p.name for p in tmp_path.iterdir()] == ["step_00000001"]
    ckpt, warnings = latest_checkpoint(tmp_path)
    assert ckpt is not None and ckpt.step == 1 and warnings == []
