"""What ranks exchange while training: nothing (one rank), gradients every step (DDP), or DiLoCo rounds.

A strategy hooks into the training loop at two points: `reduce_gradients` inside the compiled step
(DDP averages there) and `after_step` after each optimizer step (DiLoCo's outer step goes there).
The collective engine is always MLX's own `mx.distributed` (ring backend).
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten


class Strategy:
    """The interface the training loop drives; the base class is the single-rank no-op."""

    name = "local"

    def __init__(self) -> None:
        self.bytes_sent = 0  # payload bytes this rank sent over the network so far
        self.comm_seconds = 0.0  # wall time spent in collectives outside the compiled step

    def setup(self, model: nn.Module, *, rank: int, world_size: int) -> None:
        self.rank, self.world_size = rank, world_size

    def reduce_gradients(self, grads: Any) -> Any:
        return grads

    def after_step(self, model: nn.Module, optimizer: Any, step: int) -> None:
        pass

    def state_groups(self) -> dict[str, dict[str, mx.array]]:
        """Extra arrays a checkpoint must hold to resume this strategy."""
        return {}

    def restore(self, groups: dict[str, dict[str, mx.array]]) -> None:
        pass


LocalStrategy = Strategy


def ring_bytes(payload_bytes: int, world_size: int) -> int:
    """Bytes one rank sends in a ring allreduce of `payload_bytes`: 2(n-1)/n of the payload."""
    return 0 if world_size <= 1 else (2 * (world_size - 1) * payload_bytes) // world_size


class DDPStrategy(Strategy):
    """Data parallel: every step the gradients are averaged across ranks, so all ranks take the same step.

    Gradients are packed into a few large flat buckets (one all_sum per bucket, not one per tensor): the
    ring's per-call latency dominates small tensors.
    """

    name = "ddp"

    def __init__(self, group: mx.distributed.Group, bucket_bytes: int = 32 << 20) -> None:
        super().__init__()
        self.group = group
        self.bucket_bytes = bucket_bytes
        self._step_bytes = 0

    def setup(self, model: nn.Module, *, rank: int, world_size: int) -> None:
        super().setup(model, rank=rank, world_size=world_size)
        # The same seed gives the same weights everywhere; taking rank 0's makes it a guarantee
        # (and keeps a resumed rank 0 authoritative).
        broadcast_parameters(model, self.group)
        payload = sum(v.nbytes for _, v in tree_flatten(model.trainable_parameters()))
        self._step_bytes = ring_bytes(payload, world_size)

    def reduce_gradients(self, grads: Any) -> Any:
        if self.world_size == 1:
            return grads
        flat = tree_flatten(grads)
        out: list[tuple[str, mx.array]] = []
        bucket: list[tuple[str, mx.array]] = []
        size = 0

        def flush() -> None:
            nonlocal bucket, size
            if not bucket:
                return
            packed = mx.concatenate([g.reshape(-1) for _, g in bucket])
            summed = mx.distributed.all_sum(packed, group=self.group) / self.world_size
            offset = 0
            for key, g in bucket:
                out.append((key, summed[offset:offset + g.size].reshape(g.shape)))
                offset += g.size
            bucket, size = [], 0

        for key, g in flat:
            bucket.append((key, g))
            size += g.nbytes
            if size >= self.bucket_bytes:
                flush()
        flush()
        return tree_unflatten(out)

    def after_step(self, model: nn.Module, optimizer: Any, step: int) -> None:
        self.bytes_sent += self._step_bytes


def broadcast_parameters(model: nn.Module, group: mx.distributed.Group) -> None:
    """Make every rank start from rank 0's weights (others contribute zeros to an all_sum)."""
    if group.size() == 1:
        return
    params = tree_flatten(model.parameters())
    synced = [(k, mx.distributed.all_sum(v if group.rank() == 0 else mx.zeros_like(v), group=group))
              for k, v in params]
    model.update(tree_unflatten(synced))
    mx.eval(model.parameters())
