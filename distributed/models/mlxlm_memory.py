"""How much memory one rank needs to fine-tune an mlx-lm model, worked out from its files without loading it.

Read before launch (launcher/room/fit.py compares it with every host's memory), so it touches neither MLX nor
mlx-lm: the weights' size is the `model*.safetensors` files' size (what mlx-lm loads, quantised or not),
and the shapes of what trains come from those files' headers (the first few KB of each):

    estimate = estimate_finetune_memory(model_dir, cfg)      # cfg.model.source == "mlx-lm"
    estimate.total                                           # bytes per rank

    weights      = sum of the model*.safetensors file sizes, as stored
    trainable    = LoRA: r*(in+out) per adapted linear layer of the last finetune.layers layers (DoRA: + out,
                   its magnitude vector; a mixture of experts: times the experts); full: every weight of
                   those layers. mlx-lm adapts every Linear of a layer (tuner/utils.py, linear_to_lora_layers)
    optimiser    = 16 bytes per trainable parameter: float32 copy, gradient and AdamW's two moments
    activations  = N * B*T * (10*h + 3*I + 2*a*T) * d  +  8 * B*T*V
                   over the N layers that train (backpropagation stops below the lowest), batch B, sequence
                   length T, hidden size h, intermediate size I, heads a, vocabulary V, d bytes per value
                   (the model's float dtype): per token per layer the block's input and normed input,
                   q, k, v, the attention output and projection (~10h), the MLP's gate, up and product
                   (3I) and the attention scores and probabilities (2aT); then the logits and their
                   gradient in float32. A rough cousin of Korthikanti et al. (2022), "Reducing Activation
                   Recomputation in Large Transformer Models"; MLX's temporaries are not counted.
"""

from __future__ import annotations

import json
import re
import struct
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from distributed.config import Config
from distributed.errors import ConfigError

OPTIMISER_BYTES = 16  # per trainable parameter: float32 weight, gradient, AdamW m and v
_LAYER = re.compile(r"^(.*?)layers\.(\d+)\.(.+)$")
_FLOAT_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2}
_MAX_HEADER = 100 << 20  # safetensors caps its header at 100 MB


@dataclass(frozen=True, slots=True)
class MemoryEstimate:
    """One rank's memory for a fine-tune, in parts, with the settings that drive it (for the error's hint)."""

    weights: int  # bytes of model*.safetensors
    trainable: int  # parameters that train
    activations: int  # bytes for one batch's forward and backward
    kind: str  # lora | dora | full
    layers: int  # layers that train or carry adapters
    quantized: bool
    batch_size: int
    seq_len: int

    @property
    def optimiser(self) -> int:
        return OPTIMISER_BYTES * self.trainable

    @property
    def total(self) -> int:
        return self.weights + self.optimiser + self.activations


def safetensors_header(path: Path) -> dict[str, Any]:
    """The JSON header of a .safetensors file: {tensor name: {"dtype", "shape", "data_offsets"}, ...}."""
    try:
        with path.open("rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            if size > _MAX_HEADER:
                raise ValueError(f"header of {size} bytes")
            header = json.loads(f.read(size))
    except (OSError, ValueError, struct.error) as exc:
        raise ConfigError(f"cannot read the weights file {path}: {exc}",
                          hint="check the model folder: download the model again") from None
    header.pop("__metadata__", None)
    return header


def _text_config(config: dict[str, Any]) -> dict[str, Any]:
    """Multimodal configs keep the language model's numbers under text_config."""
    inner = config.get("text_config")
    return {**config, **inner} if isinstance(inner, dict) else config


def _layer_tensors(header: dict[str, Any], n_layers: int | None) -> dict[int, dict[str, Any]]:
    """{layer index: {name within the layer: info}} of the transformer's layer list.

    A multimodal model has several lists (`vision_tower...layers.N`): take the one whose length is the
    config's num_hidden_layers, else the longest.
    """
    by_prefix: dict[str, dict[int, dict[str, Any]]] = defaultdict(lambda: defaultdict(dict))
    for name, info in header.items():
        match = _LAYER.match(name)
        if match:
            by_prefix[match.group(1)][int(match.group(2))][match.group(3)] = info
    if not by_prefix:
        return {}
    lists = sorted(by_prefix.values(), key=lambda layers: (len(layers) == n_layers, len(layers)))
    return dict(lists[-1])


def _bits(config: dict[str, Any], module: str) -> int:
    quant = config.get("quantization") or config.get("quantization_config") or {}
    override = next((v for k, v in quant.items() if isinstance(v, dict) and k.endswith(module)), {})
    return int(override.get("bits") or quant.get("bits") or 4)


def trainable_parameters(header: dict[str, Any], config: dict[str, Any], kind: str, layers: int, rank: int) -> int:
    """What trains in the last `layers` layers, counted from tensor shapes as mlx-lm would build it."""
    text = _text_config(config)
    per_layer = _layer_tensors(header, text.get("num_hidden_layers"))
    chosen = sorted(per_layer)[-layers:] if layers > 0 else []
    count = 0
    for index in chosen:
        tensors = per_layer[index]
        for name, info in tensors.items():
            shape = [int(d) for d in info["shape"]]
            if kind == "full":
                count += _numel(shape)
                continue
            module = name[: -len(".weight")] if name.endswith(".weight") else None
            if module is None or len(shape) not in (2, 3) or "embed" in module:
                continue
            *experts, out_dims, in_dims = shape
            if f"{module}.scales" in tensors:  # quantised: `in` packed into uint32 words
                in_dims = in_dims * 32 // _bits(config, f"layers.{index}.{module}")
            adapter = rank * (in_dims + out_dims) + (out_dims if kind == "dora" else 0)
            count += adapter * (experts[0] if experts else 1)
    return count


def _value_bytes(header: dict[str, Any]) -> int:
    """Bytes per activation value: the float dtype holding most of the weights' elements (2 if none)."""
    elements: dict[int, int] = defaultdict(int)
    for info in header.values():
        if info.get("dtype") in _FLOAT_BYTES:
            elements[_FLOAT_BYTES[info["dtype"]]] += _numel([int(d) for d in info["shape"]])
    return max(elements, key=lambda k: elements[k]) if elements else 2


def _numel(shape: list[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def estimate_finetune_memory(model_dir: Path, cfg: Config) -> MemoryEstimate:
    """The memory one rank needs to fine-tune the model in `model_dir` as `cfg` says (see the module docstring)."""
    files = sorted(Path(model_dir).glob("model*.safetensors"))
    if not files:
        raise ConfigError(f"{model_dir} holds no model*.safetensors", hint="download the model again")
    config = json.loads((Path(model_dir) / "config.json").read_text())
    header: dict[str, Any] = {}
    for path in files:
        header.update(safetensors_header(path))
    text = _text_config(config)
    n_layers = len(_layer_tensors(header, text.get("num_hidden_layers"))) or int(text.get("num_hidden_layers", 0))
    f, t = cfg.finetune, cfg.train
    layers = n_layers if f.layers == -1 else min(f.layers, n_layers)
    quantized = any(name.endswith(".scales") for name in header)
    trainable = trainable_parameters(header, config, f.type, layers, f.rank)
    h = int(text.get("hidden_size") or 0)
    inter = int(text.get("intermediate_size") or 4 * h)
    heads = int(text.get("num_attention_heads") or 1)
    vocab = int(text.get("vocab_size") or 0)
    value = _value_bytes(header)
    tokens = t.batch_size * cfg.data.seq_len
    activations = layers * tokens * (10 * h + 3 * inter + 2 * heads * cfg.data.seq_len) * value + 8 * tokens * vocab
    return MemoryEstimate(weights=sum(p.stat().st_size for p in files), trainable=trainable, activations=activations,
                          kind=f.type, layers=layers, quantized=quantized, batch_size=t.batch_size,
                          seq_len=cfg.data.seq_len)
