"""benchmarks/islands_sim.py: the alpha-beta fit, the shared-Wi-Fi ring, byte counts and the three strategies."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks.islands_sim import (
    MIB,
    WIFI_FOUR_POINTS,
    WIFI_PAIR_POINTS,
    Link,
    allreduce_seconds,
    fit_alpha_beta,
    main,
    parse_room,
    points_from_json,
    ring_bytes,
    simulate,
)
from distributed.costmodel import ring_allreduce_seconds


def test_fit_recovers_the_model_it_was_made_from() -> None:
    bw, lat, n = 250e6, 2e-3, 4
    points = [(s, ring_allreduce_seconds(s, n, bw, lat)) for s in (1e6, 16e6, 64e6)]
    got_bw, got_lat = fit_alpha_beta(points, n)
    assert got_bw == pytest.approx(bw, rel=1e-9)
    assert got_lat == pytest.approx(lat, rel=1e-9)


def test_fit_clamps_a_negative_latency_and_refuses_nonsense() -> None:
    assert fit_alpha_beta([(1e6, 0.001), (2e6, 0.0030)], 2)[1] == 0.0
    with pytest.raises(ValueError):
        fit_alpha_beta([(1e6, 0.1)], 2)
    with pytest.raises(ValueError):
        fit_alpha_beta([(1e6, 0.1), (1e6, 0.2)], 2)
    with pytest.raises(ValueError):
        fit_alpha_beta([(1e6, 0.2), (2e6, 0.1)], 2)


def test_the_measured_wifi_is_one_shared_medium() -> None:
    """The lab's pair and four-host rings fit to the same airtime (within 10%): the reason for `shared`."""
    pair_bw, _ = fit_alpha_beta(WIFI_PAIR_POINTS, 2)
    four_bw, _ = fit_alpha_beta(WIFI_FOUR_POINTS, 4)
    assert 2 * pair_bw == pytest.approx(4 * four_bw, rel=0.1)


def test_shared_medium_splits_airtime_and_a_cable_does_not() -> None:
    wifi, cable = Link(24e6, 0.0, shared=True), Link(24e6, 0.0)
    assert allreduce_seconds(16 * MIB, 4, wifi) == pytest.approx(4 * allreduce_seconds(16 * MIB, 4, cable))
    assert allreduce_seconds(16 * MIB, 1, wifi) == 0.0
    # all members' bytes over the airtime: 2(n-1)·M / A
    assert allreduce_seconds(16 * MIB, 4, wifi) == pytest.approx(ring_bytes(16 * MIB, 4) / 24e6)


def test_ring_bytes() -> None:
    assert ring_bytes(100.0, 1) == 0.0
    assert ring_bytes(100.0, 2) == 200.0
    assert ring_bytes(100.0, 4) == 600.0


def _by_name(results: list) -> dict:  # type: ignore[type-arg]
    return {r.strategy: r for r in results}


def test_simulate_the_issues_room() -> None:
    cable, wifi = Link(1e9, 1e-4), Link(24e6, 5e-3, shared=True)
    r = _by_name(simulate((2, 1, 1), 40e6, 0.5, 1024, 50, cable, wifi))
    assert r["ddp-wifi"].step_seconds > r["diloco-wifi"].step_seconds > 0.5
    # Wi-Fi bytes: 4 members 6M per round, 3 islands 4M per round, DDP 6M every step
    assert r["ddp-wifi"].wifi_bytes_per_step == pytest.approx(6 * 40e6)
    assert r["diloco-wifi"].wifi_bytes_per_step == pytest.approx(6 * 40e6 / 50)
    assert r["islands"].wifi_bytes_per_step == pytest.approx(4 * 40e6 / 50)
    # the one cabled pair: 2M per step plus the hand-out of 2M per round
    assert r["islands"].cable_bytes_per_step == pytest.approx(2 * 40e6 + 2 * 40e6 / 50)
    for x in r.values():
        assert x.tokens_per_second == pytest.approx(4 * 1024 / x.step_seconds)


def test_islands_win_when_the_cable_is_fast_and_lose_when_it_is_slow() -> None:
    wifi = Link(24e6, 5e-3, shared=True)
    fast = _by_name(simulate((2, 2), 400e6, 0.5, 1024, 50, Link(5e9, 1e-4), wifi))
    assert fast["islands"].step_seconds < fast["diloco-wifi"].step_seconds
    slow = _by_name(simulate((2, 2), 400e6, 0.5, 1024, 50, Link(0.1e9, 1e-4), wifi))
    assert slow["islands"].step_seconds > slow["diloco-wifi"].step_seconds


def test_a_room_without_cables_is_diloco_for_all() -> None:
    cable, wifi = Link(1e9, 1e-4), Link(24e6, 5e-3, shared=True)
    r = _by_name(simulate((1, 1, 1), 40e6, 0.5, 1024, 20, cable, wifi))
    assert r["islands"].step_seconds == pytest.approx(r["diloco-wifi"].step_seconds)
    assert r["islands"].cable_bytes_per_step == 0.0


def test_int8_exchange_and_bad_input() -> None:
    cable, wifi = Link(1e9, 0.0), Link(24e6, 0.0, shared=True)
    r = _by_name(simulate((2, 1), 40e6, 0.5, 1024, 10, cable, wifi, exchange_bytes=10e6))
    assert r["islands"].wifi_bytes_per_step == pytest.approx(2 * 10e6 / 10)
    with pytest.raises(ValueError):
        simulate((), 1.0, 0.5, 1, 1, cable, wifi)
    with pytest.raises(ValueError):
        simulate((2,), 1.0, 0.5, 1, 0, cable, wifi)


def test_parse_room() -> None:
    assert parse_room("2,1,1") == (2, 1, 1)
    for bad in ("", "2,x", "2,0"):
        with pytest.raises(ValueError):
            parse_room(bad)


def test_points_from_a_benchmark_json(tmp_path: Path) -> None:
    f = tmp_path / "b.json"
    f.write_text(json.dumps({"world_size": 2, "results": [{"bytes": 1024, "time_s": {"median": 0.5}}]}))
    assert points_from_json(f) == (2, [(1024, 0.5)])


def test_main_prints_a_row_per_strategy_and_writes_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "sim.json"
    assert main(["--params", "1e6", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "ddp-wifi" in text and "diloco-wifi" in text and "islands" in text
    assert len(json.loads(out.read_text())["results"]) == 3
    assert main(["--room", "2,0"]) == 2
    assert "error: --room" in capsys.readouterr().err
