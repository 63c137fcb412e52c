"""Fine-tuning mlx-lm models on one rank: LoRA, QLoRA on a 4-bit model, DoRA, full; resume; mlx-lm's own files.

The models are tiny random-weight Llama and Qwen2 folders in Hugging Face layout (tests/support/tinyhf.py),
trained through the real loop (`distributed.train.train`); what it writes is read back with mlx-lm's own
`load(model, adapter_path=...)` and `generate`. Bad input goes through the real `macrun train` command.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import yaml
from mlx.utils import tree_flatten

from distributed.checkpoint import latest_checkpoint
from distributed.config import Config, config_from_dict
from distributed.errors import CheckpointError, ConfigError
from distributed.sft_data import prepare_finetune_data
from distributed.train import make_task, train
from tests.support.tinyhf import tiny_models, write_dataset

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]
MACRUN = str(Path(sys.executable).with_name("macrun"))
STEPS = 8


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return tiny_models(tmp_path_factory.getbasetemp())


@pytest.fixture(scope="module")
def chat(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("chat"), "chat", train=32, valid=8)


def ft_config(model: Path, data: Path, **overrides: object) -> Config:
    base = {"model": {"source": "mlx-lm", "path": str(model)}, "data": {"path": str(data), "seq_len": 48},
            "finetune": {"type": "lora", "rank": 4, "scale": 10.0, "layers": -1},
            "train": {"steps": STEPS, "batch_size": 4, "lr": 1e-2, "min_lr": 1e-3, "warmup_steps": 1,
                      "weight_decay": 0.0, "eval_interval": 4, "eval_batches": 2, "checkpoint_interval": 4,
                      "keep_checkpoints": 3, "log_interval": 4}}
    return config_from_dict(base, [f"{k}={v}" for k, v in overrides.items()])


def run(cfg: Config, run_dir: Path, **kwargs: object):  # noqa: ANN201 - (TrainResult, task)
    prepared = prepare_finetune_data(cfg, run_dir / "data")
    task = make_task(cfg, prepared.dir)
    return train(cfg, data_dir=prepared.dir, run_dir=run_dir, log=lambda _m: None, task=task, **kwargs), task


def saved_adapters(run_dir: Path) -> dict[str, np.ndarray]:
    return {k: np.array(v) for k, v in mx.load(str(run_dir / "adapters" / "adapters.safetensors")).items()}


def test_lora_trains_only_adapters_and_mlx_lm_loads_them(tmp_path: Path, models: dict[str, Path], chat: Path) -> None:
    from mlx_lm import generate, load

    result, task = run(ft_config(models["llama"], chat), tmp_path)
    vals = [row["val_loss"] for row in result.history if "val_loss" in row]
    assert len(vals) == 2 and vals[1] < vals[0]  # it learns

    # The checkpoint holds the adapters and their optimizer state, never the frozen base model.
    ckpt, _ = latest_checkpoint(tmp_path / "checkpoints")
    assert ckpt is not None and ckpt.step == STEPS
    names = set(ckpt.groups["model"])
    assert names and all(n.rsplit(".", 1)[-1] in ("lora_a", "lora_b") for n in names)
    base = ckpt.meta["base_model"]
    assert base["path"] == str(models["llama"]) and len(base["config_sha256"]) == 64

    # adapters/ is mlx-lm's format, equal to the checkpoint, and mlx-lm's load gives the model we trained.
    adapters = saved_adapters(tmp_path)
    assert adapters.keys() == names
    for name in names:
        np.testing.assert_array_equal(adapters[name], np.array(ckpt.groups["model"][name]))
    config = json.loads((tmp_path / "adapters" / "adapter_config.json").read_text())
    assert config["fine_tune_type"] == "lora" and config["num_layers"] == 2
    assert config["lora_parameters"] == {"rank": 4, "scale": 10.0, "dropout": 0.0}
    model, tokenizer = load(str(models["llama"]), adapter_path=str(tmp_path / "adapters"))
    tokens = mx.array([tokenizer.encode("what is 2 plus 3")])
    task.model.eval()
    np.testing.assert_allclose(np.array(model(tokens)), np.array(task.model(tokens)), rtol=1e-5, atol=1e-5)
    text = generate(model, tokenizer, prompt="what is 2 plus 3", max_tokens=4)
    assert isinstance(text, str)


def test_the_auto_strategy_times_the_fine_tune_and_counts_only_trainable_bytes(
        tmp_path: Path, models: dict[str, Path], chat: Path) -> None:
    from distributed.worker import measure_step_seconds

    cfg = ft_config(models["llama-4bit"], chat, **{"finetune.layers": 1})
    task = make_task(cfg, tmp_path)
    adapters = sum(v.nbytes for _, v in tree_flatten(task.model.trainable_parameters()))
    everything = sum(v.nbytes for _, v in tree_flatten(task.model.parameters()))
    assert task.trainable_bytes == adapters < everything / 4  # of a real 1B model: under 1%
    assert measure_step_seconds(cfg, repeats=1, task=task) > 0


def test_resume_equals_a_straight_run(tmp_path: Path, models: dict[str, Path]) -> None:
    data = write_dataset(tmp_path / "data", "completions", train=24, valid=4)
    cfg = ft_config(models["qwen2"], data, **{"finetune.type": "dora"})
    straight, halves = tmp_path / "straight", tmp_path / "halves"
    run(cfg, straight)
    first, _ = run(cfg, halves, stop_at=4)
    assert first.step == 4 and (halves / "adapters" / "adapters.safetensors").exists()
    second, _ = run(cfg, halves, resume=True)
    assert second.step == STEPS
    a, b = saved_adapters(straight), saved_adapters(halves)
    assert a.keys() == b.keys() and any(k.endswith(".m") for k in a)  # DoRA's magnitude vectors train too
    for key in a:
        np.testing.assert_allclose(a[key], b[key], rtol=1e-5, atol=1e-6, err_msg=key)


def test_qlora_on_a_4bit_model(tmp_path: Path, models: dict[str, Path], chat: Path) -> None:
    import mlx.nn as nn
    from mlx_lm import generate, load

    result, task = run(ft_config(models["llama-4bit"], chat, **{"finetune.layers": 1}), tmp_path)
    assert result.step == STEPS and np.isfinite(result.loss)
    q_proj = task.model.layers[-1].self_attn.q_proj
    assert isinstance(q_proj.linear, nn.QuantizedLinear)  # LoRA beside the frozen 4-bit weights
    assert isinstance(task.model.layers[0].self_attn.q_proj, nn.QuantizedLinear)  # layers: 1 = the last one only
    trained = dict(tree_flatten(task.model.trainable_parameters()))
    assert trained and all(".layers.1." in k for k in trained)
    assert float(np.abs(np.array(trained["model.layers.1.self_attn.q_proj.lora_b"])).max()) > 0  # it moved
    model, tokenizer = load(str(models["llama-4bit"]), adapter_path=str(tmp_path / "adapters"))
    assert isinstance(generate(model, tokenizer, prompt="what is 1 plus 1", max_tokens=3), str)


def test_full_finetune_writes_a_model_folder_mlx_lm_loads(tmp_path: Path, models: dict[str, Path], chat: Path) -> None:
    from mlx_lm import load

    cfg = ft_config(models["qwen2"], chat, **{"finetune.type": "full", "finetune.layers": 1, "train.lr": 1e-3})
    _result, task = run(cfg, tmp_path)
    ckpt, _ = latest_checkpoint(tmp_path / "checkpoints")
    assert ckpt is not None and all(".layers.1." in k for k in ckpt.groups["model"])
    assert not (tmp_path / "adapters").exists()
    model, tokenizer = load(str(tmp_path / "model"))
    base, _ = load(str(models["qwen2"]))
    mine, theirs, trained = (dict(tree_flatten(m.parameters())) for m in (model, base, task.model))
    moved = [k for k in mine if not np.array_equal(np.array(mine[k]), np.array(theirs[k]))]
    assert moved and all(".layers.1." in k for k in moved)  # the last layer trained, nothing else changed
    for key in moved:
        np.testing.assert_array_equal(np.array(mine[key]), np.array(trained[key]))
    assert tokenizer.encode("hello") == load(str(models["qwen2"]))[1].encode("hello")


def test_full_finetune_of_a_quantised_model_is_refused(tmp_path: Path, models: dict[str, Path], chat: Path) -> None:
    with pytest.raises(ConfigError, match="quantised") as info:
        make_task(ft_config(models["llama-4bit"], chat, **{"finetune.type": "full"}), tmp_path)
    assert "lora" in (info.value.hint or "")


def test_resume_on_another_base_model_is_refused(tmp_path: Path, models: dict[str, Path], chat: Path) -> None:
    changed = tmp_path / "llama-changed"
    shutil.copytree(models["llama"], changed)
    run(ft_config(changed, chat), tmp_path / "run", stop_at=4)
    config = json.loads((changed / "config.json").read_text())
    (changed / "config.json").write_text(json.dumps({**config, "rms_norm_eps": 1e-6}))
    with pytest.raises(CheckpointError, match="another version"):
        run(ft_config(changed, chat), tmp_path / "run", resume=True)


def test_a_repo_name_resolves_from_the_hugging_face_cache_only(tmp_path: Path, models: dict[str, Path],
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants
    from mlx_lm.utils import DEFAULT_ALLOW_PATTERNS

    from distributed.models.mlxlm import MODEL_FILES, resolve_model_path

    assert MODEL_FILES == DEFAULT_ALLOW_PATTERNS  # the copy kept in step with mlx-lm's
    # The cache's layout: models--<org>--<name>/refs/main names the snapshot folder that holds the files.
    repo = tmp_path / "hub" / "models--tiny-org--tiny-llama"
    shutil.copytree(models["llama"], repo / "snapshots" / ("ab" * 20))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("ab" * 20)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert resolve_model_path("tiny-org/tiny-llama") == repo / "snapshots" / ("ab" * 20)
    with pytest.raises(ConfigError, match="nor in this machine's Hugging Face cache") as info:
        resolve_model_path("tiny-org/other-model")
    assert "hf download tiny-org/other-model" in (info.value.hint or "")


def test_a_hosts_launch_syncs_the_examples_and_fetches_fresh_exports(tmp_path: Path, models: dict[str, Path],
                                                                      chat: Path) -> None:
    from launcher.jobs.training import plan_training
    from launcher.room.hostspec import HostSpec

    path = tmp_path / "lora.yaml"
    path.write_text(yaml.safe_dump({"run": {"name": "hosts", "output_dir": str(tmp_path / "runs")},
                                    "model": {"source": "mlx-lm", "path": str(models["llama"])},
                                    "data": {"path": str(chat)}}))
    stale = tmp_path / "runs" / "hosts" / "adapters" / "adapters.safetensors"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"an earlier run's")
    lines: list[str] = []
    _cfg, spec = plan_training(path, hosts=[HostSpec(name="a", hostname="a.local")], emit=lines.append)
    assert lines[0].startswith("data: 32 training examples") and "(chat, completion-only loss)" in lines[0]
    assert {"data/train.tokens.npy", "data/train.index.npy", "data/valid.tokens.npy", "config.yaml"} <= set(spec.files)
    # An earlier run's export left here would pass for this run's.
    assert {"adapters", "model"} <= set(spec.fetch) and not stale.exists()


# ---- bad input through the real command: one error line and a hint, exit 2 ------------------------------------


def macrun_train(tmp_path: Path, config: dict) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "lora.yaml"
    path.write_text(yaml.safe_dump({"run": {"name": "bad", "output_dir": str(tmp_path / "runs")}, **config}))
    env = {k: v for k, v in os.environ.items() if k not in ("MACRUN_DEBUG", "SSH_AUTH_SOCK")}
    # An empty Hugging Face cache, and no network use even if something tried.
    env.update(HOME=str(tmp_path), COLUMNS="200", HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="1")
    return subprocess.run([MACRUN, "train", str(path)], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=120, stdin=subprocess.DEVNULL)


@pytest.mark.parametrize(("model", "data", "needles"), [
    ("{tmp}/no-such-model", "chat", ["model.path", "no-such-model", "does not exist"]),
    ("mlx-community/Not-In-This-Cache-4bit", "chat", ["mlx-community/Not-In-This-Cache-4bit",
                                                      "nor in this machine's Hugging Face cache"]),
    ("llama", "empty", ["has no train.jsonl"]),
], ids=["missing-model-folder", "repo-not-cached", "no-train-jsonl"])
def test_bad_model_or_data_is_one_error_line(tmp_path: Path, models: dict[str, Path], chat: Path, model: str,
                                             data: str, needles: list[str]) -> None:
    model_path = str(models[model]) if model in models else model.format(tmp=tmp_path)
    data_path = chat if data == "chat" else tmp_path / "empty"
    (tmp_path / "empty").mkdir()
    proc = macrun_train(tmp_path, {"model": {"source": "mlx-lm", "path": model_path},
                                   "data": {"path": str(data_path)}})
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2 and "Traceback" not in out, out[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    hints = [line for line in proc.stderr.splitlines() if line.startswith("hint: ")]
    assert len(errors) == 1 and len(hints) == 1, proc.stderr
    for needle in needles:
        assert needle in errors[0], errors[0]
