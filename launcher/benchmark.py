"""`macrun benchmark`: run `distributed.bench` on the ranks and links a training run would use, and report it.

The benchmark is launched exactly as training is (`launcher.jobs.api.launch`: same hosts, same ring placement,
same env contract); only the program differs. Rank 0 prints its figures as `MACRUN-BENCH <json>` lines
(see distributed/bench.py), which `BenchmarkCollector` takes out of the output stream. The report is one
JSON document with every figure plus what identifies the run (hosts, MLX, macrun's git commit), so two
runs can be compared (`compare_reports`) and plotted (launcher/views/pngplot.py).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import re
import subprocess
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from rich.console import Console

from distributed.bench import DTYPES, TYPES, parse_event
from distributed.errors import RunFailedError, UsageError
from launcher.jobs.api import SOURCE_ROOT, LaunchSpec, launch
from launcher.jobs.job import RankSpec, RunResult
from launcher.room.hosts import HostSpec
from launcher.views.benchview import BenchmarkDisplay, compare_reports, format_size, plot_reports, render_report

FORMAT = "macrun-benchmark/1"
DEFAULT_SIZES = {"allreduce": "1K,1M,16M,256M", "latency": "4,64,512,4K", "bandwidth": ""}
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
_SIZE = re.compile(r"^(\d+)([KMG]?)(?:I?B)?$")
MAX_SIZE = 4 << 30  # element indices stay within int32 (the check reports them)


@dataclass(frozen=True, slots=True)
class BenchmarkSpec:
    """One benchmark run, resolved."""

    kind: str = "allreduce"  # one of distributed.bench.TYPES
    sizes: tuple[int, ...] = ()  # bytes per all-reduce (allreduce, latency)
    dtype: str = "float32"
    iters: int = 20  # at most this many timed iterations per size
    warmup: int = 2
    budget_s: float = 10.0  # per size: fewer iterations (never below 3) when one iteration takes long
    probe_seconds: float = 0.5  # per link probe
    pings: int = 20
    hosts: Sequence[HostSpec] | None = None
    nproc: int = 2
    link: str = "auto"
    backend: str = "auto"  # auto | ring | jaccl | jaccl-ring (launcher/thunderbolt/backend.py)
    accept_new_host_keys: bool = False
    run_dir: Path = field(default_factory=lambda: Path("runs").resolve() / "benchmark")


def parse_sizes(text: str, dtype: str = "float32") -> tuple[int, ...]:
    """"1K,64K,16M" -> byte counts (K, M, G are powers of 1024; "KB"/"KiB" also read); UsageError if wrong."""
    sizes: list[int] = []
    item = DTYPES.get(dtype, 4)
    for raw in text.split(","):
        part = raw.strip().upper()
        match = _SIZE.match(part)
        if not match:
            raise UsageError(f"--sizes: {raw.strip()!r} is not a size",
                             hint="give byte counts with an optional K, M or G, e.g. --sizes 1K,1M,16M")
        n = int(match.group(1)) * _UNITS[match.group(2)]
        if n < item or n % item or n > MAX_SIZE:
            raise UsageError(f"--sizes: {raw.strip()} is not a whole number of {dtype} elements ({item} bytes) "
                             f"between {item} bytes and {MAX_SIZE >> 30} GiB",
                             hint=f"use sizes that are multiples of {item}, e.g. --sizes 1K,1M,16M")
        if n not in sizes:
            sizes.append(n)
    return tuple(sizes)


def bench_argv(spec: BenchmarkSpec) -> list[str]:
    """The command every rank runs."""
    argv = ["python", "-m", "distributed.bench", spec.kind, "--probe-seconds", f"{spec.probe_seconds:g}",
            "--seconds", f"{spec.probe_seconds:g}", "--pings", str(spec.pings)]
    if spec.kind != "bandwidth":
        argv += ["--sizes", ",".join(map(str, spec.sizes)), "--dtype", spec.dtype, "--iters", str(spec.iters),
                 "--warmup", str(spec.warmup), "--budget", f"{spec.budget_s:g}"]
    return argv


class BenchmarkCollector:
    """The launcher's `emit` for a benchmark: benchmark events are kept (and handed to `on_event`), the
    ring's placement is noted, every other line goes on to `emit`."""

    def __init__(self, emit: Callable[[str], None], on_event: Callable[[dict[str, Any]], None] | None = None):
        self.emit, self.on_event = emit, on_event
        self.events: list[dict[str, Any]] = []
        self.ring: str | None = None
        self.host_of: dict[int, str] = {}

    def line(self, text: str) -> None:
        event = parse_event(text) if text.startswith("[rank 0 ") else None
        if event is None:
            if text.startswith(("ring over ", "ring on one host")):
                self.ring = text
            self.emit(text)
            return
        self.events.append(event)
        if self.on_event is not None:
            self.on_event(event)

    def ready(self, specs: list[RankSpec]) -> None:
        self.host_of = {s.rank: s.host_name for s in specs}


def run_benchmark(spec: BenchmarkSpec, *, emit: Callable[[str], None] = print,
                  on_event: Callable[[dict[str, Any]], None] | None = None) -> tuple[RunResult, dict[str, Any]]:
    """Launch the benchmark on the spec's ranks; returns how the run ended and the report."""
    collector = BenchmarkCollector(emit, on_event)
    launch_spec = LaunchSpec(argv=bench_argv(spec), run_dir=spec.run_dir, name="benchmark", hosts=spec.hosts,
                             nproc=spec.nproc, link=spec.link, backend=spec.backend,
                             accept_new_host_keys=spec.accept_new_host_keys)
    result = launch(launch_spec, emit=collector.line, on_ready=collector.ready)
    return result, build_report(spec, collector, result.exit_code)


def build_report(spec: BenchmarkSpec, collector: BenchmarkCollector, exit_code: int) -> dict[str, Any]:
    """Every figure of a run as one JSON-ready document."""
    events = collector.events
    start = next((e for e in events if e["event"] == "start"), {})
    hosts = [{"host": collector.host_of.get(int(h["rank"]), "?"), **h} for h in start.get("hosts", [])]
    host_of = {h["rank"]: h["host"] for h in hosts}
    links = [{**e, "from_host": host_of.get(e["rank"]), "to_host": host_of.get(e["to"])}
             for ev in events if ev["event"] == "links" for e in ev["links"]]
    link_rate = min((e["bandwidth_bytes_s"] for e in links), default=None)
    results = []
    for e in events:
        if e["event"] == "size":
            row = {k: v for k, v in e.items() if k != "event"}
            row["busbw_share"] = row["busbw_bytes_s"] / link_rate if link_rate else None
            results.append(row)
    world = int(start.get("world", len(hosts)))
    one_host = any(e["event"] == "pairs-start" and e.get("same_host") for e in events)

    def pair_label(rank: int) -> str:  # ranks of one host are told apart by rank
        return f"rank {rank} ({host_of.get(rank)})" if one_host else str(host_of.get(rank))

    settings = {k: v for k, v in asdict(spec).items() if k not in ("hosts", "run_dir", "accept_new_host_keys")}
    return {
        "format": FORMAT, "type": spec.kind, "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "macrun": source_version(), "launcher": {"python": platform.python_version(), "platform": platform.platform(),
                                                 "mlx": _version("mlx")},
        "settings": settings, "world_size": world, "link": start.get("link"),
        "ring": collector.ring or (f"{world} local ranks over loopback" if not spec.hosts else None),
        "hosts": hosts, "links": links, "link_bytes_s": link_rate, "results": results,
        "pingpong": [{k: v for k, v in e.items() if k != "event"} | {"from_host": host_of.get(e["rank"]),
                                                                     "to_host": host_of.get(e["to"])}
                     for e in events if e["event"] == "pingpong"],
        "pairs": [{k: v for k, v in e.items() if k != "event"} | {"from_host": pair_label(e["rank"]),
                                                                  "to_host": pair_label(e["to"])}
                  for e in events if e["event"] == "pair"],
        "complete": any(e["event"] == "done" for e in events), "exit_code": exit_code,
    }


def raise_for_wrong_results(report: Mapping[str, Any]) -> None:
    """RunFailedError naming the first size whose all-reduce results were wrong."""
    for row in report.get("results", []):
        check = row["check"]
        if not check["passed"]:
            first = check.get("first", {})
            raise RunFailedError(
                f"all_sum of {format_size(row['bytes'])} gave wrong results: {check['wrong_elements']} wrong "
                f"element(s); first on rank {first.get('rank')} at index {first.get('index')}: got "
                f"{first.get('got')}, want {first.get('want')}",
                hint="the ring corrupted data: check the hosts' MLX versions (macrun hosts check) and run again")


# ---- versions and files ---------------------------------------------------------------------------------


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def source_version() -> dict[str, Any]:
    """macrun's version and, in a git checkout, its commit and whether files differ from it."""
    found: dict[str, Any] = {"version": _version("macrun"), "git_commit": None, "git_dirty": None}
    env = {**os.environ, "GIT_OPTIONAL_LOCKS": "0"}  # read-only: never refresh the index
    try:
        commit = subprocess.run(["git", "-C", str(SOURCE_ROOT), "rev-parse", "HEAD"], capture_output=True,
                                text=True, timeout=5, env=env)
        if commit.returncode == 0:
            found["git_commit"] = commit.stdout.strip()
            status = subprocess.run(["git", "-C", str(SOURCE_ROOT), "status", "--porcelain", "--untracked-files=no"],
                                    capture_output=True, text=True, timeout=5, env=env)
            found["git_dirty"] = bool(status.stdout.strip()) if status.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        pass
    return found


def write_report(report: Mapping[str, Any], path: Path) -> None:
    """Write the report as JSON (via a temporary file, so a crash leaves no half file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.part")
    partial.write_text(json.dumps(report, indent=2) + "\n")
    partial.replace(path)


def read_report(path: Path) -> dict[str, Any]:
    """A report written by `write_report`; UsageError naming the file when it is not one."""
    try:
        data = json.loads(path.read_text())
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror or exc}",
                         hint="give a file written by macrun benchmark --json") from None
    except ValueError as exc:
        raise UsageError(f"{path} is not JSON ({exc})", hint="give a file written by macrun benchmark --json") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise UsageError(f"{path} is not a macrun benchmark result", hint="give a file written by --json")
    return data


# ---- the command ----------------------------------------------------------------------------------------


def plan_benchmark(kind: str, sizes: str | None, *, dtype: str = "float32", iters: int = 20, warmup: int = 2,
                   budget_s: float = 10.0, hosts: Sequence[HostSpec] | None = None, nproc: int = 2,
                   link: str = "auto", backend: str = "auto", accept_new_host_keys: bool = False) -> BenchmarkSpec:
    """Validate the command line into a spec; UsageError (exit 2) naming the bad option."""
    if kind not in TYPES:
        raise UsageError(f"--type {kind!r} is not one of {', '.join(TYPES)}")
    if dtype not in DTYPES:
        raise UsageError(f"--dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    if iters < 1 or warmup < 1 or budget_s <= 0:
        raise UsageError("--iters and --warmup must be at least 1 and --budget above 0")
    if kind == "bandwidth" and sizes:
        raise UsageError("--sizes does not apply to --type bandwidth", hint="leave it out, or use --type allreduce")
    ranks = sum(h.slots for h in hosts) if hosts else nproc
    if ranks < 2:
        raise UsageError(f"a benchmark needs at least two ranks; {'the hosts file has' if hosts else '--nproc gives'} "
                         f"{ranks}", hint="use --nproc 2 or more, or a hosts file with two hosts")
    parsed = parse_sizes(sizes or DEFAULT_SIZES[kind], dtype) if kind != "bandwidth" else ()
    return BenchmarkSpec(kind=kind, sizes=parsed, dtype=dtype, iters=iters, warmup=warmup, budget_s=budget_s,
                         hosts=hosts, nproc=nproc, link=link, backend=backend,
                         accept_new_host_keys=accept_new_host_keys)


def benchmark_command(console: Console, spec: BenchmarkSpec, *, json_path: Path | None = None,
                      compare: Path | None = None, plot: Path | None = None) -> RunResult:
    """`macrun benchmark`: run, show progress and tables, write --json/--plot, compare; RunFailedError when
    a result was wrong. Files named on the command line are checked before anything starts."""
    old = read_report(compare) if compare else None
    if old is not None and old.get("type") != spec.kind:
        raise UsageError(f"{compare} holds a {old.get('type')} result; this run is {spec.kind}",
                         hint="compare results of the same --type")
    if plot is not None and spec.kind == "bandwidth":
        raise UsageError("--plot draws bus bandwidth against size; --type bandwidth has no sizes",
                         hint="use --plot with --type allreduce or latency")
    with BenchmarkDisplay(console, spec.kind, len(spec.sizes)) as display:
        result, report = run_benchmark(spec, emit=display.line, on_event=display.event)
    if result.exit_code != 0:
        return result
    for item in render_report(report):
        console.print(item, highlight=False)
    if json_path is not None:
        write_report(report, json_path)
        console.print(f"wrote {json_path}", markup=False, highlight=False)
    if old is not None:
        console.print(compare_reports(old, report), highlight=False)
    if plot is not None:
        plot_reports([report, *([old] if old else [])], plot)
        console.print(f"wrote {plot}", markup=False, highlight=False)
    raise_for_wrong_results(report)
    return result


__all__ = ["DEFAULT_SIZES", "FORMAT", "TYPES", "BenchmarkCollector", "BenchmarkSpec", "bench_argv",
           "benchmark_command", "build_report", "parse_sizes", "plan_benchmark", "raise_for_wrong_results",
           "read_report", "run_benchmark", "source_version", "write_report"]
