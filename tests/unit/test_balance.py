"""Balanced DDP's batch shares (distributed/balance.py) and the sampler slices they cut (distributed/shards.py)."""

from __future__ import annotations

import itertools
import random
from pathlib import Path

import numpy as np
import pytest

from distributed.balance import BalancePlan, compute_shares, pool_by_host
from distributed.config import config_from_dict
from distributed.data import BatchSampler
from distributed.errors import ConfigError
from distributed.shards import ShardedStream


def test_shares_follow_speed_and_sum_to_the_global_batch() -> None:
    assert compute_shares([1.0, 3.0], 8) == (2, 6)
    assert compute_shares([10.0, 20.0, 30.0], 12) == (2, 4, 6)
    # An M1 Air beside an M3 Max at about a third of its speed, batch 16 each.
    assert compute_shares([41.0, 120.0], 32) == (8, 24)


def test_largest_remainder_rounding_and_ties_to_the_lower_rank() -> None:
    # Quotas 6 * (1, 1, 2)/4 = 1.5, 1.5, 3: floors 1, 1, 3 and one item left, to the largest remainder
    # (0.5, a tie between ranks 0 and 1: rank 0).
    assert compute_shares([1.0, 1.0, 2.0], 6) == (2, 1, 3)
    # 7 items: 1.75, 1.75, 3.5 -> floors 1, 1, 3 and two left, for the remainders .75 and .75.
    assert compute_shares([1.0, 1.0, 2.0], 7) == (2, 2, 3)
    # 10 * (1, 2, 4)/7 = 1.43, 2.86, 5.71: floors 1, 2, 5, remainders .43, .86, .71 -> rank 1 gets the item.
    assert compute_shares([1.0, 2.0, 4.0], 10) == (1, 3, 6)


def test_every_rank_keeps_at_least_one_item() -> None:
    assert compute_shares([1.0, 1000.0], 4) == (1, 3)
    assert compute_shares([1.0, 1.0, 1000.0], 3) == (1, 1, 1)
    # The minimum taken from the rank furthest above its quota.
    assert compute_shares([1e-3, 1e-3, 5.0, 5.0], 8) == (1, 1, 3, 3)


def test_within_ten_percent_keeps_equal_shares() -> None:
    assert compute_shares([100.0, 109.0, 105.0], 12) == (4, 4, 4)
    assert compute_shares([100.0, 112.0], 32) == (15, 17)
    assert compute_shares([100.0, 112.0], 8) == (4, 4)  # 3.77 and 4.23: too little to move a whole sample
    assert compute_shares([100.0, 150.0], 8, tolerance=0.6) == (4, 4)
    # A speed that cannot be right (not measured, zero, NaN) keeps equal shares rather than guessing.
    assert compute_shares([0.0, 50.0], 8) == (4, 4)
    assert compute_shares([float("nan"), 50.0], 8) == (4, 4)


@pytest.mark.parametrize("seed", range(20))
def test_random_speeds_sum_exactly_and_stay_near_proportional(seed: int) -> None:
    rng = random.Random(seed)
    n = rng.randint(2, 6)
    speeds = [rng.uniform(0.05, 10.0) for _ in range(n)]
    batch = n * rng.randint(1, 40)
    shares = compute_shares(speeds, batch)
    assert sum(shares) == batch and min(shares) >= 1
    assert shares == compute_shares(list(speeds), batch)  # deterministic: a pure function of the numbers
    if max(speeds) > min(speeds) * 1.1:
        quotas = [batch * s / sum(speeds) for s in speeds]
        assert all(abs(b - q) < 1 or b == 1 for b, q in zip(shares, quotas, strict=True))


def test_impossible_requests_are_refused() -> None:
    with pytest.raises(ValueError, match="at least one"):
        compute_shares([1.0, 2.0, 3.0], 2)
    with pytest.raises(ValueError, match="divide"):
        compute_shares([1.0, 1.0, 1.0], 7)


def test_ranks_on_one_host_share_its_mean_speed() -> None:
    assert pool_by_host([10.0, 30.0, 50.0], ["a", "a", "b"]) == [20.0, 20.0, 50.0]
    assert pool_by_host([10.0, 30.0], [1, 2]) == [10.0, 30.0]


def test_the_line_rank_0_prints() -> None:
    assert BalancePlan((2, 6), (40.5, 121.0), hosts=2).describe() == \
        "balance: batch shares 2 + 6 = 8 by measured speed (40.5, 121 samples/s)"
    assert BalancePlan((4, 4), (100.0, 104.0), hosts=2).describe() == \
        "balance: equal shares of 4 per rank, measured speeds within 10% (100, 104 samples/s)"
    assert BalancePlan((4, 4), (100.0, 112.0), hosts=2).describe() == \
        "balance: equal shares of 4 per rank, measured speeds too close to move a whole sample (100, 112 samples/s)"
    assert BalancePlan((4, 4), (80.0, 80.0), hosts=1).describe() == \
        "balance: equal shares of 4 per rank, every rank is on one host (80, 80 samples/s)"
    assert BalancePlan((4, 4), (1.0, 1.0), hosts=1).equal and not BalancePlan((3, 5), (1.0, 2.0), hosts=2).equal


def test_balance_config_key() -> None:
    assert config_from_dict({}).strategy.balance == "auto"
    assert config_from_dict({"strategy": {"balance": "off"}}).strategy.balance == "off"
    with pytest.raises(ConfigError, match="strategy.balance"):
        config_from_dict({"strategy": {"balance": "yes"}})


# ---------------------------------------------------------------------------------------------
# The slices


def test_shares_cut_the_same_step_elsewhere() -> None:
    shares = (1, 2, 6)
    equal = [ShardedStream(50, 3, r, 3, seed=4) for r in range(3)]
    balanced = [ShardedStream(50, 3, r, 3, seed=4, shares=shares) for r in range(3)]
    for step in range(40):  # several epochs, steps that straddle two
        union = np.concatenate([s.item_ids(step) for s in balanced])
        np.testing.assert_array_equal(union, np.concatenate([s.item_ids(step) for s in equal]))
        np.testing.assert_array_equal(union, balanced[1].step_ids(step))
        assert [len(s.item_ids(step)) for s in balanced] == list(shares)
        assert balanced[2].position(step) == equal[0].position(step) == step * 9


def test_bad_shares_are_refused() -> None:
    for shares in [(1, 2), (0, 4), (2, 3), (1, 2, 1)]:
        with pytest.raises(ValueError, match="shares"):
            ShardedStream(50, 2, 0, 2, seed=0, shares=shares)


def test_resume_with_other_shares_and_another_world_continues_the_stream(tmp_path: Path) -> None:
    # Shares are measured afresh at every start, and a restart may drop a host: the position (global
    # windows consumed) alone carries the stream across.
    seq_len, n_windows = 7, 90
    path = tmp_path / "t.bin"
    path.write_bytes(bytes(i % 251 for i in range(n_windows * (seq_len + 1))))
    plan = [(3, 2, (1, 2, 3)), (2, 2, (3, 1)), (2, 2, None), (1, 4, None)]  # (world, batch, shares)
    seen: list[np.ndarray] = []
    step = position = 0
    for world, batch, shares in plan:
        samplers = [BatchSampler(path, seq_len, batch, r, world, seed=2, start_step=step, start_position=position,
                                 shares=shares) for r in range(world)]
        for s in range(step, step + 3):
            x = [sampler.batch(s)[0] for sampler in samplers]
            assert [len(a) for a in x] == list(shares or (batch,) * world)
            seen += [sampler.window_ids(s) for sampler in samplers]
        step, position = step + 3, samplers[0].position(step + 3)
    ids = np.concatenate(seen)
    assert position == len(ids) == 3 * (6 + 4 + 4 + 4)
    one = BatchSampler(path, seq_len, position, 0, 1, seed=2)
    np.testing.assert_array_equal(ids, one.window_ids(0))  # the stream itself, in order


def test_shares_of_every_size_cover_an_epoch_once() -> None:
    for shares in itertools.permutations((1, 2, 3)):
        streams = [ShardedStream(36, 2, r, 3, seed=1, shares=shares) for r in range(3)]
        ids = np.concatenate([s.item_ids(step) for step in range(streams[0].steps_per_epoch) for s in streams])
        assert sorted(ids.tolist()) == list(range(36))
