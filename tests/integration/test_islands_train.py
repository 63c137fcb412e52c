"""Thunderbolt islands training (distributed/islands.py) with 4 real ranks on loopback: islands {0 1}, {2}, {3}.

Each rank runs the real worker's strategy choice and training loop over three real MLX rings (its island's,
the leaders' on ranks 0, 2 and 3, and the world's), with plain averaging as the outer step so each round's
result has a closed form. Checked round by round from every rank's weights just before the exchange:
- inside island {0 1} the two ranks hold the same weights (their gradients were averaged every step);
- the islands differ from each other (they trained apart);
- the new theta, the same on all four ranks, is the mean over *ranks* of their weights: island {0 1} counts
  twice. An unweighted mean over the three islands would be off by far more than the tolerance.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from distributed.config import config_from_dict
from distributed.data import prepare_data
from tests.integration.test_ddp import OPENBLAS, ROOT, finish, free_ports
from tests.integration.test_diloco import ROUNDS, H
from tests.integration.test_diloco import TINY as DILOCO_TINY

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]
# test_diloco.py's tiny run (H=3, 3 rounds), with plain averaging so each round's theta has a closed form.
TINY = {**DILOCO_TINY, "strategy": {"mode": "islands", "inner_steps": H, "outer_lr": 1.0, "outer_momentum": 0.0}}
ISLAND_OF = (0, 0, 1, 2)  # rank -> island

# One rank. argv: out_dir data_dir config_json. The island variables come from the test (as the launcher sets).
RANK = r"""
import json, os, sys
from pathlib import Path
from distributed.config import config_from_dict
from distributed.env import RankEnv
from distributed.islands import IslandStrategy
from distributed.train import train
from tests.integration.rounds_spy import record_rounds, save_rounds
from distributed.worker import choose_strategy

out, data, cfg = Path(sys.argv[1]), Path(sys.argv[2]), config_from_dict(json.loads(sys.argv[3]))
env = RankEnv.from_environ()
strategy, reason = choose_strategy(cfg, env)
assert isinstance(strategy, IslandStrategy), type(strategy)
record_rounds(strategy)
result = train(cfg, data_dir=data, run_dir=out / "run", rank=env.rank, world_size=env.world_size,
               strategy=strategy, log=lambda m: print(m, flush=True))
save_rounds(out / f"rank{env.rank}.npz")
(out / f"report{env.rank}.json").write_text(json.dumps(
    {"reason": reason, "bytes": strategy.bytes_sent, "val": result.val_loss, "rounds": strategy.rounds}))
"""


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("data")
    prepare_data(config_from_dict(TINY).data, out)
    return out


def hostfile(path: Path, count: int) -> str:
    path.write_text(json.dumps([[f"127.0.0.1:{p}"] for p in free_ports(count)]))
    return str(path)


def test_islands_average_inside_and_weight_islands_by_their_ranks(tmp_path: Path, data_dir: Path) -> None:
    island0, leaders = hostfile(tmp_path / "island0.json", 2), hostfile(tmp_path / "leaders.json", 3)
    contract = {"WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "4", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1",
                "MACRUN_RUN_ID": "islands-test", "MACRUN_SECRET": "unused", "MACRUN_LINK": "network",
                "MACRUN_ISLANDS": "3"}
    (tmp_path / "rank.py").write_text(RANK)
    world = hostfile(tmp_path / "world.json", 4)
    procs = []
    for rank in range(4):
        island = ISLAND_OF[rank]
        island_rank = 1 if rank == 1 else 0
        env = {**contract, "RANK": str(rank), "LOCAL_RANK": str(rank), "MACRUN_ISLAND_RANK": str(island_rank),
               "MACRUN_ISLAND_SIZE": "2" if island == 0 else "1"}
        if island == 0:
            env["MACRUN_ISLAND_HOSTFILE"] = island0
        if island_rank == 0:
            env.update(MACRUN_LEADER_RANK=str(island), MACRUN_LEADERS_HOSTFILE=leaders)
        procs.append(_start(tmp_path, data_dir, rank, world, env))
    results = finish(procs, deadline_s=200)
    for code, output in results:
        assert code == 0, output

    reports = [json.loads((tmp_path / f"report{r}.json").read_text()) for r in range(4)]
    assert all(r["rounds"] == ROUNDS for r in reports)
    runs = [np.load(tmp_path / f"rank{r}.npz") for r in range(4)]
    for t in range(ROUNDS):
        local = np.stack([run["local"][t] for run in runs])
        theta = np.stack([run["theta"][t] for run in runs])
        np.testing.assert_array_equal(local[0], local[1], err_msg=f"round {t + 1}: island {{0 1}} split")
        assert np.abs(local[0] - local[2]).max() > 1e-4 and np.abs(local[2] - local[3]).max() > 1e-4
        for r in range(1, 4):
            np.testing.assert_array_equal(theta[r], theta[0], err_msg=f"round {t + 1}: theta differs on rank {r}")
        by_ranks = local.mean(axis=0)
        by_islands = local[[0, 2, 3]].mean(axis=0)
        err = np.abs(theta[0] - by_ranks).max()
        assert err < 1e-5, f"round {t + 1}: theta is not the ranks' mean (off by {err})"
        assert np.abs(by_islands - by_ranks).max() > 100 * max(err, 1e-7)
    assert all(np.isfinite(r["val"]) for r in reports)
    # The exchange travels between leaders only: rank 1 sends its island's gradients and no pseudo-gradients.
    assert reports[1]["bytes"] < reports[0]["bytes"]


def _start(out: Path, data_dir: Path, rank: int, world: str, extra: dict[str, str]) -> subprocess.Popen[str]:
    env = {**{k: v for k, v in os.environ.items() if not k.startswith(("MLX_", "MACRUN_"))},
           "PYTHONPATH": str(ROOT), "MLX_RANK": str(rank), "MLX_HOSTFILE": world, **extra}
    if os.path.exists(OPENBLAS):
        env["LD_PRELOAD"] = OPENBLAS
    return subprocess.Popen([sys.executable, str(out / "rank.py"), str(out), str(data_dir), json.dumps(TINY)],
                            env=env, cwd=out, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
