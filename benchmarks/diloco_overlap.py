"""Exposed communication of DiLoCo with `strategy.overlap` off and on, side by side, through `macrun train`.

Runs the same DiLoCo task twice per pair, overlap off then on (the order alternates between pairs so load
from other work falls on both alike), either on the emulated lab (3 hosts whose Wi-Fi shares one 200 Mbit/s
segment; `--link network`) or on local ranks (`--nproc N`, loopback). From each run's rank 0
`metrics.jsonl` it reads the loop's time, `comm_seconds` (the time the loop waited for exchanges: exposed)
and `exchange_seconds` (every exchange from start to finish), and prints both with the step time and the
final validation loss. Without overlap the two are equal by definition; with it, the difference is what
the inner steps hid.

    sudo .venv/bin/python benchmarks/diloco_overlap.py --json runs/bench/diloco_overlap.json      # lab
    .venv/bin/python benchmarks/diloco_overlap.py --nproc 3                                       # loopback

Takes ~5 minutes on a 2-core machine with the defaults.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
MACRUN = str(Path(sys.executable).with_name("macrun"))


def overrides(args: argparse.Namespace, overlap: bool, name: str) -> list[str]:
    sets = [f"run.name={name}", f"model.size={args.size}", f"data.max_bytes={args.max_bytes}",
            f"data.seq_len={args.seq_len}", f"train.batch_size={args.batch}", f"train.steps={args.steps}",
            "train.warmup_steps=5", f"train.eval_interval={args.steps}", f"train.log_interval={args.inner_steps}",
            "train.eval_batches=4", "train.checkpoint_interval=0", "strategy.mode=diloco",
            f"strategy.inner_steps={args.inner_steps}", f"strategy.overlap={str(overlap).lower()}"]
    return [part for s in sets for part in ("--set", s)]


def run_once(args: argparse.Namespace, cwd: Path, overlap: bool, name: str, where: list[str],
             home: Path | None) -> dict[str, Any]:
    argv = [MACRUN, "train", *where, str(ROOT / "configs" / "quickstart.yaml"), *overrides(args, overlap, name)]
    env = {k: v for k, v in os.environ.items() if k not in ("SSH_AUTH_SOCK", "MACRUN_DEBUG")}
    if home is not None:
        env["HOME"] = str(home)
    proc = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=args.timeout,
                          stdin=subprocess.DEVNULL)
    if proc.returncode:
        raise SystemExit(f"run {name} failed (exit {proc.returncode}):\n{(proc.stdout + proc.stderr)[-3000:]}")
    last = json.loads((cwd / "runs" / name / "metrics.jsonl").read_text().splitlines()[-1])
    loop = last["time"]
    return {"overlap": overlap, "name": name, "steps": last["step"], "loop_s": loop,
            "step_ms": 1e3 * loop / last["step"], "exposed_s": last["comm_seconds"],
            "exchange_s": last["exchange_seconds"], "exposed_share": last["comm_seconds"] / loop,
            "val_loss": last.get("val_loss"), "bytes_sent_rank0": last["bytes_sent"]}


def describe(r: dict[str, Any]) -> str:
    return (f"overlap {'on ' if r['overlap'] else 'off'} {r['name']:>6}: {r['steps']} steps in {r['loop_s']:6.1f} s "
            f"({r['step_ms']:4.0f} ms/step) · exchanges {r['exchange_s']:5.1f} s, exposed {r['exposed_s']:5.1f} s "
            f"({r['exposed_share']:.0%} of the loop) · final val {r['val_loss']:.3f}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=2, help="pairs of runs (off, on), order alternating")
    p.add_argument("--nproc", type=int, default=0, help="local ranks on loopback instead of the lab")
    p.add_argument("--size", default="mini", help="model.size (default mini: 0.84M parameters, 3.4 MB)")
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--batch", type=int, default=4, help="train.batch_size per rank")
    p.add_argument("--max-bytes", type=int, default=1_000_000)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--inner-steps", type=int, default=10, help="DiLoCo's H")
    p.add_argument("--lab-hosts", type=int, default=3)
    p.add_argument("--prefix", default="mro", help="lab name prefix")
    p.add_argument("--timeout", type=float, default=600, help="seconds per run")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)

    lab, home = None, None
    if args.nproc:
        where = ["--nproc", str(args.nproc)]
    else:
        sys.path.insert(0, str(ROOT))
        from tests.lab.labnet import Lab, LabUnavailable

        try:
            lab = Lab.up(args.lab_hosts, prefix=args.prefix)
        except LabUnavailable as exc:
            print(f"error: cannot bring up the lab: {exc}", file=sys.stderr)
            return 2
        where, home = ["--hosts", str(lab.state_dir / "hosts.json"), "--link", "network"], lab.ssh_home
    runs: list[dict[str, Any]] = []
    load = [os.getloadavg()[0]]
    try:
        with tempfile.TemporaryDirectory(prefix="macrun-overlap-") as tmp:
            for i in range(args.repeats):
                for overlap in ((False, True) if i % 2 == 0 else (True, False)):
                    runs.append(run_once(args, Path(tmp), overlap, f"{'on' if overlap else 'off'}{i}", where, home))
                    print(describe(runs[-1]), flush=True)
                    load.append(os.getloadavg()[0])
    finally:
        if lab is not None:
            lab.down()
    summary = {}
    for overlap in (False, True):
        mine = [r for r in runs if r["overlap"] == overlap]
        summary["on" if overlap else "off"] = {k: sum(r[k] for r in mine) / len(mine)
                                               for k in ("loop_s", "step_ms", "exposed_s", "exchange_s",
                                                         "exposed_share", "val_loss")}
    off, on = summary["off"], summary["on"]
    print(f"mean of {args.repeats}: exposed {off['exposed_s']:.1f} s ({off['exposed_share']:.0%}) off vs "
          f"{on['exposed_s']:.1f} s ({on['exposed_share']:.0%}) on, of exchanges lasting {off['exchange_s']:.1f} / "
          f"{on['exchange_s']:.1f} s; loop {off['loop_s']:.1f} vs {on['loop_s']:.1f} s; "
          f"val {off['val_loss']:.3f} vs {on['val_loss']:.3f}")
    print(f"load average (1 min) over the runs: {min(load):.1f}-{max(load):.1f} on {os.cpu_count()} CPUs")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
        args.json.write_text(json.dumps({
            "benchmark": "diloco_overlap", "args": {k: str(v) for k, v in vars(args).items()}, "runs": runs,
            "summary": summary, "load_average_1min": load, "commit": commit.stdout.strip(),
            "python": platform.python_version(), "time": time.strftime("%Y-%m-%dT%H:%M:%S")}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
