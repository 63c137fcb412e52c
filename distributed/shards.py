"""Which items of a data set each rank trains on at each step: disjoint shards, a pure function of the step.

Shared by the built-in GPT's token windows (`distributed.data.BatchSampler`) and the fine-tuning examples
(`distributed.sft_data.ExampleSampler`), so both keep the same guarantees: deterministic in the seed,
disjoint per rank within an epoch, and resumable where a checkpoint stopped, with another world size too.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


class ShardedStream:
    """Which items (windows of a token file, fine-tuning examples) each rank takes at each global step.

    Epoch e is the permutation `default_rng((seed, e))` of all `num_items` items; the epochs, one after
    another, form a stream. Global step s takes the next batch_size * world_size items of that stream and
    rank r its own contiguous batch_size of them, so ranks never share an item within an epoch and what a
    rank takes at step s depends on s only. `shares` (balanced DDP, see distributed.balance) sizes the
    ranks' slices unequally: rank r takes shares[r] items after the shares of ranks 0..r-1; the step's
    items are the same, only cut elsewhere.

    A run that resumes with another world size (a restart after losing a host) continues the same stream
    where the last checkpoint left it: `start_step` and `start_position` (items of the stream consumed
    before that step, see `position`) re-base the arithmetic, so no item is skipped or repeated within an
    epoch because the world changed.
    """

    def __init__(self, num_items: int, batch_size: int, rank: int, world_size: int, seed: int, *,
                 start_step: int = 0, start_position: int | None = None,
                 shares: Sequence[int] | None = None) -> None:
        check_shard(batch_size, rank, world_size, start_step, start_position, shares)
        self.num_items, self.batch_size = num_items, batch_size
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.shares = tuple(shares) if shares is not None else (batch_size,) * world_size
        self.offset = sum(self.shares[:rank])  # where this rank's slice starts within a step's items
        self.local_batch = self.shares[rank]  # items this rank takes per step
        self.start_step = start_step
        self.start_position = start_step * batch_size * world_size if start_position is None else start_position
        self._perms: dict[int, np.ndarray] = {}

    @property
    def steps_per_epoch(self) -> int:
        """Global steps per pass over the data (at least 1; a step may straddle two epochs)."""
        return max(1, self.num_items // (self.batch_size * self.world_size))

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            if len(self._perms) >= 4:
                del self._perms[next(iter(self._perms))]
            self._perms[epoch] = np.random.default_rng((self.seed, epoch)).permutation(self.num_items)
        return self._perms[epoch]

    def position(self, step: int) -> int:
        """Items of the stream consumed by every rank together before global `step` (0-based)."""
        return self.start_position + (step - self.start_step) * self.batch_size * self.world_size

    def _ids(self, start: int, count: int) -> np.ndarray:
        stream = np.arange(start, start + count, dtype=np.int64)
        epochs, positions = np.divmod(stream, self.num_items)
        ids = np.empty(count, dtype=np.int64)
        for epoch in np.unique(epochs):
            here = epochs == epoch
            ids[here] = self._perm(int(epoch))[positions[here]]
        return ids

    def item_ids(self, step: int) -> np.ndarray:
        """The item indices this rank uses at global `step`."""
        if step < self.start_step:
            raise ValueError(f"step must be >= {self.start_step}, got {step}")
        return self._ids(self.position(step) + self.offset, self.local_batch)

    def step_ids(self, step: int) -> np.ndarray:
        """The item indices every rank together uses at global `step`, rank 0's first."""
        if step < self.start_step:
            raise ValueError(f"step must be >= {self.start_step}, got {step}")
        return self._ids(self.position(step), self.batch_size * self.world_size)


def check_shard(batch_size: int, rank: int, world_size: int, start_step: int, start_position: int | None,
                shares: Sequence[int] | None = None) -> None:
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world_size {world_size}")
    if batch_size < 1:
        raise ValueError("batch_size must be positive")
    if shares is not None and (len(shares) != world_size or min(shares) < 1
                               or sum(shares) != batch_size * world_size):
        raise ValueError(f"shares {tuple(shares)} must be {world_size} positive numbers summing to "
                         f"batch_size * world_size = {batch_size * world_size}")
    if start_step < 0 or (start_position is not None and start_position < 0):
        raise ValueError("start_step and start_position must be >= 0")
