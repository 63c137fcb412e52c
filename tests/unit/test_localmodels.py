"""The mlx-lm models the wizard offers (launcher/models/localmodels.py): found in a Hugging Face cache layout and in
./models, sized from their files, held against what mlx-lm builds from the same tiny models (tests/support)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from distributed.config import load_config
from distributed.models import mlxlm
from distributed.models.mlxlm_memory import estimate_finetune_memory
from launcher.models.localmodels import (
    SOURCE_HF,
    SOURCE_MODELS,
    count_parameters,
    data_folder_problem,
    describe_quantization,
    find_local_models,
    hf_hub_cache,
)
from launcher.views.plan import FINETUNE_CONFIG, finetune_choice, set_override
from tests.support.tinyhf import put_in_hf_cache, tiny_models, write_dataset

LORA_CHAT = Path(__file__).resolve().parents[2] / "configs" / FINETUNE_CONFIG


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return tiny_models(tmp_path_factory.getbasetemp())


@pytest.fixture
def room(tmp_path: Path, models: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> Path:
    """A cwd with models/llama and models/qwen2, and a Hugging Face cache holding the 4-bit Llama."""
    hub = tmp_path / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    put_in_hf_cache(hub, "tiny-org/llama-4bit", models["llama-4bit"])
    cwd = tmp_path / "cwd"
    for name in ("llama", "qwen2"):
        shutil.copytree(models[name], cwd / "models" / name)
    (cwd / "models" / "notes").mkdir()  # no config.json: not a model
    (cwd / "models" / "notes" / "readme.txt").write_text("hello")
    return cwd


def test_hf_hub_cache_follows_huggingface_hub() -> None:
    assert hf_hub_cache({"HF_HUB_CACHE": "/c/hub", "HF_HOME": "/h"}) == Path("/c/hub")
    assert hf_hub_cache({"HF_HOME": "/h", "XDG_CACHE_HOME": "/x"}) == Path("/h/hub")
    assert hf_hub_cache({"XDG_CACHE_HOME": "/x"}) == Path("/x/huggingface/hub")
    assert hf_hub_cache({}) == Path("~/.cache/huggingface/hub").expanduser()


def test_models_are_found_in_the_cache_and_in_the_models_folder(room: Path, models: dict[str, Path],
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    found = {m.name: m for m in find_local_models(room)}
    assert set(found) == {"tiny-org/llama-4bit", "models/llama", "models/qwen2"}
    quant, llama = found["tiny-org/llama-4bit"], found["models/llama"]
    assert (quant.source, quant.model_type, quant.quantization) == (SOURCE_HF, "llama", "4-bit, group 32")
    assert (llama.source, llama.quantization, llama.dtype, llama.value_bytes) == (SOURCE_MODELS, None, "f32", 4)
    assert llama.path == room / "models" / "llama" and not quant.error
    # The repo id resolves to the same snapshot the way a launch finds it (huggingface_hub read its
    # variables at import: point it at the fake cache too).
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hf_hub_cache()))
    assert mlxlm.resolve_model_path(quant.name) == quant.path


@pytest.mark.parametrize("name", ["llama", "qwen2", "llama-4bit"])
def test_parameters_are_counted_as_mlx_lm_counts_them(models: dict[str, Path], tmp_path: Path, name: str) -> None:
    from mlx_lm.utils import get_total_parameters, load_model

    shutil.copytree(models[name], tmp_path / "models" / name)
    (found,) = find_local_models(tmp_path, env={"HF_HUB_CACHE": str(tmp_path / "none")})
    model, _ = load_model(models[name])
    assert found.params == get_total_parameters(model) > 0


def test_a_repo_without_refs_main_is_offered_by_folder_and_broken_ones_are_reported(
        tmp_path: Path, models: dict[str, Path]) -> None:
    hub = tmp_path / "hub"
    snapshot = put_in_hf_cache(hub, "tiny-org/llama", models["llama"], revision="a" * 40, main=False)
    put_in_hf_cache(hub, "gpt2", models["qwen2"])  # no org: not a name resolve_model_path takes
    partial = put_in_hf_cache(hub, "tiny-org/partial", models["qwen2"])
    (partial / "model.safetensors").unlink()  # incomplete download: not offered
    broken = tmp_path / "models" / "broken"
    broken.mkdir(parents=True)
    (broken / "config.json").write_text("{}")
    (broken / "model.safetensors").write_bytes(b"\x01")
    found = find_local_models(tmp_path, env={"HF_HUB_CACHE": str(hub)})
    no_org = hub / "models--gpt2" / "snapshots" / ("0" * 40)
    assert {m.name for m in found if not m.error} == {str(snapshot), str(no_org)}
    assert found[-1].name == "models/broken" and "cannot read the weights file" in (found[-1].error or "")
    assert len(found) == 3


def test_quantization_is_described_from_the_config() -> None:
    assert describe_quantization({}) is None
    assert describe_quantization({"quantization": {"bits": 4, "group_size": 64}}) == "4-bit, group 64"
    mixed = {"quantization": {"bits": 4, "group_size": 64, "model.layers.0.mlp.down_proj": {"bits": 8,
                                                                                            "group_size": 64}}}
    assert describe_quantization(mixed) == "4-bit (some layers 8-bit), group 64"
    assert describe_quantization({"quantization_config": {"bits": 4, "group_size": 32, "mode": "mxfp4"}}) == \
        "4-bit, group 32, mxfp4"
    assert describe_quantization({"quantization_config": {"quant_method": "fp8"}}) == "fp8"
    # A layer kept at 8 bits unpacks to 4 values a word, not 8.
    header = {"a.weight": {"shape": [8, 4]}, "a.scales": {"shape": [8, 1]}, "a.biases": {"shape": [8, 1]},
              "b.weight": {"shape": [8, 4]}, "b.scales": {"shape": [8, 1]}, "n.weight": {"shape": [5]}}
    assert count_parameters(header, {"quantization": {"bits": 4, "b": {"bits": 8}}}) == 8 * 4 * 8 + 8 * 4 * 4 + 5


@pytest.mark.parametrize(("name", "kind"), [("llama-4bit", "lora"), ("llama", "full"), ("qwen2", "dora")])
def test_finetune_choice_is_sized_with_lora_chat_and_counts_what_trains(
        models: dict[str, Path], tmp_path: Path, name: str, kind: str) -> None:
    shutil.copytree(models[name], tmp_path / "models" / name)
    (local,) = find_local_models(tmp_path, env={"HF_HUB_CACHE": str(tmp_path / "none")})
    choice = finetune_choice(local, LORA_CHAT, ["train.batch_size=2"], (f"finetune.type={kind}",))
    # The tiny models have 2 layers, fewer than lora-chat's 16: all of them, or the launch would refuse.
    assert choice.sets == (f"model.path=models/{name}", f"finetune.type={kind}", "finetune.layers=-1")
    cfg = load_config(LORA_CHAT, ["train.batch_size=2", *choice.sets])
    assert choice.config == cfg and choice.params == local.params and choice.error is None
    assert choice.memory_per_rank == estimate_finetune_memory(local.path, cfg).total
    # What travels per sync: the bytes of the parameters mlx-lm leaves trainable (LoRA: float32 adapters).
    from mlx.utils import tree_flatten

    ft = mlxlm.load_finetune(load_config(LORA_CHAT, [f"model.path={local.path}", *choice.sets[1:]]))
    assert choice.sync_bytes == sum(v.nbytes for _, v in tree_flatten(ft.model.trainable_parameters()))


def test_set_override_quotes_only_what_yaml_would_change() -> None:
    assert set_override("data.path", "~/data/chat") == "data.path=~/data/chat"
    assert set_override("data.path", "a: b") == "data.path='a: b'"
    assert set_override("model.path", "123") == "model.path='123'"
    assert load_config(LORA_CHAT, [set_override("data.path", "it's: here")]).data.path == "it's: here"


def test_data_folder_problem_names_what_is_missing(tmp_path: Path) -> None:
    write_dataset(tmp_path / "chat", "chat")
    (tmp_path / "empty").mkdir()
    (tmp_path / "file").write_text("")
    assert data_folder_problem("chat", tmp_path) is None
    assert data_folder_problem(str(tmp_path / "chat"), Path("/")) is None
    assert data_folder_problem("", tmp_path) == "give the folder that holds train.jsonl"
    assert data_folder_problem("nope", tmp_path) == "nope does not exist"
    assert data_folder_problem("file", tmp_path) == "file is not a folder"
    assert (data_folder_problem("empty", tmp_path) or "").startswith("empty has no train.jsonl: the data folder")
