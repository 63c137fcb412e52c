"""Unit tests for data preparation, splitting and sharded batching (distributed/data.py)."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import numpy as np
import pytest

from distributed.config import DataConfig
from distributed.data import BatchSampler, PreparedData, prepare_data, val_batches
from distributed.errors import DataError


def _text(seed: int, n: int) -> str:
    rng = random.Random(seed)
    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "iota", "kappa", "\n"]
    return " ".join(rng.choice(words) for _ in range(n))


def _cfg(source: Path | str, **kw: object) -> DataConfig:
    return DataConfig(source=str(source), **{"max_bytes": 0, "seq_len": 16, "val_share": 0.1, **kw})


def _bins(out: Path) -> tuple[bytes, bytes]:
    return (out / "train.bin").read_bytes(), (out / "val.bin").read_bytes()


def _write_tokens(path: Path, n: int) -> Path:
    path.write_bytes(bytes(i % 251 for i in range(n)))
    return path


# ---------------------------------------------------------------------------------------------
# Sources


def test_single_text_file(tmp_path: Path) -> None:
    src = tmp_path / "book.txt"
    src.write_text(_text(0, 3000))
    prepared = prepare_data(_cfg(src), tmp_path / "out")
    train, val = _bins(tmp_path / "out")
    assert prepared.train_tokens == len(train) > 0 and prepared.val_tokens == len(val) > 0
    # One document + its separator, split by blocks: nothing lost, nothing added.
    assert len(train) + len(val) == src.stat().st_size + 1
    assert 0.05 < len(val) / (len(train) + len(val)) < 0.25
    info = json.loads((tmp_path / "out" / "data.json").read_text())
    assert info["split"] == "blocks" and info["train"]["bytes"] == len(train)
    assert PreparedData.load(tmp_path / "out") == prepared
    prepared.verify()


def test_folder_recursive_sorted_skips_binary(tmp_path: Path) -> None:
    src = tmp_path / "corpus"
    for i in range(60):
        d = src / f"part{i % 3}"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"doc{i:02d}.txt").write_text(f"DOC{i:02d} " + _text(i, 40))
    (src / "part0" / "image.bin").write_bytes(b"\x89PNG\x00\x01\x02")
    (src / "part1" / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    (src / ".git").mkdir()
    (src / ".git" / "config").write_text("HIDDEN")
    prepare_data(_cfg(src), tmp_path / "out")
    train, val = _bins(tmp_path / "out")
    docs = [d for d in (train + val).split(b"\x00") if d]
    assert len(docs) == 60
    assert b"PNG" not in train + val and b"HIDDEN" not in train + val and b"caf" not in train + val
    info = json.loads((tmp_path / "out" / "data.json").read_text())
    assert info["split"] == "documents" and info["skipped_files"] == 2
    # Within each split, documents keep the sorted path order (part0/doc00, part0/doc03, ...).
    names = [d[:5].decode() for d in train.split(b"\x00") if d]
    order = sorted(names, key=lambda n: (int(n[3:]) % 3, int(n[3:])))
    assert names == order


def test_jsonl(tmp_path: Path) -> None:
    src = tmp_path / "data.jsonl"
    lines = [json.dumps({"text": f"record {i}: " + _text(i, 30), "id": i}) for i in range(50)]
    src.write_text("\n".join(lines[:25]) + "\n\n" + "\n".join(lines[25:]) + "\n")
    prepare_data(_cfg(src), tmp_path / "out")
    train, val = _bins(tmp_path / "out")
    docs = sorted(d for d in (train + val).split(b"\x00") if d)
    assert docs == sorted(json.loads(line)["text"].encode() for line in lines)


def test_jsonl_missing_field_names_the_line(tmp_path: Path) -> None:
    src = tmp_path / "data.jsonl"
    src.write_text(json.dumps({"text": "fine"}) + "\n" + json.dumps({"body": "no text"}) + "\n")
    with pytest.raises(DataError, match=r"line 2 has no 'text' field") as exc:
        prepare_data(_cfg(src), tmp_path / "out")
    assert str(src) in str(exc.value)
    src.write_text(json.dumps({"text": "fine"}) + "\n{not json\n")
    with pytest.raises(DataError, match=r"line 2 is not valid JSON"):
        prepare_data(_cfg(src), tmp_path / "out")


def test_missing_path_and_empty_sources(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does-not-exist") as exc:
        prepare_data(_cfg(tmp_path / "does-not-exist.txt"), tmp_path / "out")
    assert exc.value.hint
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(DataError, match="holds no text"):
        prepare_data(_cfg(tmp_path / "empty.txt"), tmp_path / "out")
    (tmp_path / "bins").mkdir()
    (tmp_path / "bins" / "a.bin").write_bytes(b"\x00\xff" * 100)
    with pytest.raises(DataError, match=r"holds no text \(1 binary files skipped\)"):
        prepare_data(_cfg(tmp_path / "bins"), tmp_path / "out")
    assert not (tmp_path / "out" / "data.json").exists()


def test_unreadable_file_names_the_path(tmp_path: Path) -> None:
    src = tmp_path / "corpus"
    src.mkdir()
    (src / "a.txt").write_text(_text(0, 200))
    (src / "b.txt").symlink_to(tmp_path / "dangling")  # listed as a file, cannot be opened
    with pytest.raises(DataError, match=r"cannot read .*b\.txt"):
        prepare_data(_cfg(src), tmp_path / "out")


def test_too_little_data_for_one_sequence(tmp_path: Path) -> None:
    src = tmp_path / "small.txt"
    src.write_text(_text(0, 500))
    with pytest.raises(DataError, match="less than one sequence") as exc:
        prepare_data(_cfg(src, seq_len=4096), tmp_path / "out")
    assert "shorter data.seq_len" in (exc.value.hint or "")


def test_max_bytes_caps_the_read(tmp_path: Path) -> None:
    src = tmp_path / "big.txt"
    src.write_text(_text(1, 20000))
    prepared = prepare_data(_cfg(src, max_bytes=5000), tmp_path / "out")
    assert prepared.train_tokens + prepared.val_tokens == 5000


def test_builtin_stdlib_with_small_max_bytes(tmp_path: Path) -> None:
    prepared = prepare_data(_cfg("builtin:stdlib", max_bytes=200_000, seq_len=64), tmp_path / "out")
    train, val = _bins(tmp_path / "out")
    assert len(train) + len(val) == 200_000
    assert b"import " in train and b"def " in train
    assert prepared.val_tokens >= 65 and prepared.source == "builtin:stdlib"


# ---------------------------------------------------------------------------------------------
# Idempotence, atomicity, determinism of the split


def test_second_prepare_rewrites_nothing_until_the_input_changes(tmp_path: Path) -> None:
    src = tmp_path / "book.txt"
    src.write_text(_text(0, 3000))
    out = tmp_path / "out"
    first = prepare_data(_cfg(src), out)
    files = ("train.bin", "val.bin", "data.json")
    # Back-date the outputs so that any rewrite shows, however coarse the file system's clock.
    before = {}
    for f in files:
        past = (out / f).stat().st_mtime_ns - 10**10
        os.utime(out / f, ns=(past, past))
        before[f] = past
    assert prepare_data(_cfg(src), out) == first
    assert {f: (out / f).stat().st_mtime_ns for f in files} == before
    # Another setting or another input means a new prepare.
    prepare_data(_cfg(src, val_share=0.2), out)
    assert (out / "data.json").stat().st_mtime_ns != before["data.json"]


def test_truncated_output_is_detected_and_redone(tmp_path: Path) -> None:
    src = tmp_path / "book.txt"
    src.write_text(_text(0, 3000))
    out = tmp_path / "out"
    prepare_data(_cfg(src), out)
    good = _bins(out)
    with open(out / "train.bin", "r+b") as f:
        f.truncate(100)
    with pytest.raises(DataError, match="train.bin is 100 bytes"):
        PreparedData.load(out)
    prepare_data(_cfg(src), out)
    assert _bins(out) == good
    (out / "data.json").unlink()  # what an interrupted prepare leaves behind
    with pytest.raises(DataError, match="data.json"):
        PreparedData.load(out)


def test_split_is_deterministic_and_non_empty(tmp_path: Path) -> None:
    src = tmp_path / "corpus"
    src.mkdir()
    for i in range(100):
        (src / f"{i:03d}.txt").write_text(_text(i, 30))
    prepare_data(_cfg(src), tmp_path / "a")
    prepare_data(_cfg(src), tmp_path / "b")
    assert _bins(tmp_path / "a") == _bins(tmp_path / "b")
    train, val = _bins(tmp_path / "a")
    assert train and val
    n_val = len([d for d in val.split(b"\x00") if d])
    assert 3 <= n_val <= 25  # ~10% of 100 documents
    # A few documents only: still both splits non-empty.
    few = tmp_path / "few"
    few.mkdir()
    for i in range(3):
        (few / f"{i}.txt").write_text(_text(i, 400))
    prepared = prepare_data(_cfg(few), tmp_path / "c")
    assert prepared.train_tokens > 0 and prepared.val_tokens > 0


# ---------------------------------------------------------------------------------------------
# Batching


def test_batches_shape_dtype_and_shift(tmp_path: Path) -> None:
    path = _write_tokens(tmp_path / "t.bin", 10_000)
    sampler = BatchSampler(path, seq_len=16, batch_size=4, rank=0, world_size=1, seed=0)
    x, y = sampler.batch(0)
    assert x.shape == y.shape == (4, 16) and x.dtype == y.dtype == np.int32
    np.testing.assert_array_equal(x[:, 1:], y[:, :-1])
    data = np.frombuffer(path.read_bytes(), dtype=np.uint8)
    for row, w in zip(x, sampler.window_ids(0), strict=True):
        np.testing.assert_array_equal(row, data[w * 17: w * 17 + 16])
    assert sampler.num_windows == 10_000 // 17


def test_same_seed_same_batches_other_seed_different(tmp_path: Path) -> None:
    path = _write_tokens(tmp_path / "t.bin", 20_000)
    a = BatchSampler(path, 16, 4, 0, 1, seed=1)
    b = BatchSampler(path, 16, 4, 0, 1, seed=1)
    c = BatchSampler(path, 16, 4, 0, 1, seed=2)
    # A pure function of the step: asking out of order gives the same answer.
    for step in (5, 0, 500, 3):
        np.testing.assert_array_equal(a.batch(step)[0], b.batch(step)[0])
    assert not np.array_equal(a.batch(0)[0], c.batch(0)[0])
    assert not np.array_equal(a.batch(0)[0], a.batch(1)[0])


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_one_epoch_covers_every_window_once_across_ranks(tmp_path: Path, world_size: int) -> None:
    seq_len, batch = 7, 2
    n_windows = 120  # divisible by batch * world_size for every world size here
    path = _write_tokens(tmp_path / "t.bin", n_windows * (seq_len + 1) + 5)
    samplers = [BatchSampler(path, seq_len, batch, r, world_size, seed=9) for r in range(world_size)]
    assert samplers[0].steps_per_epoch == n_windows // (batch * world_size)
    seen = [s.window_ids(step) for step in range(samplers[0].steps_per_epoch) for s in samplers]
    ids = np.concatenate(seen)
    assert sorted(ids.tolist()) == list(range(n_windows))
    # The next epoch is a different order of the same windows.
    nxt = np.concatenate([s.window_ids(samplers[0].steps_per_epoch) for s in samplers])
    assert not np.array_equal(nxt, ids[: len(nxt)])


def test_epoch_stream_when_windows_do_not_divide(tmp_path: Path) -> None:
    seq_len, batch, world = 7, 4, 3
    n_windows = 50
    path = _write_tokens(tmp_path / "t.bin", n_windows * (seq_len + 1))
    samplers = [BatchSampler(path, seq_len, batch, r, world, seed=0) for r in range(world)]
    stream = np.concatenate([s.window_ids(step) for step in range(10) for s in samplers])
    for epoch in range(2):
        assert sorted(stream[epoch * n_windows:(epoch + 1) * n_windows].tolist()) == list(range(n_windows))


def test_sampler_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="missing"):
        BatchSampler(tmp_path / "none.bin", 16, 2, 0, 1, 0)
    short = _write_tokens(tmp_path / "short.bin", 10)
    with pytest.raises(DataError, match="less than one sequence"):
        BatchSampler(short, 16, 2, 0, 1, 0)
    with pytest.raises(ValueError):
        BatchSampler(_write_tokens(tmp_path / "t.bin", 1000), 16, 2, rank=2, world_size=2, seed=0)


def test_val_batches_fixed_and_spread(tmp_path: Path) -> None:
    path = _write_tokens(tmp_path / "v.bin", 17 * 100)
    batches = val_batches(path, seq_len=16, batch_size=4, count=5)
    again = val_batches(path, seq_len=16, batch_size=4, count=5)
    assert len(batches) == 5
    for (x, y), (x2, y2) in zip(batches, again, strict=True):
        assert x.shape == (4, 16) and x.dtype == np.int32
        np.testing.assert_array_equal(x, x2)
        np.testing.assert_array_equal(y, y2)
    starts = [int(x[i, 0]) for x, _ in batches for i in range(4)]
    data = np.frombuffer(path.read_bytes(), dtype=np.uint8)
    # The first and last windows are included: the set spans the whole file.
    assert starts[0] == data[0] and starts[-1] == data[99 * 17]


@pytest.mark.parametrize("worlds", [(4, 3), (3, 2, 4), (2, 1)])
def test_a_world_that_changes_mid_epoch_neither_skips_nor_repeats_a_window(tmp_path: Path,
                                                                          worlds: tuple[int, ...]) -> None:
    # A restart after losing (or regaining) hosts resumes at the checkpoint's step with another world size:
    # the samplers re-based on the checkpoint's stream position continue the same stream.
    seq_len, batch, n_windows = 7, 2, 96
    path = _write_tokens(tmp_path / "t.bin", n_windows * (seq_len + 1))
    seen: list[np.ndarray] = []
    step, position = 0, 0
    for world in worlds:
        samplers = [BatchSampler(path, seq_len, batch, r, world, seed=3, start_step=step, start_position=position)
                    for r in range(world)]
        for s in range(step, step + 5):
            seen += [x.window_ids(s) for x in samplers]
        step, position = step + 5, samplers[0].position(step + 5)
    ids = np.concatenate(seen)
    assert position == len(ids) < n_windows  # still within the first epoch
    assert len(set(ids.tolist())) == len(ids)  # nothing repeated
    # ...and nothing skipped: exactly the first `position` windows of epoch 0's order.
    one_rank = BatchSampler(path, seq_len, 1, 0, 1, seed=3)
    assert sorted(ids.tolist()) == sorted(np.concatenate([one_rank.window_ids(i) for i in range(position)]).tolist())
    # Without re-basing, a step count from the old world would land elsewhere in the stream.
    naive = BatchSampler(path, seq_len, batch, 0, worlds[1], seed=3)
    assert naive.position(5) != 5 * batch * worlds[0]
