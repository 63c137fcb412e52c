"""What ranks exchange while training: nothing (one rank), gradients every step (DDP), or DiLoCo rounds.

A strategy hooks into the training loop at three points: `reduce_gradients` inside the compiled step
(DDP averages there), `after_step` after each optimizer step (DiLoCo's outer step goes there; `last` marks
the run's final step) and `check_replicas` at eval time (proves that what should be identical on every
rank is). The collective engine is always MLX's own `mx.distributed` (ring backend). DiLoCo lives in
`distributed.diloco`, its wire formats in `distributed.compress`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

from distributed.compress import ring_bytes
from distributed.errors import TrainingError
from distributed.progress import PROGRESS

__all__ = ["DDPStrategy", "LocalStrategy", "Strategy", "broadcast_parameters", "replica_fingerprint",
           "ring_bytes"]

# Replicas agree when each tensor's sum matches rank 0's within this share of the tensor's sum of |w|.
# Identical weights give identical sums up to the reduction order of `mx.sum` (float32: ~1e-7 relative);
# a skipped allreduce or a rank on other data moves them far more within a step or two.
REPLICA_RTOL = 1e-5


class Strategy:
    """The interface the training loop drives; the base class is the single-rank no-op."""

    name = "local"
    # Whether a non-finite loss on one rank is survivable (DiLoCo drops that rank's round) rather than fatal.
    tolerates_nonfinite_loss = False

    def __init__(self, group: mx.distributed.Group | None = None) -> None:
        self.group = group
        self.rank, self.world_size = 0, 1
        self.bytes_sent = 0  # payload bytes this rank put on the network so far (setup broadcast included)
        self.comm_seconds = 0.0  # wall time spent in collectives outside the compiled step

    def setup(self, model: nn.Module, *, rank: int, world_size: int) -> None:
        """Called once before the first step (after any `restore`)."""
        self.rank, self.world_size = rank, world_size

    # Whether the ranks meet in a collective every step (inside the compiled step); the stop vote then
    # travels with it (`reduce_with_votes`) instead of in `after_step`.
    syncs_every_step = False
    # Steps between the points where every rank holds the same weights (DiLoCo's H); None: every step.
    round_steps: int | None = None
    # Whether each rank's inner optimizer state is its own (DiLoCo) rather than identical everywhere (DDP): then
    # every rank saves and restores its own beside the checkpoint.
    own_optimizer_state = False
    # Balanced DDP: each rank's number of samples per step (distributed.balance); None: equal shares.
    shares: tuple[int, ...] | None = None

    def reduce_gradients(self, grads: Any) -> Any:
        """Runs inside the compiled train step, between the backward pass and the optimizer."""
        return grads

    def reduce_with_votes(self, grads: Any, votes: mx.array) -> tuple[Any, mx.array]:
        """`reduce_gradients`, plus `votes` (a float32 vector) summed over the ranks in the same collective
        when there is one (DDP); otherwise `votes` comes back unchanged."""
        return self.reduce_gradients(grads), votes

    def after_step(self, model: nn.Module, optimizer: Any, step: int, *, last: bool = False,
                   stop: bool = False) -> bool:
        """Runs after optimizer step `step` (1-based) has been queued; `last` is true for the run's final step.

        `stop` is this rank's wish to stop (the launcher asked for it); returns True when the ranks have
        agreed to stop after this step (every rank gets the same answer at the same step). A strategy
        that meets every step votes in `reduce_with_votes` instead and returns False here.
        """
        return stop and self.world_size <= 1

    def replicated_arrays(self, model: nn.Module) -> list[tuple[str, mx.array]]:
        """The named arrays every rank must hold identically whenever `check_replicas` runs."""
        return tree_flatten(model.trainable_parameters())

    def consensus_parameters(self, model: nn.Module) -> dict[str, mx.array]:
        """The trainable parameters the ranks agree on, by name: what an export (adapters) holds."""
        return dict(tree_flatten(model.trainable_parameters()))

    def check_replicas(self, model: nn.Module, step: int) -> None:
        """Raise TrainingError unless every rank holds the same `replicated_arrays` (one small all_gather).

        Every rank must call this at the same step; every rank then raises (or not) alike.
        """
        if self.group is None or self.world_size <= 1:
            return
        named = self.replicated_arrays(model)
        PROGRESS.enter(f"replica check at step {step}")
        mine = replica_fingerprint([v for _, v in named])
        everyone = np.array(mx.distributed.all_gather(mine[None], group=self.group))
        self.bytes_sent += (self.world_size - 1) * mine.nbytes
        sums, abs_sums = everyone[:, 0::2], everyone[:, 1::2]
        tolerance = REPLICA_RTOL * abs_sums[0] + 1e-6
        for r in range(1, self.world_size):
            off = np.flatnonzero(np.abs(sums[r] - sums[0]) > tolerance)
            if off.size:
                i = int(off[0])
                raise TrainingError(
                    f"rank {r}'s weights differ from rank 0's at step {step} ({named[i][0]}: sum "
                    f"{sums[r, i]:.6g} vs {sums[0, i]:.6g}; {off.size} of {len(named)} tensors differ)",
                    hint="the ranks no longer train one model: check that every host runs the same macrun "
                         "and MLX versions, then resume from the last checkpoint (--resume)")

    def state_groups(self) -> dict[str, dict[str, mx.array]]:
        """Extra arrays a checkpoint must hold to resume this strategy (called on rank 0 only)."""
        return {}

    @property
    def exchange_seconds(self) -> float:
        """Wall time of the exchanges from start to finish; more than `comm_seconds` (the time the loop waited)
        only for a strategy that overlaps them with compute."""
        return self.comm_seconds

    def rank_state(self) -> dict[str, mx.array]:
        """This rank's own arrays (flat names) that ranks other than 0 keep beside the checkpoint with their
        optimizer state (own_optimizer_state strategies only); rank 0 puts its own in `state_groups`."""
        return {}

    def restore_rank_state(self, arrays: dict[str, mx.array]) -> None:
        """Take back what `rank_state` saved; called after `setup` on a resume."""

    def restore(self, groups: dict[str, dict[str, mx.array]]) -> None:
        """Take back what `state_groups` saved; called before `setup`."""


LocalStrategy = Strategy


def replica_fingerprint(arrays: list[mx.array]) -> mx.array:
    """Per tensor (sum, sum of |w|) as one float32 vector: cheap to all_gather, sensitive per tensor."""
    parts = [mx.stack([mx.sum(a.astype(mx.float32)), mx.sum(mx.abs(a.astype(mx.float32)))]) for a in arrays]
    return mx.concatenate(parts)


class DDPStrategy(Strategy):
    """Data parallel: every step the gradients are averaged across ranks, so all ranks take the same step.

    Gradients are packed into a few large flat buckets (one all_sum per bucket, not one per tensor): the
    ring's per-call latency dominates small tensors. The all_sum runs inside the compiled step, so its
    time shows up in the step time, not in `comm_seconds`.
    """

    name = "ddp"
    syncs_every_step = True

    def __init__(self, group: mx.distributed.Group, bucket_bytes: int = 32 << 20,
                 shares: Sequence[int] | None = None) -> None:
        super().__init__(group)
        self.bucket_bytes = bucket_bytes
        self._step_bytes = 0
        self.shares = tuple(shares) if shares is not None else None
        # This rank's gradient is multiplied by this before the all_sum (balanced DDP sets shares[r]·world/B;
        # see train.train); 1.0 leaves the step exactly as it was.
        self.grad_weight = 1.0

    def setup(self, model: nn.Module, *, rank: int, world_size: int) -> None:
        super().setup(model, rank=rank, world_size=world_size)
        if self.shares is not None and len(self.shares) != world_size:
            raise ValueError(f"{len(self.shares)} batch shares for {world_size} ranks")
        # The same seed gives the same weights everywhere; taking rank 0's makes it a guarantee
        # (and keeps a resumed rank 0 authoritative).
        self.bytes_sent += broadcast_parameters(model, self.group)
        payload = sum(v.nbytes for _, v in tree_flatten(model.trainable_parameters()))
        self._step_bytes = ring_bytes(payload, world_size)

    def reduce_gradients(self, grads: Any) -> Any:
        return self.reduce_with_votes(grads, None)[0]

    def reduce_with_votes(self, grads: Any, votes: mx.array | None) -> tuple[Any, mx.array | None]:
        if self.world_size == 1:
            return grads, votes
        flat = tree_flatten(grads)
        out: list[tuple[str, mx.array]] = []
        bucket: list[tuple[str, mx.array]] = []
        size = 0

        summed_votes = votes

        def flush(final: bool = False) -> None:
            nonlocal bucket, size, summed_votes
            if not bucket:
                return
            parts = [g.reshape(-1) for _, g in bucket]
            if self.grad_weight != 1.0:
                parts = [p * self.grad_weight for p in parts]
            if final and votes is not None:  # a few floats ride along in the last bucket: no extra collective
                parts.append(votes.astype(parts[0].dtype))
            summed = mx.distributed.all_sum(mx.concatenate(parts), group=self.group)
            offset = 0
            for key, g in bucket:
                out.append((key, summed[offset:offset + g.size].reshape(g.shape) / self.world_size))
                offset += g.size
            if final and votes is not None:
                summed_votes = summed[offset:].astype(mx.float32)
            bucket, size = [], 0

        for i, (key, g) in enumerate(flat):
            bucket.append((key, g))
            size += g.nbytes
            if size >= self.bucket_bytes and i < len(flat) - 1:  # the last bucket is flushed below, with votes
                flush()
        flush(final=True)
        return tree_unflatten(out), summed_votes

    def after_step(self, model: nn.Module, optimizer: Any, step: int, *, last: bool = False,
                   stop: bool = False) -> bool:
        self.bytes_sent += self._step_bytes
        return False


def broadcast_parameters(model: nn.Module, group: mx.distributed.Group | None) -> int:
    """Make every rank start from rank 0's trainable weights (others contribute zeros to an all_sum).

    Frozen weights (a fine-tune's base model) are not sent: every rank loads them itself. Returns the bytes
    this rank sent.
    """
    if group is None or group.size() == 1:
        return 0
    params = tree_flatten(model.trainable_parameters())
    synced = [(k, mx.distributed.all_sum(v if group.rank() == 0 else mx.zeros_like(v), group=group))
              for k, v in params]
    model.update(tree_unflatten(synced))
    mx.eval(model.trainable_parameters())
    return sum(ring_bytes(v.nbytes, group.size()) for _, v in params)


def adopt_from_rank0(step: int, position: int | None, state: Any,
                     group: mx.distributed.Group) -> tuple[int, int | None, Any, int]:
    """Every rank takes rank 0's step counter, data-stream position and optimizer state (others contribute
    zeros to an all_sum).

    Used on resume: only rank 0 reads the checkpoint, so a rank on a host without it continues exactly
    where rank 0 does. `position` None means "no checkpoint" (a fresh start). Returns (step, position,
    state, bytes this rank sent).
    """
    rank0 = group.rank() == 0
    # Sorted: a state read back from a checkpoint lists its keys in another order than a fresh one, and
    # the ranks must issue their collectives in the same order.
    flat = sorted(tree_flatten(state), key=lambda kv: kv[0])
    synced = [(k, mx.distributed.all_sum(v if rank0 else mx.zeros_like(v), group=group)) for k, v in flat]
    # int64: a position counts windows, and a long run on a big corpus passes 2^31 of them.
    mine = [step, -1 if position is None else position] if rank0 else [0, 0]
    agreed = mx.distributed.all_sum(mx.array(mine, dtype=mx.int64), group=group)
    mx.eval(agreed, [v for _, v in synced])
    sent = sum(ring_bytes(v.nbytes, group.size()) for _, v in flat) + ring_bytes(16, group.size())
    got_step, got_position = (int(v) for v in agreed.tolist())
    return got_step, (None if got_position < 0 else got_position), tree_unflatten(synced), sent
