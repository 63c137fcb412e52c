"""benchmarks/projection.py and benchmarks/wifi_time_to_loss.py's arithmetic: the projection follows the cost
model's rules, and the time to a target is interpolated between evaluations."""

from __future__ import annotations

import pytest

from benchmarks.projection import LINKS, MODELS, main, project
from benchmarks.wifi_time_to_loss import time_to
from distributed.costmodel import DDP_MAX_SHARE, EXPOSED_MAX_SHARE, INNER_STEPS_CHOICES


def test_every_row_follows_the_rules() -> None:
    for model in MODELS:
        for link in LINKS:
            for macs in (2, 3, 4):
                r = project(model, link, macs)
                assert r.ddp_step_s == pytest.approx(r.compute_s + r.allreduce_s)
                assert r.auto == ("DDP" if r.allreduce_s <= DDP_MAX_SHARE * r.compute_s else "DiLoCo")
                assert r.exposed <= EXPOSED_MAX_SHARE + 1e-9 or r.h == max(INNER_STEPS_CHOICES)
                assert r.exposed_overlap <= r.exposed and r.h_overlap <= r.h
                assert r.ddp_step_s / r.diloco_step_s >= 1.0


def test_shared_wifi_splits_the_air_and_more_macs_cost_more() -> None:
    wifi = next(link for link in LINKS if link.shared)
    assert wifi.per_link(4) == pytest.approx(wifi.bandwidth_bytes_s / 8)  # 4 links, each frame twice on air
    gpt2 = MODELS[0]
    assert project(gpt2, wifi, 4).allreduce_s > project(gpt2, wifi, 2).allreduce_s


def test_the_table_prints(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--macs", "2", "--markdown"]) == 0
    out = capsys.readouterr().out
    assert out.count("\n| ") == 1 + len(MODELS) * len(LINKS)  # header + rows (the separator starts "|-")


def test_time_to_target_is_interpolated_between_evaluations() -> None:
    evals = [(4, 1.0, 3.0, 0.8), (8, 2.0, 2.5, 1.6), (12, 3.0, 2.4, 2.4)]  # step, loop s, val, training s
    assert time_to(evals, 2.75) == pytest.approx(1.2)  # half-way from 0.8 to 1.6 s of training
    assert time_to(evals, 2.75, at=1) == pytest.approx(1.5)
    assert time_to(evals, 2.75, at=0) == pytest.approx(6.0)
    assert time_to(evals, 3.5) == 0.8  # already there at the first evaluation
    assert time_to(evals, 2.0) is None
