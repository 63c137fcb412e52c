"""The wizard's questions for an mlx-lm fine-tune: which local model, which data folder, what trains."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from rich.console import Console
from rich.markup import escape

from distributed.errors import ConfigError
from launcher.jobs.api import SOURCE_ROOT
from launcher.models.localmodels import data_folder_problem, find_local_models, hf_hub_cache
from launcher.room.fit import fit_shortfall
from launcher.views.asker import Asker
from launcher.views.plan import FINETUNE_CONFIG, FINETUNE_KINDS, Machine, ModelChoice, finetune_choice, set_override
from launcher.views.wizard_view import finetune_title


def local_models(out: Console, cwd: Path, config_dir: Path, overrides: Sequence[str]) -> list[ModelChoice]:
    """The mlx-lm models in the Hugging Face cache and ./models, sized for a LoRA with FINETUNE_CONFIG."""
    template = config_dir / FINETUNE_CONFIG
    template = template if template.is_file() else SOURCE_ROOT / "configs" / FINETUNE_CONFIG
    hub = hf_hub_cache()
    with out.status(f"Looking for mlx-lm models in {hub} and ./models…"):
        local = [finetune_choice(m, template, overrides) for m in find_local_models(cwd)]
    out.print(f"mlx-lm models: {len(local)} in {hub} and ./models" if local else
              f"mlx-lm models: none in {hub} or ./models (`hf download mlx-community/"
              "Llama-3.2-1B-Instruct-4bit`, or a model folder in ./models, adds one)")
    return local


def too_big(c: ModelChoice, machines: list[Machine]) -> str | None:
    """Why a fine-tune cannot be offered: the launch refuses one that does not fit (launcher/room/fit.py)."""
    short = fit_shortfall(c.memory_per_rank, machines)
    return f"too big: {short.describe()}" if short else None


def choose_finetune(ask: Asker, out: Console, cwd: Path, overrides: Sequence[str], base: ModelChoice,
                    machines: list[Machine]) -> ModelChoice:
    """The data folder and what trains (lora, dora, full) for the mlx-lm model picked."""
    import questionary

    assert base.local is not None and base.config is not None
    data = ask_data_folder(ask, out, cwd, base.config.data.path)
    kinds = {kind: finetune_choice(base.local, base.path, overrides,
                                   (set_override("data.path", data), f"finetune.type={kind}"))
             for kind in FINETUNE_KINDS}

    def why_not(kind: str, c: ModelChoice) -> str | None:
        if kind == "full" and base.local and base.local.quantized:
            return "its weights are quantised: full fine-tuning needs an unquantised model"
        return c.error or too_big(c, machines)

    items = [questionary.Choice(finetune_title(k, c), value=k, disabled=why_not(k, c)) for k, c in kinds.items()]
    default = next((i for i in items if i.value == base.config.finetune.type and not i.disabled), items[0])
    return kinds[ask.select(f"Fine-tune {base.name} how?", items, default)]


def ask_data_folder(ask: Asker, out: Console, cwd: Path, default: str) -> str:
    while True:
        text = ask.text("Data folder (holding train.jsonl, and valid.jsonl if you have one)", default)
        problem = data_folder_problem(text, cwd)
        if problem is None:
            return text
        out.print(f"[red]{escape(problem)}[/]")
        if ask.assume_yes:
            raise ConfigError(problem, hint="answer the question in a terminal, or use macrun train with "
                                            "--set data.path=<folder>")
        default = text  # typed again with the mistake in view
