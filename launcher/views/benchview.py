"""How `macrun benchmark` shows its figures: live progress, the tables, the comparison of two runs, the plot.

Everything here reads the report built by launcher/benchmark.py (plain JSON-ready dicts), so a saved result
file renders exactly like a fresh run.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from rich.console import Console, RenderableType
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn
from rich.table import Table

from distributed.errors import UsageError

# ---- rendering ----------------------------------------------------------------------------------------------


def format_size(n: float) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:g} {unit}"
    return f"{n:g} B"


def format_rate(bytes_s: float | None) -> str:
    """Bytes/s as bits/s, the way links are sold: '198 Mbit/s', '9.41 Gbit/s'."""
    if not bytes_s:
        return "-"
    bits = bytes_s * 8
    for unit, scale in (("Gbit/s", 1e9), ("Mbit/s", 1e6), ("kbit/s", 1e3)):
        if bits >= scale:
            return f"{bits / scale:.3g} {unit}"
    return f"{bits:.0f} bit/s"


def format_time(s: float) -> str:
    if s >= 1:
        return f"{s:.2f} s"
    if s >= 1e-3:
        return f"{s * 1e3:.3g} ms"
    return f"{s * 1e6:.3g} µs"


def _check_cell(check: Mapping[str, Any]) -> str:
    return "[green]ok[/]" if check["passed"] else f"[bold red]{check['wrong_elements']} wrong[/]"


def _spread(t: Mapping[str, float]) -> str:
    return f"{format_time(t['min'])}–{format_time(t['max'])}".replace(" ", "")


def render_report(report: Mapping[str, Any]) -> list[RenderableType]:
    """The tables of a report, in the order they are printed."""
    out: list[RenderableType] = []
    if report.get("ring"):
        out.append(report["ring"])
    if report["links"]:
        links = Table("link", "hosts", "TCP throughput", "RTT", title="ring links, all busy at once", box=None)
        for e in report["links"]:
            links.add_row(f"rank {e['rank']} → {e['to']}", f"{e['from_host']} → {e['to_host']}",
                          format_rate(e["bandwidth_bytes_s"]), format_time(e["rtt_s"]))
        out.append(links)
    if report["results"]:
        checked = sum(row["check"]["results"] for row in report["results"])
        table = Table("size", "median", "min–max", "algbw", "busbw", "of link", "check",
                      title=f"all_sum, {report['settings']['dtype']}, {report['world_size']} ranks", box=None)
        for row in report["results"]:
            t = row["time_s"]
            share = row.get("busbw_share")
            table.add_row(format_size(row["bytes"]), format_time(t["median"]), _spread(t),
                          format_rate(row["algbw_bytes_s"]), format_rate(row["busbw_bytes_s"]),
                          f"{share:.0%}" if share is not None else "-", _check_cell(row["check"]))
        out.append(table)
        out.append(f"{checked} results checked element by element. busbw = size / time · 2(n−1)/n (NCCL-tests); "
                   "'of link' is busbw against the slowest ring link's TCP throughput. MLX's ring sends half the "
                   "data each way round, so over a full-duplex cable it can pass 100%; over Wi-Fi it cannot.")
    if report["pingpong"]:
        rtt = {(e["rank"], e["to"]): e["rtt_s"] for e in report["links"]}
        table = Table("neighbours", "hosts", "MLX round trip", "min–max", "TCP RTT",
                      title="ping-pong, 4 bytes, mx.distributed send/recv (median)", box=None)
        for e in report["pingpong"]:
            t = e["time_s"]
            tcp = rtt.get((e["rank"], e["to"]))
            table.add_row(f"rank {e['rank']} ↔ {e['to']}", f"{e['from_host']} ↔ {e['to_host']}",
                          format_time(t["median"]), _spread(t), format_time(tcp) if tcp is not None else "-")
        out.append(table)
    if report["pairs"]:
        out.extend(render_matrix(report))
    return out


def render_matrix(report: Mapping[str, Any]) -> list[RenderableType]:
    """The bandwidth matrix (rows send, columns receive), a summary per kind of link, and what it means for
    the ring."""
    pairs = report["pairs"]
    names = list(dict.fromkeys([p["from_host"] for p in pairs] + [p["to_host"] for p in pairs]))
    table = Table("from \\ to", *names, box=None, show_lines=True,
                  title="TCP throughput and RTT between hosts, one pair at a time: ⚡ Thunderbolt, "
                        "other links by the sender's interface")
    for src in names:
        cells = []
        for dst in names:
            lines = []
            for p in pairs:
                if p["from_host"] == src and p["to_host"] == dst:
                    name = "⚡" if p["kind"] == "thunderbolt" else f"{p['from_iface']} "
                    figure = "[red]failed[/]" if "error" in p else \
                        f"{_short_rate(p['bandwidth_bytes_s'])} {_short_time(p['rtt_s'])}"
                    lines.append(f"{name}{figure}")
            cells.append("\n".join(lines) or ("" if src == dst else "no shared link"))
        table.add_row(src, *cells)
    summary = Table("link", "interfaces", "pairs", "throughput", "RTT", title="by link (medians)", box=None)
    medians: dict[str, float] = {}
    for kind in sorted({p["kind"] for p in pairs}):
        ok = [p for p in pairs if p["kind"] == kind and "error" not in p]
        if ok:
            medians[kind] = statistics.median([p["bandwidth_bytes_s"] for p in ok])
        summary.add_row(kind, ", ".join(sorted({p["from_iface"] for p in pairs if p["kind"] == kind})),
                        f"{len(ok)} of {sum(p['kind'] == kind for p in pairs)}",
                        format_rate(medians.get(kind)),
                        format_time(statistics.median([p["rtt_s"] for p in ok])) if ok else "-")
    out: list[RenderableType] = [table, summary]
    failed = [p for p in pairs if "error" in p]
    if failed:
        out.append(f"[red]{len(failed)} probe(s) failed[/], first: {failed[0]['from_host']} → "
                   f"{failed[0]['to_host']} over {failed[0]['from_iface']}: {failed[0]['error']}")
    others = {k: v for k, v in medians.items() if k != "thunderbolt"}
    if "thunderbolt" in medians and others:
        best = max(others, key=lambda k: others[k])
        names = ", ".join(sorted({p["from_iface"] for p in pairs if p["kind"] == best}))
        out.append(f"Thunderbolt carries {medians['thunderbolt'] / others[best]:.0f}× the throughput of {names} "
                   "here: auto mode puts the ring on it whenever every pair of ring neighbours shares a cable.")
    return out


def _short_rate(bytes_s: float) -> str:
    return format_rate(bytes_s).replace("bit/s", "b/s")


def _short_time(seconds: float) -> str:
    return f"{seconds * 1e6:.0f}µs" if seconds < 1e-3 else f"{seconds * 1e3:.1f}ms"


def compare_reports(old: Mapping[str, Any], new: Mapping[str, Any]) -> Table:
    """The change per size (or per pair and link) from `old` to `new`."""
    if old.get("type") != new.get("type"):
        raise UsageError(f"cannot compare a {old.get('type')} result with a {new.get('type')} one",
                         hint="compare results of the same --type")
    title = f"change from {old.get('created')} ({old.get('link')}, {_commit(old)}) to now ({new.get('link')}, " \
            f"{_commit(new)})"
    if new["type"] == "bandwidth":
        table = Table("pair", "link", "before", "now", "change", title=title, box=None)
        before = {(p["from_host"], p["to_host"], p["from_iface"]): p for p in old.get("pairs", [])}
        for p in new["pairs"]:
            o = before.get((p["from_host"], p["to_host"], p["from_iface"]))
            a, b = (o or {}).get("bandwidth_bytes_s"), p.get("bandwidth_bytes_s")
            table.add_row(f"{p['from_host']} → {p['to_host']}", p["from_iface"], format_rate(a), format_rate(b),
                          _change(a, b))
        return table
    table = Table("size", "busbw before", "busbw now", "change", "time before", "time now", "change",
                  title=title, box=None)
    before = {r["bytes"]: r for r in old.get("results", [])}
    for r in new["results"]:
        o = before.get(r["bytes"], {})
        ob, nb = o.get("busbw_bytes_s"), r["busbw_bytes_s"]
        ot, nt = o.get("time_s", {}).get("median"), r["time_s"]["median"]
        table.add_row(format_size(r["bytes"]), format_rate(ob), format_rate(nb), _change(ob, nb),
                      format_time(ot) if ot else "-", format_time(nt), _change(ot, nt, lower_is_better=True))
    return table


def _commit(report: Mapping[str, Any]) -> str:
    commit = (report.get("macrun") or {}).get("git_commit")
    return commit[:10] if commit else "no commit"


def _change(old: float | None, new: float | None, *, lower_is_better: bool = False) -> str:
    if not old or not new:
        return "-"
    change = new / old - 1
    better = change < 0 if lower_is_better else change > 0
    colour = "green" if better and abs(change) >= 0.05 else "red" if abs(change) >= 0.05 else "dim"
    return f"[{colour}]{change:+.0%}[/]"


def plot_reports(reports: Sequence[Mapping[str, Any]], path: Path) -> Path:
    """busbw against size, one line per report (this run first), each with its slowest link as a dashed line."""
    from launcher.views.pngplot import line_plot

    series, guides = [], []
    for i, report in enumerate(reports):
        when = " (before)" if i else ""
        series.append((f"{report.get('link')} {report.get('world_size')} ranks{when}",
                       [(r["bytes"], r["busbw_bytes_s"] * 8 / 1e9) for r in report["results"]]))
        if report.get("link_bytes_s"):
            guides.append((f"{report.get('link')} link TCP{when}", report["link_bytes_s"] * 8 / 1e9))
    return line_plot(series, path, title="all_sum bus bandwidth", x_label="size (bytes)",
                     y_label="busbw (Gbit/s)", x_tick_label=lambda x: format_size(x).replace(" ", "").replace("i", ""),
                     guides=guides)


# ---- live display -----------------------------------------------------------------------------------------


class BenchmarkDisplay:
    """Progress while the benchmark runs: a rich bar on a terminal, one line per figure otherwise."""

    def __init__(self, console: Console, kind: str, sizes: int) -> None:
        self.console, self.kind, self.sizes = console, kind, sizes
        self.live = console.is_terminal
        self._progress: Progress | None = None
        self._task: TaskID | None = None

    def __enter__(self) -> BenchmarkDisplay:
        if self.live:
            self._progress = Progress(TextColumn(f"[bold]{self.kind}[/]"), BarColumn(), MofNCompleteColumn(),
                                      TextColumn("{task.description}"), console=self.console, transient=True)
            self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.stop()

    def line(self, text: str) -> None:
        self.console.print(text, markup=False, highlight=False)

    def _say(self, text: str) -> None:
        self.console.print(text, highlight=False)

    def _total(self, total: int) -> None:
        if self._progress is not None and self._task is None:
            self._task = self._progress.add_task("", total=total)

    def _advance(self, description: str = "") -> None:
        if self._progress is not None and self._task is not None:
            self._progress.update(self._task, advance=1, description=description)

    def event(self, e: Mapping[str, Any]) -> None:
        kind = e["event"]
        if kind == "start":
            self._say(f"benchmark {e['type']}: {e['world']} ranks, link {e['link']}")
            if e["type"] != "bandwidth":
                self._total(self.sizes)
        elif kind == "links":
            rates = ", ".join(f"{m['rank']}→{m['to']} {format_rate(m['bandwidth_bytes_s'])}" for m in e["links"])
            self._say(f"ring links (TCP, all busy): {rates}")
        elif kind == "size-start" and self._progress is not None and self._task is not None:
            self._progress.update(self._task, description=f"{format_size(e['bytes'])}: {e['iterations']} "
                                  f"iterations, about {format_time(e['estimate_s'])}")
        elif kind == "size":
            self._advance()
            if not self.live:
                self._say(f"{format_size(e['bytes'])}: {format_time(e['time_s']['median'])}, busbw "
                          f"{format_rate(e['busbw_bytes_s'])}, check {'ok' if e['check']['passed'] else 'WRONG'}")
        elif kind == "pairs-start":
            self._total(int(e["count"]))
        elif kind == "pair":
            self._advance()
            if not self.live:
                figure = e.get("error") or f"{format_rate(e['bandwidth_bytes_s'])}, RTT {format_time(e['rtt_s'])}"
                self._say(f"rank {e['rank']} → {e['to']} over {e['from_iface']}: {figure}")
        elif kind == "pingpong" and not self.live:
            self._say(f"ping-pong rank {e['rank']} ↔ {e['to']}: {format_time(e['time_s']['median'])}")


__all__ = ["BenchmarkDisplay", "compare_reports", "format_rate", "format_size", "format_time", "plot_reports",
           "render_matrix", "render_report"]
