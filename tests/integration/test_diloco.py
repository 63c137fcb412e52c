"""DiLoCo over a real 2-process `mx.distributed` ring on loopback, checked round by round against NumPy.

Each rank runs the real training loop with a `DiLoCoStrategy` that, for the test only, all_gathers every
rank's local weights before each round's exchange, so that it can recompute the outer step in NumPy
(paper's Algorithm 1: mean of the finite pseudo-gradients, then Nesterov SGD) and compare it with what
the strategy did, within the error bound of the wire format. A fault injector makes rank 1 blow up
mid-round (NaN weights, so NaN losses and NaN AdamW moments); the round must go on without it.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import yaml

from distributed.checkpoint import latest_checkpoint
from distributed.compress import wire_bytes
from distributed.config import config_from_dict
from distributed.data import prepare_data
from tests.integration.test_ddp import finish, start_ranks

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]
H, ROUNDS = 3, 3
TINY = {
    "model": {"size": "tiny", "activation": "relu2"},
    "data": {"max_bytes": 120_000, "seq_len": 32, "val_share": 0.1},
    "train": {"steps": H * ROUNDS, "batch_size": 2, "lr": 3e-3, "min_lr": 3e-4, "warmup_steps": 2,
              "eval_interval": H, "eval_batches": 1, "checkpoint_interval": 0, "log_interval": H},
    "strategy": {"mode": "diloco", "inner_steps": H, "outer_lr": 0.7, "outer_momentum": 0.9},
}

# One rank. argv: out_dir data_dir config_json exchange_dtype nan_step (0 = no fault).
RANK = r"""
import hashlib, json, sys
from pathlib import Path
import mlx.core as mx
import numpy as np
from distributed.config import config_from_dict
from distributed.diloco import DiLoCoStrategy
from distributed.train import train

out, data, cfg = Path(sys.argv[1]), Path(sys.argv[2]), config_from_dict(json.loads(sys.argv[3]))
dtype, nan_step = sys.argv[4], int(sys.argv[5])
group = mx.distributed.init(backend="ring", strict=True)
rank, world = group.rank(), group.size()
s = cfg.strategy
rounds = []

# The exchange alone, on an odd size (3 int8 blocks, the last partial): all valid, then rank 1 out.
from distributed.compress import cast_round_trip, sum_valid
x = mx.sin(mx.arange(8195, dtype=mx.float32) * (rank + 1))
exact = sum(np.sin(np.arange(8195, dtype=np.float32) * (r + 1)) for r in range(world))
total, count = sum_valid(x, True, group, dtype)
probe = {"all_count": float(count), "all_err": float(np.abs(np.array(total) - exact).max())}
total, count = sum_valid(x * float("nan") if rank == 1 else x, rank == 0, group, dtype)
alone = np.array(cast_round_trip(mx.sin(mx.arange(8195, dtype=mx.float32)), dtype))
probe.update(one_count=float(count), one_err=float(np.abs(np.array(total) - alone).max()))

def bound(deltas, valid):
    # Error bound of the averaged pseudo-gradient for this wire format, per element.
    v = deltas[valid]
    if dtype == "float32":
        return 1e-6 * np.abs(v).sum(0) / len(v)
    if dtype in ("bfloat16", "float16"):
        ulp = 2.0 ** -8 if dtype == "bfloat16" else 2.0 ** -11
        return 2 * ulp * np.abs(v).sum(0) / len(v)  # each rank's cast, then the 16-bit sum
    n = v.shape[1]
    blocks = -(-n // 4096)
    padded = np.zeros((len(v), blocks * 4096), np.float32)
    padded[:, :n] = np.abs(v)
    scales = padded.reshape(len(v), blocks, 4096).max(2) / 127
    return np.repeat(scales, 4096, axis=1)[:, :n].sum(0) / 2 / len(v) * (1 + 1e-5)


class Checked(DiLoCoStrategy):
    def after_step(self, model, optimizer, step, *, last=False, stop=False):
        if rank == 1 and step == nan_step:
            model.update({"ln_f": {"weight": model.ln_f.weight * float("nan")}})
        return super().after_step(model, optimizer, step, last=last, stop=stop)

    def sync(self, model, optimizer, step):
        theta, v = np.array(self.params), np.array(self.momentum)
        local = self._flatten(model)
        everyone = np.array(mx.distributed.all_gather(local[None], group=group))  # instrumentation only
        super().sync(model, optimizer, step)
        deltas = theta[None] - everyone
        valid = np.isfinite(deltas).all(1)
        mean = deltas[valid].mean(0)
        v_ref = s.outer_momentum * v + mean
        theta_ref = theta - s.outer_lr * (mean + s.outer_momentum * v_ref)
        err_mean = bound(deltas, valid)
        tol_theta = s.outer_lr * (1 + s.outer_momentum) * err_mean + 1e-6 + 1e-6 * np.abs(theta_ref)
        tol_v = err_mean + 1e-7 + 1e-6 * np.abs(v_ref)
        got_theta, got_v = np.array(self.params), np.array(self.momentum)
        rounds.append({
            "step": step, "valid": int(valid.sum()), "valid_seen": self.valid_ranks,
            "theta_ratio": float((np.abs(got_theta - theta_ref) / tol_theta).max()),
            "v_ratio": float((np.abs(got_v - v_ref) / tol_v).max()),
            "local_is_theta": bool(np.array_equal(np.array(self._flatten(model)), got_theta)),
            "outer_moved": float(np.abs(got_theta - theta).max()),
        })

strategy = Checked.from_config(group, s, log=lambda m: print(m, flush=True))
strategy.exchange_dtype = dtype
result = train(cfg, data_dir=data, run_dir=out / "run", rank=rank, world_size=world, strategy=strategy,
               log=lambda m: print(m, flush=True))
final = np.array(strategy.params)
(out / f"report{rank}.json").write_text(json.dumps({
    "rounds": rounds, "probe": probe, "bytes_sent": strategy.bytes_sent, "comm_seconds": strategy.comm_seconds,
    "loss": result.loss, "params": int(final.size), "tensors": len(strategy._layout),
    "final_sum": float(final.sum()), "final_finite": bool(np.isfinite(final).all()),
    "final_hash": hashlib.sha256(final.tobytes()).hexdigest(),
}))
"""


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("data")
    prepare_data(config_from_dict(TINY).data, out)
    return out


def run(tmp_path: Path, data_dir: Path, dtype: str, nan_step: int) -> tuple[list[dict], list[str]]:
    results = finish(start_ranks(RANK, [str(data_dir), json.dumps(TINY), dtype, str(nan_step)], tmp_path, 2))
    for code, output in results:
        assert code == 0, output
    reports = [json.loads((tmp_path / f"report{r}.json").read_text()) for r in (0, 1)]
    return reports, [output for _, output in results]


@pytest.mark.parametrize(("dtype", "nan_step"), [("float32", 0), ("bfloat16", 0), ("float16", 4), ("int8", 4)])
def test_rounds_match_the_numpy_reference(tmp_path: Path, data_dir: Path, dtype: str, nan_step: int) -> None:
    reports, outputs = run(tmp_path, data_dir, dtype, nan_step)
    # sum_valid on its own: values in [-1, 1], so the error of a sum of two is within 2 steps of the format.
    step = {"float32": 1e-6, "bfloat16": 2**-8, "float16": 2**-11, "int8": 1 / 127}[dtype]
    for rep in reports:
        probe = rep["probe"]
        assert probe["all_count"] == 2 and probe["all_err"] <= 2 * step
        assert probe["one_count"] == 1 and probe["one_err"] <= 1e-6  # exactly rank 0's own contribution
    for rep in reports:
        assert [r["step"] for r in rep["rounds"]] == [H, 2 * H, 3 * H]
        for r in rep["rounds"]:
            assert r["theta_ratio"] <= 1.0 and r["v_ratio"] <= 1.0, (dtype, r)
            assert r["local_is_theta"] and r["outer_moved"] > 1e-4
            assert r["valid_seen"] == r["valid"]
        assert rep["final_finite"]
    # The outer state is bit-identical on both ranks (and train() checked it at every eval).
    assert reports[0]["final_hash"] == reports[1]["final_hash"]
    valid = [r["valid"] for r in reports[0]["rounds"]]
    if nan_step:
        # Rank 1 blew up at step 4 (round 2): it sat out round 2, said so, and trained normally in round 3.
        assert valid == [2, 1, 2]
        assert "rank 1: pseudo-gradient has NaN/Inf at round 2 (step 6); contributing nothing this round" \
            in outputs[1]
        assert "NaN/Inf" not in outputs[0]
        assert np.isfinite(reports[1]["loss"])  # its AdamW moments were reset along with its weights
    else:
        assert valid == [2, 2, 2]
    # Bytes: rank 0's initial broadcast of weights, the 1-float vote on a restored momentum (none: nothing more
    # is sent; at 2 ranks one float is padded to two), one exchange and one 4-byte stop vote per round, a
    # replica check per eval.
    rep = reports[0]
    checks = ROUNDS * (2 * rep["tensors"]) * 2 * 4
    votes = ROUNDS * 8  # one float summed by 2 ranks: padded to two floats, one of them sent
    assert rep["bytes_sent"] == (4 * rep["params"] + 8 + ROUNDS * wire_bytes(rep["params"], 2, dtype) + checks
                                 + votes)
    assert rep["comm_seconds"] > 0


def test_macrun_train_runs_diloco_end_to_end(tmp_path: Path, data_dir: Path) -> None:
    """DiLoCo through the launcher (auto mode's measured choice is shown in tests/lab/test_lab_train.py)."""
    from launcher.jobs.api import launch
    from launcher.jobs.training import plan_training

    config = tmp_path / "tiny.yaml"
    cfg = {**TINY, "run": {"name": "diloco", "output_dir": str(tmp_path / "runs")},
           "strategy": {"mode": "diloco", "inner_steps": H, "exchange_dtype": "int8"}}  # outer: by H, rounds
    config.write_text(yaml.safe_dump(cfg))
    lines: list[str] = []
    _cfg, spec = plan_training(config, [], nproc=2, emit=lines.append)
    result = launch(replace(spec, heartbeat_timeout=120), emit=lines.append)
    text = "\n".join(lines)
    assert result.exit_code == 0, text
    assert "strategy diloco: strategy.mode=diloco" in text
    assert (f"outer step: plain averaging (lr 1, momentum 0), chosen for H={H} and {ROUNDS} rounds "
            "(strategy.outer_lr 0)") in text  # H < 20
    ckpt, _ = latest_checkpoint(tmp_path / "runs" / "diloco" / "checkpoints")
    assert ckpt is not None and ckpt.step == H * ROUNDS
    assert int(ckpt.groups["diloco"]["round"].item()) == ROUNDS
    # The saved model is theta (the run ended on a round boundary).
    for key, value in ckpt.groups["model"].items():
        np.testing.assert_array_equal(np.array(value), np.array(ckpt.groups["diloco"][f"params.{key}"]))
