"""Pretrained mlx-lm models for fine-tuning: found without downloading, adapted with mlx-lm's LoRA/DoRA, saved its way.

Everything model-specific is mlx-lm's own code: `mlx_lm.utils.load_model` builds the architecture (Llama,
Qwen, Mistral, Gemma, Phi, ... in Hugging Face layout, quantised or not), `linear_to_lora_layers` adds the
adapters (on a quantised model that is QLoRA: LoRA beside frozen 4-bit weights), and the results are
written in the files mlx-lm reads back:

    ft = load_finetune(cfg)                  # cfg.model.source == "mlx-lm"
    write_adapters(run_dir / "adapters", adapter_weights, adapter_config(ft, cfg))
    mlx_lm.generate --model PATH --adapter-path runs/<name>/adapters --prompt "..."
    mlx_lm.fuse --model PATH --adapter-path runs/<name>/adapters

A model is a local folder or a repo name already in this machine's Hugging Face cache; nothing is fetched.
On a host the launcher may name the folder to load instead (env MACRUN_MODEL_DIR: where that host holds the
same files, found or pushed by launcher/models/modelpush.py); `model.path` still names the model in checkpoints.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from distributed.config import Config
from distributed.env import MODEL_DIR_VAR
from distributed.errors import ConfigError

ADAPTER_FILE = "adapters.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
# The files mlx-lm's `load` fetches (mlx_lm.utils.DEFAULT_ALLOW_PATTERNS, copied: importing mlx_lm takes
# seconds, and a repo that is not cached should be reported at once). A cached snapshot must hold them.
MODEL_FILES = ["*.json", "model*.safetensors", "*.py", "tokenizer.model", "*.tiktoken", "tiktoken.model", "*.txt",
               "*.jsonl", "*.jinja"]
_PATH_HINT = ("set model.path to a local mlx-lm model folder or a Hugging Face repo in this machine's cache, "
              "e.g. --set model.path=mlx-community/Llama-3.2-1B-Instruct-4bit")


def require_mlx_lm() -> None:
    """Raise a ConfigError naming the fix when this Python lacks mlx-lm (a host set up for the built-in GPT)."""
    try:
        import mlx_lm  # noqa: F401
    except ImportError as exc:
        raise ConfigError(f"model.source=mlx-lm needs the mlx-lm package, and this Python cannot import it ({exc})",
                          hint="install it where macrun runs, on every host too: pip install mlx-lm") from None


def resolve_model_path(name: str) -> Path:
    """The local folder of `name`: a folder (with config.json), or a repo name found in the Hugging Face cache.

    Never downloads: a repo that is not cached is a ConfigError saying how to get it.
    """
    if not name:
        raise ConfigError("model.path is not set: model.source=mlx-lm needs the model to fine-tune", hint=_PATH_HINT)
    local = Path(name).expanduser()
    if local.exists():
        if not (local / "config.json").is_file():
            raise ConfigError(f"model.path {local} is not a model folder (it has no config.json)",
                              hint="point model.path at the folder that holds config.json, *.safetensors and "
                                   "the tokenizer files")
        return local
    if name.startswith(("/", ".", "~")) or name.count("/") != 1:
        raise ConfigError(f"model.path {name} does not exist", hint=_PATH_HINT)
    from huggingface_hub import snapshot_download

    try:
        found = Path(snapshot_download(name, local_files_only=True, allow_patterns=MODEL_FILES))
    except Exception:  # not cached (LocalEntryNotFoundError), or not a valid repo id (HFValidationError)
        raise ConfigError(f"model {name} is neither a local folder nor in this machine's Hugging Face cache "
                          "(macrun never downloads)",
                          hint=f"download it once, e.g. `hf download {name}` or `mlx_lm.generate --model {name} "
                               "--prompt hi`, or set model.path to a local folder") from None
    if not (found / "config.json").is_file() or not any(found.glob("model*.safetensors")):
        raise ConfigError(f"model {name} is only partly in the Hugging Face cache ({found})",
                          hint=f"download it again, e.g. `hf download {name}`")
    return found


def model_dir(name: str) -> Path:
    """The folder this rank loads `name` from: the one the launcher found on this host (MACRUN_MODEL_DIR),
    else `resolve_model_path(name)`."""
    given = os.environ.get(MODEL_DIR_VAR)
    if not given:
        return resolve_model_path(name)
    folder = Path(given)
    if not (folder / "config.json").is_file():
        raise ConfigError(f"{MODEL_DIR_VAR}={given} is not a model folder (it has no config.json)",
                          hint="launch again: macrun checks each host's model before starting the ranks")
    return folder


def config_sha256(path: Path) -> str:
    """sha256 of the model's config.json: names the base model in checkpoints and adapter configs."""
    return hashlib.sha256((path / "config.json").read_bytes()).hexdigest()


def _is_quantized(model: nn.Module) -> bool:
    return any(isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding)) for _, m in model.named_modules())


@dataclass
class FineTune:
    """A loaded base model with its trainable part set up as `cfg.finetune` says."""

    model: nn.Module
    path: Path  # the resolved local folder
    config: dict[str, Any]  # the model's config, as mlx-lm read it
    kind: str  # lora | dora | full
    layers: int  # how many of the last layers have adapters (lora/dora) or train (full)
    quantized: bool

    @property
    def trainable_count(self) -> int:
        return sum(v.size for _, v in tree_flatten(self.model.trainable_parameters()))

    @property
    def total_count(self) -> int:
        from mlx_lm.utils import get_total_parameters

        return int(get_total_parameters(self.model))


def load_finetune(cfg: Config) -> FineTune:
    """Load `cfg.model.path` with mlx-lm, freeze it and add what trains (adapters seeded by run.seed)."""
    require_mlx_lm()
    from mlx_lm.tuner.utils import linear_to_lora_layers
    from mlx_lm.utils import load_model

    path = model_dir(cfg.model.path)
    f = cfg.finetune
    try:
        model, config = load_model(path)
    except (ValueError, FileNotFoundError, KeyError) as exc:
        raise ConfigError(f"mlx-lm cannot load {path}: {exc}",
                          hint="check that it is an mlx-lm model (config.json with a model_type mlx-lm supports, "
                               "model*.safetensors); update mlx-lm for newer architectures") from None
    if not hasattr(model, "layers"):
        raise ConfigError(f"{path}: this model type ({config.get('model_type')}) has no layer list to fine-tune")
    n = len(model.layers)
    layers = n if f.layers == -1 else f.layers
    if layers > n:
        raise ConfigError(f"finetune.layers is {f.layers} but {path} has {n} layers",
                          hint=f"use at most {n}, or -1 for all of them")
    quantized = _is_quantized(model)
    model.freeze()
    if f.type == "full":
        if quantized:
            raise ConfigError(f"finetune.type=full cannot train {path}: its weights are quantised",
                              hint="use finetune.type=lora (QLoRA) or dora, or an unquantised model")
        for layer in model.layers[-layers:]:
            layer.unfreeze()
    else:
        mx.random.seed(cfg.run.seed)  # the adapters' initial weights depend on the seed alone
        try:
            linear_to_lora_layers(model, layers, lora_parameters(cfg), use_dora=f.type == "dora")
        except ValueError as exc:
            raise ConfigError(f"finetune.type={f.type} on {path}: {exc}", hint="try finetune.type=lora") from None
    mx.eval(model.parameters())
    return FineTune(model=model, path=path, config=config, kind=f.type, layers=layers, quantized=quantized)


def lora_parameters(cfg: Config) -> dict[str, Any]:
    f = cfg.finetune
    return {"rank": f.rank, "scale": f.scale, "dropout": f.dropout}


def loss_fn(model: nn.Module, inputs: mx.array, targets: mx.array, mask: mx.array,
            scale: mx.array) -> tuple[mx.array, mx.array]:
    """(objective, mean): the masked cross-entropy summed and times `scale`, which the gradient follows, and
    its mean over this batch's loss tokens, which is printed.

    `scale` is 1/(loss tokens of this step on every rank) x world size under DDP, so that averaging the
    ranks' gradients gives exactly the gradient of the global batch's token mean; 1/(this rank's loss
    tokens) otherwise. mlx-lm's own loss is the local token mean (tuner/trainer.py, default_loss).
    """
    logits = model(inputs)
    ce = nn.losses.cross_entropy(logits, targets).astype(mx.float32) * mask
    total = ce.sum()
    return total * scale, total / mx.maximum(mask.sum(), 1.0)


def adapter_config(ft: FineTune, cfg: Config) -> dict[str, Any]:
    """adapter_config.json as `mlx_lm lora` writes it (the keys its load_adapters and fuse read), plus provenance."""
    from distributed import __version__

    return {"fine_tune_type": ft.kind, "num_layers": ft.layers,
            "lora_parameters": None if ft.kind == "full" else lora_parameters(cfg),
            "model": cfg.model.path, "base_model_config_sha256": config_sha256(ft.path),
            "data": cfg.data.path, "max_seq_length": cfg.data.seq_len, "mask_prompt": cfg.data.mask_prompt,
            "seed": cfg.run.seed, "iters": cfg.train.steps, "batch_size": cfg.train.batch_size,
            "learning_rate": cfg.train.lr, "trained_with": f"macrun {__version__}"}


def _replace_file(path: Path, write: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}{path.suffix}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_adapters(out_dir: Path, weights: dict[str, mx.array], config: dict[str, Any]) -> Path:
    """Write `adapters.safetensors` and `adapter_config.json` into `out_dir`, each file replaced atomically."""
    out_dir.mkdir(parents=True, exist_ok=True)
    _replace_file(out_dir / ADAPTER_FILE, lambda p: mx.save_safetensors(str(p), weights, metadata={"format": "mlx"}))
    text = json.dumps(config, indent=2, sort_keys=True) + "\n"
    _replace_file(out_dir / ADAPTER_CONFIG, lambda p: p.write_text(text))
    return out_dir


def write_model(out_dir: Path, ft: FineTune) -> Path:
    """A full fine-tune as a model folder mlx-lm loads (weights, config.json, tokenizer files), via mlx-lm's
    own `save`; written beside `out_dir` and swapped in, so a reader never sees half a model."""
    from mlx_lm.utils import load_tokenizer, save

    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tokenizer = load_tokenizer(ft.path, eos_token_ids=ft.config.get("eos_token_id"))
    save(tmp, ft.path, ft.model, tokenizer, dict(ft.config), donate_model=False)
    if out_dir.exists():
        os.rename(out_dir, old)
    os.rename(tmp, out_dir)
    shutil.rmtree(old, ignore_errors=True)
    return out_dir
