"""Fine-tuning data: mlx-lm's JSONL formats, tokenised once on the master, batched per rank with a loss mask.

`prepare_finetune_data` reads `data.path/train.jsonl` (and `valid.jsonl`, when there is one) in mlx-lm's
formats, `{"text": ...}`, `{"messages": [...]}` (chat, through the tokenizer's chat template) or
`{"prompt": ..., "completion": ...}`, and tokenises every record with mlx-lm's own dataset classes
(`mlx_lm.tuner.datasets`: the same tokens, end-of-sequence handling and prompt offsets as `mlx_lm lora`).
It writes `<split>.tokens.npy` (every example's tokens, one after another), `<split>.index.npy` (start,
length and prompt length per example) and `data.json`; the launcher syncs them to the hosts, so every rank
trains on the same tokens whatever tokenizer version its host has.

`ExampleSampler` hands each rank its examples of each step through `ShardedStream` (disjoint per rank,
deterministic in the seed, resumable where a checkpoint stopped, with another world size too), truncated
to seq_len+1 tokens and padded to a multiple of 32 with a mask over the tokens that count in the loss.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from distributed.config import Config
from distributed.data import _read_info, _write_atomic, jsonl_records
from distributed.errors import DataError
from distributed.shards import ShardedStream

FORMAT_VERSION = 1
SPLITS = (("train", "train.jsonl"), ("valid", "valid.jsonl"))
PAD_MULTIPLE = 32  # as mlx-lm's iterate_batches: few distinct shapes, so few compiled variants of the step
FORMAT_KEYS = {"completions": ("prompt", "completion"), "chat": ("messages",), "text": ("text",)}
_HINT = ('data.path is a folder with train.jsonl (and valid.jsonl), one JSON object a line: {"text": ...}, '
         '{"messages": [{"role": "user", "content": ...}, ...]} or {"prompt": ..., "completion": ...}')
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
                    "chat_template.jinja", "chat_template.json", "tokenizer.tiktoken")


@dataclass(frozen=True)
class PreparedExamples:
    """A prepared fine-tuning data folder."""

    dir: Path
    format: str
    examples: dict[str, int]  # split -> examples
    tokens: dict[str, int]  # split -> tokens before truncation
    source: str
    masked: bool  # whether the loss skips the prompt
    cut: int = 0  # training examples longer than seq_len+1 tokens (truncated when batched)
    seq_len: int = 0

    def describe(self) -> str:
        valid = (f"{self.examples['valid']:,} validation examples" if self.examples.get("valid")
                 else "no valid.jsonl: no validation loss")
        loss = "completion-only loss" if self.masked else "loss on every token"
        cut = f"; {self.cut:,} longer than data.seq_len={self.seq_len} are cut" if self.cut else ""
        return (f"data: {self.examples['train']:,} training examples ({self.tokens['train']:,} tokens), {valid} "
                f"from {self.source} ({self.format}, {loss}{cut})")


def _records(path: Path) -> list[dict[str, Any]]:
    out = []
    for number, record in jsonl_records(path, _HINT):
        if not isinstance(record, dict):
            raise DataError(f"{path}: line {number} is not a JSON object", hint=_HINT)
        record["_line"] = number
        out.append(record)
    return out


def detect_format(record: dict[str, Any]) -> str | None:
    """mlx-lm's rule (tuner/datasets.py, create_dataset): prompt+completion, else messages, else text."""
    for name, keys in FORMAT_KEYS.items():
        if all(k in record for k in keys):
            return name
    return None


def _dataset(fmt: str, records: list[dict[str, Any]], tokenizer: Any, mask_prompt: bool) -> Any:
    from mlx_lm.tuner.datasets import ChatDataset, CompletionsDataset, TextDataset

    if fmt == "text":
        return TextDataset(records, tokenizer)
    if fmt == "chat":
        return ChatDataset(records, tokenizer, mask_prompt=mask_prompt)
    return CompletionsDataset(records, tokenizer, "prompt", "completion", mask_prompt)


def _tokenize(path: Path, fmt: str, records: list[dict[str, Any]], tokenizer: Any,
              mask_prompt: bool) -> tuple[np.ndarray, np.ndarray]:
    """(tokens uint32, index int64 (n, 3): start, length, prompt offset) of every record."""
    keys = FORMAT_KEYS[fmt]
    for r in records:
        if not all(k in r for k in keys):
            raise DataError(f"{path}: line {r['_line']} lacks {' and '.join(repr(k) for k in keys)} "
                            f"(the file's {fmt} format, read off its first record)", hint=_HINT)
    dataset = _dataset(fmt, records, tokenizer, mask_prompt and fmt != "text")
    pieces, index, start = [], [], 0
    for r in records:
        try:
            tokens, offset = dataset.process(r)
        except Exception as exc:  # the tokenizer's chat template failing, or a field of the wrong type
            if fmt != "text" and not getattr(tokenizer, "chat_template", None):
                raise DataError(f"{path}: {fmt} records need a chat template, and this model's tokenizer has none",
                                hint="use text records, or a model with a chat template (an -Instruct model)") from None
            why = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise DataError(f"{path}: line {r['_line']} cannot be tokenised: {why}", hint=_HINT) from None
        tokens = np.asarray(tokens, dtype=np.uint32).reshape(-1)
        pieces.append(tokens)
        index.append((start, tokens.size, min(int(offset), tokens.size)))
        start += tokens.size
    tokens = np.concatenate(pieces) if pieces else np.zeros(0, np.uint32)
    return tokens, np.asarray(index, dtype=np.int64).reshape(-1, 3)


def _fingerprint(cfg: Config, data_dir: Path, model_dir: Path) -> str:
    """What the prepared output depends on: the JSONL files' sizes and mtimes, the tokenizer files, the settings."""
    stats = []
    for _, name in SPLITS:
        p = data_dir / name
        if p.exists():
            st = p.stat()
            stats.append([name, st.st_size, st.st_mtime_ns])
    tok = hashlib.sha256()
    for name in _TOKENIZER_FILES:
        if (model_dir / name).is_file():
            tok.update(name.encode() + b"\0" + (model_dir / name).read_bytes())
    blob = {"format": FORMAT_VERSION, "data": str(data_dir.resolve()), "files": stats, "tokenizer": tok.hexdigest(),
            "records": cfg.data.format, "mask_prompt": cfg.data.mask_prompt}
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()


def _data_dir(cfg: Config) -> Path:
    if not cfg.data.path:
        raise DataError("data.path is not set: fine-tuning reads a folder of JSONL files", hint=_HINT)
    root = Path(cfg.data.path).expanduser()
    if not root.is_dir():
        raise DataError(f"data.path {str(root)!r} is not a folder" if root.exists()
                        else f"data.path {str(root)!r} does not exist",
                        hint=_HINT)
    if not (root / "train.jsonl").is_file():
        raise DataError(f"{root} has no train.jsonl", hint=_HINT)
    return root


def prepare_finetune_data(cfg: Config, out_dir: Path) -> PreparedExamples:
    """Tokenise `cfg.data.path` with `cfg.model.path`'s tokenizer into `out_dir` (idempotent, like prepare_data)."""
    from distributed.models.mlxlm import require_mlx_lm, resolve_model_path

    model_dir = resolve_model_path(cfg.model.path)  # the model first: a config without one says so first
    root = _data_dir(cfg)
    fingerprint = _fingerprint(cfg, root, model_dir)
    info = _read_info(out_dir)
    if info is not None and info.get("fingerprint") == fingerprint:
        try:
            return load_prepared(out_dir, cfg.data.seq_len)
        except DataError:
            pass
    require_mlx_lm()
    from mlx_lm.utils import load_tokenizer

    tokenizer = load_tokenizer(model_dir)
    raw = {split: _records(root / name) if (root / name).is_file() else [] for split, name in SPLITS}
    if not raw["train"]:
        raise DataError(f"{root / 'train.jsonl'} holds no records", hint=_HINT)
    fmt = cfg.data.format if cfg.data.format != "auto" else detect_format(raw["train"][0])
    if fmt is None:
        raise DataError(f"{root / 'train.jsonl'}: line {raw['train'][0]['_line']} is in none of mlx-lm's formats "
                        f"(its keys: {', '.join(k for k in raw['train'][0] if k != '_line')})", hint=_HINT)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "data.json").unlink(missing_ok=True)
    record: dict[str, Any] = {"format": FORMAT_VERSION, "kind": "finetune", "source": str(root), "records": fmt,
                              "mask_prompt": cfg.data.mask_prompt and fmt != "text", "fingerprint": fingerprint,
                              "model": cfg.model.path, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                              "train": {}, "val": {}}
    for split, name in SPLITS:
        tokens, index = _tokenize(root / name, fmt, raw[split], tokenizer, cfg.data.mask_prompt)
        for part, array in (("tokens", tokens), ("index", index)):
            _write_atomic(out_dir / f"{split}.{part}.npy", _npy_bytes(array))
        record["train" if split == "train" else "val"] = {"examples": int(index.shape[0]), "tokens": int(tokens.size)}
    _write_atomic(out_dir / "data.json", (json.dumps(record, indent=2) + "\n").encode())
    return load_prepared(out_dir, cfg.data.seq_len)


def _npy_bytes(array: np.ndarray) -> bytes:
    import io

    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def load_prepared(dir: Path, seq_len: int = 0) -> PreparedExamples:
    """Read `dir/data.json` of a prepared fine-tuning folder and check that its files are there; with `seq_len`,
    count the training examples it cuts."""
    info = _read_info(dir)
    if info is None or info.get("kind") != "finetune":
        raise DataError(f"{dir / 'data.json'} is missing or not fine-tuning data",
                        hint="prepare the data on the master first (macrun train does; it is synced to the hosts)")
    for split, _ in SPLITS:
        for part in ("tokens", "index"):
            if not (dir / f"{split}.{part}.npy").is_file():
                raise DataError(f"{dir / f'{split}.{part}.npy'} is missing",
                                hint=f"prepare the data again (delete {dir})")
    cut = int((np.load(dir / "train.index.npy")[:, 1] > seq_len + 1).sum()) if seq_len else 0
    return PreparedExamples(dir=dir, format=info["records"], source=info["source"], masked=info["mask_prompt"],
                            examples={"train": info["train"]["examples"], "valid": info["val"]["examples"]},
                            tokens={"train": info["train"]["tokens"], "valid": info["val"]["tokens"]},
                            cut=cut, seq_len=seq_len)


class Examples:
    """One split's tokenised examples, truncated to seq_len+1 tokens, as padded batches with a loss mask."""

    def __init__(self, dir: Path, split: str, seq_len: int) -> None:
        try:
            self.tokens = np.load(dir / f"{split}.tokens.npy", mmap_mode="r", allow_pickle=False)
            index = np.load(dir / f"{split}.index.npy", allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise DataError(f"cannot read the prepared {split} data in {dir}: {exc}",
                            hint=f"prepare the data again (delete {dir})") from None
        self.starts = index[:, 0]
        self.lengths = np.minimum(index[:, 1], seq_len + 1)  # truncation: seq_len inputs, as mlx-lm's max_seq_length
        # Targets are tokens 1..length-1; those before the prompt offset do not count in the loss.
        self.first_target = np.maximum(index[:, 2], 1)
        self.loss_tokens = np.maximum(self.lengths - self.first_target, 0)
        self.seq_len = seq_len

    def __len__(self) -> int:
        return int(self.starts.shape[0])

    def batch(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(inputs, targets) int32 and mask float32, all (len(ids), T) with T a multiple of 32 (at most seq_len)."""
        longest = int(self.lengths[ids].max()) - 1 if len(ids) else 1
        width = max(1, min(self.seq_len, PAD_MULTIPLE * math.ceil(max(longest, 1) / PAD_MULTIPLE)))
        inputs = np.zeros((len(ids), width), np.int32)
        targets = np.zeros((len(ids), width), np.int32)
        mask = np.zeros((len(ids), width), np.float32)
        for row, i in enumerate(ids):
            n, start = int(self.lengths[i]), int(self.starts[i])
            if n < 2:
                continue
            seq = np.asarray(self.tokens[start:start + n], dtype=np.int32)
            inputs[row, :n - 1], targets[row, :n - 1] = seq[:-1], seq[1:]
            mask[row, int(self.first_target[i]) - 1:n - 1] = 1.0
        return inputs, targets, mask


class ExampleSampler(ShardedStream):
    """This rank's batch of fine-tuning examples at each global step, with the loss scale of that step.

    `global_mean` (DDP: the ranks average gradients every step) scales each rank's summed loss by
    world_size / (loss tokens of the whole step), which every rank computes from the step's example ids,
    so the averaged gradient is exactly that of the global batch's token mean, however the step's examples
    are cut between the ranks (equal slices or balanced DDP's `shares`); otherwise each rank takes its own
    token mean.
    """

    def __init__(self, dir: Path, seq_len: int, batch_size: int, rank: int, world_size: int, seed: int, *,
                 start_step: int = 0, start_position: int | None = None, global_mean: bool = True,
                 shares: Sequence[int] | None = None) -> None:
        self.examples = Examples(Path(dir), "train", seq_len)
        if not len(self.examples):
            raise DataError(f"{dir} holds no training examples", hint=_HINT)
        super().__init__(len(self.examples), batch_size, rank, world_size, seed, start_step=start_step,
                         start_position=start_position, shares=shares)
        self.global_mean = global_mean

    def batch(self, step: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(inputs, targets, mask, scale): scale is a float32 scalar (see the class docstring)."""
        ids = self.item_ids(step)
        counted = self.examples.loss_tokens[self.step_ids(step) if self.global_mean else ids].sum()
        world = self.world_size if self.global_mean else 1
        scale = np.array(world / max(int(counted), 1), dtype=np.float32)
        return (*self.examples.batch(ids), scale)

    def tokens(self, step: int) -> int:
        """Input tokens (padding excluded) every rank together trains on at `step`."""
        return int((self.examples.lengths[self.step_ids(step)] - 1).clip(min=0).sum())


def eval_batches(dir: Path, seq_len: int, batch_size: int, count: int) -> list[tuple[np.ndarray, ...]]:
    """Up to `count` batches of the validation examples, in file order, the same on every rank (none without
    valid.jsonl); each is (inputs, targets, mask, scale 1): the loss sums, to be divided by mask.sum()."""
    examples = Examples(Path(dir), "valid", seq_len)
    ids = np.arange(min(len(examples), count * batch_size))
    return [(*examples.batch(chunk), np.array(1.0, np.float32))
            for chunk in (ids[i:i + batch_size] for i in range(0, len(ids), batch_size))]
