"""Auto H (strategy.inner_steps 0): the smallest H of the set whose exposed exchange stays <= 10% of a round's
compute, bounded by the largest; an explicit H is kept; overlap and a compressed exchange need a smaller H."""

from __future__ import annotations

import random

import pytest

from distributed.costmodel import (
    AUTO_INNER_STEPS,
    EXPOSED_MAX_SHARE,
    INNER_STEPS_CHOICES,
    UNMEASURED_INNER_STEPS,
    choose_inner_steps,
    choose_strategy,
    exposed_seconds,
    inner_steps_needed,
)

MB = 1_000_000
WIFI = 25e6  # 200 Mbit/s in bytes/s


def share(sync: float, h: int, step: float, overlap: bool = False) -> float:
    return exposed_seconds(sync, h, step, overlap=overlap) / (h * step)


def test_smallest_h_that_keeps_the_exchange_under_a_tenth() -> None:
    # 1 s exchange, 0.1 s step: H=100 gives exactly 10%; a hair more exchange needs the next choice, 200.
    assert inner_steps_needed(1.0, 0.1) == 100
    assert choose_inner_steps(1.0, 0.1) == 100
    assert choose_inner_steps(1.01, 0.1) == 200
    assert choose_inner_steps(0.001, 0.1) == min(INNER_STEPS_CHOICES)  # never below the set's smallest


def test_the_rule_holds_and_the_choice_below_breaks_it() -> None:
    rng = random.Random(0)
    choices = sorted(INNER_STEPS_CHOICES)
    for _ in range(500):
        sync, step, overlap = 10 ** rng.uniform(-3, 3), 10 ** rng.uniform(-3, 0), rng.random() < 0.5
        h = choose_inner_steps(sync, step, overlap=overlap)
        if h == max(choices) and share(sync, h, step, overlap) > EXPOSED_MAX_SHARE:
            continue  # bounded: even the largest H leaves more exposed (the reason then says so)
        assert share(sync, h, step, overlap) <= EXPOSED_MAX_SHARE + 1e-9
        below = [c for c in choices if c < h]
        if below:
            assert share(sync, below[-1], step, overlap) > EXPOSED_MAX_SHARE


def test_bounded_by_the_largest_choice_and_the_reason_says_what_would_do() -> None:
    d = choose_strategy(0.3, 496 * MB, 4, WIFI, 2e-3, link="network")  # GPT-2 124M over shared Wi-Fi: 30 s
    assert d.mode == "diloco" and d.inner_steps == max(INNER_STEPS_CHOICES) == 500
    assert d.exposed_share == pytest.approx(d.sync_seconds / (500 * 0.3))
    assert "H=500 auto (exchange 30 s: 20% of a round's compute exposed, at most 10%)" in d.reason
    assert "consider strategy.inner_steps >= 993 or strategy.overlap=true" in d.reason


def test_auto_h_in_the_reason_and_an_explicit_h_is_kept() -> None:
    # 2 ranks, 10 MB over 25 MB/s, no latency: 0.4 s per exchange against a 0.1 s step -> H >= 40 -> 50.
    auto = choose_strategy(0.1, 10 * MB, 2, WIFI, 0.0, inner_steps=AUTO_INNER_STEPS, link="network")
    assert auto.mode == "diloco" and auto.inner_steps == 50 and auto.exposed_share == pytest.approx(0.08)
    assert auto.reason == ("allreduce 0.40 s vs step 0.10 s over network → DiLoCo, H=50 auto (exchange 0.40 s: "
                           "8% of a round's compute exposed, at most 10%)")
    mine = choose_strategy(0.1, 10 * MB, 2, WIFI, 0.0, inner_steps=20, link="network")
    assert mine.inner_steps == 20 and mine.reason.startswith("allreduce 0.40 s vs step 0.10 s over network → "
                                                             "DiLoCo, H=20; communication still 20% of a round")
    forced = choose_strategy(0.1, 10 * MB, 2, WIFI, 0.0, mode="diloco")  # forced mode, H still auto
    assert forced.inner_steps == 50 and forced.reason.startswith("strategy.mode=diloco (allreduce 0.40 s")


def test_a_compressed_exchange_or_overlap_needs_a_smaller_h() -> None:
    plain = choose_strategy(0.1, 10 * MB, 2, WIFI, 0.0)
    # int8 puts about a quarter of float32's bytes on the wire: 0.1 s per exchange -> H >= 10.
    int8 = choose_strategy(0.1, 10 * MB, 2, WIFI, 0.0, sync_bytes=10 * MB / 4)
    assert int8.sync_seconds == pytest.approx(0.1) and int8.inner_steps == 10 < plain.inner_steps == 50
    # Overlapped, the 0.4 s exchange hides behind H steps: H >= 0.4 / (1.1 * 0.1) -> 10, nothing exposed.
    hidden = choose_strategy(0.1, 10 * MB, 2, WIFI, 0.0, overlap=True)
    assert hidden.inner_steps == 10 and hidden.exposed_share == 0.0 and ", overlapped:" in hidden.reason


def test_ddp_and_one_rank_pass_a_usable_h_through() -> None:
    fast = choose_strategy(0.3, 50 * MB, 2, 1.25e9, 0.0)  # Thunderbolt: DDP
    assert fast.mode == "ddp" and fast.inner_steps == UNMEASURED_INNER_STEPS
    assert choose_strategy(0.3, 50 * MB, 2, 1.25e9, 0.0, inner_steps=7).inner_steps == 7
    assert choose_strategy(0.3, 50 * MB, 1, WIFI, 0.0).inner_steps == UNMEASURED_INNER_STEPS
    with pytest.raises(ValueError):
        choose_strategy(0.3, MB, 2, WIFI, 0.0, inner_steps=-1)


def test_config_zero_means_auto_and_the_worker_resolves_it_without_measuring() -> None:
    from distributed.config import config_from_dict
    from distributed.diloco import DiLoCoStrategy
    from distributed.errors import ConfigError
    from distributed.worker import choose_strategy as worker_choice

    assert config_from_dict({}).strategy.inner_steps == AUTO_INNER_STEPS
    assert config_from_dict({"strategy": {"inner_steps": 30}}).strategy.inner_steps == 30
    with pytest.raises(ConfigError, match="strategy.inner_steps"):
        config_from_dict({"strategy": {"inner_steps": -1}})
    strategy, _ = worker_choice(config_from_dict({"strategy": {"mode": "diloco"}}), None)
    assert isinstance(strategy, DiLoCoStrategy) and strategy.inner_steps == UNMEASURED_INNER_STEPS


def test_the_plan_shows_auto_h_without_dividing_by_it() -> None:
    from distributed.config import config_from_dict
    from launcher.views.plan import describe_strategy, describe_traffic

    cfg = config_from_dict({"strategy": {"mode": "diloco"}})
    assert "every H steps (H chosen at start" in describe_strategy(cfg, 3, "network")[1]
    assert "per DiLoCo round (float32, every H steps" in describe_traffic(cfg, "diloco", 1000, 3)
    explicit = config_from_dict({"strategy": {"mode": "diloco", "inner_steps": 10}, "train": {"steps": 100}})
    assert "over 10 rounds" in describe_traffic(explicit, "diloco", 1000, 3)


def test_a_short_run_caps_h_so_it_keeps_ten_rounds() -> None:
    # 1 s exchange, 0.01 s step: H=500 would be needed for 10% (the largest), but 400 steps allow H <= 40 -> 20.
    assert choose_inner_steps(1.0, 0.01) == 500
    assert choose_inner_steps(1.0, 0.01, steps=400) == 20
    assert choose_inner_steps(1.0, 0.01, steps=50) == 10  # never below the smallest choice
    assert choose_inner_steps(0.001, 0.01, steps=400) == 10  # the cap only lowers H
    d = choose_strategy(0.01, 10 * MB, 2, WIFI, 0.0, steps=400)
    assert d.inner_steps == 20 and "H capped so that 400 steps make >= 10 rounds" in d.reason
    assert "consider strategy.inner_steps >= 400 " in d.reason  # 0.4 s / (10% of 0.01 s)
