"""The training loop: model, data, AdamW with warm-up and cosine decay, a strategy, eval, checkpoints, metrics.

One function, `train`, runs on every rank (with world size 1 it is plain single-process training). The
strategy decides what ranks exchange (nothing, gradients every step, or DiLoCo pseudo-gradients); the loop
itself only computes, logs and saves. Rank 0 alone prints progress, writes metrics.jsonl and checkpoints.
What is trained is a task: the built-in GPT on a token file (`BuiltinTask`, below) or a pretrained mlx-lm
model fine-tuned on JSONL examples (`distributed.finetune.FinetuneTask`, when model.source is mlx-lm).

    python -m distributed.worker configs/quickstart.yaml --data runs/quickstart/data --run-dir runs/quickstart
"""

from __future__ import annotations

import dataclasses
import json
import math
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim

from distributed import __version__
from distributed.checkpoint import (
    flatten_tree,
    latest_checkpoint,
    load_rank_state,
    save_checkpoint,
    save_rank_state,
    stream_position,
    unflatten_tree,
)
from distributed.config import Config, ModelConfig, TrainConfig
from distributed.data import BatchSampler, val_batches
from distributed.errors import CheckpointError
from distributed.models.gpt import build_model, count_params, loss_fn
from distributed.progress import PROGRESS
from distributed.strategy import LocalStrategy, Strategy, adopt_from_rank0


def lr_at(step: int | mx.array, t: TrainConfig) -> Any:
    """Learning rate for a 0-based step: linear warm-up to `lr` (step 0 already trains), then cosine to `min_lr`.

    Works on Python numbers (for display) and on mx arrays (inside the optimizer).
    """
    if isinstance(step, mx.array):
        s = step.astype(mx.float32)
        warm = t.lr * (s + 1) / (t.warmup_steps + 1)
        progress = mx.clip((s - t.warmup_steps) / max(1, t.steps - t.warmup_steps), 0.0, 1.0)
        cosine = t.min_lr + 0.5 * (t.lr - t.min_lr) * (1 + mx.cos(math.pi * progress))
        return mx.where(s < t.warmup_steps, warm, cosine)
    if step < t.warmup_steps:
        return t.lr * (step + 1) / (t.warmup_steps + 1)
    progress = min(1.0, (step - t.warmup_steps) / max(1, t.steps - t.warmup_steps))
    return t.min_lr + 0.5 * (t.lr - t.min_lr) * (1 + math.cos(math.pi * progress))


@dataclass
class TrainResult:
    step: int
    loss: float  # rank 0's loss on the final step's batch alone (noisy; the checkpoint records it too)
    val_loss: float | None
    tokens: int
    seconds: float
    tokens_per_s: float
    checkpoint: Path | None
    history: list[dict[str, Any]] = field(default_factory=list)
    # rank 0's mean loss over the steps since the previous progress line, first..last step: the figure the
    # last `step N/M · loss X` line printed. None when the call trained no step (resumed at the end).
    recent_loss: float | None = None
    recent_steps: tuple[int, int] | None = None


def make_optimizer(cfg: Config) -> optim.AdamW:
    t = cfg.train
    return optim.AdamW(learning_rate=partial(lr_at, t=t), betas=[t.beta1, t.beta2],
                       weight_decay=t.weight_decay)


class BuiltinTask:
    """The built-in GPT on the prepared token files: the model, its batches, its loss and its evaluation."""

    def __init__(self, cfg: Config, data_dir: Path) -> None:
        self.cfg, self.data_dir = cfg, data_dir
        self.model = build_model(cfg.model, cfg.data.seq_len, cfg.run.seed)
        self.loss = loss_fn
        self.sampler: BatchSampler | None = None

    def describe(self, world_size: int, strategy: str) -> str:
        cfg = self.cfg
        return (f"model {cfg.model.arch}-{cfg.model.size}: {count_params(self.model) / 1e6:.2f}M parameters · "
                f"{world_size} rank(s) × batch {cfg.train.batch_size} × {cfg.data.seq_len} tokens · "
                f"strategy {strategy}")

    def checkpoint_meta(self) -> dict[str, Any]:
        return {}

    def check_checkpoint(self, path: Path, meta: dict[str, Any]) -> None:
        saved = meta.get("config", {}).get("model")
        if isinstance(saved, dict):  # keys added since the checkpoint was written take their defaults
            saved = {**dataclasses.asdict(ModelConfig()), **saved}
        if saved != self.cfg.to_dict()["model"]:
            raise CheckpointError(f"{path} was written for another model ({meta['config']['model']})",
                                  hint="resume with the config the run was started with")

    def check_same_base(self, rank: int, world_size: int, group: Any) -> int:
        return 0  # built from the seed alone: nothing loaded that could differ between hosts

    # The loss is the mean over this rank's own batch: under balanced DDP its gradient needs a weight.
    local_mean_loss = True

    def start(self, rank: int, world_size: int, start_step: int, position: int | None, *,
              global_mean: bool, shares: Sequence[int] | None = None) -> None:
        cfg, t = self.cfg, self.cfg.train
        self.sampler = BatchSampler(self.data_dir / "train.bin", cfg.data.seq_len, t.batch_size, rank, world_size,
                                    cfg.run.seed, start_step=start_step, start_position=position, shares=shares)
        self._world = world_size
        self._evals = [(mx.array(x), mx.array(y)) for x, y in
                       val_batches(self.data_dir / "val.bin", cfg.data.seq_len, t.batch_size, t.eval_batches)]
        self._eval_step = mx.compile(partial(loss_fn, self.model), inputs=self.model.state)

    def batch(self, step: int) -> tuple[Any, ...]:
        assert self.sampler is not None
        return self.sampler.batch(step)

    def position(self, step: int) -> int:
        assert self.sampler is not None
        return self.sampler.position(step)

    def tokens(self, step: int) -> int:
        return self.cfg.train.batch_size * self.cfg.data.seq_len * self._world

    def evaluate(self) -> float | None:
        self.model.eval()
        losses = [self._eval_step(x, y) for x, y in self._evals]
        self.model.train()
        return float(mx.mean(mx.stack(losses)).item())

    def export(self, run_dir: Path, weights: dict[str, mx.array], *, final: bool) -> list[Path]:
        return []  # the checkpoint is the output


def make_task(cfg: Config, data_dir: Path) -> Any:
    """The task `cfg` describes; mlx-lm is imported only for model.source=mlx-lm (it takes seconds)."""
    if cfg.model.source == "mlx-lm":
        from distributed.finetune import FinetuneTask

        return FinetuneTask(cfg, data_dir)
    return BuiltinTask(cfg, data_dir)


def _versions() -> dict[str, str]:
    return {"macrun": __version__, "mlx": mx.__version__, "python": platform.python_version()}


def _fmt_count(x: float) -> str:
    return f"{x / 1e6:.2f}M" if x >= 1e6 else f"{x / 1e3:.1f}k" if x >= 1e3 else f"{x:.0f}"


def _fmt_time(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def train(cfg: Config, *, data_dir: Path, run_dir: Path, rank: int = 0, world_size: int = 1,
          strategy: Strategy | None = None, resume: bool = False, resume_at: int | None = None,
          stop_at: int | None = None, log: Callable[[str], None] = print, task: Any = None) -> TrainResult:
    """Train `cfg` on this rank's shard of the prepared data in `data_dir`.

    `resume` continues from the newest valid checkpoint in `run_dir/checkpoints` (corrupt ones are skipped
    with a warning); `resume_at` caps that at a step the launcher names (see latest_checkpoint). `stop_at` ends
    the run early at that step (with a checkpoint), as an interruption would.
    `task` is the model and data to train (`make_task(cfg, data_dir)` when None; the worker passes the one
    it already built to time a step).
    """
    t = cfg.train
    strategy = strategy or LocalStrategy()
    is_main = rank == 0
    say = log if is_main else (lambda _msg: None)
    ckpt_root = run_dir / "checkpoints"

    task = task or make_task(cfg, data_dir)
    model = task.model
    optimizer = make_optimizer(cfg)
    optimizer.init(model.trainable_parameters())
    start_step = 0
    position: int | None = None  # windows of the data stream consumed before start_step (None: fresh)
    group = getattr(strategy, "group", None)
    shared = group is not None and world_size > 1
    # With several ranks only rank 0 reads the checkpoint (it wrote it, maybe on its own host); the others
    # adopt its step and optimizer state below and its weights in strategy.setup.
    if resume and (is_main or not shared):
        ckpt, warnings = latest_checkpoint(ckpt_root, at_most=resume_at)
        for w in warnings:
            log(f"warning: {w}")
        if ckpt is None:
            say(f"no checkpoint in {ckpt_root}: starting from step 0")
        else:
            task.check_checkpoint(ckpt.path, ckpt.meta)
            model.update(unflatten_tree(ckpt.groups["model"]))
            optimizer.state = unflatten_tree(ckpt.groups["optimizer"])
            strategy.restore(ckpt.groups)
            start_step = ckpt.step
            position = stream_position(ckpt.meta, ckpt.step, t.batch_size)
            was = ckpt.meta.get("world_size")
            say(f"resumed from {ckpt.path} (step {ckpt.step})"
                + (f"; {was} rank(s) then, {world_size} now: the data stream continues where it stopped"
                   if was not in (None, world_size) else ""))
    strategy.setup(model, rank=rank, world_size=world_size)
    strategy.bytes_sent += task.check_same_base(rank, world_size, group if shared else None)
    if resume and shared:
        start_step, position, optimizer.state, sent = adopt_from_rank0(start_step, position, optimizer.state, group)
        strategy.bytes_sent += sent
        if strategy.own_optimizer_state and not is_main:
            extra = strategy.rank_state()
            own = load_rank_state(run_dir, rank, start_step, {**optimizer.state, **extra})
            if own is not None:  # rank 0's state (just adopted) is the fallback
                strategy.restore_rank_state({k: own.pop(k) for k in extra})
                optimizer.state = own

    # Under DDP a step's loss is the mean over every rank's tokens (see sft_data.ExampleSampler).
    shares = strategy.shares if shared else None
    task.start(rank, world_size, start_step, position, global_mean=strategy.syncs_every_step, shares=shares)
    if shares is not None and task.local_mean_loss:
        # Balanced DDP (distributed.balance): rank r's loss is the mean over its shares[r] samples, so its
        # gradient is weighted by shares[r]·world/B before the ranks average: the update is the global batch's mean.
        strategy.grad_weight = shares[rank] * world_size / sum(shares)
    say(task.describe(world_size, strategy.name))

    state = [model.state, optimizer.state, mx.random.state]
    value_and_grad = nn.value_and_grad(model, task.loss)

    def step_body(batch: tuple[mx.array, ...], votes: mx.array | None) -> tuple[mx.array, mx.array, mx.array | None]:
        loss, grads = value_and_grad(model, *batch)
        if isinstance(loss, tuple):  # (objective the gradient follows, the loss to print)
            loss = loss[1]
        grads, votes = strategy.reduce_with_votes(grads, votes) if votes is not None else \
            (strategy.reduce_gradients(grads), None)
        if t.grad_clip > 0:
            grads, norm = optim.clip_grad_norm(grads, t.grad_clip)
        else:
            norm = mx.array(0.0)
        optimizer.update(model, grads)
        return loss, norm, votes

    # Only a strategy that meets in a collective every step carries the stop votes through the compiled step
    # (measured: an array passed through unchanged cost the single-rank loop ~10% on this CPU).
    if strategy.syncs_every_step:
        voting = mx.compile(lambda *a: step_body(a[:-1], a[-1]), inputs=state, outputs=state)

        def train_step(batch: tuple[mx.array, ...], votes: mx.array) -> tuple[mx.array, mx.array, mx.array | None]:
            return voting(*batch, votes)
    else:
        plain = mx.compile(lambda *a: step_body(a, None)[:2], inputs=state, outputs=state)

        def train_step(batch: tuple[mx.array, ...], votes: mx.array) -> tuple[mx.array, mx.array, mx.array | None]:
            loss, norm = plain(*batch)
            return loss, norm, None

    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
    metrics_file = (run_dir / "metrics.jsonl").open("a") if is_main else None
    history: list[dict[str, Any]] = []

    def record(row: dict[str, Any]) -> None:
        history.append(row)
        if metrics_file:
            metrics_file.write(json.dumps(row) + "\n")
            metrics_file.flush()

    def checkpoint(step: int, loss: float, val_loss: float | None, final: bool) -> Path | None:
        if strategy.own_optimizer_state and world_size > 1 and not is_main:
            save_rank_state(run_dir, rank, step, {**optimizer.state, **strategy.rank_state()})
        if not is_main:
            return None
        # Only what trains: a fine-tune's checkpoint holds its adapters, not the frozen base model.
        groups = {"model": flatten_tree(model.trainable_parameters()), "optimizer": flatten_tree(optimizer.state)}
        groups.update(strategy.state_groups())
        meta = {"config": cfg.to_dict(), "loss": loss, "val_loss": val_loss, "world_size": world_size,
                "strategy": strategy.name, "versions": _versions(), "stream_position": task.position(step),
                **task.checkpoint_meta()}
        path = save_checkpoint(ckpt_root, step, groups, meta, keep=t.keep_checkpoints)
        say(f"checkpoint {path}")
        for out in task.export(run_dir, strategy.consensus_parameters(model), final=final):
            say(f"saved {out}")
        return path

    end = t.steps if stop_at is None else min(stop_at, t.steps)
    model.train()
    batch = tuple(mx.array(a) for a in task.batch(start_step))
    tokens = 0
    loss_sum, loss_n, window_start, window_tokens = 0.0, 0, time.perf_counter(), 0
    started = time.perf_counter()
    last_loss, val_loss, ckpt_path = float("nan"), None, None
    recent: tuple[float, int, int] | None = None  # (mean loss, first step, last step) of the last logged window
    step = start_step
    stopped = False
    no_vote, yes_vote = mx.array([0.0]), mx.array([1.0])
    PROGRESS.start(start_step)
    for step in range(start_step, end):
        wants_stop = PROGRESS.stop_requested
        if strategy.syncs_every_step:
            PROGRESS.maybe_skip(rank, step + 1, "the gradient all_sum")
            PROGRESS.enter(f"gradient all_sum of step {step + 1}")
        loss, _norm, votes = train_step(batch, yes_vote if wants_stop else no_vote)
        mx.async_eval(loss, state, *([] if votes is None else [votes]))
        step_tokens = task.tokens(step)  # every rank's together
        if step + 1 < end:  # prepare the next batch while this step computes
            batch = tuple(mx.array(a) for a in task.batch(step + 1))
        last_loss = loss.item()
        stopped = strategy.after_step(model, optimizer, step + 1, last=step + 1 == end, stop=wants_stop)
        if votes is not None:
            stopped = stopped or votes.item() > 0
        loss_sum, loss_n, window_tokens = loss_sum + last_loss, loss_n + 1, window_tokens + step_tokens
        tokens += step_tokens
        done = step + 1
        PROGRESS.finished(done)
        if not math.isfinite(last_loss) and not strategy.tolerates_nonfinite_loss:
            raise FloatingPointError(f"loss became {last_loss} at step {done}; lower train.lr or check the data")
        is_eval = (t.eval_interval and done % t.eval_interval == 0) or done == end
        if done % t.log_interval == 0 or is_eval:
            now = time.perf_counter()
            tps = window_tokens / max(now - window_start, 1e-9)
            row = {"step": done, "loss": loss_sum / loss_n, "lr": float(lr_at(step, t)),
                   "tokens_per_s": tps, "bytes_sent": strategy.bytes_sent, "comm_seconds": strategy.comm_seconds,
                   "exchange_seconds": strategy.exchange_seconds, "time": now - started}
            evaluated = None
            if is_eval:
                evaluated = val_loss = task.evaluate()
                strategy.check_replicas(model, done)
                if evaluated is not None:
                    row["val_loss"] = evaluated
            record(row)
            left = (now - started) / max(done - start_step, 1) * (t.steps - done)
            say(f"step {done}/{t.steps} · loss {row['loss']:.3f}"
                + (f" · val {evaluated:.3f}" if evaluated is not None else "")
                + f" · lr {row['lr']:.2e} · {_fmt_count(tps)} tok/s · {_fmt_time(now - started)} elapsed, "
                  f"~{_fmt_time(left)} left")
            recent = (row["loss"], done - loss_n + 1, done)
            loss_sum, loss_n, window_start, window_tokens = 0.0, 0, time.perf_counter(), 0
        synced = strategy.round_steps is not None and done % strategy.round_steps == 0 and cfg.fault.sync_checkpoints
        if (t.checkpoint_interval and done % t.checkpoint_interval == 0) or done == end or synced or stopped:
            ckpt_path = checkpoint(done, last_loss, val_loss, final=done == end or stopped) or ckpt_path
        if stopped:
            say(f"stopped at step {done} as asked, with a checkpoint; continue with --resume")
            end = done
            break

    seconds = time.perf_counter() - started
    if loss_n:  # stopped between progress lines: the steps since the last one
        recent = (loss_sum / loss_n, step + 2 - loss_n, step + 1)
    if metrics_file:
        metrics_file.close()
    return TrainResult(step=end, loss=last_loss, val_loss=val_loss, tokens=tokens, seconds=seconds,
                       tokens_per_s=tokens / max(seconds, 1e-9), checkpoint=ckpt_path, history=history,
                       recent_loss=recent[0] if recent else None, recent_steps=recent[1:] if recent else None)
