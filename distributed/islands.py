"""Thunderbolt islands: per-step DDP inside each cabled group of Macs, DiLoCo between the groups.

The design, its measurements and MLX's limits are in docs/islands.md; the planner is
`distributed.topology_islands`. A rank holds up to three MLX rings:

- its **island's ring** (over the island's cables, or loopback on one Mac), where gradients are averaged
  every step, as DDP does over a whole room;
- on each island's leader (its island rank 0), the **leaders' ring** over the network, where the islands
  exchange pseudo-gradients every H steps, weighted by their ranks;
- the **world ring**, every rank, for what is small: the start-up broadcast, the stop vote, the replica check.

MLX 0.32's ring has no `Group.split`, and `mx.distributed.init` keeps one group per backend name. Its C++
`distributed::clear_backends()` empties that cache (Python binds it only to run at exit), so it is called
through ctypes between the inits; a group already opened lives on in the Python object that holds it. The
world ring is opened last, so `mx.distributed.init()` in anything else still returns the whole world.

An island of k ranks is one DiLoCo worker whose batch is its k ranks' batches: every member applies the
same averaged gradient, so all hold the same weights and the same pseudo-gradient. The leaders sum
k_i·Δ_i; the leader hands the sum to its island (an all_sum to which the others add zeros); every rank
then takes the same outer step on Σ k_i·Δ_i / Σ k_i, which is flat DiLoCo's mean over all ranks. θ, the
outer momentum and the checkpoint's format are DiLoCo's own, so a run can resume under another island
layout (or none), which is what a pulled cable leads to.
"""

from __future__ import annotations

import ctypes
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from distributed.compress import exchange, ring_bytes, ring_sum_bytes
from distributed.diloco import DiLoCoStrategy
from distributed.env import RankEnv
from distributed.errors import MacrunError, TrainingError
from distributed.progress import PROGRESS
from distributed.strategy import DDPStrategy

CLEAR_BACKENDS = "_ZN3mlx4core11distributed14clear_backendsEv"  # mlx::core::distributed::clear_backends()


@dataclass(frozen=True, slots=True)
class IslandGroups:
    """The rings a rank of an island plan holds (docs/islands.md, "Groups")."""

    world: mx.distributed.Group
    island: mx.distributed.Group | None  # None for an island of one rank
    leaders: mx.distributed.Group | None  # on island leaders only
    islands: int  # how many islands (the leaders' ring's size)
    island_rank: int
    island_size: int
    leader_rank: int  # this island's place in the leaders' ring

    @property
    def is_leader(self) -> bool:
        return self.island_rank == 0


class IslandsUnavailable(MacrunError):
    """This MLX gives no way to open a second ring in a process; the run goes on without islands."""


def _clear_backends() -> Callable[[], None]:
    """MLX's `clear_backends`, from the library the Python module loaded, or IslandsUnavailable saying why not."""
    name = "libmlx.dylib" if sys.platform == "darwin" else "libmlx.so"
    lib = Path(mx.__file__).parent / "lib" / name
    try:
        return getattr(ctypes.CDLL(str(lib)), CLEAR_BACKENDS)
    except (OSError, AttributeError) as exc:
        raise IslandsUnavailable(f"MLX {mx.__version__} does not expose clear_backends, which opening a second "
                                 f"ring needs ({exc})", hint="docs/islands.md says what MLX would need") from None


def _open_ring(rank: int, hostfile: str) -> mx.distributed.Group:
    os.environ["MLX_RANK"], os.environ["MLX_HOSTFILE"] = str(rank), hostfile
    return mx.distributed.init(strict=True, backend="ring")


def open_groups(env: RankEnv) -> IslandGroups:
    """Open this rank's island ring, the leaders' ring on a leader, then the world ring (in that order on
    every rank, so no ring waits on a member busy opening another)."""
    if env.islands < 2 or env.mlx_backend != "ring" or not env.mlx_hostfile:
        raise ValueError("open_groups needs the launcher's island plan over the ring backend")
    world_rank, world_hostfile = os.environ.get("MLX_RANK"), os.environ.get("MLX_HOSTFILE")
    clear = _clear_backends()
    island = leaders = None
    try:
        if env.island_size > 1 and env.island_hostfile:
            island = _open_ring(env.island_rank, env.island_hostfile)
            clear()
        if env.leader_rank is not None and env.leaders_hostfile:
            leaders = _open_ring(env.leader_rank, env.leaders_hostfile)
            clear()
        world = _open_ring(env.rank, env.mlx_hostfile)
    finally:
        for key, value in (("MLX_RANK", world_rank), ("MLX_HOSTFILE", world_hostfile)):
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    return IslandGroups(world, island, leaders, env.islands, env.island_rank, env.island_size,
                        env.leader_rank or 0)


class IslandStrategy(DiLoCoStrategy):
    """DDP over each island's ring every step; DiLoCo between the islands over the leaders' ring."""

    name = "islands"

    def __init__(self, groups: IslandGroups, **diloco: Any) -> None:
        super().__init__(groups.world, **diloco)
        self.groups = groups
        self.island = DDPStrategy(groups.island) if groups.island is not None else None
        self.island_step_bytes = 0  # what one step's gradient all_sum over the island sends from this rank

    def setup(self, model: nn.Module, *, rank: int, world_size: int) -> None:
        super().setup(model, rank=rank, world_size=world_size)  # rank 0's weights and outer state, on the world ring
        if self.island is not None:
            # The island already holds rank 0's weights: no second broadcast, only its step bytes.
            self.island.rank, self.island.world_size = self.groups.island_rank, self.groups.island_size
            payload = sum(v.nbytes for _, v in tree_flatten(model.trainable_parameters()))
            self.island_step_bytes = ring_bytes(payload, self.groups.island_size)

    def reduce_gradients(self, grads: Any) -> Any:
        return self.island.reduce_gradients(grads) if self.island is not None else grads

    def after_step(self, model: nn.Module, optimizer: Any, step: int, *, last: bool = False,
                   stop: bool = False) -> bool:
        if self.island is not None:
            self.bytes_sent += self.island_step_bytes
        return super().after_step(model, optimizer, step, last=last, stop=stop)

    def sync(self, model: nn.Module, optimizer: Any, step: int) -> None:
        """End a round: the leaders exchange their islands' weighted pseudo-gradients, each hands the sum to its
        island, every rank takes the outer step."""
        if self.params is None or self.momentum is None:
            raise RuntimeError("IslandStrategy.setup must run before the first step")
        g, round_no = self.groups, self.rounds + 1
        PROGRESS.enter(f"islands' outer exchange of round {round_no} (after step {step})")
        started = time.perf_counter()
        delta = self.params - self._flatten(model)
        valid = bool(mx.all(mx.isfinite(delta)).item())  # the same on every member: they hold the same weights
        total = mx.zeros_like(delta)
        weight = mx.zeros((1,))
        if g.is_leader:
            if not valid:
                self.log(f"island of rank {self.rank}: pseudo-gradient has NaN/Inf at round {round_no} "
                         f"(step {step}); contributing nothing this round")
            sent = exchange(delta * g.island_size, valid, g.leaders, self.exchange_dtype, self.exchange_state)
            weight = mx.distributed.all_sum(mx.array([float(g.island_size if valid else 0)]), group=g.leaders)
            total = sent.total
            mx.eval(total, weight, *sent.arrays)
            self.bytes_sent += sent.bytes_sent + ring_sum_bytes(1, 4, g.islands, g.leader_rank)
        if g.island is not None:  # the hand-out: the leader's sum, the others adding zeros (exact in float32)
            both = mx.distributed.all_sum(mx.concatenate([total, weight]), group=g.island)
            mx.eval(both)
            total, weight = both[:-1], both[-1:]
            self.bytes_sent += ring_bytes(both.nbytes, g.island_size)
        self.comm_seconds += time.perf_counter() - started
        ranks = float(weight.item())
        self.valid_ranks = round(ranks)
        if self.valid_ranks == 0:
            raise TrainingError(f"every island's pseudo-gradient has NaN/Inf at round {round_no} (step {step})",
                                hint="lower train.lr, or strategy.inner_steps")
        self._outer(model, optimizer, total / ranks, round_no, step, valid)


__all__ = ["IslandGroups", "IslandStrategy", "IslandsUnavailable", "open_groups"]
