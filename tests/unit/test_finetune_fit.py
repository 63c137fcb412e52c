"""Fit before launch: the fine-tune memory estimate against tiny real models, the refusal, and where hosts look.

The estimate reads only files (sizes, safetensors headers, config.json); here it is held against what
mlx-lm itself builds from the same folders (tests/support/tinyhf.py): the weights part must be the files'
size exactly and the trainable count the count of the model mlx-lm adapts.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from distributed.config import Config, config_from_dict
from distributed.errors import ConfigError, UsageError
from distributed.models import mlxlm
from distributed.models.mlxlm_memory import MemoryEstimate, estimate_finetune_memory
from launcher.jobs.training import plan_training
from launcher.models.modelfiles import Manifest, ModelSpec
from launcher.room.fit import FitError, Machine, fit_problem, require_finetune_fit
from launcher.views.display import LineProgress
from tests.support.tinyhf import LLAMA, tiny_models

GIB = 2**30


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return tiny_models(tmp_path_factory.getbasetemp())


def ft_config(model: Path, kind: str = "lora", layers: int = -1, **train: int) -> Config:
    return config_from_dict({"model": {"source": "mlx-lm", "path": str(model)}, "data": {"seq_len": 64},
                             "finetune": {"type": kind, "rank": 4, "layers": layers},
                             "train": {"batch_size": 2, **train}})


@pytest.mark.parametrize(("name", "kind", "layers"), [
    ("llama", "lora", -1), ("llama", "lora", 1), ("llama", "dora", 1), ("llama", "full", 1),
    ("qwen2", "lora", -1), ("qwen2", "full", -1), ("llama-4bit", "lora", -1), ("llama-4bit", "dora", 1),
])
def test_estimate_matches_the_files_and_the_model_mlx_lm_builds(models: dict[str, Path], name: str, kind: str,
                                                                layers: int) -> None:
    cfg = ft_config(models[name], kind, layers)
    estimate = estimate_finetune_memory(models[name], cfg)
    assert estimate.weights == sum(p.stat().st_size for p in models[name].glob("model*.safetensors"))
    assert estimate.trainable == mlxlm.load_finetune(cfg).trainable_count
    assert estimate.quantized == name.endswith("4bit")
    assert estimate.total == estimate.weights + 16 * estimate.trainable + estimate.activations


def test_activations_follow_the_documented_formula(models: dict[str, Path]) -> None:
    estimate = estimate_finetune_memory(models["llama"], ft_config(models["llama"], layers=1))
    h, inter, heads = LLAMA["hidden_size"], LLAMA["intermediate_size"], LLAMA["num_attention_heads"]
    tokens, vocab = 2 * 64, 384  # batch x seq_len; the tiny tokenizer's vocabulary
    per_layer = tokens * (10 * h + 3 * inter + 2 * heads * 64) * 4  # float32 weights: 4 bytes a value
    assert estimate.activations == per_layer + 8 * tokens * vocab
    bigger = estimate_finetune_memory(models["llama"], ft_config(models["llama"], layers=1, batch_size=4))
    assert bigger.activations == 2 * estimate.activations


def estimate(**changes: object) -> MemoryEstimate:
    base: dict = {"weights": 2 * GIB, "trainable": 10_000_000, "activations": 3 * GIB, "kind": "lora",
                  "layers": 16, "quantized": False, "batch_size": 4, "seq_len": 2048}
    return MemoryEstimate(**{**base, **changes})


def test_a_fine_tune_that_does_not_fit_is_refused_with_the_numbers_and_the_fixes() -> None:
    require_finetune_fit(estimate(), [Machine("studio", 64 * GIB)])  # fits: no error
    with pytest.raises(FitError) as err:
        require_finetune_fit(estimate(), [Machine("studio", 64 * GIB), Machine("air", 8 * GIB, slots=2)])
    message, hint = err.value.message, err.value.hint or ""
    assert "but air has 8.0 GiB (about 6.0 GiB usable by MLX)" in message and "(2 ranks)" in message
    assert "weights 2.0 GiB" in message and "batch 4 x 2048 tokens 3.0 GiB" in message
    assert "train.batch_size (4)" in hint and "data.seq_len (2048)" in hint and "finetune.layers=16" in hint
    assert "4-bit" in hint and err.value.exit_code == 2
    with pytest.raises(FitError) as err:
        require_finetune_fit(estimate(quantized=True, kind="full"), [Machine("air", 1 * GIB)])
    assert "4-bit" not in (err.value.hint or "") and "finetune.type=lora" in (err.value.hint or "")


def test_hosts_of_unknown_memory_are_not_refused() -> None:
    require_finetune_fit(estimate(), [Machine("odd", 0)])
    assert fit_problem(7 * GIB, [Machine("odd", 0)]) is None


def test_where_a_host_looks_for_the_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    empty = Manifest(())
    folder = tmp_path / "m"
    folder.mkdir()
    assert ModelSpec("org/name", folder, empty).host_candidates() == ["hf:org/name"]  # not a folder here: a repo
    assert ModelSpec(str(folder), folder, empty).host_candidates() == [str(folder)]
    monkeypatch.chdir(tmp_path)
    assert ModelSpec("m", folder, empty).host_candidates() == [str(folder.resolve())]  # relative: made absolute
    snapshot = tmp_path / "hub" / "models--org--tiny" / "snapshots" / "abc"
    snapshot.mkdir(parents=True)
    assert ModelSpec(str(snapshot), snapshot, empty).host_candidates() == [str(snapshot), "hf:org/tiny"]


def test_a_rank_loads_the_folder_the_launcher_named(models: dict[str, Path], tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MACRUN_MODEL_DIR", str(models["qwen2"]))
    assert mlxlm.model_dir("org/not-here") == models["qwen2"]
    monkeypatch.setenv("MACRUN_MODEL_DIR", str(tmp_path))
    with pytest.raises(ConfigError, match="MACRUN_MODEL_DIR"):
        mlxlm.model_dir("org/not-here")


def test_plain_progress_lines_every_tenth() -> None:
    lines: list[str] = []
    progress = LineProgress(lines.append)
    with progress:
        progress.add("h1", 1000)
        for _ in range(20):
            progress.advance("h1", 50)
    assert [line.split(":")[1].split("%")[0].strip() for line in lines] == [str(10 * i) for i in range(1, 11)]
    assert lines[-1].startswith("model -> h1: 100% (0.0 of 0.0 MB")


def test_push_model_needs_hosts(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("run:\n  name: x\n")
    with pytest.raises(UsageError, match="--push-model"):
        plan_training(config, push_model=True)


def test_a_terminal_shows_a_byte_bar_and_gets_its_training_bar_back() -> None:
    from io import StringIO

    from rich.console import Console

    from launcher.views.display import BarProgress, TrainingDisplay

    console = Console(file=StringIO(), force_terminal=True, width=100)
    with TrainingDisplay(console) as display:
        bar = display.transfers()
        assert isinstance(bar, BarProgress)
        with bar:  # the training bar pauses: rich allows one live display at a time
            bar.add("h1", 2_000_000)
            bar.advance("h1", 2_000_000)
        display.emit("[rank 0 h1] step 1/2 · loss 2.000 · lr 1e-3 · 1.0k tok/s")
    text = console.file.getvalue()
    assert "model" in text and "h1" in text and "2.0 MB" in text and "training" in text
    assert isinstance(TrainingDisplay(Console(file=StringIO())).transfers(), LineProgress)
