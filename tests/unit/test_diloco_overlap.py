"""The overlapped DiLoCo rule on one rank (no group: the exchange returns this rank's own pseudo-gradient),
driven step by step with known "inner steps" and checked against NumPy; and its checkpoint round trip.

The real 2-rank ring, the NaN rank and the launcher's resume are in tests/integration/test_diloco_overlap.py.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

from distributed.diloco_overlap import OverlapDiLoCoStrategy

H, LR, MU = 2, 0.7, 0.9


def nudge(step: int) -> tuple[np.ndarray, np.ndarray]:
    """A deterministic stand-in for one AdamW step's change (weight, bias): a different one per step."""
    w = -0.01 * step * np.cos(np.arange(15, dtype=np.float32) + step).reshape(3, 5)
    return w.astype(np.float32), np.full(3, 0.003 * step, np.float32)


def inner_step(model: nn.Linear, step: int) -> None:
    w, b = nudge(step)
    model.update({"weight": model.weight + mx.array(w), "bias": model.bias + mx.array(b)})


def flat(model: nn.Linear) -> np.ndarray:
    """In the strategy's flat order (tree_flatten's)."""
    return np.concatenate([np.array(v).ravel() for _, v in tree_flatten(model.trainable_parameters())])


def make(model: nn.Linear) -> OverlapDiLoCoStrategy:
    s = OverlapDiLoCoStrategy(None, inner_steps=H, outer_lr=LR, outer_momentum=MU)
    s.setup(model, rank=0, world_size=1)
    return s


def outer(theta: np.ndarray, v: np.ndarray, mean: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    v = MU * v + mean
    return theta - LR * (mean + MU * v), v


def test_one_rank_follows_the_delayed_rule() -> None:
    mx.random.seed(0)
    model = nn.Linear(5, 3)
    s = make(model)
    x = flat(model).astype(np.float64)
    theta, v, anchor, pending = x.copy(), np.zeros_like(x), x.copy(), None
    applied = []
    for step in range(1, 4 * H + 1):
        inner_step(model, step)
        last = step == 4 * H
        s.after_step(model, None, step, last=last)
        w, b = nudge(step)
        x = x + np.concatenate([w.ravel(), b])  # the reference's own local weights
        if step % H:
            continue
        applied.append(s.rounds)
        d = anchor - x
        if pending is not None:
            theta, v = outer(theta, v, pending)
        x = theta - d  # rebased onto the new theta
        anchor, pending = x.copy(), d
        if last:
            theta, v = outer(theta, v, pending)
            x = theta
        np.testing.assert_allclose(flat(model), x, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(np.array(s.params), theta, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(np.array(s.momentum), v, rtol=1e-5, atol=1e-6)
    assert applied == [0, 1, 2, 4]  # nothing at the first boundary; the last one applies two
    assert s.exchange_seconds >= s.exposed_seconds == s.comm_seconds >= 0


def test_a_checkpoint_at_a_boundary_resumes_the_round_in_flight() -> None:
    mx.random.seed(1)
    whole = nn.Linear(5, 3)
    mx.random.seed(1)
    parts = nn.Linear(5, 3)
    a, b = make(whole), make(parts)
    for step in range(1, 2 * H + 1):
        inner_step(whole, step)
        a.after_step(whole, None, step)
        inner_step(parts, step)
        b.after_step(parts, None, step, last=step == 2 * H)  # the stopped run drains at its last step
    groups = b.state_groups()
    assert int(groups["diloco"]["round"].item()) == 1 and int(groups["diloco"]["diloco_inflight"].item()) == 1
    resumed = OverlapDiLoCoStrategy(None, inner_steps=H, outer_lr=LR, outer_momentum=MU)
    resumed.restore(groups)
    resumed.setup(parts, rank=0, world_size=1)
    np.testing.assert_array_equal(flat(parts), flat(whole))  # back at the in-flight round's local weights
    for step in range(2 * H + 1, 4 * H + 1):
        inner_step(whole, step)
        a.after_step(whole, None, step, last=step == 4 * H)
        inner_step(parts, step)
        resumed.after_step(parts, None, step, last=step == 4 * H)
    np.testing.assert_array_equal(np.array(resumed.params), np.array(a.params))
    np.testing.assert_array_equal(flat(parts), flat(whole))
    assert resumed.rounds == a.rounds == 4
