"""benchmarks/diloco_sim.py against real ranks: the same DDP and DiLoCo configurations, trained by real
`mx.distributed` ranks (2-process ring on loopback, the real training loop and strategies) and simulated in one
process, end at the same weights and validation loss up to float rounding.

This is what lets the fair protocol of benchmarks/diloco_vs_ddp.py simulate its grid."""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from benchmarks.diloco_sim import SimSpec, simulate
from distributed.checkpoint import latest_checkpoint
from distributed.config import config_from_dict
from distributed.data import prepare_data, val_batches
from distributed.models.gpt import build_model, loss_fn
from tests.integration.test_ddp import finish, start_ranks

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]
H, ROUNDS = 3, 3
STEPS = H * ROUNDS
TINY = {
    "model": {"size": "tiny", "activation": "relu2"},
    "data": {"max_bytes": 120_000, "seq_len": 32, "val_share": 0.1},
    # Clipping at 2.0: the gradient norm starts near 1.8 and passes 2 on some steps, so both paths are compared.
    "train": {"steps": STEPS, "batch_size": 2, "lr": 1e-2, "min_lr": 1e-3, "warmup_steps": 2, "grad_clip": 2.0,
              "eval_interval": 0, "eval_batches": 1, "checkpoint_interval": 0, "log_interval": STEPS},
    "strategy": {"inner_steps": H, "outer_lr": 0.7, "outer_momentum": 0.9},
}

# One rank. argv: out_dir data_dir config_json mode
RANK = r"""
import json, sys
from pathlib import Path
import mlx.core as mx
from distributed.config import config_from_dict
from distributed.diloco import DiLoCoStrategy
from distributed.strategy import DDPStrategy
from distributed.train import train

out, data, cfg, mode = Path(sys.argv[1]), Path(sys.argv[2]), config_from_dict(json.loads(sys.argv[3])), sys.argv[4]
group = mx.distributed.init(backend="ring", strict=True)
strategy = DDPStrategy(group) if mode == "ddp" else DiLoCoStrategy.from_config(group, cfg.strategy)
train(cfg, data_dir=data, run_dir=out / "run", rank=group.rank(), world_size=group.size(), strategy=strategy,
      log=lambda m: print(m, flush=True))
"""


def score(model_cfg: object, params: dict[str, mx.array], data: Path) -> float:
    model = build_model(model_cfg, 32, 0)  # type: ignore[arg-type]
    model.update(params)  # type: ignore[arg-type]
    windows = val_batches(data / "val.bin", 32, 2, 4)
    return float(mx.mean(mx.stack([loss_fn(model, mx.array(x), mx.array(y)) for x, y in windows])).item())


def test_simulated_ranks_match_real_ranks(tmp_path: Path) -> None:
    cfg = config_from_dict(TINY)
    data = prepare_data(cfg.data, tmp_path / "data").dir
    specs = {"ddp": SimSpec("ddp", 2, 1e-2, 0),
             "diloco": SimSpec("diloco", 2, 1e-2, 0, h=H, outer_lr=0.7, outer_momentum=0.9)}
    procs = {mode: start_ranks(RANK, [str(data), json.dumps({**TINY, "strategy": {**TINY["strategy"], "mode": mode}}),
                                      mode], tmp_path / mode, 2) for mode in specs}
    for mode, ranks in procs.items():
        for code, output in finish(ranks, deadline_s=200):
            assert code == 0, f"{mode}: {output}"
    for mode, spec in specs.items():
        ckpt, _ = latest_checkpoint(tmp_path / mode / "run" / "checkpoints")
        assert ckpt is not None and ckpt.step == STEPS
        real = ckpt.tree("model")
        sim = simulate(cfg, data, spec, steps=STEPS, eval_every=STEPS, eval_batches=1, score_batches=4,
                       min_lr_ratio=0.1)
        assert sim.rounds == (ROUNDS if mode == "diloco" else 0)
        assert 0.0 < sim.clip_fraction < 1.0, sim.clip_fraction  # both sides of the clip were taken
        real_loss = score(cfg.model, real, data)
        assert abs(sim.val_loss - real_loss) <= 1e-4 * real_loss, (mode, sim.val_loss, real_loss)
        init = dict(tree_flatten(build_model(cfg.model, 32, 0).parameters()))
        moved = max(float(np.abs(np.array(v) - np.array(init[k])).max()) for k, v in tree_flatten(real))
        assert moved > 1e-3  # the runs trained
