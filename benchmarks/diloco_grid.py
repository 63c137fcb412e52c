"""The fair protocol's grid and verdicts: which configurations run, which one of each method wins, targets met.

Pure logic (no MLX), so the protocol is unit-tested (tests/unit/test_diloco_sim.py) apart from training.
The protocol (issue 11; the tuning of "Scaling Laws for DiLoCo", Charles et al. 2025, arXiv:2503.09799):
each method tuned on its own at equal tokens, best against best.

* stage 1, seed 0: DDP at every inner lr; DiLoCo at every inner lr with the middle outer setting, then
  every outer setting (outer lr 0.3/0.5/0.7 with Nesterov 0.9, and the (1.0, 0) control: plain averaging)
  at its best inner lr; one rank: plain at every lr, one-rank DiLoCo at every outer setting at plain's
  best lr.
* stage 2, the other seeds: the `top` best groups of each method again; a method's best is the group
  with the lowest validation loss averaged over every seed it ran, and it must have run every seed
  (if a group with fewer seeds overtakes it, that group runs the rest, until the best has them all);
  if that moves plain's best lr, one-rank DiLoCo's outer settings run again at the new lr.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import replace
from typing import Any, Protocol

from benchmarks.diloco_sim import SimSpec

# (outer lr, outer momentum): three Nesterov settings and the plain-averaging control.
OUTER = ((0.3, 0.9), (0.5, 0.9), (0.7, 0.9), (1.0, 0.0))
MIDDLE_OUTER = (0.5, 0.9)  # where DiLoCo's inner lr is tuned before the outer grid
LOSS_TARGET = 1.02  # best DiLoCo's validation loss / best DDP's
BYTES_TARGET = 400.0  # best DDP's bytes per rank / best DiLoCo's
MIN_ROUNDS = 50


class Scored(Protocol):
    spec: SimSpec
    val_loss: float


def ddp_specs(ranks: int, lrs: Sequence[float], seed: int) -> list[SimSpec]:
    return [SimSpec("ddp", ranks, lr, seed) for lr in lrs]


def plain_specs(lrs: Sequence[float], seed: int) -> list[SimSpec]:
    return [SimSpec("plain", 1, lr, seed) for lr in lrs]


def diloco_specs(ranks: int, lrs: Sequence[float], outers: Iterable[tuple[float, float]], seed: int, h: int,
                 fmt: str) -> list[SimSpec]:
    return [SimSpec("diloco", ranks, lr, seed, h=h, outer_lr=o, outer_momentum=m, fmt=fmt)
            for lr in lrs for o, m in outers]


def ranked(results: Sequence[Scored], method: str, ranks: int) -> list[tuple[str, float, list[Scored]]]:
    """(group, mean validation loss over its seeds, its results) of one method, best first.

    A group that diverged (a non-finite loss on any seed) ranks last.
    """
    groups: dict[str, list[Scored]] = {}
    for r in results:
        if r.spec.method == method and r.spec.ranks == ranks:
            groups.setdefault(r.spec.group, []).append(r)
    rows = []
    for name, members in groups.items():
        losses = [m.val_loss for m in members]
        mean = sum(losses) / len(losses) if all(math.isfinite(x) for x in losses) else math.inf
        rows.append((name, mean, members))
    # Among equals, the group that ran more seeds is the better evidence.
    return sorted(rows, key=lambda row: (row[1], -len(row[2])))


def best_spec(results: Sequence[Scored], method: str, ranks: int) -> SimSpec | None:
    rows = ranked(results, method, ranks)
    return rows[0][2][0].spec if rows else None


def reseeded(results: Sequence[Scored], method: str, ranks: int, top: int, seed: int) -> list[SimSpec]:
    """The `top` best groups of a method (by stage 1) again with `seed`."""
    return [replace(members[0].spec, seed=seed) for _, _, members in ranked(results, method, ranks)[:top]]


def missing_seeds(results: Sequence[Scored], method: str, ranks: int, seeds: Sequence[int]) -> list[SimSpec]:
    """The current best group of a method on the seeds it has not run: a group that won on one lucky seed
    must face the others before it is called best (the protocol reruns until the best has every seed)."""
    rows = ranked(results, method, ranks)
    if not rows:
        return []
    members = rows[0][2]
    have = {m.spec.seed for m in members}
    return [replace(members[0].spec, seed=s) for s in seeds if s not in have]


def verdicts(results: Sequence[Any], ranks: int, rounds: int) -> dict[str, Any]:
    """Best of each method (averaged over seeds) and the targets: loss ratio, byte ratio, one-rank ratio.

    `results` need spec, val_loss and bytes_per_rank; every figure is reported, met or not.
    """
    out: dict[str, Any] = {"best": {}, "targets": {}}
    for method, n in (("ddp", ranks), ("diloco", ranks), ("plain", 1), ("diloco", 1)):
        rows = ranked(results, method, n)
        if rows:
            group, mean, members = rows[0]
            out["best"][f"{method}_{n}r"] = {
                "group": group, "val_loss": mean, "seeds": sorted(m.spec.seed for m in members),
                "val_losses": [m.val_loss for m in members], "bytes_per_rank": members[0].bytes_per_rank,
                "clip_fraction": sum(m.clip_fraction for m in members) / len(members),
                "settings": {"lr": members[0].spec.lr, "h": members[0].spec.h, "outer_lr": members[0].spec.outer_lr,
                             "outer_momentum": members[0].spec.outer_momentum, "nesterov": members[0].spec.nesterov,
                             "format": members[0].spec.fmt}}
    best = out["best"]
    ddp, dil = best.get(f"ddp_{ranks}r"), best.get(f"diloco_{ranks}r")
    if ddp and dil:
        ratio = dil["val_loss"] / ddp["val_loss"]
        fewer = ddp["bytes_per_rank"] / dil["bytes_per_rank"] if dil["bytes_per_rank"] else math.inf
        out["targets"]["loss_ratio"] = {"value": ratio, "target": f"<= {LOSS_TARGET}", "met": ratio <= LOSS_TARGET,
                                        "over_by": f"{(ratio - LOSS_TARGET) * 100:+.2f} points"}
        out["targets"]["bytes_fewer"] = {"value": fewer, "target": f">= {BYTES_TARGET:.0f}",
                                         "met": fewer >= BYTES_TARGET}
        out["targets"]["rounds"] = {"value": rounds, "target": f">= {MIN_ROUNDS}", "met": rounds >= MIN_ROUNDS}
    plain, one = best.get("plain_1r"), best.get("diloco_1r")
    if plain and one:
        ratio = one["val_loss"] / plain["val_loss"]
        out["targets"]["one_rank_ratio"] = {"value": ratio, "target": "<= 1.0", "met": ratio <= 1.0}
    return out
