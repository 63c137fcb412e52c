"""N ranks of DDP or DiLoCo simulated in one process: the same training math as real ranks, with no wire.

The quality protocol of `diloco_vs_ddp.py` trains dozens of configurations; launching real ranks for each
costs processes, imports and ring set-up, and on a 2-core machine N ranks fight for the same cores. The
numbers that decide quality do not need the wire, so this module computes them in one process with the
project's own pieces (the model of distributed.models.gpt, the per-rank `BatchSampler` of distributed.data,
`make_optimizer` and `lr_at` of distributed.train, `outer_step` of distributed.diloco, the byte counts of
distributed.compress):

* DDP with N ranks of batch b is one model stepping on the concatenation of the N ranks' batches: the
  gradient of the mean loss over N·b rows is the mean of the N ranks' gradients, which is what the all_sum
  divided by N gives (then clipped, then AdamW), so the updates are the same up to float rounding.
* DiLoCo (Douillard et al. 2023, arXiv:2311.08105, Algorithm 1): N replicas, each with its own AdamW, take
  H steps on their own shard; the mean pseudo-gradient (theta - theta_r) feeds the outer Nesterov step, and
  every replica restarts from the new theta. A wire format's rounding is applied to each replica's
  pseudo-gradient with distributed.compress's round trip, where one exists for that format.
* "plain" is one rank with no strategy.

`benchmarks/diloco_vs_ddp.py --check-real` (and tests/integration/test_diloco_sim.py) run a configuration
both ways, real ranks against this, and compare the final validation loss.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

from distributed import compress
from distributed.compress import ring_bytes
from distributed.config import Config
from distributed.data import BatchSampler, val_batches
from distributed.diloco import outer_step
from distributed.models.gpt import build_model, loss_fn
from distributed.train import make_optimizer

METHODS = ("ddp", "diloco", "plain")
VOTE_BYTES = 4  # DiLoCo's stop vote at every round boundary (one float32)


@dataclass(frozen=True)
class SimSpec:
    """One configuration of the protocol: the method, its tuned knobs and the seed."""

    method: str  # "ddp", "diloco" or "plain" (one rank, no strategy)
    ranks: int
    lr: float  # peak inner learning rate (AdamW); min_lr is lr * min_lr_ratio
    seed: int
    h: int = 0  # DiLoCo inner steps per round
    outer_lr: float = 1.0
    outer_momentum: float = 0.0
    nesterov: bool = True
    fmt: str = "float32"  # DiLoCo wire format (distributed.compress)

    @property
    def name(self) -> str:
        base = f"{self.method}-{self.ranks}r-lr{self.lr:g}"
        if self.method == "diloco":
            base += f"-h{self.h}-o{self.outer_lr:g}m{self.outer_momentum:g}-{self.fmt}"
        return f"{base}-s{self.seed}"

    @property
    def group(self) -> str:
        """The name without the seed: the seeds of one group are averaged."""
        return self.name.rsplit("-s", 1)[0]


@dataclass
class SimResult:
    spec: SimSpec
    val_loss: float  # the final weights (DiLoCo: theta) on the scoring batches
    steps: int
    tokens: int  # every rank's together
    bytes_per_rank: int  # steady bytes one rank sends (start-up broadcasts left out)
    rounds: int
    clip_fraction: float  # share of (rank, step) gradients whose norm exceeded train.grad_clip
    median_grad_norm: float
    quality_format: str  # the format whose rounding was applied ("float32": none)
    seconds: float
    curve: list[dict[str, float]] = field(default_factory=list)  # step, tokens, bytes, val_loss

    def row(self) -> dict[str, Any]:
        return {"name": self.spec.name, "group": self.spec.group, **self.spec.__dict__,
                **{k: v for k, v in self.__dict__.items() if k != "spec"}}


def config_for(base: Config, spec: SimSpec, min_lr_ratio: float) -> Config:
    """`base` with the spec's learning rate, seed and (DiLoCo) outer settings."""
    train = replace(base.train, lr=spec.lr, min_lr=spec.lr * min_lr_ratio)
    strategy = replace(base.strategy, mode=spec.method if spec.method != "plain" else base.strategy.mode,
                       inner_steps=spec.h or base.strategy.inner_steps, outer_lr=spec.outer_lr,
                       outer_momentum=spec.outer_momentum, nesterov=spec.nesterov,
                       exchange_dtype=spec.fmt if spec.fmt in compress.EXCHANGE_DTYPES else "float32")
    return replace(base, train=train, strategy=strategy, run=replace(base.run, seed=spec.seed))


def step_bytes_ddp(params: int, ranks: int) -> int:
    """What one DDP rank sends per step: the ring's share of a float32 all_sum of every gradient."""
    return ring_bytes(4 * params, ranks)


def round_bytes_diloco(params: int, ranks: int, fmt: str) -> int:
    """What one DiLoCo rank sends per round: the pseudo-gradient in `fmt` plus the stop vote."""
    if ranks <= 1:
        return 0
    return compress.wire_bytes(params, ranks, fmt) + ring_bytes(VOTE_BYTES, ranks)


def required_h(params: int, ranks: int, fmt: str, target: float) -> int:
    """The smallest H whose DiLoCo sends `target` times fewer bytes per rank than DDP at equal steps."""
    return max(1, math.ceil(target * round_bytes_diloco(params, ranks, fmt) / step_bytes_ddp(params, ranks)))


class Exchange:
    """The mean pseudo-gradient as N ranks would get it through `fmt`, computed in this process.

    With distributed.compress's in-process exchange (`exchange_simulated`: the ranks' own code, their
    stochastic roundings and int2's error-feedback residuals) the result is what real ranks get; an
    older compress without it falls back to each rank's `cast_round_trip` (exact for float32, 16-bit casts
    and the gathered int8), and a format neither knows is simulated as float32 (`simulated` says which).
    """

    def __init__(self, fmt: str, ranks: int) -> None:
        self.fmt, self.ranks = fmt, ranks
        self.states: list[Any] | None = None
        self.simulated = fmt
        if fmt == "float32":
            return
        if hasattr(compress, "exchange_simulated") and fmt in compress.EXCHANGE_DTYPES:
            self.states = [compress.ExchangeState(rank=r) for r in range(ranks)]
            return
        try:
            mx.eval(compress.cast_round_trip(mx.ones((8,), dtype=mx.float32), fmt))
        except (KeyError, ValueError, TypeError):
            self.simulated = "float32"

    def mean(self, deltas: list[mx.array]) -> mx.array:
        if self.states is not None:
            got = compress.exchange_simulated(deltas, [True] * len(deltas), self.fmt, self.states)
            return got[0].total / len(deltas)
        if self.simulated != "float32":
            deltas = [compress.cast_round_trip(d, self.fmt) for d in deltas]
        return sum(deltas[1:], deltas[0]) / len(deltas)


class _Flat:
    """Flat float32 views of a model's trainable parameters (as DiLoCoStrategy keeps theta)."""

    def __init__(self, model: nn.Module) -> None:
        self.layout = [(k, tuple(v.shape), v.dtype) for k, v in tree_flatten(model.trainable_parameters())]

    def get(self, model: nn.Module) -> mx.array:
        return mx.concatenate([v.reshape(-1).astype(mx.float32) for _, v in tree_flatten(model.trainable_parameters())])

    def put(self, model: nn.Module, flat: mx.array) -> None:
        pieces, offset = [], 0
        for name, shape, dtype in self.layout:
            size = math.prod(shape)
            pieces.append((name, flat[offset:offset + size].reshape(shape).astype(dtype)))
            offset += size
        model.update(tree_unflatten(pieces))


def _fused_step(models: list[nn.Module], opts: list[optim.Optimizer], clip: float) -> Callable[..., list[mx.array]]:
    """One compiled call that steps every replica on its own batch: (x0, y0, x1, y1, ...) -> [loss, norm]*N.

    The body per replica is distributed.train's step (value_and_grad, clip_grad_norm, AdamW); fusing the
    replicas into one call saves the per-call overhead N times over on a small model.
    """
    grads_of = [nn.value_and_grad(m, loss_fn) for m in models]
    state = [[m.state for m in models], [o.state for o in opts]]

    def body(*xy: mx.array) -> list[mx.array]:
        out: list[mx.array] = []
        for i, (m, o) in enumerate(zip(models, opts, strict=True)):
            loss, grads = grads_of[i](m, xy[2 * i], xy[2 * i + 1])
            if clip > 0:
                grads, norm = optim.clip_grad_norm(grads, clip)
            else:
                norm = mx.array(0.0)
            o.update(m, grads)
            out += [loss, norm]
        return out

    return mx.compile(body, inputs=state, outputs=state)


def simulate(base: Config, data_dir: Path, spec: SimSpec, *, steps: int, eval_every: int, eval_batches: int,
             score_batches: int, min_lr_ratio: float = 0.1) -> SimResult:
    """Train `spec` for `steps` steps per rank on `data_dir` (prepared by distributed.data.prepare_data).

    Evaluates every `eval_every` steps on `eval_batches` validation batches (the curve) and scores the
    final weights on `score_batches`; a DiLoCo evaluation mid-round scores theta, the last synced weights.
    """
    if spec.method not in METHODS:
        raise ValueError(f"method {spec.method!r} is not one of {', '.join(METHODS)}")
    cfg = config_for(base, spec, min_lr_ratio)
    t, seq = cfg.train, cfg.data.seq_len
    cfg = replace(cfg, train=replace(t, steps=steps))
    t = cfg.train
    replicas = spec.ranks if spec.method == "diloco" else 1
    samplers = [BatchSampler(data_dir / "train.bin", seq, t.batch_size, r, spec.ranks, spec.seed)
                for r in range(spec.ranks)]
    models = [build_model(cfg.model, seq, cfg.run.seed) for _ in range(replicas)]
    opts = [make_optimizer(cfg) for _ in range(replicas)]
    for m, o in zip(models, opts, strict=True):
        o.init(m.trainable_parameters())
    step_fn = _fused_step(models, opts, t.grad_clip)
    flat = _Flat(models[0])
    params = sum(math.prod(s) for _, s, _ in flat.layout)
    theta = flat.get(models[0])
    momentum = mx.zeros_like(theta)
    wire = Exchange(spec.fmt if spec.method == "diloco" else "float32", replicas)

    scorer = build_model(cfg.model, seq, cfg.run.seed)
    scorer.eval()
    score = mx.compile(partial(loss_fn, scorer), inputs=scorer.state)
    # Each set spread evenly over the whole validation file (a prefix of the larger set would cover only its start).
    val = data_dir / "val.bin"
    windows = {count: [(mx.array(x), mx.array(y)) for x, y in val_batches(val, seq, t.batch_size, count)]
               for count in {eval_batches, score_batches}}

    def evaluate(count: int) -> float:
        if spec.method == "diloco":
            flat.put(scorer, theta)
        else:
            scorer.update(models[0].trainable_parameters())
        return float(mx.mean(mx.stack([score(x, y) for x, y in windows[count]])).item())

    ddp_bytes = step_bytes_ddp(params, spec.ranks) if spec.method == "ddp" else 0
    diloco_bytes = round_bytes_diloco(params, spec.ranks, spec.fmt) if spec.method == "diloco" else 0
    sent, rounds, norms = 0, 0, []
    curve: list[dict[str, float]] = []
    tokens_per_step = spec.ranks * t.batch_size * seq
    started = time.perf_counter()
    for step in range(steps):
        batches = [samplers[r].batch(step) for r in range(spec.ranks)]
        if replicas == 1:  # DDP: one model on the ranks' batches side by side; plain: the one rank's
            xy = [mx.array(np.concatenate([b[0] for b in batches])), mx.array(np.concatenate([b[1] for b in batches]))]
        else:
            xy = [mx.array(a) for b in batches for a in b]
        out = step_fn(*xy)
        mx.eval(out, [m.state for m in models], [o.state for o in opts])
        norms.append(mx.stack(out[1::2]))
        sent += ddp_bytes
        done = step + 1
        if spec.method == "diloco" and (done % spec.h == 0 or done == steps):
            mean = wire.mean([theta - flat.get(m) for m in models])
            theta, momentum = outer_step(theta, momentum, mean, lr=spec.outer_lr, mu=spec.outer_momentum,
                                         nesterov=spec.nesterov)
            for m in models:
                flat.put(m, theta)
            mx.eval(theta, momentum, [m.parameters() for m in models])
            rounds += 1
            sent += diloco_bytes
        if done % eval_every == 0 or done == steps:
            loss = evaluate(eval_batches)
            curve.append({"step": done, "tokens": done * tokens_per_step, "bytes": sent, "val_loss": loss})
            if not math.isfinite(loss):
                break
    all_norms = np.array(mx.concatenate(norms)) if norms else np.zeros(1)
    final = evaluate(score_batches) if curve and math.isfinite(curve[-1]["val_loss"]) else math.inf
    return SimResult(spec=spec, val_loss=final, steps=steps, tokens=steps * tokens_per_step, bytes_per_rank=sent,
                     rounds=rounds, clip_fraction=float((all_norms > t.grad_clip).mean()) if t.grad_clip > 0 else 0.0,
                     median_grad_norm=float(np.median(all_norms)), quality_format=wire.simulated,
                     seconds=time.perf_counter() - started, curve=curve)
