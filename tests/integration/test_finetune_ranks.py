"""LoRA fine-tuning of an mlx-lm model on 2 real `mx.distributed` ranks on loopback: DDP and DiLoCo.

DDP: two ranks with batch B end where one rank with batch 2B does, on the trainable parameters (the
adapters), because the ranks average gradients of a loss scaled to the whole step's token count
(sft_data.ExampleSampler); so do unequal shares of the step's examples (balanced DDP), with no gradient
weights. DiLoCo goes through the real launcher (`macrun train --nproc 2`'s path) and its adapters load in
mlx-lm. Ranks are fresh Python processes (tests/integration/test_ddp.py's helpers).
"""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import yaml

from distributed.checkpoint import latest_checkpoint
from distributed.compress import ring_bytes
from distributed.config import config_from_dict
from distributed.sft_data import prepare_finetune_data
from distributed.train import train
from tests.integration.test_ddp import finish, start_ranks
from tests.support.tinyhf import tiny_models, write_dataset

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]
STEPS = 6


def config(model: Path, data: Path, batch: int, **sections: dict) -> dict:
    return {"model": {"source": "mlx-lm", "path": str(model)}, "data": {"path": str(data), "seq_len": 48},
            "finetune": {"type": "lora", "rank": 4, "scale": 10.0, "layers": -1},
            "train": {"steps": STEPS, "batch_size": batch, "lr": 1e-2, "min_lr": 1e-3, "warmup_steps": 1,
                      "weight_decay": 0.0, "eval_interval": 3, "eval_batches": 1, "checkpoint_interval": 0,
                      "log_interval": 3},
            **sections}


# One DDP rank. argv: out_dir data_dir config_json shares_json (null: equal shares).
RANK = r"""
import json, sys
from pathlib import Path
import mlx.core as mx
from distributed.config import config_from_dict
from distributed.strategy import DDPStrategy
from distributed.train import make_task, train

out, data, cfg = Path(sys.argv[1]), Path(sys.argv[2]), config_from_dict(json.loads(sys.argv[3]))
group = mx.distributed.init(backend="ring", strict=True)
rank, world, strategy = group.rank(), group.size(), DDPStrategy(group, shares=json.loads(sys.argv[4]))
task = make_task(cfg, data)
result = train(cfg, data_dir=data, run_dir=out / "run", rank=rank, world_size=world, strategy=strategy,
               log=lambda m: print(m, flush=True), task=task)
(out / f"report{rank}.json").write_text(json.dumps({"bytes_sent": strategy.bytes_sent, "loss": result.loss,
                                                   "grad_weight": strategy.grad_weight,
                                                   "examples": task.sampler.local_batch}))
"""


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return tiny_models(tmp_path_factory.getbasetemp())


@pytest.fixture(scope="module")
def chat(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("chat"), "chat", train=40, valid=4)


@pytest.mark.parametrize("shares", [None, [1, 3]], ids=["equal", "balanced"])
def test_two_ddp_ranks_of_b_equal_one_rank_of_2b_on_the_adapters(tmp_path: Path, models: dict[str, Path],
                                                                  chat: Path, shares: list[int] | None) -> None:
    cfg2, cfg4 = config(models["llama"], chat, 2), config(models["llama"], chat, 4)
    prepared = prepare_finetune_data(config_from_dict(cfg2), tmp_path / "data")
    ddp = start_ranks(RANK, [str(prepared.dir), json.dumps(cfg2), json.dumps(shares)], tmp_path / "ddp", 2)
    try:  # the reference, one rank with the whole batch, here while the ranks start
        train(config_from_dict(cfg4), data_dir=prepared.dir, run_dir=tmp_path / "single" / "run", log=lambda _m: None)
    finally:
        results = finish(ddp, deadline_s=200)
    for code, output in results:
        assert code == 0, output[-4000:]

    one, _ = latest_checkpoint(tmp_path / "single" / "run" / "checkpoints")
    two, _ = latest_checkpoint(tmp_path / "ddp" / "run" / "checkpoints")
    assert one is not None and two is not None and one.step == two.step == STEPS
    assert one.groups["model"].keys() == two.groups["model"].keys()
    moved = 0.0
    for key, value in one.groups["model"].items():
        assert key.endswith((".lora_a", ".lora_b")), key  # only the adapters train, travel and are saved
        a, b = np.array(value), np.array(two.groups["model"][key])
        np.testing.assert_allclose(b, a, rtol=2e-4, atol=2e-6, err_msg=key)
        if key.endswith("lora_b"):  # zero at the start
            moved = max(moved, float(np.abs(a).max()))
    assert moved > 1e-3

    # Traffic is the adapters' size: one broadcast at the start, one gradient all_sum per step, two replica
    # checks, and 4 bytes to compare the ranks' base models. Not a byte of the frozen base model.
    adapters = sum(np.array(v).nbytes for v in two.groups["model"].values())
    tensors = len(two.groups["model"])
    reports = [json.loads((tmp_path / "ddp" / f"report{r}.json").read_text()) for r in (0, 1)]
    assert [rep["examples"] for rep in reports] == (shares or [2, 2])  # examples per step on each rank
    assert reports[0]["grad_weight"] == reports[1]["grad_weight"] == 1.0  # the token-count scale is already exact
    expected = ring_bytes(adapters, 2) * (1 + STEPS) + 2 * (2 * tensors * 4) + 4
    assert reports[0]["bytes_sent"] == reports[1]["bytes_sent"] == expected


def test_macrun_train_two_ranks_diloco_writes_adapters_mlx_lm_loads(tmp_path: Path, models: dict[str, Path],
                                                                   chat: Path) -> None:
    from mlx_lm import generate, load

    from launcher.jobs.api import launch
    from launcher.jobs.training import plan_training

    cfg = config(models["qwen2"], chat, 2, run={"name": "lora", "output_dir": str(tmp_path / "runs")},
                 strategy={"mode": "diloco", "inner_steps": 3})
    path = tmp_path / "lora.yaml"
    path.write_text(yaml.safe_dump(cfg))
    lines: list[str] = []
    _cfg, spec = plan_training(path, nproc=2, emit=lines.append)
    result = launch(replace(spec, heartbeat_timeout=120), emit=lines.append)
    text = "\n".join(lines)
    assert result.exit_code == 0, text[-4000:]
    assert re.search(r"data: 40 training examples \(\S+ tokens\), 4 validation examples .* \(chat, "
                     r"completion-only loss\)", text), text
    assert "strategy diloco: strategy.mode=diloco" in text and f"done: step {STEPS}" in text
    assert re.search(r"0\.00\d+M trainable \(lora rank 4 on the last 2 layers\)", text), text

    run_dir = tmp_path / "runs" / "lora"
    ckpt, _ = latest_checkpoint(run_dir / "checkpoints")
    assert ckpt is not None and ckpt.step == STEPS
    # DiLoCo's outer state covers the adapters alone, and the exported adapters are its theta.
    outer = {k[len("params."):]: v for k, v in ckpt.groups["diloco"].items() if k.startswith("params.")}
    adapters = mx.load(str(run_dir / "adapters" / "adapters.safetensors"))
    assert outer.keys() == adapters.keys() == ckpt.groups["model"].keys()
    for key in outer:
        np.testing.assert_array_equal(np.array(adapters[key]), np.array(outer[key]))
    model, tokenizer = load(str(models["qwen2"]), adapter_path=str(run_dir / "adapters"))
    assert isinstance(generate(model, tokenizer, prompt="what is 4 plus 4", max_tokens=3), str)
