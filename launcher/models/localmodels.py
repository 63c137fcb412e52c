"""The mlx-lm models on this Mac that the wizard offers to fine-tune, found and sized from their files alone.

Two places are looked in, the ones `model.path` can name without a download (distributed/models/mlxlm.py,
`resolve_model_path`):

- the Hugging Face cache (`$HF_HUB_CACHE`, else `$HF_HOME/hub`, else `$XDG_CACHE_HOME/huggingface/hub`, else
  ~/.cache/huggingface/hub, as huggingface_hub itself decides): `models--org--name/snapshots/<rev>/`. A repo
  whose refs/main names a complete snapshot is offered by its repo id, as `resolve_model_path` finds it;
  otherwise its newest complete snapshot is offered by folder;
- `./models/<name>/`, each subfolder a model folder.

A folder counts when it holds config.json and model*.safetensors (the weight files mlx-lm loads). Nothing is
loaded: the parameter count comes from the safetensors headers, counted as mlx-lm's `get_total_parameters`
counts a loaded model (a quantised weight unpacked to `32 / bits` values per uint32 word, its scales and
biases not counted); the quantisation from config.json's "quantization" (or "quantization_config").
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from distributed.errors import ConfigError
from distributed.models.mlxlm_memory import MemoryEstimate, safetensors_header

SOURCE_HF = "HF cache"
SOURCE_MODELS = "models/"
# mlx-lm creates LoRA and DoRA adapters in float32 (tuner/lora.py: mx.random.uniform, mx.zeros), whatever the
# base model's dtype; a full fine-tune trains the weights in their own dtype.
ADAPTER_VALUE_BYTES = 4
_FLOATS = {"F64": ("f64", 8), "F32": ("f32", 4), "F16": ("f16", 2), "BF16": ("bf16", 2)}
_WEIGHTS = "model*.safetensors"


@dataclass(frozen=True, slots=True)
class LocalModel:
    """One mlx-lm model folder on this Mac, described from its files."""

    name: str  # what model.path will say: a repo id ("org/name", in the HF cache) or a folder ("models/x")
    path: Path  # the folder holding config.json and model*.safetensors
    source: str  # SOURCE_HF or SOURCE_MODELS
    model_type: str = ""  # config.json's model_type: llama, qwen2, ...
    params: int = 0  # as mlx-lm's get_total_parameters counts them (quantised weights unpacked)
    quantization: str | None = None  # "4-bit, group 64"; None when the weights are not quantised
    dtype: str = ""  # the float dtype of most stored values: bf16, f16, f32
    value_bytes: int = 2  # bytes of one value of that dtype
    error: str | None = None  # why it cannot be offered (an unreadable config.json or weights file)

    @property
    def quantized(self) -> bool:
        return self.quantization is not None


def hf_hub_cache(env: Mapping[str, str] | None = None) -> Path:
    """The Hugging Face hub cache folder, from the same variables huggingface_hub reads."""
    env = os.environ if env is None else env
    hub = env.get("HF_HUB_CACHE") or env.get("HUGGINGFACE_HUB_CACHE")
    if hub:
        return Path(hub).expanduser()
    home = env.get("HF_HOME") or os.path.join(env.get("XDG_CACHE_HOME") or "~/.cache", "huggingface")
    return Path(home).expanduser() / "hub"


def is_model_folder(folder: Path) -> bool:
    """config.json and at least one model*.safetensors: what `resolve_model_path` and mlx-lm need."""
    return (folder / "config.json").is_file() and any(folder.glob(_WEIGHTS))


def _cached_snapshot(repo: Path) -> tuple[Path, bool] | None:
    """(snapshot, named by refs/main) of one `models--org--name` folder; None when no snapshot is complete."""
    try:
        main = (repo / "refs" / "main").read_text().strip()
    except OSError:
        main = ""
    if main and is_model_folder(repo / "snapshots" / main):
        return repo / "snapshots" / main, True
    snapshots = [p for p in (repo / "snapshots").glob("*") if p.is_dir() and is_model_folder(p)]
    if not snapshots:
        return None
    return max(snapshots, key=lambda p: p.stat().st_mtime), False


def find_cached(hub: Path) -> list[tuple[str, Path]]:
    """(model.path, folder) of every model repo in the cache `hub` with a complete snapshot."""
    found: list[tuple[str, Path]] = []
    for repo in sorted(hub.glob("models--*")):
        snapshot = _cached_snapshot(repo)
        if snapshot is None:
            continue
        folder, by_ref = snapshot
        repo_id = repo.name[len("models--"):].replace("--", "/")
        # resolve_model_path takes "org/name" from the cache (refs/main); anything else is named by its folder.
        found.append((repo_id if by_ref and repo_id.count("/") == 1 else str(folder), folder))
    return found


def find_in_models_dir(cwd: Path) -> list[tuple[str, Path]]:
    """(model.path, folder) of every model folder in `cwd`/models, named relative to `cwd` ("models/x")."""
    root = cwd / "models"
    if not root.is_dir():
        return []
    return [(f"models/{p.name}", p) for p in sorted(root.iterdir())
            if p.is_dir() and not p.name.startswith(".") and is_model_folder(p)]


def describe_quantization(config: Mapping[str, Any]) -> str | None:
    """'4-bit, group 64' (with the mode when not affine, and the other widths of a mixed quantisation)."""
    quant = config.get("quantization") or config.get("quantization_config")
    if not isinstance(quant, Mapping):
        return None
    bits = quant.get("bits")
    if bits is None:  # a Hugging Face quantisation mlx-lm does not write (gptq, fp8, ...)
        return str(quant.get("quant_method") or "quantised")
    text = f"{bits}-bit"
    others = sorted({int(v["bits"]) for v in quant.values() if isinstance(v, Mapping) and "bits" in v} - {int(bits)})
    if others:
        text += f" (some layers {'/'.join(map(str, others))}-bit)"
    if quant.get("group_size"):
        text += f", group {quant['group_size']}"
    if quant.get("mode") not in (None, "affine"):
        text += f", {quant['mode']}"
    return text


def _module_bits(quant: Mapping[str, Any], module: str) -> int:
    override = quant.get(module)
    return int((override if isinstance(override, Mapping) else quant).get("bits") or 4)


def count_parameters(header: Mapping[str, Any], config: Mapping[str, Any]) -> int:
    """Parameters as mlx-lm's get_total_parameters counts the loaded model: a quantised weight (one with
    `.scales` beside it) as `words * 32 / bits`, its scales and biases not at all, every other tensor whole."""
    quant = config.get("quantization") or config.get("quantization_config") or {}
    count = 0
    for name, info in header.items():
        module, _, leaf = name.rpartition(".")
        quantized = f"{module}.scales" in header
        if quantized and leaf in ("scales", "biases"):
            continue
        numel = 1
        for d in info["shape"]:
            numel *= int(d)
        count += numel * 32 // _module_bits(quant, module) if quantized and leaf == "weight" else numel
    return count


def _dtype(header: Mapping[str, Any]) -> tuple[str, int]:
    """The float dtype holding most stored values, and its bytes per value (bf16 when there is none)."""
    elements: dict[str, int] = defaultdict(int)
    for info in header.values():
        if info.get("dtype") in _FLOATS:
            n = 1
            for d in info["shape"]:
                n *= int(d)
            elements[info["dtype"]] += n
    return _FLOATS[max(elements, key=lambda k: elements[k])] if elements else _FLOATS["BF16"]


def describe_folder(name: str, folder: Path, source: str) -> LocalModel:
    """Read one model folder's config.json and weight headers; a file that cannot be read becomes `error`."""
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        if not isinstance(config, dict):
            raise ValueError("not a JSON object")
        header: dict[str, Any] = {}
        for path in sorted(folder.glob(_WEIGHTS)):
            header.update(safetensors_header(path))
    except (OSError, ValueError) as exc:
        return LocalModel(name, folder, source, error=f"cannot read {folder / 'config.json'}: {exc}")
    except ConfigError as exc:
        return LocalModel(name, folder, source, error=exc.message)
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else {}
    dtype, value_bytes = _dtype(header)
    quantization = describe_quantization(config)
    if quantization is None and any(n.endswith(".scales") for n in header):
        quantization = "quantised"
    return LocalModel(name, folder, source, model_type=str(config.get("model_type") or text.get("model_type") or "?"),
                      params=count_parameters(header, config), quantization=quantization, dtype=dtype,
                      value_bytes=value_bytes)


def find_local_models(cwd: Path, env: Mapping[str, str] | None = None) -> list[LocalModel]:
    """Every mlx-lm model in the Hugging Face cache and in `cwd`/models, smallest first; unreadable ones last."""
    found = [describe_folder(name, folder, SOURCE_HF) for name, folder in find_cached(hf_hub_cache(env))]
    found += [describe_folder(name, folder, SOURCE_MODELS) for name, folder in find_in_models_dir(cwd)]
    return sorted(found, key=lambda m: (m.error is not None, m.params, m.name))


def trainable_bytes(model: LocalModel, estimate: MemoryEstimate) -> int:
    """Bytes of what trains, which is what DDP all-reduces every step: float32 adapters for LoRA/DoRA (DoRA's
    magnitude vectors counted at 4 bytes too), the weights' own dtype for a full fine-tune."""
    return estimate.trainable * (model.value_bytes if estimate.kind == "full" else ADAPTER_VALUE_BYTES)


def data_folder_problem(text: str, cwd: Path) -> str | None:
    """Why `text` (relative to `cwd`, `~` expanded) is not a fine-tune's data folder, or None when it is one."""
    if not text:
        return "give the folder that holds train.jsonl"
    folder = Path(text).expanduser()
    folder = folder if folder.is_absolute() else cwd / folder
    if not folder.is_dir():
        return f"{text} is not a folder" if folder.exists() else f"{text} does not exist"
    if not (folder / "train.jsonl").is_file():
        return (f"{text} has no train.jsonl: the data folder holds train.jsonl (and valid.jsonl), one JSON record "
                'a line: {"messages": [...]}, {"prompt": ..., "completion": ...} or {"text": ...}')
    return None
