"""Training data: read text once on the master, split it, store it as bytes, and batch it per rank.

`prepare_data` turns a source (a text file, a folder of text files, a `.jsonl` file with a `text` field,
or `builtin:stdlib`) into `train.bin` and `val.bin` (raw uint8: the tokens are the bytes themselves,
documents separated by a NUL byte) plus `data.json`. `BatchSampler` memory-maps a `.bin` file and
serves every rank its own disjoint part of each global batch, as a pure function of the step, so a
resumed run sees exactly the batches it would have seen.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sysconfig
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from distributed.config import DataConfig
from distributed.errors import DataError
from distributed.shards import ShardedStream, check_shard

BUILTIN_STDLIB = "builtin:stdlib"
SEPARATOR = b"\x00"  # ends every document; text never contains NUL (files that do are skipped as binary)
FORMAT_VERSION = 1
_SOURCE_HINT = "set data.source to a text file, a folder of text files, a .jsonl file or builtin:stdlib"
_STDLIB_SKIP = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}


@dataclass(frozen=True)
class PreparedData:
    """A prepared data folder: `train.bin`, `val.bin` and `data.json`."""

    dir: Path
    train_tokens: int
    val_tokens: int
    source: str

    @property
    def train_path(self) -> Path:
        return self.dir / "train.bin"

    @property
    def val_path(self) -> Path:
        return self.dir / "val.bin"

    @classmethod
    def load(cls, dir: Path) -> PreparedData:
        """Read `dir/data.json` and check that both .bin files exist with the recorded sizes."""
        dir = Path(dir)
        info = _read_info(dir)
        if info is None:
            raise DataError(f"{dir / 'data.json'} is missing or unreadable",
                            hint="prepare the data on the master first (it is synced to the hosts)")
        for split in ("train", "val"):
            path, want = dir / f"{split}.bin", info[split]["bytes"]
            try:
                have = path.stat().st_size
            except OSError:
                raise DataError(f"{path} is missing", hint=f"prepare the data again (delete {dir})") from None
            if have != want:
                raise DataError(f"{path} is {have} bytes but data.json records {want}",
                                hint=f"the file is truncated or stale; prepare the data again (delete {dir})")
        return cls(dir=dir, train_tokens=info["train"]["bytes"], val_tokens=info["val"]["bytes"],
                   source=info["source"])

    def verify(self) -> None:
        """Recompute the sha256 of both .bin files and compare with data.json (reads every byte)."""
        info = _read_info(self.dir) or {}
        for split in ("train", "val"):
            path = self.dir / f"{split}.bin"
            if _sha256_file(path) != info.get(split, {}).get("sha256"):
                raise DataError(f"{path}: sha256 does not match data.json (file altered or truncated)",
                                hint=f"prepare the data again (delete {self.dir})")


# ---------------------------------------------------------------------------------------------
# Reading the source


def _resolve(source: str) -> tuple[str, Path, list[Path]]:
    """(kind, root, files): kind is 'stdlib', 'folder', 'jsonl' or 'file'; files sorted."""
    if source == BUILTIN_STDLIB:
        root = Path(sysconfig.get_paths()["stdlib"])
        return "stdlib", root, _walk(root, skip_dirs=_STDLIB_SKIP, suffix=".py")
    root = Path(source).expanduser()
    if not root.exists():
        raise DataError(f"data source {root} does not exist", hint=_SOURCE_HINT)
    if root.is_dir():
        files = _walk(root, skip_dirs=set(), suffix="")
        if not files:
            raise DataError(f"data source {root} is a folder without files", hint=_SOURCE_HINT)
        return "folder", root, files
    return ("jsonl" if root.suffix == ".jsonl" else "file"), root, [root]


def _walk(root: Path, skip_dirs: set[str], suffix: str) -> list[Path]:
    """Files under root (recursively), skipping hidden entries and `skip_dirs`, sorted by relative path."""
    found: list[Path] = []
    for here, dirs, names in os.walk(root):
        dirs[:] = [d for d in dirs if not d.startswith(".") and d not in skip_dirs]
        found += [Path(here, n) for n in names if not n.startswith(".") and n.endswith(suffix)]
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def _read_bytes(path: Path, limit: int = -1) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read(limit)
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc.strerror or exc}",
                        hint="check that the file exists and is readable") from None


def _is_text(data: bytes) -> bool:
    if SEPARATOR in data:
        return False
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _documents(kind: str, files: list[Path], max_bytes: int) -> Iterator[bytes | None]:
    """Yield each document's bytes, or None for a file skipped as binary."""
    if kind == "file":
        data = _read_bytes(files[0], max_bytes or -1)
        if SEPARATOR in data:
            raise DataError(f"{files[0]} contains NUL bytes (binary, or not UTF-8 text)",
                            hint="use a UTF-8 text file, a folder of them, or a .jsonl file")
        yield data
    elif kind == "jsonl":
        yield from _jsonl_documents(files[0])
    else:
        for path in files:
            data = _read_bytes(path)
            yield data if _is_text(data) else None


def jsonl_records(path: Path, hint: str) -> Iterator[tuple[int, Any]]:
    """(line number, parsed value) of every non-blank line of a JSONL file; DataError naming the line (with
    `hint`) for one that is not JSON, or when the file cannot be read."""
    try:
        f = open(path, "rb")
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc.strerror or exc}") from None
    with f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                yield number, json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError):
                raise DataError(f"{path}: line {number} is not valid JSON", hint=hint) from None


def _jsonl_documents(path: Path) -> Iterator[bytes]:
    for number, record in jsonl_records(path, "each line must be one JSON object with a 'text' field"):
        text = record.get("text") if isinstance(record, dict) else None
        if not isinstance(text, str):
            raise DataError(f"{path}: line {number} has no 'text' field with a string value",
                            hint='each line must look like {"text": "..."}')
        yield text.encode("utf-8").replace(SEPARATOR, b"")


def _read_source(kind: str, files: list[Path], max_bytes: int) -> tuple[list[bytes], int]:
    """(documents, files skipped as binary); the documents plus one separator each fit in max_bytes."""
    docs: list[bytes] = []
    used = skipped = 0
    for doc in _documents(kind, files, max_bytes):
        if doc is None:
            skipped += 1
            continue
        if not doc:
            continue
        if max_bytes and used + len(doc) + 1 >= max_bytes:
            docs.append(doc[: max(0, max_bytes - used - 1)])
            break
        docs.append(doc)
        used += len(doc) + 1
    return [d for d in docs if d], skipped


def _fingerprint(cfg: DataConfig, root: Path, files: list[Path]) -> str:
    """Hash of what the prepared output depends on: the inputs' names, sizes and mtimes, and the settings."""
    stats = []
    for path in files:
        try:
            st = path.stat()
        except OSError as exc:
            raise DataError(f"cannot read {path}: {exc.strerror or exc}",
                            hint="check that the file exists and is readable") from None
        stats.append([path.relative_to(root).as_posix() if path != root else path.name,
                      st.st_size, st.st_mtime_ns])
    blob = {"format": FORMAT_VERSION, "source": cfg.source, "root": str(root.resolve()), "files": stats,
            "max_bytes": cfg.max_bytes, "val_share": cfg.val_share}
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()


# ---------------------------------------------------------------------------------------------
# Splitting and writing


def _unit_hash(index: int) -> float:
    """A stable pseudo-random number in [0, 1) for an index (unlike hash(), the same in every process)."""
    digest = hashlib.blake2b(index.to_bytes(8, "little"), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2**64


def _split(docs: list[bytes], val_share: float) -> tuple[bytes, bytes, str]:
    """(train, val, how): whole documents when there are enough of them, else fixed-size blocks."""
    if len(docs) >= max(2, math.ceil(2 / val_share)):
        u = [_unit_hash(i) for i in range(len(docs))]
        is_val = [x < val_share for x in u]
        if not any(is_val):
            is_val[u.index(min(u))] = True
        if all(is_val):
            is_val[u.index(max(u))] = False
        train = b"".join(d + SEPARATOR for d, v in zip(docs, is_val, strict=True) if not v)
        val = b"".join(d + SEPARATOR for d, v in zip(docs, is_val, strict=True) if v)
        return train, val, "documents"
    stream = b"".join(d + SEPARATOR for d in docs)
    # Every period-th block goes to validation, so both splits sample the whole stream.
    period = max(2, round(1 / val_share))
    block = min(max(len(stream) // (period * 8), 1024), 1 << 20)
    blocks = [stream[i:i + block] for i in range(0, len(stream), block)]
    val_ids = {i for i in range(len(blocks)) if i % period == period - 1}
    if not val_ids and len(blocks) > 1:
        val_ids = {len(blocks) - 1}
    train = b"".join(b for i, b in enumerate(blocks) if i not in val_ids)
    val = b"".join(b for i, b in enumerate(blocks) if i in val_ids)
    return train, val, "blocks"


def _check_sizes(source: str, train: int, val: int, seq_len: int) -> None:
    need = seq_len + 1
    for name, n, extra in (("training", train, ""), ("validation", val, ", a larger data.val_share")):
        if n < need:
            raise DataError(f"{source}: the {name} split holds {n} bytes, less than one sequence of "
                            f"seq_len+1 = {need} tokens",
                            hint=f"use more data (data.source, data.max_bytes){extra} "
                                 "or a shorter data.seq_len")


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _write_atomic(path: Path, data: bytes) -> None:
    """Write to a temp file beside `path`, fsync, then rename over it: readers never see half a file."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _read_info(dir: Path) -> dict | None:
    try:
        info = json.loads((dir / "data.json").read_text())
        return info if isinstance(info, dict) and {"train", "val", "source"} <= info.keys() else None
    except (OSError, ValueError):
        return None


def prepare_data(cfg: DataConfig, out_dir: Path) -> PreparedData:
    """Read `cfg.source`, split it and write `train.bin`, `val.bin` and `data.json` into `out_dir`.

    Idempotent: when data.json's fingerprint matches the inputs (paths, sizes, mtimes) and settings
    (max_bytes, val_share) and the .bin files have their recorded sizes, nothing is rewritten. data.json
    is removed first and written last, so an interrupted prepare never leaves output that looks valid.
    """
    out_dir = Path(out_dir)
    kind, root, files = _resolve(cfg.source)
    fingerprint = _fingerprint(cfg, root, files)
    info = _read_info(out_dir)
    if info is not None and info.get("fingerprint") == fingerprint:
        try:
            prepared = PreparedData.load(out_dir)
        except DataError:
            prepared = None
        if prepared is not None:
            _check_sizes(cfg.source, prepared.train_tokens, prepared.val_tokens, cfg.seq_len)
            return prepared

    docs, skipped = _read_source(kind, files, cfg.max_bytes)
    if not docs:
        raise DataError(f"data source {cfg.source} holds no text"
                        + (f" ({skipped} binary files skipped)" if skipped else ""), hint=_SOURCE_HINT)
    train, val, how = _split(docs, cfg.val_share)
    _check_sizes(cfg.source, len(train), len(val), cfg.seq_len)

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "data.json").unlink(missing_ok=True)
    record = {"format": FORMAT_VERSION, "source": cfg.source, "kind": kind, "fingerprint": fingerprint,
              "max_bytes": cfg.max_bytes, "val_share": cfg.val_share, "documents": len(docs),
              "skipped_files": skipped, "split": how, "separator": SEPARATOR[0],
              "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    for name, data in (("train", train), ("val", val)):
        _write_atomic(out_dir / f"{name}.bin", data)
        record[name] = {"file": f"{name}.bin", "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    _write_atomic(out_dir / "data.json", (json.dumps(record, indent=2) + "\n").encode())
    return PreparedData(dir=out_dir, train_tokens=len(train), val_tokens=len(val), source=cfg.source)


# ---------------------------------------------------------------------------------------------
# Batching


def _windows(path: Path, seq_len: int) -> np.ndarray:
    """The token file as a read-only (num_windows, seq_len+1) view of non-overlapping windows."""
    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError:
        raise DataError(f"token file {path} is missing", hint="prepare the data first") from None
    n = size // (seq_len + 1)
    if n == 0:
        raise DataError(f"{path} holds {size} tokens, less than one sequence of seq_len+1 = {seq_len + 1}",
                        hint="use more data or a shorter data.seq_len")
    tokens = np.memmap(path, dtype=np.uint8, mode="r")
    return tokens[: n * (seq_len + 1)].reshape(n, seq_len + 1)


def _to_xy(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    rows = rows.astype(np.int32)
    return np.ascontiguousarray(rows[:, :-1]), np.ascontiguousarray(rows[:, 1:])


class BatchSampler(ShardedStream):
    """Deterministic, sharded batches of (x, y) windows from a token file.

    The file is cut into non-overlapping windows of seq_len+1 tokens; the windows are the stream's items
    (see ShardedStream: disjoint per rank within an epoch, a pure function of the step, resumable with
    another world size, slices sized by `shares` under balanced DDP).
    """

    def __init__(self, path: Path, seq_len: int, batch_size: int, rank: int, world_size: int,
                 seed: int, *, start_step: int = 0, start_position: int | None = None,
                 shares: Sequence[int] | None = None) -> None:
        check_shard(batch_size, rank, world_size, start_step, start_position, shares)
        if seq_len < 1:
            raise ValueError("batch_size and seq_len must be positive")
        self.path, self.seq_len = Path(path), seq_len
        self._windows = _windows(self.path, seq_len)
        super().__init__(int(self._windows.shape[0]), batch_size, rank, world_size, seed,
                         start_step=start_step, start_position=start_position, shares=shares)

    @property
    def num_windows(self) -> int:
        return self.num_items

    def window_ids(self, step: int) -> np.ndarray:
        """The window indices this rank uses at global `step`."""
        return self.item_ids(step)

    def batch(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        """(x, y), int32 arrays of shape (local_batch, seq_len); y is x shifted left by one token."""
        return _to_xy(self._windows[self.window_ids(step)])


def val_batches(path: Path, seq_len: int, batch_size: int, count: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """`count` batches of evenly spaced windows from the file; the same on every rank and every call."""
    windows = _windows(path, seq_len)
    ids = np.linspace(0, windows.shape[0] - 1, count * batch_size).round().astype(np.int64)
    return [_to_xy(windows[chunk]) for chunk in ids.reshape(count, batch_size)]
