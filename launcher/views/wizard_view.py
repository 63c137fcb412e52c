"""How the wizard shows what it found: the machines table and the one-line titles of its choices."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from rich.markup import escape
from rich.table import Table

from launcher.models.macmodels import describe_mac, mac_model_name
from launcher.room.discovery import Candidate
from launcher.views.plan import ModelChoice, format_bytes, format_count


def shown_path(path: Path, cwd: Path) -> str:
    """`path` relative to `cwd` when it is below it (shorter to read), else as it is."""
    try:
        return str(path.relative_to(cwd))
    except ValueError:
        return str(path)


def _where(c: Candidate) -> str:
    return c.address if c.port == 22 else f"{c.address}:{c.port}"


def candidate_title(c: Candidate) -> str:
    """One checkbox line: name, address, model ("Mac mini (M4, 2024)"), where it was found."""
    model = mac_model_name(c.model) or ""
    return f"{c.name:<16} {_where(c):<21} {model:<16} {c.source}" + (f"  ({c.note})" if c.note else "")


def candidates_table(candidates: Sequence[Candidate]) -> Table:
    """Every machine found, with its address, model (name and identifier) and source (hosts.json, mDNS or both)."""
    table = Table(title="machines found", title_justify="left")
    for col in ("name", "address", "model", "source"):
        table.add_column(col)
    for c in candidates:
        table.add_row(escape(c.name), escape(_where(c)), escape(describe_mac(c.model) or "-"),
                      escape(c.source + (f" — {c.note}" if c.note else "")))
    return table


def model_title(c: ModelChoice, problem: str | None, width: int = 12) -> str:
    """One menu line: name (padded to `width`), parameters, memory per rank, description, and a mark when it
    may not fit."""
    if c.error:
        return f"{c.name:<{width}} {c.description}"
    mark = "  ⚠ may not fit" if problem else ""
    return (f"{c.name:<{width}} {format_count(c.params):>7} params  {format_bytes(c.memory_per_rank):>9}/rank  "
            f"{c.description}{mark}")


def finetune_title(kind: str, c: ModelChoice) -> str:
    """One line of the fine-tune question: the kind, what trains and the memory per rank."""
    if c.estimate is None:
        return f"{kind:<5} {c.error or ''}"
    e = c.estimate
    return (f"{kind:<5} {format_count(e.trainable):>7} trainable ({format_bytes(c.sync_bytes)} per sync)  "
            f"{format_bytes(c.memory_per_rank):>9}/rank")
