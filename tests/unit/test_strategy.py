"""The strategy interface on one rank: no-op hooks, the replica fingerprint, DDP's single-rank shortcut."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from distributed.strategy import DDPStrategy, LocalStrategy, broadcast_parameters, replica_fingerprint


def test_fingerprint_is_per_tensor_sum_and_abs_sum() -> None:
    fp = np.array(replica_fingerprint([mx.array([1.0, -2.0]), mx.array([[3.0], [-4.0]])]))
    assert fp.tolist() == [-1.0, 3.0, -1.0, 7.0]
    # One changed element shows up in its own tensor's entries, not drowned in a global sum.
    other = np.array(replica_fingerprint([mx.array([1.0, -2.0]), mx.array([[3.0], [-4.5]])]))
    assert other[:2].tolist() == fp[:2].tolist() and other[2] != fp[2]


def test_local_strategy_exchanges_nothing() -> None:
    s = LocalStrategy()
    model = nn.Linear(2, 2)
    s.setup(model, rank=0, world_size=1)
    grads = {"weight": mx.ones((2, 2))}
    assert s.reduce_gradients(grads) is grads
    s.after_step(model, None, 1, last=True)
    s.check_replicas(model, 1)  # nothing to compare with: no collective, no error
    assert s.bytes_sent == 0 and s.comm_seconds == 0.0 and s.state_groups() == {}


def test_ddp_on_a_group_of_one_is_a_no_op() -> None:
    group = mx.distributed.init()  # no hostfile: a group of one
    assert group.size() == 1
    s = DDPStrategy(group)
    model = nn.Linear(3, 2)
    before = np.array(model.weight)
    s.setup(model, rank=0, world_size=1)
    grads = {"weight": mx.ones((2, 3)), "bias": mx.zeros((2,))}
    assert s.reduce_gradients(grads) is grads
    s.after_step(model, None, 1)
    assert s.bytes_sent == 0 and np.array_equal(np.array(model.weight), before)
    assert broadcast_parameters(model, None) == 0


def test_one_rank_honours_an_explicit_diloco_mode() -> None:
    from distributed.config import config_from_dict
    from distributed.diloco import DiLoCoStrategy
    from distributed.strategy import LocalStrategy
    from distributed.worker import choose_strategy

    strategy, reason = choose_strategy(config_from_dict({"strategy": {"mode": "diloco"}}), None)
    assert isinstance(strategy, DiLoCoStrategy) and "one rank" in reason
    strategy, reason = choose_strategy(config_from_dict({"strategy": {"mode": "auto"}}), None)
    assert type(strategy) is LocalStrategy and reason == "one rank: nothing to exchange"
