"""DiLoCo on one rank: the outer step against a NumPy reference, reduction to plain training, checkpoints, NaN."""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
import pytest
from mlx.utils import tree_flatten

from distributed.checkpoint import latest_checkpoint
from distributed.config import Config, StrategyConfig, config_from_dict
from distributed.data import prepare_data
from distributed.diloco import DiLoCoStrategy, outer_step
from distributed.errors import CheckpointError, TrainingError
from distributed.train import train

TINY = {
    "model": {"size": "tiny", "activation": "relu2"},
    "data": {"max_bytes": 120_000, "seq_len": 32, "val_share": 0.1},
    "train": {"steps": 8, "batch_size": 4, "lr": 3e-3, "min_lr": 3e-4, "warmup_steps": 2, "eval_interval": 4,
              "eval_batches": 2, "checkpoint_interval": 4, "keep_checkpoints": 5, "log_interval": 4},
}


def tiny_config(**overrides: object) -> Config:
    return config_from_dict(TINY, [f"{k}={v}" for k, v in overrides.items()])


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("data")
    prepare_data(tiny_config().data, out)
    return out


def quiet(_line: str) -> None:
    pass


def numpy_outer(theta: np.ndarray, v: np.ndarray, delta: np.ndarray, lr: float, mu: float,
                nesterov: bool) -> tuple[np.ndarray, np.ndarray]:
    """The reference: PyTorch SGD (dampening 0), as DiLoCo's outer optimizer (arXiv:2311.08105, torchft)."""
    v = mu * v + delta
    step = delta + mu * v if nesterov else v
    return theta - lr * step, v


def flat(model: nn.Module) -> np.ndarray:
    return np.concatenate([np.array(v).reshape(-1) for _, v in tree_flatten(model.parameters())])


@pytest.mark.parametrize("nesterov", [True, False])
def test_outer_steps_match_numpy(nesterov: bool) -> None:
    mx.random.seed(3)
    model = nn.Sequential(nn.Linear(5, 4), nn.Linear(4, 3))
    mx.eval(model.parameters())
    opt = optim.AdamW(learning_rate=1e-2)
    opt.init(model.trainable_parameters())
    s = DiLoCoStrategy(None, inner_steps=3, outer_lr=0.7, outer_momentum=0.9, nesterov=nesterov, log=quiet)
    s.setup(model, rank=0, world_size=1)
    theta, v = flat(model), np.zeros_like(flat(model))
    rng = np.random.default_rng(0)
    for round_no in (1, 2, 3):
        # Inner steps: any change of the local weights will do; only the last one is seen by the outer step.
        model.update(nn.utils.tree_map(lambda p: p + mx.array(rng.normal(size=p.shape).astype(np.float32)) * 0.1,
                                       model.parameters()))
        local = flat(model)
        for step in range(3 * round_no - 2, 3 * round_no):
            s.after_step(model, opt, step)
            assert s.rounds == round_no - 1  # no exchange between rounds
        s.after_step(model, opt, 3 * round_no)
        theta, v = numpy_outer(theta, v, theta - local, 0.7, 0.9, nesterov)
        assert s.rounds == round_no and s.valid_ranks == 1
        np.testing.assert_allclose(flat(model), theta, rtol=1e-5, atol=1e-6)  # local := theta
        np.testing.assert_allclose(np.array(s.momentum), v, rtol=1e-5, atol=1e-6)
    assert s.bytes_sent == 0 and s.comm_seconds >= 0


def test_outer_step_function_with_lr_1_and_no_momentum_is_the_local_mean() -> None:
    theta, local = mx.array([1.0, 2.0, 3.0]), mx.array([0.5, 2.5, -1.0])
    new, v = outer_step(theta, mx.zeros(3), theta - local, lr=1.0, mu=0.0, nesterov=True)
    np.testing.assert_allclose(np.array(new), np.array(local), atol=1e-7)
    np.testing.assert_allclose(np.array(v), np.array(theta - local), atol=1e-7)


def test_the_last_step_ends_a_round_early() -> None:
    model = nn.Linear(2, 2)
    s = DiLoCoStrategy(None, inner_steps=10, log=quiet)
    s.setup(model, rank=0, world_size=1)
    s.after_step(model, None, 3)
    assert s.rounds == 0
    s.after_step(model, None, 4, last=True)
    assert s.rounds == 1


def _weights(run_dir: Path) -> dict[str, np.ndarray]:
    ckpt, warnings = latest_checkpoint(run_dir / "checkpoints")
    assert ckpt is not None and not warnings
    return {k: np.array(v) for k, v in ckpt.groups["model"].items()}


def test_one_rank_with_lr_1_and_no_momentum_is_plain_training(tmp_path: Path, data_dir: Path) -> None:
    cfg = tiny_config()
    train(cfg, data_dir=data_dir, run_dir=tmp_path / "plain", log=quiet)
    diloco = DiLoCoStrategy(None, inner_steps=3, outer_lr=1.0, outer_momentum=0.0, log=quiet)  # 8 = 3+3+2
    result = train(cfg, data_dir=data_dir, run_dir=tmp_path / "diloco", strategy=diloco, log=quiet)
    assert diloco.rounds == 3 and result.step == 8
    a, b = _weights(tmp_path / "plain"), _weights(tmp_path / "diloco")
    for key in a:
        np.testing.assert_allclose(a[key], b[key], rtol=1e-5, atol=1e-6, err_msg=key)
    # ... while the paper's outer step (lr 0.7, Nesterov 0.9) really does something else.
    paper = DiLoCoStrategy.from_config(None, StrategyConfig(inner_steps=3, outer_lr=0.7, outer_momentum=0.9), log=quiet)
    train(cfg, data_dir=data_dir, run_dir=tmp_path / "paper", strategy=paper, log=quiet)
    c = _weights(tmp_path / "paper")
    assert max(np.abs(a[k] - c[k]).max() for k in a) > 1e-3


def test_resume_equals_a_straight_run(tmp_path: Path, data_dir: Path) -> None:
    cfg = tiny_config()

    def strategy() -> DiLoCoStrategy:
        return DiLoCoStrategy(None, inner_steps=2, outer_lr=0.7, outer_momentum=0.9, log=quiet)

    straight = strategy()
    train(cfg, data_dir=data_dir, run_dir=tmp_path / "straight", strategy=straight, log=quiet)
    train(cfg, data_dir=data_dir, run_dir=tmp_path / "halves", strategy=strategy(), stop_at=4, log=quiet)
    ckpt, _ = latest_checkpoint(tmp_path / "halves" / "checkpoints")
    assert ckpt is not None and int(ckpt.groups["diloco"]["round"].item()) == 2
    assert any(k.startswith("momentum.") for k in ckpt.groups["diloco"])
    resumed = strategy()
    train(cfg, data_dir=data_dir, run_dir=tmp_path / "halves", strategy=resumed, resume=True, log=quiet)
    assert resumed.rounds == straight.rounds == 4
    np.testing.assert_allclose(np.array(resumed.momentum), np.array(straight.momentum), rtol=1e-5, atol=1e-7)
    a, b = _weights(tmp_path / "straight"), _weights(tmp_path / "halves")
    for key in a:
        np.testing.assert_allclose(a[key], b[key], rtol=1e-5, atol=1e-6, err_msg=key)


def test_a_lone_rank_with_nan_stops_with_a_clear_error() -> None:
    model = nn.Linear(3, 2)
    opt = optim.AdamW(learning_rate=1e-2)
    opt.init(model.trainable_parameters())
    lines: list[str] = []
    s = DiLoCoStrategy(None, inner_steps=2, log=lines.append)
    s.setup(model, rank=0, world_size=1)
    model.update({"weight": model.weight * float("nan")})
    with pytest.raises(TrainingError, match="every rank's pseudo-gradient has NaN/Inf at DiLoCo round 1"):
        s.after_step(model, opt, 2)
    assert lines == ["rank 0: pseudo-gradient has NaN/Inf at round 1 (step 2); contributing nothing this round"]


def test_checkpoint_state_does_not_fit_another_model() -> None:
    s = DiLoCoStrategy(None, inner_steps=2, log=quiet)
    s.setup(nn.Linear(3, 2), rank=0, world_size=1)
    other = DiLoCoStrategy(None, inner_steps=2, log=quiet)
    other.restore(s.state_groups())
    with pytest.raises(CheckpointError, match="does not match this model"):
        other.setup(nn.Linear(4, 2), rank=0, world_size=1)


def test_the_outer_step_is_chosen_by_h_and_rounds_unless_set() -> None:
    def chosen(steps: int | None = None, **kw: object) -> tuple[float, float]:
        s = DiLoCoStrategy.from_config(None, StrategyConfig(**kw), log=quiet, steps=steps)  # type: ignore[arg-type]
        return s.outer_lr, s.outer_momentum

    assert chosen(inner_steps=10, steps=5000) == (1.0, 0.0)  # short rounds: plain averaging
    assert chosen(inner_steps=20, steps=600) == chosen(inner_steps=500) == (0.3, 0.9)  # long and many: Nesterov
    assert chosen(inner_steps=50, steps=400) == (1.0, 0.0)  # 8 rounds (the quickstart): too few for momentum
    assert chosen(inner_steps=50, steps=1451) == (0.3, 0.9)  # 30 rounds, the last one short
    assert chosen(inner_steps=10, outer_lr=0.7) == (0.7, 0.9)  # set by the user: taken as given
    assert chosen(inner_steps=50, steps=5000, outer_lr=1.0, outer_momentum=0.0) == (1.0, 0.0)
