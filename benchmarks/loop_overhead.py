"""Tokens/s of macrun's training loop against a bare MLX loop: same model, batches, optimizer and steps.

Both run in this process, interleaved (bare, macrun, bare, macrun, ...) so machine noise hits both alike;
the ratio macrun/bare is reported per pair and as the median. Target: >= 0.95.

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0 \
        python benchmarks/loop_overhead.py --steps 60 --repeats 3 --json runs/bench/loop_overhead.json

macrun's figure is its steady-state rate: the loop's own timing windows between log lines, which include
batch preparation, metrics and logging but not the final validation and checkpoint (the bare loop has none).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from functools import partial
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim

from distributed.config import load_config
from distributed.data import BatchSampler, prepare_data
from distributed.models.gpt import build_model, loss_fn
from distributed.train import lr_at, train


def bare_loop(cfg, data_dir: Path, steps: int) -> float:  # type: ignore[no-untyped-def]
    """The loop a careful MLX user would write by hand; returns tokens/s over the timed steps."""
    t = cfg.train
    model = build_model(cfg.model, cfg.data.seq_len, cfg.run.seed)
    opt = optim.AdamW(learning_rate=partial(lr_at, t=t), betas=[t.beta1, t.beta2], weight_decay=t.weight_decay)
    opt.init(model.trainable_parameters())
    sampler = BatchSampler(data_dir / "train.bin", cfg.data.seq_len, t.batch_size, 0, 1, cfg.run.seed)
    state = [model.state, opt.state]
    vg = nn.value_and_grad(model, loss_fn)

    @partial(mx.compile, inputs=state, outputs=state)
    def step(x: mx.array, y: mx.array) -> mx.array:
        loss, grads = vg(model, x, y)
        grads, _ = optim.clip_grad_norm(grads, t.grad_clip)
        opt.update(model, grads)
        return loss

    warm = t.log_interval  # untimed warm-up (compilation), as macrun's first window
    start = 0.0
    for i in range(warm + steps):
        if i == warm:
            start = time.perf_counter()
        x, y = (mx.array(a) for a in sampler.batch(i))
        loss = step(x, y)
        mx.eval(loss, state)
        loss.item()
    return steps * t.batch_size * cfg.data.seq_len / (time.perf_counter() - start)


def macrun_loop(cfg, data_dir: Path, run_dir: Path) -> float:  # type: ignore[no-untyped-def]
    result = train(cfg, data_dir=data_dir, run_dir=run_dir, log=lambda _m: None)
    windows = [row["tokens_per_s"] for row in result.history[1:] if "val_loss" not in row]
    return statistics.median(windows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/quickstart.yaml")
    p.add_argument("--steps", type=int, default=60, help="timed steps per run")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        window = 10
        overrides = [f"train.steps={args.steps + window}", f"train.log_interval={window}", "train.eval_interval=0",
                     "train.eval_batches=1", "train.checkpoint_interval=0", "data.max_bytes=1000000",
                     f"run.output_dir={tmp}"]
        cfg = load_config(args.config, overrides)
        data_dir = Path(tmp) / "data"
        prepare_data(cfg.data, data_dir)
        pairs = []
        for i in range(args.repeats):
            bare = bare_loop(cfg, data_dir, args.steps)
            ours = macrun_loop(cfg, data_dir, Path(tmp) / f"run{i}")
            pairs.append({"bare_tokens_per_s": bare, "macrun_tokens_per_s": ours, "ratio": ours / bare})
            print(f"pair {i}: bare {bare:,.0f} tok/s · macrun {ours:,.0f} tok/s · ratio {ours / bare:.3f}")
    ratio = statistics.median(p["ratio"] for p in pairs)
    print(f"median ratio macrun/bare: {ratio:.3f} (target >= 0.95)")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "benchmark": "loop_overhead", "config": args.config, "steps": args.steps, "pairs": pairs,
            "median_ratio": ratio, "mlx": mx.__version__, "python": platform.python_version(),
            "machine": platform.machine(), "time": time.strftime("%Y-%m-%dT%H:%M:%S")}, indent=2))


if __name__ == "__main__":
    main()
