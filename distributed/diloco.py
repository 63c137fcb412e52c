"""DiLoCo: every rank takes H local AdamW steps, then all apply one outer Nesterov step on the averaged change.

Douillard et al. 2023, "DiLoCo: Distributed Low-Communication Training of Language Models",
arXiv:2311.08105, Algorithm 1. Per round t, with global parameters theta (identical on every rank):

    each rank r:   theta_r <- theta; H inner AdamW steps on its own shard (its AdamW state persists)
    pseudo-grad:   delta_r = theta - theta_r;    Delta = mean of delta_r over the ranks with a finite delta_r
    outer step:    theta <- OuterSGD(theta, Delta)  (Nesterov momentum, outer_lr 0.7, momentum 0.9 in the paper)
    every rank:    theta_r <- theta

macrun's config chooses the outer step by H unless the user sets it (`default_outer_step`); this class keeps
the paper's values as its own defaults for callers that build it directly.

The exchange is the only communication: one collective every H steps instead of one every step. The outer
state (theta and the momentum buffer) is replicated: every rank applies the same update to the same
numbers, so it needs no second broadcast. Each round boundary is also where the ranks agree to stop
(a one-float vote), so a graceful stop always lands on a synced state. Wire formats (float32, bf16/fp16, int8,
int4, int2) are in `distributed.compress`.

Checkpoints hold the outer state and the round counter (group "diloco"); a resumed run restarts the
current round from theta. Each rank keeps its own inner AdamW state beside the checkpoint (see
distributed.train) and takes it back on resume.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_map, tree_unflatten

from distributed.compress import EXCHANGE_DTYPES, ExchangeState, exchange, ring_sum_bytes
from distributed.config import StrategyConfig
from distributed.errors import CheckpointError, TrainingError
from distributed.progress import PROGRESS
from distributed.strategy import Strategy, broadcast_parameters

GROUP = "diloco"  # checkpoint group: "round", "params.<name>", "momentum.<name>"
RESIDUAL = "exchange_residual"  # int2's error feedback: in GROUP for rank 0, in the rank state for the others


def outer_step(params: mx.array, momentum: mx.array, delta: mx.array, *, lr: float, mu: float,
               nesterov: bool) -> tuple[mx.array, mx.array]:
    """One outer SGD step on the averaged pseudo-gradient `delta`; returns (new params, new momentum).

    The form of PyTorch's `torch.optim.SGD` (dampening 0), which is the outer optimizer of the DiLoCo
    paper and of torchft's DiLoCo:  v <- mu*v + delta;  u <- delta + mu*v (Nesterov) or v;  p <- p - lr*u.
    With lr = 1 and mu = 0 the new params are the mean of the ranks' local params.
    """
    v = mu * momentum + delta
    update = delta + mu * v if nesterov else v
    return params - lr * update, v


# The outer step when strategy.outer_lr is 0: chosen by H and the number of rounds, from benchmarks/
# diloco_vs_ddp.py's fair protocol (mini GPT, 4 ranks, equal tokens; runs/bench/diloco_*.json), validation loss:
#   H=5,  50 rounds: plain averaging (1.0, 0) 2.270; Nesterov 0.9 at lr 0.3 2.499, 0.5 2.670, 0.7 2.769.
#   H=27, 50 rounds: Nesterov 0.9 at lr 0.3 1.748 (two seeds: 1.752), 0.5 1.801, 0.7 1.902; plain 2.086.
#   H=50,  8 rounds: plain averaging 2.246; Nesterov 0.9 at lr 0.5 2.287, 0.3 2.341, 0.7 2.360.
# benchmarks/wifi_time_to_loss.py (lab Wi-Fi, H=10, 12 rounds) agrees: plain averaging reached DDP's loss in
# 1.20x DDP's steps, Nesterov 0.5/0.9 in 1.56x, 0.7/0.9 in 2.27x. So the momentum pays only when rounds are
# both long (short ones are already an averaged step, which momentum overshoots) and many (its memory is
# ~1/(1-0.9) = 10 rounds: a run of a few rounds is all transient). The thresholds sit between the points
# measured: H >= 20 (between 10 and 27) and >= 30 rounds (between 12 and 50).
NESTEROV_FROM_H, NESTEROV_FROM_ROUNDS = 20, 30
PLAIN_AVERAGING = (1.0, 0.0)
NESTEROV_STEP = (0.3, 0.9)


def default_outer_step(inner_steps: int, rounds: int | None = None) -> tuple[float, float]:
    """(outer lr, outer momentum) for H = `inner_steps` and a run of `rounds` outer rounds (None: many) when
    strategy.outer_lr is 0 (see the table above)."""
    many = rounds is None or rounds >= NESTEROV_FROM_ROUNDS
    return NESTEROV_STEP if inner_steps >= NESTEROV_FROM_H and many else PLAIN_AVERAGING


class DiLoCoStrategy(Strategy):
    """DiLoCo (arXiv:2311.08105) over `mx.distributed`: an outer step every `inner_steps` steps and at the end."""

    name = "diloco"
    tolerates_nonfinite_loss = True  # a diverged rank sits out its round and restarts from theta
    own_optimizer_state = True  # H steps of AdamW on its own shard: each rank's moments are its own

    def __init__(self, group: mx.distributed.Group | None, *, inner_steps: int = 100, outer_lr: float = 0.7,
                 outer_momentum: float = 0.9, nesterov: bool = True, exchange_dtype: str = "float32",
                 log: Callable[[str], None] = print) -> None:
        super().__init__(group)
        if inner_steps < 1:
            raise ValueError(f"inner_steps must be >= 1, got {inner_steps}")
        if exchange_dtype not in EXCHANGE_DTYPES:
            raise ValueError(f"exchange_dtype {exchange_dtype!r} is not one of {', '.join(EXCHANGE_DTYPES)}")
        self.inner_steps, self.outer_lr, self.outer_momentum = inner_steps, outer_lr, outer_momentum
        self.nesterov, self.exchange_dtype, self.log = nesterov, exchange_dtype, log
        self.rounds = 0  # outer steps taken so far
        self.valid_ranks = 0  # ranks that contributed to the last round
        self.params: mx.array | None = None  # theta, flat float32
        self.momentum: mx.array | None = None  # the outer momentum buffer, flat float32
        self._layout: list[tuple[str, tuple[int, ...], mx.Dtype]] = []
        self._restored: dict[str, mx.array] | None = None
        self.exchange_state = ExchangeState()  # this rank's rounding keys and int2 residual (distributed.compress)

    @classmethod
    def from_config(cls, group: mx.distributed.Group | None, cfg: StrategyConfig, *,
                    log: Callable[[str], None] = print, steps: int | None = None) -> DiLoCoStrategy:
        """The strategy `cfg` describes; `steps` (the run's train.steps) lets the outer step be chosen by H and
        the number of rounds when strategy.outer_lr is 0."""
        if cfg.overlap and cls is DiLoCoStrategy:
            from distributed.diloco_overlap import OverlapDiLoCoStrategy

            cls = OverlapDiLoCoStrategy
        rounds = None if steps is None else -(-steps // cfg.inner_steps)
        lr, mu = ((cfg.outer_lr, cfg.outer_momentum) if cfg.outer_lr > 0
                  else default_outer_step(cfg.inner_steps, rounds))
        return cls(group, inner_steps=cfg.inner_steps, outer_lr=lr, outer_momentum=mu,
                   nesterov=cfg.nesterov, exchange_dtype=cfg.exchange_dtype, log=log)

    # -- flat views of the trainable parameters ------------------------------------------------

    def _flatten(self, model: nn.Module) -> mx.array:
        leaves = tree_flatten(model.trainable_parameters())
        return mx.concatenate([v.reshape(-1).astype(mx.float32) for _, v in leaves])

    def _pieces(self, flat: mx.array) -> list[tuple[str, mx.array]]:
        out, offset = [], 0
        for name, shape, _dtype in self._layout:
            size = math.prod(shape)
            out.append((name, flat[offset:offset + size].reshape(shape)))
            offset += size
        return out

    def _load_into(self, model: nn.Module, flat: mx.array) -> None:
        dtypes = {name: dtype for name, _, dtype in self._layout}
        model.update(tree_unflatten([(k, v.astype(dtypes[k])) for k, v in self._pieces(flat)]))

    # -- the hooks ---------------------------------------------------------------------------------

    def setup(self, model: nn.Module, *, rank: int, world_size: int) -> None:
        super().setup(model, rank=rank, world_size=world_size)
        if world_size > 1 and self.group is None:
            raise ValueError("DiLoCo with more than one rank needs an mx.distributed group")
        self._layout = [(k, tuple(v.shape), v.dtype) for k, v in tree_flatten(model.trainable_parameters())]
        momentum = None
        if self._restored is not None:
            saved = self._restored
            names = {f"params.{k}" for k, _, _ in self._layout} | {f"momentum.{k}" for k, _, _ in self._layout}
            if not names <= set(saved) or any(saved[f"params.{k}"].shape != s for k, s, _ in self._layout):
                raise CheckpointError("the checkpoint's DiLoCo state does not match this model",
                                      hint="resume with the config the run was started with")
            params = mx.concatenate([saved[f"params.{k}"].reshape(-1).astype(mx.float32) for k, _, _ in self._layout])
            momentum = mx.concatenate([saved[f"momentum.{k}"].reshape(-1).astype(mx.float32)
                                       for k, _, _ in self._layout])
            self.rounds = int(saved["round"].item()) if "round" in saved else 0
            # A checkpoint taken mid-round holds rank 0's local weights: restart the round from theta.
            self._load_into(model, params)
            self._restored = None
            if RESIDUAL in saved and saved[RESIDUAL].shape == params.shape:
                self.exchange_state.residual = saved[RESIDUAL]  # rank 0's own int2 residual
        self.bytes_sent += broadcast_parameters(model, self.group)
        self.params = self._flatten(model)
        self.momentum = mx.zeros_like(self.params) if momentum is None else momentum
        self.exchange_state.rank = rank
        if self.group is not None and world_size > 1:
            # Only rank 0 reads the checkpoint, and its momentum is the one that counts. Two floats say whether
            # it restored one and at which round (so every rank counts rounds alike); only then is the momentum
            # sent (float32, the others adding zeros: exact). A fresh start sends no zeros around (that was
            # 2(n-1)/n x 4P bytes).
            mine = [1.0 if momentum is not None else 0.0, float(self.rounds)] if rank == 0 else [0.0, 0.0]
            restored, rounds = mx.distributed.all_sum(mx.array(mine), group=self.group).tolist()
            self.bytes_sent += ring_sum_bytes(2, 4, world_size, rank)
            self.rounds = round(rounds)
            if restored > 0:
                self.momentum = mx.distributed.all_sum(self.momentum if rank == 0 else mx.zeros_like(self.momentum),
                                                       group=self.group)
                self.bytes_sent += ring_sum_bytes(self.momentum.size, 4, world_size, rank)
            else:
                self.momentum = mx.zeros_like(self.params)
        mx.eval(self.params, self.momentum)

    @property
    def round_steps(self) -> int:  # type: ignore[override]
        return self.inner_steps

    def after_step(self, model: nn.Module, optimizer: Any, step: int, *, last: bool = False,
                   stop: bool = False) -> bool:
        if not (step % self.inner_steps == 0 or last):
            return False
        agreed = self._stop_vote(step, stop)
        self.sync(model, optimizer, step)
        return agreed

    def _stop_vote(self, step: int, stop: bool) -> bool:
        """Every rank votes at every round boundary (one float, once per H steps), so a stop asked of some ranks
        mid-round happens on all of them after the same round. True when any rank asked to stop."""
        if self.group is None or self.world_size <= 1:
            return stop
        PROGRESS.maybe_skip(self.rank, step, "the DiLoCo stop vote")
        PROGRESS.enter(f"DiLoCo stop vote after step {step}")
        votes = mx.distributed.all_sum(mx.array([1.0 if stop else 0.0]), group=self.group)
        agreed = bool(votes.item() > 0)
        self.bytes_sent += ring_sum_bytes(1, 4, self.world_size, self.rank)
        return agreed

    def sync(self, model: nn.Module, optimizer: Any, step: int) -> None:
        """End a round: exchange pseudo-gradients, take the outer step, set the local weights to theta."""
        if self.params is None or self.momentum is None:
            raise RuntimeError("DiLoCoStrategy.setup must run before the first step")
        round_no = self.rounds + 1
        PROGRESS.enter(f"DiLoCo outer exchange of round {round_no} (after step {step})")
        delta = self.params - self._flatten(model)
        valid = bool(mx.all(mx.isfinite(delta)).item())
        if not valid:
            self.log(f"rank {self.rank}: pseudo-gradient has NaN/Inf at round {round_no} (step {step}); "
                     "contributing nothing this round")
        started = time.perf_counter()
        # Balanced (strategy.balance): each rank's pseudo-gradient counts by its tokens, its batch share.
        weight = 1.0 if self.shares is None else self.shares[self.rank] * self.world_size / sum(self.shares)
        sent = exchange(delta * weight if weight != 1.0 else delta, valid, self.group, self.exchange_dtype,
                        self.exchange_state)
        total, count = sent.total, sent.count
        weights = None  # balanced: the valid ranks' weights summed
        if self.shares is not None and self.group is not None:
            weights = mx.distributed.all_sum(mx.array([weight if valid else 0.0]), group=self.group)
            self.bytes_sent += ring_sum_bytes(1, 4, self.world_size, self.rank)
        mx.eval(total, count, *([] if weights is None else [weights]), *sent.arrays)
        self.comm_seconds += time.perf_counter() - started
        self.bytes_sent += sent.bytes_sent  # counted at each collective (distributed.compress_wire)
        self.valid_ranks = int(count.item())
        if self.valid_ranks == 0:
            raise TrainingError(f"every rank's pseudo-gradient has NaN/Inf at DiLoCo round {round_no} (step {step})",
                                hint="lower train.lr, or strategy.inner_steps")
        divisor = self.valid_ranks if weights is None else float(weights.item())
        self._outer(model, optimizer, total / divisor, round_no, step, valid)

    def _outer(self, model: nn.Module, optimizer: Any, mean: mx.array, round_no: int, step: int,
               valid: bool) -> None:
        """The outer step on the averaged pseudo-gradient `mean`; the local weights become theta."""
        assert self.params is not None and self.momentum is not None
        params, momentum = outer_step(self.params, self.momentum, mean, lr=self.outer_lr,
                                      mu=self.outer_momentum, nesterov=self.nesterov)
        if not bool(mx.all(mx.isfinite(params)).item()):
            raise TrainingError(f"the DiLoCo outer step at round {round_no} (step {step}) gave NaN/Inf weights",
                                hint="lower strategy.outer_lr; with exchange_dtype=float16, use bfloat16 "
                                     "(float16 overflows above 65504)")
        self.params, self.momentum = params, momentum
        self._load_into(model, params)
        if not valid:
            _reset_nonfinite_moments(optimizer)
        mx.eval(self.params, self.momentum, model.parameters())
        self.rounds = round_no

    # -- replicas and checkpoints ------------------------------------------------------------------

    def replicated_arrays(self, model: nn.Module) -> list[tuple[str, mx.array]]:
        """theta and the momentum buffer: identical on every rank at all times (local weights are not)."""
        if self.params is None or self.momentum is None:
            return []
        return ([(f"outer params {k}", v) for k, v in self._pieces(self.params)]
                + [(f"outer momentum {k}", v) for k, v in self._pieces(self.momentum)])

    def consensus_parameters(self, model: nn.Module) -> dict[str, mx.array]:
        """theta, the outer parameters (a checkpoint mid-round holds rank 0's local weights, which differ)."""
        if self.params is None:
            return super().consensus_parameters(model)
        dtypes = {name: dtype for name, _, dtype in self._layout}
        return {k: v.astype(dtypes[k]) for k, v in self._pieces(self.params)}

    def state_groups(self) -> dict[str, dict[str, mx.array]]:
        if self.params is None or self.momentum is None:
            return {}
        group = {"round": mx.array(self.rounds, dtype=mx.int32)}
        group.update({f"params.{k}": v for k, v in self._pieces(self.params)})
        group.update({f"momentum.{k}": v for k, v in self._pieces(self.momentum)})
        group.update(self._residual_state())  # rank 0's own int2 residual
        return {GROUP: group}

    def rank_state(self) -> dict[str, mx.array]:
        """int2's error-feedback residual: this rank's own, kept beside the checkpoint like its AdamW state."""
        return self._residual_state()

    def _residual_state(self) -> dict[str, mx.array]:
        # Always the same key and shape for int2 (zeros before the first round): a rank's saved state is only
        # taken back when it matches what `rank_state` gives after setup.
        if self.exchange_dtype != "int2" or self.params is None:
            return {}
        residual = self.exchange_state.residual
        return {RESIDUAL: residual if residual is not None else mx.zeros_like(self.params)}

    def restore_rank_state(self, arrays: dict[str, mx.array]) -> None:
        if RESIDUAL in arrays and self.params is not None and arrays[RESIDUAL].shape == self.params.shape:
            self.exchange_state.residual = arrays[RESIDUAL].astype(mx.float32)

    def restore(self, groups: dict[str, dict[str, mx.array]]) -> None:
        # A checkpoint without the group (a DDP or single-rank run) starts a fresh outer state from its weights.
        self._restored = dict(groups[GROUP]) if GROUP in groups else None


def _reset_nonfinite_moments(optimizer: Any) -> None:
    """Zero the inner optimizer's per-parameter state if any of it is NaN/Inf (the round's blow-up left it so).

    The dict is changed in place: the compiled train step captured it.
    """
    state = optimizer.state
    keys = [k for k in state if k not in ("step", "learning_rate")]
    leaves = [v for k in keys for _, v in tree_flatten(state[k])]
    if all(bool(mx.all(mx.isfinite(v)).item()) for v in leaves):
        return
    for k in keys:
        state[k] = tree_map(mx.zeros_like, state[k])
