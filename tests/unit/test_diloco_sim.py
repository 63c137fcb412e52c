"""benchmarks/diloco_grid.py and the pure parts of benchmarks/diloco_sim.py: the fair protocol's grid, winners,
targets and byte counts (training itself is checked against real ranks in tests/integration/test_diloco_sim.py)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import pytest

from benchmarks import diloco_grid as grid
from benchmarks.diloco_sim import SimSpec, config_for, required_h, round_bytes_diloco, step_bytes_ddp
from distributed import compress
from distributed.config import load_config

ROOT = Path(__file__).resolve().parents[2]
P = 825_600  # the mini GPT's parameters


@dataclass
class Fake:
    spec: SimSpec
    val_loss: float
    bytes_per_rank: int = 0
    clip_fraction: float = 0.5


def test_the_grid_covers_each_outer_setting_and_the_control() -> None:
    specs = grid.diloco_specs(4, [1e-3, 2e-3], grid.OUTER, seed=0, h=50, fmt="int4")
    assert len(specs) == 8
    assert {(s.outer_lr, s.outer_momentum) for s in specs} == {(0.3, 0.9), (0.5, 0.9), (0.7, 0.9), (1.0, 0.0)}
    assert all(s.method == "diloco" and s.h == 50 and s.fmt == "int4" and s.nesterov for s in specs)
    assert [s.lr for s in grid.ddp_specs(4, [1e-3, 2e-3], 1)] == [1e-3, 2e-3]
    assert len({s.name for s in specs}) == 8  # names tell the runs apart


def test_the_best_group_is_the_lowest_mean_over_seeds() -> None:
    a0, a1 = SimSpec("ddp", 4, 1e-3, 0), SimSpec("ddp", 4, 1e-3, 1)
    b0, b1 = SimSpec("ddp", 4, 2e-3, 0), SimSpec("ddp", 4, 2e-3, 1)
    # b wins seed 0 alone but loses on the mean: one lucky seed must not decide.
    results = [Fake(a0, 2.10), Fake(b0, 2.05), Fake(a1, 2.10), Fake(b1, 2.25)]
    rows = grid.ranked(results, "ddp", 4)
    assert [name for name, _, _ in rows] == [a0.group, b0.group]
    assert rows[0][1] == pytest.approx(2.10) and rows[1][1] == pytest.approx(2.15)
    assert grid.best_spec(results, "ddp", 4) in (a0, a1)


def test_a_diverged_seed_ranks_its_group_last() -> None:
    good, bad0, bad1 = SimSpec("plain", 1, 1e-3, 0), SimSpec("plain", 1, 9e-3, 0), SimSpec("plain", 1, 9e-3, 1)
    rows = grid.ranked([Fake(bad0, 1.0), Fake(bad1, math.inf), Fake(good, 3.0)], "plain", 1)
    assert rows[0][0] == good.group and rows[-1][1] == math.inf


def test_the_second_seed_reruns_the_top_groups_of_each_method() -> None:
    results = [Fake(SimSpec("diloco", 4, lr, 0, h=5, outer_lr=0.7, outer_momentum=0.9), loss)
               for lr, loss in ((1e-3, 2.3), (2e-3, 2.1), (4e-3, 2.2))]
    again = grid.reseeded(results, "diloco", 4, top=2, seed=1)
    assert [(s.lr, s.seed) for s in again] == [(2e-3, 1), (4e-3, 1)]
    assert grid.reseeded(results, "ddp", 4, top=2, seed=1) == []


def test_verdicts_compare_best_with_best_and_say_by_how_much() -> None:
    ddp = Fake(SimSpec("ddp", 4, 1e-3, 0), 2.00, bytes_per_rank=400_000)
    dil = Fake(SimSpec("diloco", 4, 2e-3, 0, h=50, outer_lr=0.5, outer_momentum=0.9), 2.05, bytes_per_rank=800)
    plain = Fake(SimSpec("plain", 1, 1e-3, 0), 2.50)
    one = Fake(SimSpec("diloco", 1, 1e-3, 0, h=50, outer_lr=0.7, outer_momentum=0.9), 2.45)
    out = grid.verdicts([ddp, dil, plain, one], ranks=4, rounds=50)
    t = out["targets"]
    assert t["loss_ratio"]["value"] == pytest.approx(1.025) and not t["loss_ratio"]["met"]
    assert t["loss_ratio"]["over_by"] == "+0.50 points"
    assert t["bytes_fewer"]["value"] == pytest.approx(500) and t["bytes_fewer"]["met"]
    assert t["rounds"]["met"] and t["one_rank_ratio"]["met"]
    best = out["best"]["diloco_4r"]["settings"]
    assert best == {"lr": 2e-3, "h": 50, "outer_lr": 0.5, "outer_momentum": 0.9, "nesterov": True, "format": "float32"}


def test_bytes_per_rank_follow_the_strategies_counts() -> None:
    assert step_bytes_ddp(P, 4) == compress.ring_bytes(4 * P, 4)  # what DDPStrategy adds per step
    assert round_bytes_diloco(P, 1, "float32") == 0
    per_round = round_bytes_diloco(P, 4, "float32")
    assert per_round == compress.wire_bytes(P, 4, "float32") + compress.ring_bytes(4, 4)
    # float32: DiLoCo's exchange is DDP's step plus a few bytes, so 400x fewer needs H just over 400.
    assert required_h(P, 4, "float32", 400) == 401
    # H is the smallest that reaches the target: one less misses it.
    for fmt in compress.EXCHANGE_DTYPES:
        h = required_h(P, 4, fmt, 400)
        assert h * step_bytes_ddp(P, 4) / round_bytes_diloco(P, 4, fmt) >= 400
        assert h == 1 or (h - 1) * step_bytes_ddp(P, 4) / round_bytes_diloco(P, 4, fmt) < 400


def test_a_spec_sets_lr_seed_and_outer_settings_of_the_config() -> None:
    base = load_config(ROOT / "configs" / "quickstart.yaml", ["train.batch_size=4"])
    spec = SimSpec("diloco", 4, 6e-3, 1, h=7, outer_lr=0.3, outer_momentum=0.9)
    cfg = config_for(base, spec, min_lr_ratio=0.1)
    assert (cfg.train.lr, cfg.train.min_lr, cfg.run.seed) == (6e-3, pytest.approx(6e-4), 1)
    assert (cfg.strategy.mode, cfg.strategy.inner_steps, cfg.strategy.outer_lr) == ("diloco", 7, 0.3)
    assert cfg.train.batch_size == 4 and cfg.model == base.model


def test_a_best_group_on_one_seed_must_run_the_others() -> None:
    a0, a1 = SimSpec("ddp", 4, 1e-3, 0), SimSpec("ddp", 4, 1e-3, 1)
    b0 = SimSpec("ddp", 4, 2e-3, 0)
    # a ran both seeds; b ran seed 0 only and leads: b must run seed 1 before it is called best.
    results = [Fake(a0, 2.10), Fake(a1, 2.12), Fake(b0, 2.08)]
    assert grid.missing_seeds(results, "ddp", 4, [0, 1]) == [SimSpec("ddp", 4, 2e-3, 1)]
    results.append(Fake(SimSpec("ddp", 4, 2e-3, 1), 2.20))
    assert grid.missing_seeds(results, "ddp", 4, [0, 1]) == []  # a leads again, with both seeds
    assert grid.missing_seeds([], "ddp", 4, [0, 1]) == []
