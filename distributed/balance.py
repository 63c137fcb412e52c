"""Batch shares for DDP on Macs of different speeds: each rank trains on a slice of the global batch sized
by its measured throughput, so a fast Mac does not wait every step for a slow one.

The global batch stays B = world_size × train.batch_size and is the same set of items as with equal shares;
rank r takes the contiguous slice of b_r items after those of ranks 0..r-1 (`distributed.shards`), and its
mean gradient is weighted by b_r·world/B before the ranks average (`DDPStrategy.grad_weight`), so the
update is that of the whole batch's mean, as with equal shares. DiLoCo uses the same shares: every rank takes
H inner steps on its share, so a round takes the slow Mac as long as the fast one, and each pseudo-gradient
is weighted by its rank's tokens (`DiLoCoStrategy.sync`). Shares, not more inner steps for the fast ranks,
because the loop's step counter, learning-rate schedule, data stream and checkpoints stay common to all.

Every rank measures its own step (`distributed.worker.measure_step_seconds`, all ranks at once), the ranks
all_gather the per-sample throughputs (ranks on one host take the host's mean: they share its GPU), each
computes the shares from the same numbers, and rank 0's result is broadcast so the ranks cannot split on
a rounding difference.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

# Speeds within this share of each other (fastest <= slowest × 1.10) keep equal shares: a step measured a
# few times varies by several percent on its own, and equal shares need no gradient weights.
BALANCE_TOLERANCE = 0.10


def compute_shares(speeds: Sequence[float], global_batch: int,
                   tolerance: float = BALANCE_TOLERANCE) -> tuple[int, ...]:
    """Integer shares of `global_batch` proportional to `speeds` (items per second, one per rank).

    Each share is at least 1 and they sum to `global_batch` exactly (largest-remainder rounding: floors
    first, then one more item to the ranks with the largest remainders; ties go to the lower rank). Equal
    shares (global_batch must then divide evenly) when every speed lies within `tolerance` of the slowest,
    or when a speed is not a positive finite number. A pure function of its arguments.
    """
    n = len(speeds)
    if n < 1 or global_batch < n:
        raise ValueError(f"{global_batch} items cannot give each of {n} rank(s) at least one")
    usable = all(math.isfinite(s) and s > 0 for s in speeds)
    if not usable or max(speeds) <= min(speeds) * (1 + tolerance):
        if global_batch % n:
            raise ValueError(f"equal shares of {global_batch} items over {n} ranks do not divide evenly")
        return (global_batch // n,) * n
    total = math.fsum(speeds)
    quotas = [global_batch * s / total for s in speeds]
    shares = [max(1, math.floor(q)) for q in quotas]
    # Floors leave some items over (hand them out by largest remainder); minimums of 1 can overshoot
    # (take back from the ranks given most above their quota, never below 1).
    while sum(shares) < global_batch:
        r = max(range(n), key=lambda i: (quotas[i] - shares[i], -i))
        shares[r] += 1
    while sum(shares) > global_batch:
        r = max((i for i in range(n) if shares[i] > 1), key=lambda i: (shares[i] - quotas[i], -i))
        shares[r] -= 1
    return tuple(shares)


def pool_by_host(speeds: Sequence[float], hosts: Sequence[Any]) -> list[float]:
    """Each rank's speed replaced by the mean over the ranks on its host (`hosts[r]`: any key naming rank r's
    host): ranks on one Mac share its GPU and so its speed, and timing them side by side only adds noise."""
    by_host: dict[Any, list[float]] = {}
    for s, h in zip(speeds, hosts, strict=True):
        by_host.setdefault(h, []).append(s)
    return [math.fsum(by_host[h]) / len(by_host[h]) for h in hosts]


@dataclass(frozen=True)
class BalancePlan:
    """What the ranks agreed on: `shares` (rank 0's, the same on every rank), the per-rank speeds they came from
    (samples/s, the host's mean) and how many hosts the ranks are on."""

    shares: tuple[int, ...]
    speeds: tuple[float, ...]
    hosts: int
    tolerance: float = BALANCE_TOLERANCE

    @property
    def equal(self) -> bool:
        return len(set(self.shares)) == 1

    def describe(self) -> str:
        """Rank 0's line: the shares and the speeds they came from."""
        measured = ", ".join(f"{s:.3g}" for s in self.speeds)
        if not self.equal:
            return (f"balance: batch shares {' + '.join(map(str, self.shares))} = {sum(self.shares)} by measured "
                    f"speed ({measured} samples/s)")
        speeds = self.speeds
        if self.hosts == 1 and len(speeds) > 1:
            why = "every rank is on one host"
        elif not all(math.isfinite(s) and s > 0 for s in speeds):
            why = "measured speeds not all usable"
        elif max(speeds) <= min(speeds) * (1 + self.tolerance):
            why = f"measured speeds within {self.tolerance:.0%}"
        else:
            why = "measured speeds too close to move a whole sample"
        return f"balance: equal shares of {self.shares[0]} per rank, {why} ({measured} samples/s)"


def agree_shares(speed: float, global_batch: int, group: Any, host: str | None = None,
                 tolerance: float = BALANCE_TOLERANCE) -> BalancePlan:
    """Every rank's share of `global_batch` from every rank's `speed` (samples per second on this rank).

    Collective: every rank of `group` calls it at the same point. Ranks that name the same `host` share the
    mean of their speeds (None: this rank's host is its own). The shares are rank 0's, broadcast (the others
    contribute zeros to an all_sum), so every rank holds the same whatever its own arithmetic gave.
    """
    import mlx.core as mx

    rank = group.rank()
    key = zlib.crc32(host.encode()) & 0x7FFFFFFF if host is not None else -1 - rank
    speeds = [float(s) for s in mx.distributed.all_gather(mx.array([speed], dtype=mx.float32), group=group).tolist()]
    hosts = mx.distributed.all_gather(mx.array([key], dtype=mx.int32), group=group).tolist()
    pooled = pool_by_host(speeds, hosts)
    mine = compute_shares(pooled, global_batch, tolerance)
    contribution = mx.array(mine if rank == 0 else [0] * len(mine), dtype=mx.int32)
    agreed = tuple(int(b) for b in mx.distributed.all_sum(contribution, group=group).tolist())
    return BalancePlan(agreed, tuple(pooled), len(set(hosts)), tolerance)
