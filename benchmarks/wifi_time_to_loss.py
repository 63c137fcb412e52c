"""Time to a common validation loss over shared Wi-Fi: DDP against DiLoCo, side by side, through `macrun train`.

Brings up the lab (tests/lab: 3 emulated hosts whose Wi-Fi shares one 200 Mbit/s segment, plus Thunderbolt
veths that `--link network` leaves unused), then runs the same task (configs/quickstart.yaml's byte-level
GPT on the stdlib text, same seed, same per-rank batch) with `strategy.mode=ddp` and with
`strategy.mode=diloco`, alternating (DDP first in even pairs, DiLoCo first in odd ones) so load from other
work on the machine falls on both alike. Each run is the real path: `macrun train --hosts lab.json --link
network`, and its rank 0's `runs/<name>/metrics.jsonl` fetched to the master.

The target loss is DDP's own: its validation loss at ~80% of its run (the worst of the DDP runs, so every
DDP run reaches it). Each run's time to the target is read off its evaluations by linear interpolation
between the two around the crossing, on the loop's clock, which starts with the first step (launching, data
preparation and the strategy's start-up are outside it for both) less the evaluations' own time (each
metrics row's tokens/s window excludes them; DiLoCo, with more of them in a shorter run, would pay more;
the ratio with them is printed too). DiLoCo is evaluated at its syncs
(eval_interval = H), where rank 0 holds the averaged model; DDP every `--ddp-eval` steps. DiLoCo is given
`--diloco-factor` times DDP's steps (its own cosine schedule over them): each worker sees a third of DDP's
batch per step, so it needs more steps to the same loss. Both checkpoint only at the end: macrun's default
for DiLoCo (fault.sync_checkpoints) writes one every round and the launcher fetches each to the master at
once, over the same Wi-Fi (~17 MB a round here, four times the exchange); `--sync-checkpoints` keeps it.

Why this model: the `mini` GPT (0.84M parameters, 3.35 MB of float32 gradients) with 2 x 64 tokens per rank.
The cost model (distributed/costmodel.ring_allreduce_seconds) puts one ring allreduce of the gradients over
three stations sharing 25 MB/s of air (~8.3 MB/s per ring link) at ~0.54 s, against a compute step of tens
of ms (88 ms for 4 x 64 tokens, timed alone under load 12): DDP spends most of each step on the network, as a
124M-parameter model does on real Wi-Fi (benchmarks/projection.py); with the tiny GPT (0.5 MB) the network
would matter far less. The batch is small because the lab's hosts share this machine's CPUs: with other work
on them (load average 15-30 on 2 cores) a step of 4 x 64 tokens took 0.5-1 s in the lab, and DiLoCo, which
then waits on compute, not on the air, lost its advantage (benchmarks/README.md has both runs). Training is
deterministic (same seed, data and ring order), so the steps each method needs to reach the target do not
depend on load: the summary prints that ratio; the time ratio is it times the ratio of step times.

    sudo .venv/bin/python benchmarks/wifi_time_to_loss.py --repeats 3 --json runs/bench/wifi_time_to_loss.json
    .venv/bin/python benchmarks/wifi_time_to_loss.py --hosts hosts.json --home ~   # real Macs on Wi-Fi

Takes ~10 minutes (3 pairs) on a busy 2-core machine with the defaults.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a file: `python benchmarks/wifi_time_to_loss.py`
    sys.path.insert(0, str(ROOT))

from distributed.costmodel import ring_allreduce_seconds  # noqa: E402

MACRUN = str(Path(sys.executable).with_name("macrun"))
WIFI_BYTES_S = 25e6  # the lab's shared segment: 200 Mbit/s
TARGET = 0.5  # DiLoCo's time to the loss / DDP's
TX = 'for d in /sys/class/net/*; do echo "${d##*/}" "$(cat "$d/statistics/tx_bytes")"; done'


def overrides(args: argparse.Namespace, mode: str, name: str) -> list[str]:
    """The `--set` values of one run: the same task for both, each method's own steps and evaluation."""
    diloco = mode == "diloco"
    steps = args.ddp_steps * args.diloco_factor if diloco else args.ddp_steps
    every = args.inner_steps if diloco else args.ddp_eval
    sets = [f"run.name={name}", f"model.size={args.size}", f"data.max_bytes={args.max_bytes}",
            f"data.seq_len={args.seq_len}", f"train.batch_size={args.batch}", f"train.steps={steps}",
            f"train.warmup_steps={args.warmup}", f"train.eval_interval={every}", f"train.log_interval={every}",
            f"train.eval_batches={args.eval_batches}", "train.checkpoint_interval=0", f"strategy.mode={mode}",
            f"fault.sync_checkpoints={str(args.sync_checkpoints).lower()}"]
    if diloco:
        sets.append(f"strategy.inner_steps={args.inner_steps}")
        sets += [f"strategy.{key}={value}" for key, value in (("outer_lr", args.outer_lr),
                                                               ("outer_momentum", args.outer_momentum))
                 if value is not None]
    return [part for s in sets for part in ("--set", s)]


def tx_bytes(lab: Any) -> dict[str, dict[str, int]]:
    """Bytes each lab host has sent per interface, from the kernel's counters in its namespace."""
    out = {}
    for host in lab.hosts:
        text = lab.exec(host, ["sh", "-c", TX], check=True).stdout
        out[host.name] = {k: int(v) for k, v in (line.split() for line in text.splitlines())}
    return out


def sent_by_kind(before: dict[str, dict[str, int]], after: dict[str, dict[str, int]]) -> dict[str, int]:
    """All hosts' bytes sent between two readings, summed over Wi-Fi and over the Thunderbolt veths."""
    wifi = thunderbolt = 0
    for host, counts in after.items():
        for iface, count in counts.items():
            delta = count - before[host].get(iface, 0)
            wifi += delta if iface == "wifi0" else 0
            thunderbolt += delta if iface.startswith("thunderbolt") else 0
    return {"wifi": wifi, "thunderbolt": thunderbolt}


def run_once(args: argparse.Namespace, hosts_file: Path, home: Path, cwd: Path, mode: str, name: str,
             lab: Any, ranks: int) -> dict[str, Any]:
    """One `macrun train` to its end: its evaluations, wall time and (in the lab) bytes per link kind."""
    argv = [MACRUN, "train", "--hosts", str(hosts_file), "--link", "network",
            str(ROOT / "configs" / "quickstart.yaml"), *overrides(args, mode, name)]
    env = {k: v for k, v in os.environ.items() if k not in ("SSH_AUTH_SOCK", "MACRUN_DEBUG")}
    env["HOME"] = str(home)
    before = tx_bytes(lab) if lab is not None else None
    began = time.perf_counter()
    proc = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=args.timeout,
                          stdin=subprocess.DEVNULL)
    wall = time.perf_counter() - began
    if proc.returncode:
        raise SystemExit(f"{mode} run {name} failed (exit {proc.returncode}):\n{(proc.stdout + proc.stderr)[-3000:]}")
    rows = [json.loads(line) for line in (cwd / "runs" / name / "metrics.jsonl").read_text().splitlines()]
    # The loop's clock runs on through evaluations; each row's tokens/s does not (its window starts after the
    # previous evaluation), so the training time alone is the sum of window tokens / tokens/s.
    evals, trained, last = [], 0.0, 0
    for r in rows:
        trained += (r["step"] - last) * args.batch * args.seq_len * ranks / r["tokens_per_s"]
        last = r["step"]
        if "val_loss" in r:
            evals.append((r["step"], r["time"], r["val_loss"], trained))
    strategy = next((line.split("] ", 1)[-1] for line in proc.stdout.splitlines() if "strategy " in line), "")
    out = {"mode": mode, "name": name, "wall_s": wall, "loop_s": rows[-1]["time"], "steps": rows[-1]["step"],
           "bytes_sent_rank0": rows[-1]["bytes_sent"], "comm_s_rank0": rows[-1]["comm_seconds"], "evals": evals,
           "strategy_line": strategy}
    if lab is not None and before is not None:
        out["sent"] = sent_by_kind(before, tx_bytes(lab))
    return out


Eval = tuple[int, float, float, float]  # step, loop seconds (evaluations included), val loss, training seconds


def step_at_fraction(evals: Sequence[Eval], fraction: float) -> Eval:
    """The evaluation nearest `fraction` of the run's steps."""
    last = evals[-1][0]
    return min(evals, key=lambda e: abs(e[0] - fraction * last))


def time_to(evals: Sequence[Eval], target: float, at: int = 3) -> float | None:
    """Training seconds (`at=3`; loop seconds with evaluations for 1, the step for 0) at which the validation
    loss first reaches `target`, interpolated linearly between the evaluations around the crossing (the first
    one's when already there); None when never reached."""
    previous: Eval | None = None
    for row in evals:
        if row[2] <= target:
            if previous is None or previous[2] == row[2]:
                return float(row[at])
            share = (previous[2] - target) / (previous[2] - row[2])
            return previous[at] + share * (row[at] - previous[at])
        previous = row
    return None


def summarize(runs: list[dict[str, Any]], fraction: float) -> dict[str, Any]:
    """The common target, each run's time to it, and DiLoCo/DDP per pair (runs alternate within a pair)."""
    ddp = [r for r in runs if r["mode"] == "ddp"]
    diloco = [r for r in runs if r["mode"] == "diloco"]
    target = max(step_at_fraction(r["evals"], fraction)[2] for r in ddp)
    for r in runs:
        r["time_to_target_s"] = time_to(r["evals"], target)
        r["time_to_target_with_evals_s"] = time_to(r["evals"], target, at=1)
        r["steps_to_target"] = time_to(r["evals"], target, at=0)
        r["step_s"] = r["loop_s"] / r["steps"]
    ratios = [d["time_to_target_s"] / p["time_to_target_s"] for p, d in zip(ddp, diloco, strict=True)
              if d["time_to_target_s"] is not None and p["time_to_target_s"]]
    reached = all(d["time_to_target_s"] is not None for d in diloco)
    with_evals = [d["time_to_target_with_evals_s"] / p["time_to_target_with_evals_s"]
                  for p, d in zip(ddp, diloco, strict=True)
                  if d["time_to_target_with_evals_s"] is not None and p["time_to_target_with_evals_s"]]
    # Training is deterministic (same seed, data and ring order), so steps to the target do not depend on load.
    steps = [d["steps_to_target"] / p["steps_to_target"] for p, d in zip(ddp, diloco, strict=True)
             if d["steps_to_target"] is not None and p["steps_to_target"]]
    return {"target_val_loss": target, "ratios": ratios, "all_diloco_reached": reached,
            "steps_ratio": statistics.median(steps) if steps else None,
            "ratios_with_evals": with_evals,
            "ratio_median": statistics.median(ratios) if ratios and reached else None,
            "ratio_min": min(ratios) if ratios else None, "ratio_max": max(ratios) if ratios else None,
            "ddp_step_s": statistics.median(r["step_s"] for r in ddp),
            "diloco_step_s": statistics.median(r["step_s"] for r in diloco)}


def describe(r: dict[str, Any]) -> str:
    reached = r["time_to_target_s"]
    hit = f"{reached:6.1f} s of training" if reached is not None else "  never"
    # DDP's all_sum runs inside the compiled step (its time is in the step); DiLoCo's exchange is timed apart.
    waited = f", {r['comm_s_rank0'] / r['loop_s']:.0%} of it in exchanges" if r["mode"] == "diloco" else ""
    sent = f" · sent wifi {r['sent']['wifi'] / 1e6:.0f} MB, thunderbolt {r['sent']['thunderbolt'] / 1e6:.2f} MB" \
        if "sent" in r else ""
    at = f" (step {r['steps_to_target']:.0f})" if r["steps_to_target"] is not None else ""
    return (f"{r['mode']:>6} {r['name']:>10}: to target {hit}{at} · {r['steps']} steps in {r['loop_s']:.1f} s "
            f"({r['step_s'] * 1e3:.0f} ms/step{waited}, whole command {r['wall_s']:.0f} s) · final val "
            f"{r['evals'][-1][2]:.3f}{sent}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=2, help="pairs of runs (DDP, DiLoCo), order alternating")
    p.add_argument("--size", default="mini", help="model.size (default mini: 0.84M parameters)")
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--batch", type=int, default=2, help="train.batch_size per rank")
    p.add_argument("--max-bytes", type=int, default=1_000_000, help="data.max_bytes of the stdlib text")
    p.add_argument("--ddp-steps", type=int, default=40)
    p.add_argument("--ddp-eval", type=int, default=4, help="DDP's eval_interval")
    p.add_argument("--diloco-factor", type=int, default=3, help="DiLoCo's steps = this x --ddp-steps")
    p.add_argument("--inner-steps", type=int, default=10, help="DiLoCo's H (also its eval_interval)")
    p.add_argument("--outer-lr", type=float, default=None, help="strategy.outer_lr (default: the config's)")
    p.add_argument("--outer-momentum", type=float, default=None, help="strategy.outer_momentum (default: config's)")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--eval-batches", type=int, default=16, help="batches per evaluation (the same for both)")
    p.add_argument("--sync-checkpoints", action="store_true",
                   help="DiLoCo: checkpoint every round (fault.sync_checkpoints, macrun's default); off here, so both "
                        "methods checkpoint only at the end (each checkpoint is fetched to the master over the Wi-Fi)")
    p.add_argument("--fraction", type=float, default=0.8, help="the target is DDP's val loss at this share of its run")
    p.add_argument("--timeout", type=float, default=600, help="seconds per run")
    p.add_argument("--hosts", type=Path, default=None, help="use these hosts instead of bringing up a lab")
    p.add_argument("--home", type=Path, default=None, help="HOME whose .ssh reaches --hosts (default: $HOME)")
    p.add_argument("--lab-hosts", type=int, default=3)
    p.add_argument("--prefix", default="mrw", help="lab name prefix (default mrw)")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)

    from distributed.config import config_from_dict
    from distributed.models.gpt import build_model, count_params

    cfg = config_from_dict({"model": {"size": args.size}, "data": {"seq_len": args.seq_len}})
    params = count_params(build_model(cfg.model, args.seq_len, 0))
    lab = None
    if args.hosts is None:
        from tests.lab.labnet import Lab, LabUnavailable

        try:
            lab = Lab.up(args.lab_hosts, prefix=args.prefix)
        except LabUnavailable as exc:
            print(f"error: cannot bring up the lab: {exc}", file=sys.stderr)
            return 2
        hosts_file, home = lab.state_dir / "hosts.json", lab.ssh_home
        n = args.lab_hosts
    else:
        from launcher.room.hosts import load_hosts

        hosts_file, home = args.hosts.resolve(), (args.home or Path.home()).resolve()
        n = sum(h.slots for h in load_hosts(hosts_file))
    # The shared segment carries every station's sends: each ring link gets about 1/n of the air.
    modelled = ring_allreduce_seconds(params * 4, n, WIFI_BYTES_S / n, 0.002)
    print(f"{args.size} GPT: {params / 1e6:.2f}M parameters, {params * 4 / 1e6:.2f} MB of float32 gradients; "
          f"cost model: one ring allreduce over {n} stations sharing 200 Mbit/s ≈ {modelled:.2f} s", flush=True)
    runs: list[dict[str, Any]] = []
    load = [os.getloadavg()[0]]
    try:
        with tempfile.TemporaryDirectory(prefix="macrun-wifi-") as tmp:
            for i in range(args.repeats):
                order = ("ddp", "diloco") if i % 2 == 0 else ("diloco", "ddp")
                pair = {}
                for mode in order:
                    pair[mode] = run_once(args, hosts_file, home, Path(tmp), mode, f"{mode}{i}", lab, n)
                    print(f"  {mode} #{i}: {pair[mode]['steps']} steps, loop {pair[mode]['loop_s']:.1f} s, "
                          f"final val {pair[mode]['evals'][-1][2]:.3f} · {pair[mode]['strategy_line']}", flush=True)
                    load.append(os.getloadavg()[0])
                runs += [pair["ddp"], pair["diloco"]]
    finally:
        if lab is not None:
            lab.down()
    summary = summarize(runs, args.fraction)
    print(f"target: validation loss {summary['target_val_loss']:.3f} (DDP's at ~{args.fraction:.0%} of its run)")
    for r in runs:
        print(describe(r))
    ratios = ", ".join(f"{x:.2f}" for x in summary["ratios"])
    verdict = (f"median {summary['ratio_median']:.2f} (target <= {TARGET})" if summary["ratio_median"] is not None
               else "DiLoCo did not reach the target in every run")
    print(f"DiLoCo/DDP training time to target, per pair: {ratios} · {verdict} · median step DDP "
          f"{summary['ddp_step_s'] * 1e3:.0f} ms, DiLoCo {summary['diloco_step_s'] * 1e3:.0f} ms")
    print("with the evaluations' time included: " + ", ".join(f"{x:.2f}" for x in summary["ratios_with_evals"]))
    if summary["steps_ratio"] is not None:
        print(f"DiLoCo needs {summary['steps_ratio']:.2f}x DDP's steps to the target (independent of load): the time "
              f"ratio is that times DiLoCo's step / DDP's step")
    print(f"load average (1 min) over the runs: {min(load):.1f}-{max(load):.1f} on {os.cpu_count()} CPUs")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
        args.json.write_text(json.dumps({
            "benchmark": "wifi_time_to_loss", "args": {k: str(v) for k, v in vars(args).items()},
            "params": params, "modelled_allreduce_s": modelled, "hosts": n, "summary": summary, "runs": runs,
            "load_average_1min": load, "commit": commit.stdout.strip(), "python": platform.python_version(),
            "time": time.strftime("%Y-%m-%dT%H:%M:%S")}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
