"""Will it fit: a run's memory per rank against each host's memory, for the wizard's models and for fine-tunes.

One check for both (`fit_shortfall`): the wizard warns with `fit_problem` when a built-in GPT may not fit the
machines picked; `macrun train` refuses an mlx-lm fine-tune with `require_finetune_fit` before anything is
copied or started, giving the estimate's parts and what to change.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from distributed.errors import ConfigError
from distributed.models.mlxlm_memory import MemoryEstimate

# MLX on a Mac lets the GPU use about 3/4 of unified memory by default (Metal's recommendedMaxWorkingSetSize);
# the rest belongs to macOS and other apps. A model whose estimate is above that share may not fit.
FIT_SHARE = 0.75


class FitError(ConfigError):
    """The run needs more memory per host than the host has (change the config: batch, length, model)."""


@dataclass(frozen=True, slots=True)
class Machine:
    """A machine as the memory check needs it."""

    name: str
    memory_bytes: int
    slots: int = 1


@dataclass(frozen=True, slots=True)
class Shortfall:
    """The tightest machine, what its ranks need together and what MLX may use there."""

    machine: Machine
    need: int
    budget: int

    def describe(self) -> str:
        m = self.machine
        per = f" ({m.slots} ranks)" if m.slots > 1 else ""
        return (f"needs about {format_bytes(self.need)} per Mac{per}, but {m.name} has {format_bytes(m.memory_bytes)}"
                f" (about {format_bytes(self.budget)} usable by MLX)")


def fit_shortfall(memory_per_rank: int, machines: Sequence[Machine]) -> Shortfall | None:
    """The machine (of those whose memory is known) where `memory_per_rank` times its ranks exceeds FIT_SHARE
    of its memory, the tightest one; None when the run fits everywhere."""
    known = [m for m in machines if m.memory_bytes > 0]
    if not known or memory_per_rank <= 0:
        return None
    tight = min(known, key=lambda m: m.memory_bytes / max(1, m.slots))
    need, budget = memory_per_rank * tight.slots, int(tight.memory_bytes * FIT_SHARE)
    return None if need <= budget else Shortfall(tight, need, budget)


def fit_problem(memory_per_rank: int, machines: Sequence[Machine]) -> str | None:
    """A warning when the model may not fit the tightest of `machines` (its ranks' share of memory), else None."""
    short = fit_shortfall(memory_per_rank, machines)
    if short is None:
        return None
    return f"{short.describe()}: lower train.batch_size or data.seq_len, or pick a smaller model"


def describe_estimate(e: MemoryEstimate) -> str:
    """'weights 1.2 GiB + 5.6M trainable x 16 B 90 MiB + activations (batch 4 x 2048 tokens) 2.1 GiB'."""
    return (f"weights {format_bytes(e.weights)} + {format_count(e.trainable)} trainable parameters with "
            f"gradients and AdamW {format_bytes(e.optimiser)} + activations for batch {e.batch_size} x "
            f"{e.seq_len} tokens {format_bytes(e.activations)}")


def require_finetune_fit(estimate: MemoryEstimate, machines: Sequence[Machine]) -> None:
    """Raise FitError when the fine-tune would not fit the tightest machine, with the estimate and the fixes."""
    short = fit_shortfall(estimate.total, machines)
    if short is None:
        return
    fixes = [f"lower train.batch_size ({estimate.batch_size}) or data.seq_len ({estimate.seq_len})",
             f"train fewer layers (finetune.layers={estimate.layers})"]
    if estimate.kind == "full":
        fixes.append("use finetune.type=lora")
    if not estimate.quantized:
        fixes.append("fine-tune a 4-bit model (QLoRA), e.g. an mlx-community/...-4bit one")
    raise FitError(f"the fine-tune {short.describe()}: per rank {describe_estimate(estimate)}",
                   hint="; ".join(fixes) + f", or run on Macs with more memory (MLX may use about "
                        f"{FIT_SHARE:.0%} of it)")


def format_bytes(n: int) -> str:
    """1536 -> '1.5 KiB'; whole units from GiB down, one decimal below 10."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" or value >= 10 else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def format_count(n: int) -> str:
    """123_456 -> '0.12M', 85_100_000 -> '85.1M', 1.3e9 -> '1.3B'."""
    if n >= 1_000_000_000:
        return f"{n / 1e9:.1f}B"
    return f"{n / 1e6:.2f}M" if n < 10_000_000 else f"{n / 1e6:.1f}M"
