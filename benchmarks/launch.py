"""Launch latency: macrun against `mlx.launch` on the same hosts, as ratios measured in one run.

For each launcher, alternating (macrun first on even iterations, mlx.launch first on odd ones), it runs a
trivial script on every host and records two figures from the moment the command is started:

- to_running: until the LAST rank has started (each rank's first action is `time.time()`, printed);
- to_exit: until the launcher process has exited.

    sudo .venv/bin/python benchmarks/launch.py --iterations 7 --json runs/bench/launch.json
    .venv/bin/python benchmarks/launch.py --hosts hosts.json --home ~ --iterations 7   # real hosts

With no --hosts it brings up its own lab (tests/lab, needs root) and takes it down afterwards. Both
launchers get the same HOME; `mlx.launch` uses the `ssh` binary, which ignores $HOME, so it runs with a
PATH whose `ssh` wrapper passes HOME's key and known_hosts explicitly (`-F none -i KEY -o
UserKnownHostsFile=...`). to_running relies on one clock for all ranks: exact in the lab (one machine),
as good as NTP on real hosts. macrun's figure includes what mlx.launch does not do: connecting in-process,
the preflight probe of every host (Python, MLX, disk, links), free-port queries, syncing the job's files
and starting each rank under its supervising shim. One untimed warm-up of each launcher comes first (it
pushes macrun's files and warms the hosts' page cache).

Both launchers start from compiled bytecode, as an installed package does: `pip install` compiles mlx's
modules, and a user's first `macrun` writes `__pycache__` for its own. Where PYTHONDONTWRITEBYTECODE is set
(some CI and sandbox shells), macrun would otherwise recompile its ~40 modules from source on every launch
(measured in the lab on a loaded 2-core machine: 0.4 s more start-up), which no user sees; so the
benchmark compiles `launcher/` and `distributed/` first (`--no-compile` to measure that case).
"""

from __future__ import annotations

import argparse
import compileall
import json
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run as a file: `python benchmarks/launch.py`
    sys.path.insert(0, str(REPO))

from launcher.room.hosts import HostSpec, load_hosts, write_mlx_hostfile  # noqa: E402

STAMP = "MACRUN_BENCH_STAMP"
# The trivial job: its very first statement takes the time; it prints it with its rank and exits.
TRIVIAL = f'''import time
_started = time.time()
import os
print("{STAMP}", os.environ.get("MLX_RANK", "?"), repr(_started), flush=True)
'''
RUN_TIMEOUT_S = 120.0
BIN_DIR = Path(sys.executable).parent
MLX_LAUNCH = BIN_DIR / "mlx.launch"
MACRUN = BIN_DIR / "macrun"
PHASES = re.compile(r"starting \d+ rank\(s\) on \d+ host\(s\) \((([0-9.]+) s from connecting[^)]*)\)")


@dataclass
class Sample:
    """One launch: seconds from the command's start to the last rank running and to the launcher's exit."""

    launcher: str
    iteration: int
    to_running: float
    to_first_rank: float
    to_exit: float
    phases: str = ""  # macrun's own account of its launch (the "starting N rank(s)" line)
    startup: float | None = None  # macrun: command start -> connecting (interpreter, imports, parsing)
    prepare: float | None = None  # macrun: connecting -> starting ranks (connect, probe, ports, sync)
    rank_start: float | None = None  # macrun: starting ranks -> last rank running (channel, shim, Python)


@dataclass
class Setup:
    """What both launchers need: the hosts, a HOME with .ssh, and where the script and files live."""

    hosts: list[HostSpec]
    home: Path
    hosts_file: Path
    mlx_hostfile: Path
    script: Path
    bin_dir: Path  # holds the `ssh` wrapper for mlx.launch
    work: Path


def ssh_wrapper(home: Path, hosts: Sequence[HostSpec]) -> str:
    """A `sh` script standing in for `ssh` that uses HOME's key and known_hosts (ssh itself ignores $HOME)."""
    ssh_dir = home / ".ssh"
    key = hosts[0].key_file or next((str(ssh_dir / k) for k in ("id_ed25519", "id_ecdsa", "id_rsa")
                                     if (ssh_dir / k).exists()), None)
    opts = ["-F", "none", "-o", f"UserKnownHostsFile={ssh_dir / 'known_hosts'}", "-o", "BatchMode=yes"]
    if key:
        opts += ["-i", str(Path(key).expanduser()), "-o", "IdentitiesOnly=yes"]
    return f"#!/bin/sh\nexec /usr/bin/ssh {shlex.join(opts)} \"$@\"\n"


def prepare(hosts_file: Path, home: Path, work: Path) -> Setup:
    """Write the script, MLX's hostfile and the ssh wrapper; push the script to the same path on each host."""
    hosts = load_hosts(hosts_file)
    if len({h.python for h in hosts}) > 1:
        print(f"warning: mlx.launch takes one --python for all hosts; using {hosts[0].python}", file=sys.stderr)
    script = work / "trivial.py"
    script.write_text(TRIVIAL)
    mlx_hostfile = work / "mlx_hostfile.json"
    write_mlx_hostfile(hosts, mlx_hostfile)
    bin_dir = work / "bin"
    bin_dir.mkdir()
    wrapper = bin_dir / "ssh"
    wrapper.write_text(ssh_wrapper(home, hosts))
    wrapper.chmod(0o755)
    setup = Setup(hosts=hosts, home=home, hosts_file=hosts_file, mlx_hostfile=mlx_hostfile, script=script,
                  bin_dir=bin_dir, work=work)
    stage_script(setup)
    return setup


def stage_script(setup: Setup) -> None:
    """mlx.launch runs the script by path on every host: put it there (a no-op where /tmp is shared)."""
    old_home = os.environ.get("HOME")
    os.environ["HOME"] = str(setup.home)
    try:
        from launcher.transport.ssh import connect_all

        conns = connect_all(setup.hosts)
        try:
            for conn in conns:
                conn.run(f"mkdir -p {shlex.quote(str(setup.work))}", timeout=20)
                conn.put_file(setup.script, str(setup.script))
        finally:
            for conn in conns:
                conn.close()
    finally:
        if old_home is None:
            os.environ.pop("HOME", None)
        else:
            os.environ["HOME"] = old_home


def compile_sources() -> bool:
    """Write the bytecode of macrun's own packages, as an install would; True if all compiled."""
    return all(compileall.compile_dir(REPO / pkg, quiet=1) for pkg in ("launcher", "distributed"))


def commands(setup: Setup) -> dict[str, list[str]]:
    """The two command lines, each running the host's Python on the same script."""
    python = setup.hosts[0].python
    return {
        "macrun": [str(MACRUN), "run", "--hosts", str(setup.hosts_file), "--name", "bench", "--",
                   "python", str(setup.script)],
        "mlx.launch": [str(MLX_LAUNCH), "--hostfile", str(setup.mlx_hostfile), "--backend", "ring",
                       "--python", python, str(setup.script)],
    }


def run_once(name: str, argv: list[str], setup: Setup, world: int, iteration: int) -> Sample:
    """Run one launch, time-stamping its output lines as they arrive; RuntimeError unless it exits 0 with
    every rank's stamp."""
    env = {**os.environ, "HOME": str(setup.home), "PATH": f"{setup.bin_dir}:{os.environ.get('PATH', '')}"}
    started = time.time()
    clock = time.perf_counter()
    proc = subprocess.Popen(argv, cwd=setup.work, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    watchdog = threading.Timer(RUN_TIMEOUT_S, proc.kill)  # a hung launcher must not hang the benchmark
    watchdog.start()
    try:
        lines: list[tuple[float, str]] = [(time.time(), line) for line in proc.stdout]  # ends at EOF
        rc = proc.wait()
    finally:
        watchdog.cancel()
    to_exit = time.perf_counter() - clock
    output = "".join(line for _, line in lines)
    stamps = {int(m.group(1)): float(m.group(2)) for m in re.finditer(rf"{STAMP} (\d+) ([0-9.]+)", output)}
    if rc != 0 or sorted(stamps) != list(range(world)):
        raise RuntimeError(f"{name} failed (exit {rc}, stamps from ranks {sorted(stamps)}):\n{output[-3000:]}")
    sample = Sample(launcher=name, iteration=iteration, to_running=max(stamps.values()) - started,
                    to_first_rank=min(stamps.values()) - started, to_exit=to_exit)
    for at, line in lines:
        m = PHASES.search(line)
        if m:  # macrun: split its time at the moment it printed "starting N rank(s)"
            sample.phases = m.group(1)
            from_connecting = float(m.group(2))
            sample.startup = at - started - from_connecting
            sample.prepare = from_connecting
            sample.rank_start = max(stamps.values()) - at
    return sample


def measure(setup: Setup, iterations: int) -> tuple[list[Sample], list[Sample]]:
    """One untimed warm-up of each, then `iterations` alternating rounds; returns (warm-ups, samples)."""
    cmds = commands(setup)
    world = sum(h.slots for h in setup.hosts)
    warmups = [run_once(name, argv, setup, world, -1) for name, argv in cmds.items()]
    samples: list[Sample] = []
    for i in range(iterations):
        order = list(cmds) if i % 2 == 0 else list(reversed(cmds))
        for name in order:
            samples.append(run_once(name, cmds[name], setup, world, i))
    return warmups, samples


def summarize(samples: Sequence[Sample]) -> dict[str, Any]:
    """Medians per launcher, macrun's split of its time, and the ratios macrun / mlx.launch."""
    out: dict[str, Any] = {}
    for name in ("macrun", "mlx.launch"):
        mine = [s for s in samples if s.launcher == name]
        out[name] = {key: statistics.median(getattr(s, key) for s in mine)
                     for key in ("to_running", "to_first_rank", "to_exit")}
    split = [s for s in samples if s.launcher == "macrun" and s.startup is not None]
    if split:
        out["macrun"]["split"] = {key: statistics.median(getattr(s, key) for s in split)
                                  for key in ("startup", "prepare", "rank_start")}
    out["ratio"] = {key: out["macrun"][key] / out["mlx.launch"][key] for key in ("to_running", "to_exit")}
    # The spread: each round's two launches ran back to back, so their ratio cancels most of the load that
    # other work puts on a shared machine; the quartiles of those per-round ratios say how sure the median is.
    pairs = pair_ratios(samples)
    if len(pairs) >= 2:
        q1, q2, q3 = statistics.quantiles(pairs, n=4)
        out["round_ratio"] = {"median": statistics.median(pairs), "q1": q1, "q3": q3,
                              "min": min(pairs), "max": max(pairs), "rounds": len(pairs)}
    return out


def pair_ratios(samples: Sequence[Sample]) -> list[float]:
    """to_running of macrun / mlx.launch for each round that has both."""
    by_round: dict[int, dict[str, float]] = {}
    for s in samples:
        by_round.setdefault(s.iteration, {})[s.launcher] = s.to_running
    return [r["macrun"] / r["mlx.launch"] for r in by_round.values() if len(r) == 2]


def table(samples: Sequence[Sample], summary: dict[str, Any]) -> str:
    """Per-iteration figures, the medians and the ratios as plain text."""
    rows = [f"{'iter':>4}  {'launcher':10}  {'to_running s':>12}  {'to_exit s':>9}  "
            f"{'startup':>7}  {'prepare':>7}  {'ranks':>5}  macrun's own phase line"]
    for s in samples:
        split = (f"{s.startup:7.3f}  {s.prepare:7.3f}  {s.rank_start:5.3f}" if s.startup is not None
                 and s.prepare is not None and s.rank_start is not None else f"{'':7}  {'':7}  {'':5}")
        rows.append(f"{s.iteration:>4}  {s.launcher:10}  {s.to_running:12.3f}  {s.to_exit:9.3f}  {split}  {s.phases}")
    for name in ("macrun", "mlx.launch"):
        m = summary[name]
        split = m.get("split")
        extra = f"  {split['startup']:7.3f}  {split['prepare']:7.3f}  {split['rank_start']:5.3f}" if split else ""
        rows.append(f"{'med':>4}  {name:10}  {m['to_running']:12.3f}  {m['to_exit']:9.3f}{extra}")
    r = summary["ratio"]
    rows.append(f"ratio macrun/mlx.launch: to_running {r['to_running']:.3f}, to_exit {r['to_exit']:.3f} "
                "(target <= 1.0)")
    rr = summary.get("round_ratio")
    if rr:
        rows.append(f"per-round to_running ratio: median {rr['median']:.3f}, quartiles {rr['q1']:.3f}-{rr['q3']:.3f}, "
                    f"range {rr['min']:.3f}-{rr['max']:.3f} over {rr['rounds']} rounds")
    rows.append("startup: command -> connecting; prepare: connect, probe, ports, sync; ranks: -> last rank running")
    return "\n".join(rows)


def git_commit() -> str:
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True).stdout.strip()
        return head + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--iterations", type=int, default=7, help="timed rounds (each runs both launchers)")
    p.add_argument("--hosts", type=Path, default=None, help="use these hosts instead of bringing up a lab")
    p.add_argument("--home", type=Path, default=None, help="HOME whose .ssh reaches --hosts (default: $HOME)")
    p.add_argument("--lab-hosts", type=int, default=3, help="hosts in the lab (default 3)")
    p.add_argument("--prefix", default="mrb", help="lab name prefix (default mrb)")
    p.add_argument("--json", type=Path, default=None, help="write the results here")
    p.add_argument("--no-compile", action="store_true",
                   help="do not compile macrun's modules first (with PYTHONDONTWRITEBYTECODE set, every launch "
                        "then compiles them from source)")
    args = p.parse_args(argv)
    compiled = False if args.no_compile else compile_sources()

    lab = None
    if args.hosts is None:
        from tests.lab.labnet import Lab, LabUnavailable

        try:
            lab = Lab.up(args.lab_hosts, prefix=args.prefix)
        except LabUnavailable as exc:
            print(f"error: cannot bring up the lab: {exc}", file=sys.stderr)
            return 2
        hosts_file, home = lab.state_dir / "hosts.json", lab.ssh_home
    else:
        hosts_file, home = args.hosts.resolve(), (args.home or Path.home()).resolve()
    try:
        with tempfile.TemporaryDirectory(prefix="macrun-bench-", dir="/tmp") as tmp:
            setup = prepare(hosts_file, home, Path(tmp))
            load_before = os.getloadavg()[0]
            warmups, samples = measure(setup, args.iterations)
            load_after = os.getloadavg()[0]
    finally:
        if lab is not None:
            lab.down()
    summary = summarize(samples)
    print(table(samples, summary))
    print(f"load average (1 min) before/after: {load_before:.1f}/{load_after:.1f} on {os.cpu_count()} CPUs")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "benchmark": "launch", "hosts": len(setup.hosts), "ranks": sum(h.slots for h in setup.hosts),
            "where": "lab" if lab is not None else str(hosts_file), "iterations": args.iterations,
            "commands": {k: shlex.join(v) for k, v in commands(setup).items()},
            "summary": summary, "samples": [asdict(s) for s in samples], "warmups": [asdict(s) for s in warmups],
            "mlx": metadata.version("mlx"), "python": platform.python_version(), "git_commit": git_commit(),
            "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "cpus": os.cpu_count(),
            "load_average_1min": [load_before, load_after], "bytecode_compiled": compiled,
            "pythondontwritebytecode": bool(os.environ.get("PYTHONDONTWRITEBYTECODE")),
            "note": "macrun's figures include preflight probing, free-port queries and file sync"}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
