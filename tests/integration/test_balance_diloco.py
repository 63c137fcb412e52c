"""Balanced DiLoCo over a real 2-rank `mx.distributed` ring on loopback: a fast rank takes a larger batch share,
and its pseudo-gradient counts by its tokens.

Rank 0 claims three times rank 1's speed, so of each step's 4 windows it takes 3 and rank 1 one (the shares
`distributed.balance.agree_shares` agrees); both take the same H inner steps, so a round costs the slow Mac
what it costs the fast one. With plain averaging as the outer step, each round's new theta (the same on both
ranks) must be the token-weighted mean (3·w0 + w1)/4 of the ranks' weights before the exchange, not their
plain mean; and the ranks really trained on batches of 3 and 1 windows.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from distributed.config import config_from_dict
from distributed.data import prepare_data
from tests.integration.test_ddp import finish, start_ranks
from tests.integration.test_diloco import ROUNDS, H
from tests.integration.test_diloco import TINY as DILOCO_TINY

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]
# test_diloco.py's tiny run (H=3, 3 rounds) with plain averaging, without evaluations.
TINY = {**DILOCO_TINY, "train": {**DILOCO_TINY["train"], "eval_interval": 0},
        "strategy": {"mode": "diloco", "inner_steps": H, "outer_lr": 1.0, "outer_momentum": 0.0}}

# One rank. argv: out_dir data_dir config_json
RANK = r"""
import json, sys
from pathlib import Path
import mlx.core as mx
import distributed.balance as balance
from distributed.config import config_from_dict
from distributed.diloco import DiLoCoStrategy
from distributed.train import train
from tests.integration.rounds_spy import record_rounds, save_rounds

out, data, cfg = Path(sys.argv[1]), Path(sys.argv[2]), config_from_dict(json.loads(sys.argv[3]))
group = mx.distributed.init(backend="ring", strict=True)
rank, world = group.rank(), group.size()
plan = balance.agree_shares([30.0, 10.0][rank], cfg.train.batch_size * world, group)
strategy = DiLoCoStrategy.from_config(group, cfg.strategy, steps=cfg.train.steps)
strategy.shares = plan.shares
batches = []
record_rounds(strategy)
import distributed.train as loop
make_task = loop.make_task

def spying_task(*args, **kwargs):
    task = make_task(*args, **kwargs)
    batch = task.batch
    task.batch = lambda step: batches.append(int(batch(step)[0].shape[0])) or batch(step)
    return task

loop.make_task = spying_task
train(cfg, data_dir=data, run_dir=out / "run", rank=rank, world_size=world, strategy=strategy,
      log=lambda m: print(m, flush=True))
save_rounds(out / f"rank{rank}.npz")
(out / f"report{rank}.json").write_text(json.dumps({"shares": list(plan.shares), "batches": batches}))
"""


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("data")
    prepare_data(config_from_dict(TINY).data, out)
    return out


def test_a_fast_rank_takes_more_of_each_batch_and_counts_by_its_tokens(tmp_path: Path, data_dir: Path) -> None:
    for code, output in finish(start_ranks(RANK, [str(data_dir), json.dumps(TINY)], tmp_path, 2)):
        assert code == 0, output
    reports = [json.loads((tmp_path / f"report{r}.json").read_text()) for r in (0, 1)]
    assert [r["shares"] for r in reports] == [[3, 1], [3, 1]]
    assert set(reports[0]["batches"]) == {3} and set(reports[1]["batches"]) == {1}
    runs = [np.load(tmp_path / f"rank{r}.npz") for r in (0, 1)]
    for t in range(ROUNDS):
        w0, w1 = runs[0]["local"][t], runs[1]["local"][t]
        np.testing.assert_array_equal(runs[0]["theta"][t], runs[1]["theta"][t])
        weighted, plain = (3 * w0 + w1) / 4, (w0 + w1) / 2
        err = np.abs(runs[0]["theta"][t] - weighted).max()
        assert err < 1e-5, f"round {t + 1}: theta is not the token-weighted mean (off by {err})"
        assert np.abs(plain - weighted).max() > 100 * max(err, 1e-7)
