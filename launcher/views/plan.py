"""What the wizard will do, worked out before anything happens: the models on offer and whether they fit,
the links and strategy, the run's name, the files it will write and the equivalent `macrun train` command.

Everything here is pure (or reads config files only) so it can be unit-tested; the one writer,
`write_atomic`, is called by the wizard after the user confirmed.
"""

from __future__ import annotations

import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from distributed.config import Config, ModelConfig, load_config
from distributed.errors import MacrunError
from distributed.models.gpt import VOCAB_SIZE, estimate_memory_bytes
from distributed.models.mlxlm_memory import MemoryEstimate, estimate_finetune_memory
from distributed.topology import RingPlan, plan_ring
from distributed.topology_islands import IslandPlan, plan_islands
from launcher.models.localmodels import LocalModel, trainable_bytes
from launcher.room.fit import FIT_SHARE, Machine, fit_problem, format_bytes, format_count  # noqa: F401  (re-exported)
from launcher.room.hosts import HostSpec, write_atomic  # noqa: F401  (re-exported for the wizard)
from launcher.room.preflight import HostFacts

PREFERRED_MODEL = "quickstart"
FINETUNE_CONFIG = "lora-chat.yaml"  # the config a local mlx-lm model is fine-tuned with, its defaults sizing it
FINETUNE_KINDS = {"lora": "LoRA", "dora": "DoRA", "full": "full fine-tune"}


@dataclass(frozen=True, slots=True)
class ModelChoice:
    """One config from configs/, with what it costs; `error` is set when it cannot be loaded."""

    name: str  # the file's stem: "quickstart"
    path: Path
    description: str  # the first comment line of the file
    config: Config | None
    params: int = 0
    memory_per_rank: int = 0  # bytes, estimate_memory_bytes (a fine-tune: estimate_finetune_memory)
    error: str | None = None
    sets: tuple[str, ...] = ()  # the --set overrides that make `path` this model: a fine-tune's model.path, ...
    local: LocalModel | None = None  # the mlx-lm model on this Mac that it fine-tunes
    estimate: MemoryEstimate | None = None  # that fine-tune's memory per rank, in parts

    @property
    def sync_bytes(self) -> int:
        """Bytes of what trains, which DDP all-reduces every step: float32 gradients of the GPT; a fine-tune's
        trainable parameters (LoRA: the adapters)."""
        if self.local is not None and self.estimate is not None:
            return trainable_bytes(self.local, self.estimate)
        return self.params * 4


# ---- models -------------------------------------------------------------------------------------------

def describe_config(text: str) -> str:
    """The first comment line of a YAML file ("# A small GPT ..." -> "A small GPT ..."), else ""."""
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("#"):
            body = stripped.lstrip("#").strip()
            if body:
                return body
        elif stripped:
            return ""  # the header comment ends at the first key
    return ""


def param_count(model_cfg: ModelConfig, block_size: int) -> int:
    """Parameters of the built-in GPT, counted from its shape (equal to gpt.count_params of the built model)."""
    n_layer, _n_head, n_embd = model_cfg.dims()
    return (VOCAB_SIZE * n_embd + block_size * n_embd  # token (tied with the output layer) and positions
            + n_layer * (12 * n_embd * n_embd + 4 * n_embd)  # attention, MLP and two LayerNorms per block
            + 2 * n_embd)  # the final LayerNorm


def load_model_choice(path: Path, overrides: Sequence[str] = ()) -> ModelChoice:
    """Read one config with `overrides` applied and work out its size; a bad file becomes `error`."""
    try:
        description = describe_config(path.read_text(encoding="utf-8"))
        cfg = load_config(path, overrides)
    except (OSError, UnicodeDecodeError) as exc:
        return ModelChoice(path.stem, path, "", None, error=f"cannot read {path}: {exc}")
    except MacrunError as exc:
        return ModelChoice(path.stem, path, "", None, error=f"cannot load: {exc.message}")
    if cfg.model.source != "builtin":  # sized by its pretrained model, which the wizard does not look at yet
        return ModelChoice(path.stem, path, description, cfg,
                           error=f"fine-tunes an mlx-lm model: macrun train configs/{path.name} --set model.path=...")
    return ModelChoice(path.stem, path, description, cfg, params=param_count(cfg.model, cfg.data.seq_len),
                       memory_per_rank=estimate_memory_bytes(cfg.model, cfg.data.seq_len, cfg.train.batch_size))


def set_override(key: str, value: str) -> str:
    """`key=value` for --set, the value single-quoted where YAML would not read it back as this string."""
    try:
        plain = yaml.safe_load(value) == value
    except yaml.YAMLError:
        plain = False
    return f"{key}={value}" if plain else f"{key}='" + value.replace("'", "''") + "'"


def finetune_choice(local: LocalModel, config_path: Path, overrides: Sequence[str] = (),
                    sets: Sequence[str] = ()) -> ModelChoice:
    """`local` fine-tuned with `config_path` (configs/lora-chat.yaml) plus `overrides` and the choice's own `sets`
    (model.path first, then e.g. finetune.type), sized with estimate_finetune_memory; a failure is `error`.

    A model with fewer layers than finetune.layers gets finetune.layers=-1 (all of them), which the estimate
    assumed already: loading it would fail otherwise."""
    all_sets = (set_override("model.path", local.name), *sets)
    description = " · ".join(filter(None, [local.quantization or local.dtype, local.model_type, local.source]))
    if local.error:
        return ModelChoice(local.name, config_path, description, None, error=local.error, sets=all_sets, local=local)
    try:
        cfg = load_config(config_path, [*overrides, *all_sets])
        estimate = estimate_finetune_memory(local.path, cfg)
        if cfg.finetune.layers > estimate.layers:  # fewer layers than the config's count: the launch would refuse
            all_sets += ("finetune.layers=-1",)
            cfg = load_config(config_path, [*overrides, *all_sets])
    except MacrunError as exc:
        return ModelChoice(local.name, config_path, description, None, error=exc.message, sets=all_sets, local=local)
    return ModelChoice(local.name, config_path, description, cfg, params=local.params, memory_per_rank=estimate.total,
                       sets=all_sets, local=local, estimate=estimate)


def list_models(config_dir: Path, overrides: Sequence[str] = ()) -> list[ModelChoice]:
    """Every *.yaml in `config_dir`, smallest model first; those that fail to load come last."""
    choices = [load_model_choice(p, overrides) for p in sorted(config_dir.glob("*.yaml"))]
    return sorted(choices, key=lambda c: (c.error is not None, c.params, c.name))


def default_model(choices: Sequence[ModelChoice]) -> ModelChoice | None:
    """The quickstart when it is there, else the smallest model that loads."""
    usable = [c for c in choices if c.error is None]
    return next((c for c in usable if c.name == PREFERRED_MODEL), usable[0] if usable else None)


def find_config_dir(cwd: Path, source_root: Path) -> Path:
    """./configs when there is one, else the configs shipped beside macrun's source."""
    local = cwd / "configs"
    return local if local.is_dir() else source_root / "configs"


# ---- links and strategy ---------------------------------------------------------------------------------

def plan_links(hosts: Sequence[HostSpec], facts: Mapping[str, HostFacts], mode: str = "auto") -> RingPlan:
    """Where the ring will run, worked out exactly as the launch will (distributed.topology.plan_ring).

    Raises HostError when `mode` is "thunderbolt" and some pair of neighbours has no cable.
    """
    from launcher.jobs.remote import ring_host  # the launch's own view of a host, so plan and launch agree

    return plan_ring([ring_host(h, facts[h.name], h.ips[0] if h.ips else h.hostname) for h in hosts], mode)


def plan_islands_for(hosts: Sequence[HostSpec], facts: Mapping[str, HostFacts], mode: str,
                     ring: RingPlan) -> IslandPlan | None:
    """The Thunderbolt islands the launch will offer the ranks (launcher.jobs.remote._plan_islands), or None."""
    from launcher.jobs.remote import ring_host

    if mode != "auto" or ring.link != "network":
        return None
    return plan_islands([ring_host(h, facts[h.name], h.ips[0] if h.ips else h.hostname) for h in hosts])


def describe_links(ring: RingPlan, islands: IslandPlan | None = None) -> str:
    """The ring in one line, with why it runs over that link (and the islands, when there are some)."""
    if len(ring.rank_hosts) == 1:
        return "none needed (one rank)"
    line = f"{ring.describe()} ({ring.reason})" if ring.link == "thunderbolt" else ring.describe()
    return line + (f"; {islands.describe()}" if islands is not None else "")


def every_h(cfg: Config) -> str:
    """DiLoCo's H as the plan shows it: strategy.inner_steps, or for 0 (auto) the rule the ranks apply at start."""
    h = cfg.strategy.inner_steps
    return f"{h} steps" if h else "H steps (H chosen at start: the exchange under 10% of a round's compute)"


def describe_strategy(cfg: Config, world_size: int, link: str, islands: bool = False) -> tuple[str, str]:
    """The strategy to expect and why. In auto mode the ranks decide at start from measured numbers
    (distributed.worker.decide_auto: link probe + timed step → distributed.costmodel); this is the likely outcome.
    `islands`: the launch will offer Thunderbolt islands (plan_islands_for)."""
    if world_size <= 1:
        return "local", "one rank: nothing to exchange"
    mode = cfg.strategy.mode
    if islands and mode in ("auto", "islands"):
        return "islands", (f"{'auto: usual here' if mode == 'auto' else 'strategy.mode=islands'}: gradients averaged "
                           f"every step over the cables inside each island, islands averaging their progress every "
                           f"{every_h(cfg)} over the network")
    if mode == "islands":
        return ("ddp", "strategy.mode=islands, but no islands: all cabled, so DDP") if link == "thunderbolt" else \
            ("diloco", f"strategy.mode=islands, but no islands: every Mac its own DiLoCo worker, every {every_h(cfg)}")
    if mode == "auto":
        measured = "decided when the ranks start, from the measured link speed and step time"
        if link == "network":
            return "diloco", (f"auto: {measured}; over the network DiLoCo is usual, ranks averaging their "
                              f"progress every {every_h(cfg)}")
        return "ddp", f"auto: {measured}; over {link} a per-step allreduce of the gradients is usual"
    if mode == "diloco":
        return "diloco", f"strategy.mode=diloco: ranks average their progress every {every_h(cfg)}"
    return "ddp", "strategy.mode=ddp: gradients averaged every step"


# ---- the plan ---------------------------------------------------------------------------------------------

def pick_run_name(base: str, output_dir: Path) -> str:
    """`base`, or `base-2`, `base-3`, ... : the first name no earlier run or wizard file uses."""
    name, n = base, 2
    while any(p.exists() for p in (output_dir / name, output_dir / f"{name}.yaml",
                                   output_dir / f"{name}.hosts.json")):
        name, n = f"{base}-{n}", n + 1
    return name


def launch_order(existing: Sequence[str], selected: Sequence[HostSpec]) -> list[HostSpec]:
    """The selection in the order the merged hosts file will list it: file entries first, then new ones.

    Ranks are numbered in file order, so this keeps `macrun train --hosts FILE` equivalent to the launch.
    """
    by_name = {s.name.lower(): s for s in selected}
    first = [by_name[n.lower()] for n in existing if n.lower() in by_name]
    seen = {s.name.lower() for s in first}
    return first + [s for s in selected if s.name.lower() not in seen]


@dataclass(frozen=True, slots=True)
class WizardPlan:
    """Everything the wizard will do on "launch"."""

    hosts: list[HostSpec]  # the machines, in hosts-file order (the ring may start the others in another order)
    ring: RingPlan
    model: ModelChoice
    config: Config  # the model's config with the run's name
    source_config: Path
    overrides: tuple[str, ...]
    hosts_file: Path  # machines are merged into it (never dropping an entry)
    run_config: Path  # the run's config: <output_dir>/<name>.yaml
    run_hosts_file: Path | None  # exactly the selection, when hosts_file lists other machines too
    kept_entries: int  # entries of hosts_file that stay as they were
    link_mode: str = "auto"  # --link: auto | thunderbolt | network
    warnings: list[str] = field(default_factory=list)
    push_model: bool = False  # --push-model: copy an mlx-lm model to the hosts that lack it
    islands: IslandPlan | None = None  # Thunderbolt islands the launch will offer (plan_islands_for)

    @property
    def world_size(self) -> int:
        return sum(h.slots for h in self.hosts)

    @property
    def launch_hosts_file(self) -> Path:
        return self.run_hosts_file or self.hosts_file

    def command(self, cwd: Path) -> str:
        """The `macrun train` command that does the same launch again."""
        link = ["--link", self.link_mode] if self.link_mode != "auto" else []
        push = ["--push-model"] if self.push_model else []
        return shlex.join(["macrun", "train", "--hosts", _relative(self.launch_hosts_file, cwd), *link, *push,
                           _relative(self.run_config, cwd)])


def _relative(path: Path, cwd: Path) -> str:
    try:
        return str(path.resolve().relative_to(cwd.resolve()))
    except ValueError:
        return str(path)


def describe_traffic(cfg: Config, strategy: str, params: int, world_size: int, grad_bytes: int | None = None) -> str:
    """What each rank sends per synchronisation and over the whole run, for the strategy expected.

    `params` are the values that travel (a fine-tune's trainable ones), `grad_bytes` their gradients' bytes
    (default: float32, 4 per value)."""
    from distributed.compress import ring_bytes, wire_bytes

    if world_size <= 1 or strategy == "local":
        return "none: one rank"
    steps, h = cfg.train.steps, cfg.strategy.inner_steps
    if strategy == "islands":
        return (f"each island's Macs send {format_bytes(params * 4)} of gradients or less over their cables per "
                f"step; only the islands' leaders use the network, once a DiLoCo round ({cfg.strategy.exchange_dtype}, "
                f"every {every_h(cfg)})")
    if strategy == "diloco":
        per_sync = wire_bytes(params, world_size, cfg.strategy.exchange_dtype)
        if not h:  # auto: H, and so the number of rounds, is known once the ranks have measured
            return (f"each rank sends {format_bytes(per_sync)} per DiLoCo round ({cfg.strategy.exchange_dtype}, "
                    f"every {every_h(cfg)})")
        rounds = -(-steps // h)
        return (f"each rank sends {format_bytes(per_sync)} per DiLoCo round ({cfg.strategy.exchange_dtype}, every "
                f"{h} steps): {format_bytes(per_sync * rounds)} over {rounds} rounds")
    per_step = ring_bytes(params * 4 if grad_bytes is None else grad_bytes, world_size)
    return (f"each rank sends {format_bytes(per_step)} of gradients per step: "
            f"{format_bytes(per_step * steps)} over {steps:,} steps")


def plan_rows(plan: WizardPlan, cwd: Path) -> list[tuple[str, str]]:
    """The plan as (label, text) rows, in the order a person reads it."""
    cfg, t = plan.config, plan.config.train
    machines = ", ".join(f"{h.name} ({h.hostname}" + (f", {h.slots} ranks" if h.slots > 1 else "") + ")"
                         for h in plan.hosts)
    strategy, why = describe_strategy(cfg, plan.world_size, plan.ring.link, plan.islands is not None)
    tokens = t.steps * t.batch_size * cfg.data.seq_len * plan.world_size
    ckpt = (f"every {t.checkpoint_interval} steps" if 0 < t.checkpoint_interval < t.steps
            else f"at the end (step {t.steps})")
    rank0 = plan.hosts[0].name if plan.hosts else "?"
    written = [f"{_relative(plan.hosts_file, cwd)} (adds/updates {len(plan.hosts)}, keeps {plan.kept_entries})",
               _relative(plan.run_config, cwd)]
    if plan.run_hosts_file:
        written.append(f"{_relative(plan.run_hosts_file, cwd)} (just these machines)")
    if plan.model.local is not None and plan.model.estimate is not None:
        rows = _finetune_rows(plan, cwd, strategy, why, ckpt, rank0)
    else:
        rows = [
            ("model", f"{plan.model.name}: {cfg.model.size} GPT, {format_count(plan.model.params)} parameters, "
                      f"about {format_bytes(plan.model.memory_per_rank)} per rank"),
            ("strategy", f"{strategy} ({why})"),
            ("traffic", describe_traffic(cfg, strategy, plan.model.params, plan.world_size)),
            ("steps", f"{t.steps:,} steps × {plan.world_size} rank{'s' if plan.world_size != 1 else ''} × "
                      f"{t.batch_size} sequences × {cfg.data.seq_len} tokens = {tokens:,} tokens; "
                      "the run prints its ETA as it goes"),
            ("data", f"{cfg.data.source}" + (f" (first {cfg.data.max_bytes:,} bytes)" if cfg.data.max_bytes else "")),
            ("checkpoints", f"{ckpt}, on {rank0}, copied back to "
                            f"{_relative(Path(cfg.run.output_dir) / cfg.run.name / 'checkpoints', cwd)}"),
        ]
    rows = [
        ("machines", f"{machines} → {plan.world_size} rank{'s' if plan.world_size != 1 else ''}; "
                     f"rank 0 on {rank0}"),
        ("links", describe_links(plan.ring, plan.islands)),
        *rows,
        ("writes", "; ".join(written)),
        ("command", plan.command(cwd)),
    ]
    rows += [("warning", w) for w in plan.warnings]
    return rows


def _finetune_rows(plan: WizardPlan, cwd: Path, strategy: str, why: str, ckpt: str,
                   rank0: str) -> list[tuple[str, str]]:
    """The model..checkpoints rows of an mlx-lm fine-tune: what trains, what travels, where the adapters go."""
    cfg, t, m = plan.config, plan.config.train, plan.model
    assert m.local is not None and m.estimate is not None
    e, kind = m.estimate, FINETUNE_KINDS.get(plan.config.finetune.type, plan.config.finetune.type)
    rank = "" if e.kind == "full" else f" (rank {cfg.finetune.rank})"
    what = f"{kind}{rank} {'of' if e.kind == 'full' else 'on'} the last {e.layers} layers"
    stored = m.local.quantization or m.local.dtype
    run_dir = Path(cfg.run.output_dir) / cfg.run.name
    export = run_dir / ("model" if e.kind == "full" else "adapters")
    trains = "the trained layers" if e.kind == "full" else "the adapters"
    result = "the fine-tuned model" if e.kind == "full" else "the adapters"
    pushed = [("model files", "each Mac's copy is compared with this Mac's (sizes and SHA-256) before any rank "
                              "starts; what is missing or different is copied from here (--push-model)")]
    return [
        ("model", f"{m.name} (mlx-lm {m.local.model_type}, {format_count(m.params)} parameters, {stored}): {what}, "
                  f"{format_count(e.trainable)} trainable; about {format_bytes(m.memory_per_rank)} per rank "
                  f"(weights {format_bytes(e.weights)}, optimiser {format_bytes(e.optimiser)}, activations "
                  f"{format_bytes(e.activations)})"),
        *(pushed if plan.push_model else []),
        ("strategy", f"{strategy} ({why})"),
        ("traffic", f"{trains} travel: {format_count(e.trainable)} values, {format_bytes(m.sync_bytes)} per sync; "
                    + describe_traffic(cfg, strategy, e.trainable, plan.world_size, m.sync_bytes)),
        ("steps", f"{t.steps:,} steps × {plan.world_size} rank{'s' if plan.world_size != 1 else ''} × "
                  f"{t.batch_size} examples of up to {cfg.data.seq_len} tokens; the run prints its ETA as it goes"),
        ("data", f"{cfg.data.path} (train.jsonl, format {cfg.data.format}), tokenised once on this Mac"),
        ("checkpoints", f"{ckpt}, on {rank0}, copied back to {_relative(run_dir / 'checkpoints', cwd)}; "
                        f"{result} in mlx-lm's files: {_relative(export, cwd)}"),
    ]


def run_config_text(plan: WizardPlan, cwd: Path) -> str:
    """The run's YAML: the resolved config, headed by where it came from and how to run it again."""
    sets = " ".join(f"--set {shlex.quote(o)}" for o in plan.overrides)
    header = [
        f"# Run {plan.config.run.name}: written by wizard.py from {_relative(plan.source_config, cwd)}"
        + (f" {sets}" if sets else ""),
        f"#   {plan.command(cwd)}",
        "# Running it again needs --resume (continue) or --set run.name=<new name>.",
    ]
    return "\n".join(header) + "\n" + yaml.safe_dump(plan.config.to_dict(), sort_keys=False)


