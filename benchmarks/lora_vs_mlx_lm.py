"""Tokens/s of macrun's LoRA fine-tuning loop against mlx-lm's own trainer (what `mlx_lm lora` runs).

Same model, data, LoRA adapters (rank, scale, layers), batch size, seq_len, optimizer and steps, both in this
process, interleaved (mlx-lm, macrun, mlx-lm, macrun, ...) so machine noise hits both alike; the ratio
macrun/mlx-lm is reported per pair and as the median. Target: >= 0.95.

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0 \
        python benchmarks/lora_vs_mlx_lm.py --json runs/bench/lora_vs_mlx_lm.json

macrun runs `distributed.train.train` with model.source=mlx-lm on 1 rank (no strategy exchange); mlx-lm runs
`mlx_lm.tuner.trainer.train` with its own batching, loss and compiled step, set up as `mlx_lm lora` does
(`linear_to_lora_layers` after `mx.random.seed`, `CacheDataset` over its chat dataset). The default model
is a random-weight Llama in Hugging Face layout built here (tests/support/tinyhf.py); `--model PATH` takes
a real local model (on a Mac). The chat data is generated here, no download.

Tokens are counted alike in both: the non-padding input tokens of each batch (each example's length - 1,
after truncation to seq_len+1 tokens), whether or not the loss masks them. A rate is the median over timing
windows of `--window` steps measured from the loops' own progress reports (macrun's log lines, mlx-lm's
`on_train_loss_report` callback), wall clock between two reports: batch preparation, the step, metrics and
reporting. The first window (compilation) is skipped in both. The JSON keeps every window, and the ratio of
all windows pooled (median, 90th percentile) as a second view for a loaded machine. Where the loops differ:

- batching: mlx-lm sorts its examples by length, cuts them into fixed batches and shuffles their order (in
  mlx-lm 0.32 the length is `CacheDataset.itemlen`, the raw record's: 1 for a chat record, so the batches keep
  file order); macrun draws each step's examples from a per-epoch permutation. Both pad to a multiple of 32. With
  `--lengths narrow` (default) every example is seq_len-24..seq_len+1 tokens, so every batch of both is
  seq_len wide and the padding is alike; `--lengths wide` spreads them over 24..seq_len+1 (the padding each
  loop pays is in the JSON);
- masking: both compute the loss on the assistant's answer only (`mask_prompt`); mlx-lm builds the mask
  inside the step from (offset, length) and also counts the padding token after each shorter example;
  macrun passes a mask and a 1/loss-tokens scale (equal to mlx-lm's token mean on one rank);
- optimizer: both get macrun's AdamW with its warm-up and cosine schedule (`mlx_lm lora` defaults to Adam at
  a constant rate; its trainer takes any optimizer); mlx-lm has no gradient clipping, so train.grad_clip=0;
- tokenising: mlx-lm's CacheDataset tokenises each example the first time a batch needs it; the benchmark
  fills that cache before training, as macrun tokenises before its loop;
- overlap: macrun builds the next batch while a step computes; mlx-lm builds it first, then waits on the step;
- neither evaluates (no valid.jsonl) nor checkpoints inside the timed windows; gradient checkpointing and
  LoRA dropout are off in both; mlx-lm's progress display is sent to /dev/null.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from importlib import metadata
from itertools import pairwise
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a file: `python benchmarks/lora_vs_mlx_lm.py`
    sys.path.insert(0, str(REPO))

from distributed.config import Config, config_from_dict  # noqa: E402
from distributed.finetune import FinetuneTask  # noqa: E402
from distributed.sft_data import prepare_finetune_data  # noqa: E402
from distributed.train import make_optimizer, train  # noqa: E402


@dataclass(frozen=True)
class Settings:
    """What both loops share (the command line's values)."""

    seq_len: int  # inputs per example at most: macrun's data.seq_len, mlx-lm's max_seq_length - 1
    batch_size: int
    steps: int  # timed steps per run, after one untimed window
    window: int  # steps per timing window (macrun's log_interval, mlx-lm's steps_per_report)
    lora_rank: int
    lora_scale: float
    lora_layers: int  # the last N layers get adapters (-1: all)
    lr: float
    examples: int  # training examples generated
    lengths: str  # narrow | wide: how example lengths spread below seq_len
    seed: int


# -- model and data ------------------------------------------------------------------------------------


def build_tiny_llama(root: Path, hidden: int, layers: int, vocab: int) -> Path:
    """A random-weight Llama in Hugging Face layout with tinyhf's tokenizer; rows of the embedding past the
    tokenizer's vocabulary are never used but cost what a larger vocabulary costs in the output layer."""
    from tests.support.tinyhf import LLAMA, SPECIALS, _write_model, train_tokenizer

    tokens = train_tokenizer(root / "tokenizer")
    config = {**LLAMA, "hidden_size": hidden, "num_hidden_layers": layers, "intermediate_size": hidden * 8 // 3,
              "num_attention_heads": hidden // 64, "num_key_value_heads": max(1, hidden // 128),
              "max_position_embeddings": 4096, "vocab_size": max(vocab, tokens),
              "bos_token_id": SPECIALS.index("<|bos|>"), "eos_token_id": SPECIALS.index("<|eos|>")}
    _write_model(root / "llama", config, root / "tokenizer", seed=1)
    return root / "llama"


def write_chat_data(model_dir: Path, out: Path, s: Settings) -> tuple[Path, str]:
    """`train.jsonl` of `s.examples` chat records (text records for a tokenizer without a chat template), each
    sized with the model's own tokenizer to a length drawn from the `s.lengths` range; returns (folder, format)."""
    from mlx_lm.tuner.datasets import ChatDataset, TextDataset
    from mlx_lm.utils import load_tokenizer
    from transformers.utils import logging

    from tests.support.tinyhf import WORDS

    logging.set_verbosity_error()  # the search below tokenises past the tokenizer's model_max_length

    tokenizer = load_tokenizer(model_dir)
    chat = bool(getattr(tokenizer, "chat_template", None))
    dataset = ChatDataset([], tokenizer, mask_prompt=True) if chat else TextDataset([], tokenizer)
    rng = random.Random(s.seed)
    low = s.seq_len - 24 if s.lengths == "narrow" else 24
    lines = []
    for _ in range(s.examples):
        a, b = rng.randint(1, 99), rng.randint(1, 99)
        words = [rng.choice(WORDS) for _ in range(4 * s.seq_len)]
        target = rng.randint(low, s.seq_len + 1)

        def record(n: int, a: int = a, b: int = b, words: list[str] = words) -> dict[str, Any]:
            answer = f"the answer is {a + b}. " + " ".join(words[:n])
            if chat:
                return {"messages": [{"role": "user", "content": f"what is {a} plus {b}?"},
                                     {"role": "assistant", "content": answer}]}
            return {"text": f"what is {a} plus {b}? {answer}"}

        lo, hi = 0, len(words)  # the most words whose tokens fit in `target` (binary search)
        while lo < hi:
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if len(dataset.process(record(mid))[0]) <= target else (lo, mid - 1)
        lines.append(json.dumps(record(lo)))
    out.mkdir(parents=True, exist_ok=True)
    (out / "train.jsonl").write_text("\n".join(lines) + "\n")
    return out, "chat" if chat else "text"


def macrun_config(model_dir: Path, data_dir: Path, s: Settings) -> Config:
    base = {"run": {"seed": s.seed},
            "model": {"source": "mlx-lm", "path": str(model_dir)},
            "data": {"path": str(data_dir), "seq_len": s.seq_len, "mask_prompt": True},
            "finetune": {"type": "lora", "rank": s.lora_rank, "scale": s.lora_scale, "dropout": 0.0,
                         "layers": s.lora_layers},
            "train": {"steps": s.steps + s.window, "batch_size": s.batch_size, "lr": s.lr, "min_lr": s.lr / 10,
                      "warmup_steps": s.window, "weight_decay": 0.0, "grad_clip": 0.0, "eval_interval": 0,
                      "eval_batches": 1, "checkpoint_interval": 0, "log_interval": s.window}}
    return config_from_dict(base, [])


# -- the two loops -------------------------------------------------------------------------------------


def mlx_lm_loop(cfg: Config, model_dir: Path, data_dir: Path, work: Path, s: Settings) -> dict[str, Any]:
    """`mlx_lm.tuner.trainer.train` set up as `mlx_lm lora` sets it up; its tokens/s and padding share."""
    from types import SimpleNamespace

    from mlx_lm.tuner import trainer
    from mlx_lm.tuner.datasets import CacheDataset, load_local_dataset
    from mlx_lm.tuner.utils import linear_to_lora_layers
    from mlx_lm.utils import load

    model, tokenizer = load(str(model_dir))
    mx.random.seed(s.seed)
    model.freeze()
    layers = len(model.layers) if s.lora_layers == -1 else s.lora_layers
    linear_to_lora_layers(model, layers, {"rank": s.lora_rank, "scale": s.lora_scale, "dropout": 0.0})
    train_set, _, _ = load_local_dataset(data_dir, tokenizer, SimpleNamespace(mask_prompt=True))
    dataset = CacheDataset(train_set)
    for i in range(len(dataset)):  # tokenise up front, as macrun does (see the module docstring)
        dataset[i]

    counted = {"tokens": 0, "padded": 0}

    def batches(*args: Any, **kwargs: Any) -> Any:
        for batch, lengths in trainer.iterate_batches(*args, **kwargs):
            counted["tokens"] += int((np.array(lengths)[:, 1] - 1).clip(min=0).sum())
            counted["padded"] += batch.shape[0] * (batch.shape[1] - 1)
            yield batch, lengths

    reports: list[tuple[float, int]] = []

    class Clock(trainer.TrainingCallback):
        def on_train_loss_report(self, train_info: dict) -> None:
            reports.append((time.perf_counter(), counted["tokens"]))

    iters = s.steps + s.window
    work.mkdir(parents=True, exist_ok=True)
    args = trainer.TrainingArgs(batch_size=s.batch_size, iters=iters, val_batches=0, steps_per_report=s.window,
                                steps_per_eval=iters + 1, steps_per_save=iters + 1,
                                max_seq_length=s.seq_len + 1, adapter_file=str(work / "adapters.safetensors"),
                                grad_checkpoint=False)
    with open(os.devnull, "w") as quiet, contextlib.redirect_stdout(quiet):
        trainer.train(model=model, optimizer=make_optimizer(cfg), train_dataset=dataset, val_dataset=None,
                      args=args, iterate_batches=batches, training_callback=Clock())
    windows = [(n1 - n0) / (t1 - t0) for (t0, n0), (t1, n1) in pairwise(reports)]
    return {"tokens_per_s": statistics.median(windows), "windows": windows,
            "padding": 1 - counted["tokens"] / counted["padded"]}


class _CountingTask(FinetuneTask):
    """macrun's task, counting the padded batch size it hands the loop (the same arithmetic as mlx-lm's side)."""

    padded = 0

    def batch(self, step: int) -> tuple[np.ndarray, ...]:
        b = super().batch(step)
        self.padded += b[0].size
        return b


def macrun_loop(cfg: Config, data_dir: Path, run_dir: Path) -> dict[str, Any]:
    """`distributed.train.train` on one rank; its steady-state tokens/s (its own log windows) and padding share."""
    task = _CountingTask(cfg, data_dir)
    result = train(cfg, data_dir=data_dir, run_dir=run_dir, log=lambda _m: None, task=task)
    windows = [row["tokens_per_s"] for row in result.history[1:]]
    return {"tokens_per_s": statistics.median(windows), "windows": windows, "padding": 1 - result.tokens / task.padded}


# -- driver --------------------------------------------------------------------------------------------


def pooled_ratios(pairs: list[dict[str, Any]]) -> dict[str, float]:
    """macrun/mlx-lm of the median and the 90th percentile of every timed window of every run: on a loaded
    machine, where a burst of load can fall on one loop's run and not the other's, a second view of the same
    data (load only ever slows a window, so the fastest windows are the least disturbed)."""
    ours = [w for p in pairs for w in p["macrun_windows"]]
    theirs = [w for p in pairs for w in p["mlx_lm_windows"]]
    return {name: float(np.percentile(ours, q) / np.percentile(theirs, q)) for name, q in (("median", 50), ("p90", 90))}


def git_commit() -> str:
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True).stdout.strip()
        return head + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, default=None,
                   help="a local mlx-lm model folder (default: a random-weight Llama built here)")
    p.add_argument("--hidden", type=int, default=256, help="built model: hidden size (a multiple of 64)")
    p.add_argument("--layers", type=int, default=4, help="built model: transformer layers")
    p.add_argument("--vocab", type=int, default=1536, help="built model: vocabulary size")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--steps", type=int, default=30, help="timed steps per run (after one untimed window)")
    p.add_argument("--window", type=int, default=5, help="steps per timing window")
    p.add_argument("--lora-rank", type=int, default=8)
    p.add_argument("--lora-scale", type=float, default=20.0)
    p.add_argument("--lora-layers", type=int, default=-1, help="the last N layers get adapters (-1: all)")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--examples", type=int, default=128)
    p.add_argument("--lengths", choices=("narrow", "wide"), default="narrow",
                   help="example lengths: seq_len-24..seq_len+1 tokens (every batch equally wide) or 24..seq_len+1")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--json", type=Path, default=None)
    a = p.parse_args()
    if a.steps < a.window or a.steps % a.window:
        p.error("--steps must be a positive multiple of --window")
    s = Settings(seq_len=a.seq_len, batch_size=a.batch_size, steps=a.steps, window=a.window, lora_rank=a.lora_rank,
                 lora_scale=a.lora_scale, lora_layers=a.lora_layers, lr=a.lr, examples=a.examples,
                 lengths=a.lengths, seed=a.seed)

    load_before = os.getloadavg()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model_dir = a.model.expanduser() if a.model else build_tiny_llama(root / "model", a.hidden, a.layers, a.vocab)
        data_dir, fmt = write_chat_data(model_dir, root / "data", s)
        cfg = macrun_config(model_dir, data_dir, s)
        prepared = prepare_finetune_data(cfg, root / "prepared")
        model_config = json.loads((model_dir / "config.json").read_text())
        print(f"model {model_dir.name}: hidden {model_config.get('hidden_size')}, "
              f"{model_config.get('num_hidden_layers')} layers, vocab {model_config.get('vocab_size')} · "
              f"{prepared.describe()}")
        pairs = []
        for i in range(a.repeats):
            theirs = mlx_lm_loop(cfg, model_dir, data_dir, root / f"mlx_lm{i}", s)
            gc.collect()
            mx.clear_cache()
            ours = macrun_loop(cfg, prepared.dir, root / f"run{i}")
            gc.collect()
            mx.clear_cache()
            ratio = ours["tokens_per_s"] / theirs["tokens_per_s"]
            pairs.append({"mlx_lm_tokens_per_s": theirs["tokens_per_s"], "macrun_tokens_per_s": ours["tokens_per_s"],
                          "ratio": ratio, "mlx_lm_padding": theirs["padding"], "macrun_padding": ours["padding"],
                          "mlx_lm_windows": theirs["windows"], "macrun_windows": ours["windows"]})
            print(f"pair {i}: mlx-lm {theirs['tokens_per_s']:,.0f} tok/s · macrun {ours['tokens_per_s']:,.0f} tok/s"
                  f" · ratio {ratio:.3f} (padding {theirs['padding']:.1%} vs {ours['padding']:.1%})")
    ratio = statistics.median(p["ratio"] for p in pairs)
    pooled = pooled_ratios(pairs)
    load_after = os.getloadavg()
    print(f"median ratio macrun/mlx-lm: {ratio:.3f} (target >= 0.95) · all windows pooled: median "
          f"{pooled['median']:.3f}, 90th percentile {pooled['p90']:.3f} · load average {load_before[0]:.2f} before, "
          f"{load_after[0]:.2f} after, on {os.cpu_count()} CPUs")
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps({
            "benchmark": "lora_vs_mlx_lm", "command": " ".join(sys.argv), "settings": asdict(s),
            "model": str(a.model) if a.model else "built: random-weight llama",
            "model_config": {k: model_config.get(k) for k in ("model_type", "hidden_size", "num_hidden_layers",
                                                              "intermediate_size", "vocab_size")},
            "data_format": fmt, "token_count": "non-padding input tokens (example length - 1, after truncation)",
            "pairs": pairs, "median_ratio": ratio, "pooled_window_ratio": pooled,
            "seconds": time.perf_counter() - started,
            "load_avg_before": load_before, "load_avg_after": load_after, "cpus": os.cpu_count(),
            "git_commit": git_commit(), "mlx": mx.__version__, "mlx_lm": metadata.version("mlx-lm"),
            "python": platform.python_version(), "machine": platform.machine(), "platform": platform.platform(),
            "time": time.strftime("%Y-%m-%dT%H:%M:%S")}, indent=2))


if __name__ == "__main__":
    main()
