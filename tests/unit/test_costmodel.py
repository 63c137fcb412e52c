"""The DDP-or-DiLoCo cost model: the ring formula, both sides of the threshold, and forced modes."""

from __future__ import annotations

import pytest

from distributed.costmodel import DDP_MAX_SHARE, choose_strategy, ring_allreduce_seconds
from distributed.errors import ConfigError

MB = 1_000_000
THUNDERBOLT = 1.25e9  # 10 Gbit/s in bytes/s
WIFI = 25e6  # 200 Mbit/s


def test_ring_formula() -> None:
    # 4 ranks, 100 MB over 100 MB/s with 1 ms latency: 2*3/4 * 1 s + 6 * 1 ms.
    assert ring_allreduce_seconds(100 * MB, 4, 100 * MB, 1e-3) == pytest.approx(1.5 + 0.006)
    assert ring_allreduce_seconds(100 * MB, 2, 100 * MB, 0.0) == pytest.approx(1.0)
    assert ring_allreduce_seconds(100 * MB, 1, 1.0, 1.0) == 0.0


def test_fast_link_chooses_ddp() -> None:
    d = choose_strategy(0.3, 50 * MB, 2, THUNDERBOLT, 50e-6, link="thunderbolt")
    assert d.mode == "ddp"
    assert d.allreduce_seconds == pytest.approx(50 * MB / THUNDERBOLT + 2 * 50e-6)
    assert "thunderbolt" in d.reason and "DDP" in d.reason


def test_slow_link_chooses_diloco_with_the_reason() -> None:
    d = choose_strategy(0.3, 124 * MB * 4, 4, WIFI, 2e-3, inner_steps=100, link="network")
    assert d.mode == "diloco" and d.inner_steps == 100
    assert d.allreduce_seconds == pytest.approx(1.5 * 496 * MB / WIFI + 6 * 2e-3)
    assert d.reason.startswith("allreduce 30 s vs step 0.30 s over network → DiLoCo, H=100")
    # 30 s per round of 100 * 0.3 s is still ~100%: the reason says how large H should be for 10% (29.77 s / 0.03 s).
    assert "still 99% of a round: consider strategy.inner_steps >= 993 or strategy.overlap=true" in d.reason


def test_threshold_is_inclusive_on_the_ddp_side() -> None:
    step = 1.0
    nbytes = DDP_MAX_SHARE * step * 100 * MB  # 2 ranks, zero latency: allreduce = bytes / bandwidth
    assert choose_strategy(step, int(nbytes), 2, 100 * MB, 0.0).mode == "ddp"
    assert choose_strategy(step, int(nbytes * 1.01), 2, 100 * MB, 0.0).mode == "diloco"


def test_latency_alone_can_tip_the_choice() -> None:
    # A tiny model but a slow, high-latency link: 2(n-1) latencies dominate a short step.
    assert choose_strategy(0.01, 1000, 8, 1e9, 1e-3).mode == "diloco"  # 14 ms vs 10 ms
    assert choose_strategy(0.1, 1000, 8, 1e9, 1e-3).mode == "ddp"


def test_forced_modes_keep_the_numbers() -> None:
    fast = choose_strategy(0.3, 50 * MB, 2, THUNDERBOLT, 0.0, mode="diloco", inner_steps=20)
    assert fast.mode == "diloco" and fast.inner_steps == 20 and fast.reason.startswith("strategy.mode=diloco")
    slow = choose_strategy(0.3, 500 * MB, 2, WIFI, 0.0, mode="ddp")
    assert slow.mode == "ddp" and slow.reason.startswith("strategy.mode=ddp")
    assert "adds 6667% to every step" in slow.reason


def test_one_rank_exchanges_nothing() -> None:
    d = choose_strategy(0.3, 500 * MB, 1, WIFI, 1.0)
    assert d.mode == "ddp" and d.allreduce_seconds == 0.0 and "one rank" in d.reason


def test_bad_inputs() -> None:
    with pytest.raises(ConfigError, match="strategy.mode"):
        choose_strategy(0.3, MB, 2, WIFI, 0.0, mode="fsdp")
    with pytest.raises(ValueError):
        choose_strategy(0.0, MB, 2, WIFI, 0.0)
    with pytest.raises(ValueError):
        choose_strategy(0.3, MB, 2, 0.0, 0.0)
