"""Fine-tuning an mlx-lm model inside macrun's training loop: model, batches, loss, evaluation and exports.

`distributed.train.train` drives a task: the built-in GPT (`train.BuiltinTask`) or this `FinetuneTask`,
which holds a pretrained mlx-lm model with LoRA/DoRA adapters (or unfrozen layers), the prepared JSONL
examples (`distributed.sft_data`) and mlx-lm's file formats. Only the trainable parameters train, travel
between ranks (strategies exchange `model.trainable_parameters()`) and go into checkpoints; after every
checkpoint rank 0 writes `adapters/` for `mlx_lm.generate --adapter-path` and `mlx_lm.fuse`, and a full
fine-tune writes a whole model folder, `model/`, at the end.
"""

from __future__ import annotations

import dataclasses
import os
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

from distributed.config import Config, FinetuneConfig, ModelConfig
from distributed.env import MODEL_DIR_VAR
from distributed.errors import CheckpointError, TrainingError
from distributed.models.mlxlm import (
    FineTune,
    adapter_config,
    config_sha256,
    load_finetune,
    loss_fn,
    write_adapters,
    write_model,
)
from distributed.sft_data import ExampleSampler, eval_batches

ADAPTERS_DIR = "adapters"
MODEL_DIR = "model"
EXPORTS = (ADAPTERS_DIR, MODEL_DIR)  # what rank 0 writes into the run folder besides checkpoints and metrics


def _with_defaults(saved: Any, cls: type) -> Any:
    """A saved config section with the keys added since it was written filled in with today's defaults."""
    return {**dataclasses.asdict(cls()), **saved} if isinstance(saved, dict) else saved


class FinetuneTask:
    """The loop's view of an mlx-lm fine-tune (see the module docstring); `ft` is a model already loaded."""

    def __init__(self, cfg: Config, data_dir: Path, ft: FineTune | None = None) -> None:
        self.cfg, self.data_dir = cfg, Path(data_dir)
        self.ft = ft or load_finetune(cfg)
        self.model: nn.Module = self.ft.model
        self.loss = loss_fn
        self.sampler: ExampleSampler | None = None
        self._evals: list[tuple[mx.array, ...]] = []
        self._eval_tokens = 0.0
        self._eval_step: Any = None

    # -- describing and checking -------------------------------------------------------------------

    def describe(self, world_size: int, strategy: str) -> str:
        f, ft = self.cfg.finetune, self.ft
        what = (f"{ft.kind} rank {f.rank} on the last {ft.layers} layers" if ft.kind != "full"
                else f"full, the last {ft.layers} layers")
        where = f" from {ft.path}" if os.environ.get(MODEL_DIR_VAR) else ""  # the launcher named this host's copy
        return (f"model {self.cfg.model.path}{where} ({ft.config.get('model_type')}"
                f"{', quantised' if ft.quantized else ''}): {ft.total_count / 1e6:.2f}M parameters, "
                f"{ft.trainable_count / 1e6:.3f}M trainable ({what}) · {world_size} rank(s) × batch "
                f"{self.cfg.train.batch_size} × up to {self.cfg.data.seq_len} tokens · strategy {strategy}")

    @property
    def trainable_bytes(self) -> int:
        """Bytes of the trainable parameters: what DDP all-reduces every step and DiLoCo every round."""
        return sum(v.nbytes for _, v in tree_flatten(self.model.trainable_parameters()))

    def checkpoint_meta(self) -> dict[str, Any]:
        return {"base_model": {"path": self.cfg.model.path, "config_sha256": config_sha256(self.ft.path)}}

    def check_checkpoint(self, path: Path, meta: dict[str, Any]) -> None:
        """Refuse a checkpoint of another base model or another adapter layout."""
        saved = meta.get("config", {})
        mine = self.cfg.to_dict()
        if (_with_defaults(saved.get("model"), ModelConfig) != mine["model"]
                or _with_defaults(saved.get("finetune"), FinetuneConfig) != mine["finetune"]):
            raise CheckpointError(f"{path} was written for another model or fine-tune "
                                  f"({saved.get('model')}, {saved.get('finetune')})",
                                  hint="resume with the config the run was started with")
        base = meta.get("base_model", {}).get("config_sha256")
        if base != config_sha256(self.ft.path):
            raise CheckpointError(f"{path} was trained on another version of {self.cfg.model.path} "
                                  "(its config.json differs)",
                                  hint="resume with the base model the run was started with")

    def check_same_base(self, rank: int, world_size: int, group: Any) -> int:
        """Every rank must fine-tune the same base weights (each loads them from its own disk or cache):
        compare a checksum of config.json and the weight files' sizes; returns the bytes sent."""
        if group is None or world_size <= 1:
            return 0
        sizes = sorted((p.name, p.stat().st_size) for p in self.ft.path.glob("model*.safetensors"))
        mine = zlib.crc32(f"{config_sha256(self.ft.path)}{sizes}".encode()) & 0x7FFFFFFF
        everyone = np.array(mx.distributed.all_gather(mx.array([mine], dtype=mx.int32), group=group))
        for r, value in enumerate(everyone.tolist()):
            if value != everyone[0]:
                raise TrainingError(f"rank {r} loaded another base model than rank 0 from {self.cfg.model.path} "
                                    "(config.json or weight files differ)",
                                    hint="give every host the same model: the same folder, or the same revision "
                                         "in its Hugging Face cache")
        return 4 * (world_size - 1)

    # -- data ----------------------------------------------------------------------------------------

    # The loss is already scaled by the whole step's token count (ExampleSampler, global_mean): averaging the
    # ranks' gradients is exact however the step's examples are shared out, so balanced DDP weighs nothing.
    local_mean_loss = False

    def start(self, rank: int, world_size: int, start_step: int, position: int | None, *,
              global_mean: bool, shares: Sequence[int] | None = None) -> None:
        t = self.cfg.train
        self.sampler = ExampleSampler(self.data_dir, self.cfg.data.seq_len, t.batch_size, rank, world_size,
                                      self.cfg.run.seed, start_step=start_step, start_position=position,
                                      global_mean=global_mean, shares=shares)
        batches = eval_batches(self.data_dir, self.cfg.data.seq_len, t.batch_size, t.eval_batches)
        self._evals = [tuple(mx.array(a) for a in b) for b in batches]
        self._eval_tokens = float(sum(b[2].sum() for b in batches))

    def batch(self, step: int) -> tuple[np.ndarray, ...]:
        assert self.sampler is not None
        return self.sampler.batch(step)

    def position(self, step: int) -> int:
        assert self.sampler is not None
        return self.sampler.position(step)

    def tokens(self, step: int) -> int:
        assert self.sampler is not None
        return self.sampler.tokens(step)

    def dummy_batch(self) -> tuple[mx.array, ...]:
        """A full-length batch of random tokens, to time a step (auto strategy)."""
        shape = (self.cfg.train.batch_size, self.cfg.data.seq_len)
        vocab = int(self.ft.config.get("vocab_size") or 256)
        x = mx.random.randint(0, vocab, shape, key=mx.random.key(1))
        y = mx.random.randint(0, vocab, shape, key=mx.random.key(2))
        return x, y, mx.ones(shape), mx.array(1.0 / (shape[0] * shape[1]))

    def evaluate(self) -> float | None:
        """Mean loss per loss token over the validation batches (None without valid.jsonl)."""
        if not self._evals or self._eval_tokens <= 0:
            return None
        if self._eval_step is None:
            self._eval_step = mx.compile(lambda *b: loss_fn(self.model, *b)[0], inputs=self.model.state)
        self.model.eval()
        total = mx.sum(mx.stack([self._eval_step(*b) for b in self._evals]))
        self.model.train()
        return float(total.item()) / self._eval_tokens

    # -- outputs -------------------------------------------------------------------------------------

    def export(self, run_dir: Path, weights: dict[str, mx.array], *, final: bool) -> list[Path]:
        """Rank 0, after a checkpoint: adapters/ (LoRA, DoRA) every time; model/ for a full fine-tune at the end."""
        if self.ft.kind == "full":
            return [write_model(run_dir / MODEL_DIR, self.ft)] if final else []
        return [write_adapters(run_dir / ADAPTERS_DIR, weights, adapter_config(self.ft, self.cfg))]
