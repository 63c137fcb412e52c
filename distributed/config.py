"""The run configuration: YAML files and `--set key=value` overrides, loaded into validated dataclasses.

Precedence is command line > YAML > default. Unknown keys are errors that suggest the nearest valid
key; wrong types and out-of-range values name the key and what is allowed. Every field carries its
help text in `metadata["help"]`, which `macrun config --help-keys` and the docs print.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from distributed.config_file import LongNumber, load_yaml, read_config_file, show
from distributed.errors import ConfigError


def _f(default: Any, help: str, *, choices: tuple[Any, ...] | None = None,
       min: float | None = None, max: float | None = None, gt: float | None = None) -> Any:
    """A dataclass field with help text and the checks `validate` applies."""
    meta = {"help": help, "choices": choices, "min": min, "max": max, "gt": gt}
    return field(default=default, metadata=meta)


# Model sizes: (n_layer, n_head, n_embd). "gpt2-small" is GPT-2's 124M layout with a 256-byte vocabulary.
MODEL_SIZES: dict[str, tuple[int, int, int]] = {
    "tiny": (2, 2, 64),
    "mini": (4, 4, 128),
    "small": (6, 6, 384),
    "medium": (8, 8, 512),
    "gpt2-small": (12, 12, 768),
}


@dataclass(kw_only=True, slots=True)
class RunConfig:
    name: str = _f("quickstart", "Name of the run; checkpoints and logs go to <output_dir>/<name>.")
    output_dir: str = _f("runs", "Directory (on the master) that holds every run's folder.")
    seed: int = _f(0, "Seed for weight initialisation and data order.", min=0)


@dataclass(kw_only=True, slots=True)
class ModelConfig:
    source: str = _f("builtin", "Where the model comes from: builtin (macrun's byte-level GPT, sized by the keys "
                     "below) or mlx-lm (a pretrained Hugging Face-layout model at model.path, fine-tuned as "
                     "finetune.* says).", choices=("builtin", "mlx-lm"))
    path: str = _f("", "mlx-lm: a local model folder (config.json, *.safetensors, tokenizer files) or a Hugging "
                   "Face repo name already in this machine's cache, e.g. mlx-community/Llama-3.2-1B-Instruct-4bit. "
                   "Nothing is downloaded; every host needs the model at this path or in its own cache.")
    arch: str = _f("gpt", "Model architecture.", choices=("gpt",))
    size: str = _f("tiny", "Size preset; n_layer/n_head/n_embd override it.", choices=tuple(MODEL_SIZES))
    n_layer: int | None = _f(None, "Transformer blocks (default: from size).", min=1)
    n_head: int | None = _f(None, "Attention heads per block (default: from size).", min=1)
    n_embd: int | None = _f(None, "Embedding width; a multiple of n_head (default: from size).", min=1)
    activation: str = _f("gelu", "MLP activation: gelu (GPT-2) or relu2, squared ReLU (So et al. 2021, Primer), "
                         "which needs no exp/erf and so trains several times faster on a CPU.",
                         choices=("gelu", "relu2"))
    dropout: float = _f(0.0, "Dropout probability (0 keeps runs exactly reproducible).", min=0.0, max=0.9)

    def dims(self) -> tuple[int, int, int]:
        """The resolved (n_layer, n_head, n_embd)."""
        layer, head, embd = MODEL_SIZES[self.size]
        return (self.n_layer or layer, self.n_head or head, self.n_embd or embd)


@dataclass(kw_only=True, slots=True)
class DataConfig:
    source: str = _f("builtin:stdlib",
                     "A text file, a folder of text files, a .jsonl file with a 'text' field, or "
                     "'builtin:stdlib' (this Python's standard library source, no download needed).")
    max_bytes: int = _f(8_000_000, "Read at most this many bytes of the source (0 = all).", min=0)
    seq_len: int = _f(128, "Tokens per training sequence (built-in GPT: bytes, the vocabulary is 256 byte values; "
                      "mlx-lm: longer examples are cut to this).", min=8)
    val_share: float = _f(0.05, "Share of the data held out for validation.", gt=0.0, max=0.5)
    path: str = _f("", "mlx-lm: a folder with train.jsonl (and valid.jsonl for validation) in mlx-lm's formats: "
                   '{"text": ...}, {"messages": [...]} (chat) or {"prompt": ..., "completion": ...}.')
    format: str = _f("auto", "mlx-lm: the records' format; auto reads it off the first record like mlx-lm does.",
                     choices=("auto", "text", "chat", "completions"))
    mask_prompt: bool = _f(True, "mlx-lm: compute the loss on the completion only (the last assistant message of "
                           "a chat, the completion of a prompt/completion record); text records train on every "
                           "token.")


@dataclass(kw_only=True, slots=True)
class TrainConfig:
    steps: int = _f(1000, "Optimizer steps (per rank; each rank sees its own shard).", min=1)
    batch_size: int = _f(16, "Sequences per step on each rank.", min=1)
    lr: float = _f(3e-3, "Peak learning rate of AdamW.", gt=0.0, max=1.0)
    min_lr: float = _f(3e-4, "Learning rate at the end of the cosine decay.", min=0.0, max=1.0)
    warmup_steps: int = _f(50, "Steps of linear warm-up from 0 to lr.", min=0)
    weight_decay: float = _f(0.1, "AdamW decoupled weight decay.", min=0.0, max=1.0)
    beta1: float = _f(0.9, "AdamW beta1.", min=0.0, max=0.999999)
    beta2: float = _f(0.95, "AdamW beta2.", min=0.0, max=0.999999)
    grad_clip: float = _f(1.0, "Clip the global gradient norm to this (0 = no clipping).", min=0.0)
    eval_interval: int = _f(100, "Steps between validation-loss measurements (0 = only at the end).", min=0)
    eval_batches: int = _f(8, "Batches averaged for one validation loss.", min=1)
    checkpoint_interval: int = _f(500, "Steps between checkpoints (0 = only at the end).", min=0)
    keep_checkpoints: int = _f(3, "How many recent checkpoints to keep.", min=1)
    log_interval: int = _f(10, "Steps between progress lines.", min=1)


@dataclass(kw_only=True, slots=True)
class StrategyConfig:
    mode: str = _f("auto", "How ranks combine their work: per-step allreduce (ddp), DiLoCo, islands (DDP inside "
                   "each group of Macs cabled by Thunderbolt, DiLoCo between the groups over the network; "
                   "docs/islands.md), or auto (chosen from measured step time and link speed; islands when the "
                   "launcher found them and the network calls for DiLoCo).",
                   choices=("auto", "ddp", "diloco", "islands"))
    balance: str = _f("auto", "Several ranks: auto times a step on every rank at start and splits each "
                      "step's global batch (ranks × train.batch_size) in shares proportional to the measured "
                      "speeds, so a fast Mac does not wait for a slow one (equal shares when all are within 10%; "
                      "gradients are weighted by share, so training equals equal shares up to float rounding); "
                      "off keeps equal shares. DiLoCo balances alike (every rank takes H steps on its share, so "
                      "a round costs the slow Mac what it costs the fast one; pseudo-gradients are weighted by "
                      "tokens), except with strategy.overlap.", choices=("auto", "off"))
    inner_steps: int = _f(0, "DiLoCo: local AdamW steps between synchronisations (H); 0 = auto: the smallest H "
                          "in 10, 20, 50, 100, 200, 500 whose exchange, measured at start, stays under 10% of a "
                          "round's compute, at most train.steps/10 (distributed/costmodel.py; 100 where nothing can "
                          "be measured).", min=0)
    outer_lr: float = _f(0.0, "DiLoCo: outer learning rate; 0 = chosen by H and the number of rounds "
                         "(distributed/diloco.py, default_outer_step): Nesterov (0.3, momentum 0.9) when H >= 20 "
                         "and the run has >= 30 rounds, otherwise plain averaging (1.0, momentum 0): what won each "
                         "regime measured in benchmarks/diloco_vs_ddp.py. Set it (with outer_momentum) to fix it.",
                         min=0.0, max=10.0)
    outer_momentum: float = _f(0.9, "DiLoCo: outer momentum (Nesterov when strategy.nesterov), used when outer_lr "
                               "is set; the paper's is 0.9 with outer_lr 0.7.", min=0.0, max=0.999999)
    nesterov: bool = _f(True, "DiLoCo: use Nesterov momentum in the outer step.")
    exchange_dtype: str = _f("float32", "DiLoCo: wire format of the pseudo-gradient exchange; bytes per rank per "
                             "round at 4 ranks, P parameters: float32 6P, bfloat16/float16 3P, int8 1.52P, "
                             "int4 0.77P, int2 0.40P (int2 keeps error feedback). See distributed/compress.py.",
                             choices=("float32", "bfloat16", "float16", "int8", "int4", "int2"))
    overlap: bool = _f(False, "DiLoCo: send each round's pseudo-gradients while the next round's inner steps run "
                       "(hides the network time behind compute); the cost: each outer update arrives one round "
                       "late. See distributed/diloco_overlap.py.")
    backend: str = _f("auto", "Collective backend: auto (jaccl, RDMA over Thunderbolt 5, when every pair of Macs "
                      "has it, else the TCP ring), ring, jaccl (full mesh) or jaccl-ring (ring neighbours).",
                      choices=("auto", "ring", "jaccl", "jaccl-ring"))


@dataclass(kw_only=True, slots=True)
class FinetuneConfig:
    type: str = _f("lora", "mlx-lm: what trains: lora (low-rank adapters; on a quantised model this is QLoRA), "
                   "dora (weight-decomposed LoRA) or full (every weight of the last finetune.layers layers).",
                   choices=("lora", "dora", "full"))
    rank: int = _f(8, "mlx-lm: LoRA/DoRA rank r of the adapter matrices.", min=1)
    scale: float = _f(20.0, "mlx-lm: LoRA/DoRA scale (alpha/r in other tools; mlx-lm's lora_parameters.scale).",
                      gt=0.0)
    dropout: float = _f(0.0, "mlx-lm: dropout on the adapters' input (0 keeps runs exactly reproducible).",
                        min=0.0, max=0.9)
    layers: int = _f(16, "mlx-lm: how many of the last transformer layers get adapters (or train, for full); "
                     "-1: all of them.", min=-1)


@dataclass(kw_only=True, slots=True)
class FaultConfig:
    max_restarts: int = _f(3, "Restarts after a failure (a rank crashed, a host was lost, the run stuck) before "
                           "macrun gives up; each resumes from the last checkpoint on the hosts still there. "
                           "0: stop at the first failure.", min=0)
    min_hosts: int = _f(1, "Fewest hosts to go on with after losing some; below it the run stops, keeps its "
                        "checkpoint and prints the command that resumes.", min=1)
    heartbeat_timeout: float = _f(10.0, "Seconds without a heartbeat (sent every 2 s) before a rank's host "
                                  "counts as dead: frozen, asleep, partitioned.", gt=0.0)
    progress_timeout: float = _f(0.0, "Seconds without any rank finishing a step before the run counts as "
                                 "stuck (a collective that never completes). 0: max(60 s, 20 median steps). "
                                 "The first step of a run or restart, which compiles, always gets at least 60 s.",
                                 min=0.0)
    launcher_timeout: float = _f(30.0, "A rank that cannot reach the launcher for this long ends itself, so a "
                                 "partitioned Mac holds no job processes once it is back.", gt=0.0)
    rejoin: bool = _f(False, "Probe dropped hosts in the background and take one back at the next checkpoint "
                      "(otherwise only at the next restart).")
    min_battery: float = _f(20.0, "A Mac running on battery below this percentage is refused at preflight and "
                            "dropped during a run (0: never).", min=0.0, max=100.0)
    sync_checkpoints: bool = _f(True, "DiLoCo: checkpoint after every outer round, so a restart redoes at most "
                                "one round.")


@dataclass(kw_only=True, slots=True)
class Config:
    run: RunConfig = field(default_factory=RunConfig, metadata={"help": "Run identity and output."})
    model: ModelConfig = field(default_factory=ModelConfig, metadata={"help": "The model."})
    data: DataConfig = field(default_factory=DataConfig, metadata={"help": "The training data."})
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig,
                                     metadata={"help": "Fine-tuning an mlx-lm model: LoRA, DoRA or full."})
    train: TrainConfig = field(default_factory=TrainConfig, metadata={"help": "The training loop."})
    strategy: StrategyConfig = field(default_factory=StrategyConfig,
                                     metadata={"help": "How ranks cooperate."})
    fault: FaultConfig = field(default_factory=FaultConfig,
                               metadata={"help": "Surviving failures: restarts, timeouts, power."})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def run_dir(self) -> Path:
        return Path(self.run.output_dir) / self.run.name


# ---------------------------------------------------------------------------------------------
# Loading and validation

# Folder names may be 255 bytes; the run's name also carries suffixes ("-2", ".hosts.json") and sits in
# remote paths, so it stays well below that.
MAX_RUN_NAME_CHARS = 100
MAX_RUN_NAME_BYTES = 200
# The largest integer a config key takes: what fits a signed 64-bit integer (seeds, steps, sizes).
MAX_INT = 2**63 - 1


def _suggest(key: str, valid: list[str], prefix: str) -> str:
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    if close:
        return f"did you mean '{prefix}{close[0]}'?"
    return f"valid keys here: {', '.join(prefix + v for v in valid)}"


def _types_of(annotation: Any) -> tuple[type, ...]:
    """The concrete types a field annotation admits (`int | None` -> (int, NoneType))."""
    if isinstance(annotation, str):
        annotation = eval(annotation, vars(typing), {})  # annotations here are simple builtins
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        return tuple(typing.get_args(annotation))
    return (annotation,)


def _coerce(path: str, value: Any, annotation: Any) -> Any:
    allowed = _types_of(annotation)
    if value is None:
        if type(None) in allowed:
            return None
        raise ConfigError(f"{path}: a value is required")
    if isinstance(value, LongNumber) or (isinstance(value, int) and not isinstance(value, bool)
                                          and abs(value) > MAX_INT):
        size = repr(value) if isinstance(value, LongNumber) else f"a {value.bit_length():,}-bit number"
        raise ConfigError(f"{path}: {size} is too large", hint=f"numbers here are at most {MAX_INT:,}")
    for kind in allowed:
        if kind is bool:
            if isinstance(value, bool):
                return value
        elif kind is int:
            if isinstance(value, int) and not isinstance(value, bool):
                return value
            if isinstance(value, float) and value.is_integer():
                return int(value)
        elif kind is float:
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                return float(value)
            if isinstance(value, str):  # YAML 1.1 reads 3e-3 (no dot) as a string
                try:
                    return float(value)
                except ValueError:
                    pass
        elif kind is str:
            if isinstance(value, str):
                return value
    names = " or ".join("null" if k is type(None) else k.__name__ for k in allowed)
    raise ConfigError(f"{path}: expected {names}, got {type(value).__name__} {show(value)}")


def _check(path: str, value: Any, meta: typing.Mapping[str, Any]) -> None:
    choices = meta.get("choices")
    if choices and value not in choices:
        raise ConfigError(f"{path}: {show(value)} is not one of {', '.join(map(str, choices))}")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{path}: must be a finite number, got {value!r}")
        lo, hi, gt = meta.get("min"), meta.get("max"), meta.get("gt")
        if lo is not None and value < lo:
            raise ConfigError(f"{path}: must be >= {lo}, got {value!r}")
        if gt is not None and value <= gt:
            raise ConfigError(f"{path}: must be > {gt}, got {value!r}")
        if hi is not None and value > hi:
            raise ConfigError(f"{path}: must be <= {hi}, got {value!r}")


def _build(cls: type, data: Any, path: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{path or 'config'}: expected a mapping of keys, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        name = key if isinstance(key, str) else show(key)
        where = f"{path}.{name}" if path else name
        if key not in fields:
            prefix = f"{path}." if path else ""
            raise ConfigError(f"unknown key '{where}'", hint=_suggest(name, list(fields), prefix))
        f = fields[key]
        factory = f.default_factory
        if factory is not dataclasses.MISSING and dataclasses.is_dataclass(factory):
            kwargs[key] = _build(factory, value, where)  # type: ignore[arg-type]
        else:
            try:
                kwargs[key] = _coerce(where, value, f.type)
                _check(where, kwargs[key], f.metadata)
            except ConfigError as exc:
                exc.hint = exc.hint or f"{where}: {f.metadata.get('help', '')} (every key: macrun config keys)"
                raise
    return cls(**kwargs)


def _validate(cfg: Config) -> None:
    """Checks that involve several keys."""
    layer, head, embd = cfg.model.dims()
    if embd % head:
        raise ConfigError(f"model.n_embd ({embd}) must be a multiple of model.n_head ({head})")
    if (embd // head) % 2:
        raise ConfigError(f"model: head width n_embd/n_head = {embd // head} must be even")
    if cfg.finetune.layers == 0:
        raise ConfigError("finetune.layers: 0 layers would train nothing",
                          hint="give a number of last layers, or -1 for all of them")
    if cfg.train.min_lr > cfg.train.lr:
        raise ConfigError(f"train.min_lr ({cfg.train.min_lr}) must not exceed train.lr ({cfg.train.lr})")
    validate_run_name(cfg.run.name)


def validate_run_name(name: str, *, what: str = "run.name") -> str:
    """Check that `name` can be a run's folder (<output_dir>/<name> here, <workdir>/jobs/<name> on the hosts)
    and return it unchanged; `what` names where it came from in the error ("run.name", "--name").

    Refused: empty names, "." and "..", path separators (so no absolute or nested paths), a leading "-"
    (it reads as an option to the commands that handle the folder), spaces at either end, control and
    invisible format characters, and names over MAX_RUN_NAME_CHARS characters or MAX_RUN_NAME_BYTES bytes.
    """
    hint = "use letters, digits, '-', '_' and '.', e.g. quickstart-2"
    if not isinstance(name, str):
        raise ConfigError(f"{what}: expected a name, got {type(name).__name__} {show(name)}", hint=hint)
    problem = None
    if not name.strip():
        problem = "is empty"
    elif name in (".", ".."):
        problem = "names the current folder" if name == "." else "names the folder above"
    elif "/" in name or "\\" in name:
        problem = "must be a folder name, not a path (it contains a '/' or '\\')"
    elif any(unicodedata.category(c) in ("Cc", "Cf", "Cs") for c in name):
        bad = next(c for c in name if unicodedata.category(c) in ("Cc", "Cf", "Cs"))
        problem = f"contains the control character U+{ord(bad):04X}"
    elif name.startswith("-"):
        problem = "must not start with '-' (it would read as an option)"
    elif name != name.strip():
        problem = "starts or ends with a space"
    elif len(name) > MAX_RUN_NAME_CHARS:
        problem, hint = f"is {len(name):,} characters long; the most is {MAX_RUN_NAME_CHARS}", "choose a shorter name"
    elif len(name.encode("utf-8")) > MAX_RUN_NAME_BYTES:
        problem = f"takes {len(name.encode('utf-8'))} bytes as UTF-8; the most is {MAX_RUN_NAME_BYTES}"
        hint = "choose a shorter name"
    if problem:
        raise ConfigError(f"{what}: {show(name, 40)} {problem}", hint=hint)
    return name


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split `train.steps=200` into (['train', 'steps'], 200); the value is read as YAML."""
    if "=" not in text:
        raise ConfigError(f"override {show(text)} is not of the form section.key=value",
                          hint="for example: --set train.steps=200")
    key, _, raw = text.partition("=")
    parts = [p for p in key.strip().split(".")]
    if len(parts) != 2 or not all(parts):
        raise ConfigError(f"override {show(text)}: the key must be section.key, e.g. train.steps",
                          hint="for example: --set train.steps=200")
    try:
        value = load_yaml(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    except RecursionError:
        raise ConfigError(f"--set {key.strip()}: the value is nested too deeply to read",
                          hint="config values are single numbers, words or true/false, e.g. "
                               "--set train.steps=200") from None
    return parts, value


def config_from_dict(data: dict[str, Any], overrides: typing.Sequence[str] = ()) -> Config:
    """Build a validated Config from a plain mapping plus `section.key=value` overrides."""
    merged: dict[str, Any] = {k: (dict(v) if isinstance(v, dict) else v) for k, v in data.items()}
    for text in overrides:
        (section, key), value = parse_override(text)
        bucket = merged.setdefault(section, {})
        if not isinstance(bucket, dict):
            raise ConfigError(f"{section}: expected a mapping of keys")
        bucket[key] = value
    cfg = _build(Config, merged, "")
    _validate(cfg)
    return cfg


def load_config(path: str | Path | None, overrides: typing.Sequence[str] = ()) -> Config:
    """Load a YAML config (or the defaults when `path` is None) and apply overrides."""
    data: Any = read_config_file(Path(path)) if path is not None else {}
    try:
        return config_from_dict(data, overrides)
    except ConfigError as exc:
        if path is not None:
            exc.message = f"{path}: {exc.message}"
            exc.args = (exc.message,)
        raise


def describe_keys() -> list[tuple[str, str, Any]]:
    """(key, help, default) for every config key, for help output and docs."""
    rows = []
    for section in dataclasses.fields(Config):
        cls = section.default_factory  # type: ignore[misc]
        for f in dataclasses.fields(cls):  # type: ignore[arg-type]
            rows.append((f"{section.name}.{f.name}", f.metadata.get("help", ""), f.default))
    return rows
