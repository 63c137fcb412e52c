"""DiLoCo against DDP at equal tokens: final validation loss and bytes sent, on N local ranks through macrun's launcher.

Every configuration trains the quickstart task (configs/quickstart.yaml, here with a smaller model and
batch by default so the whole grid fits a 2-core CPU in ~15 minutes) for the same number of steps on
`--ranks` local ranks started by `launcher.training.plan_training` + `launcher.api.launch` (what
`macrun train --nproc N` does), so every configuration sees the same tokens:

* DDP: the gradients averaged every step;
* DiLoCo (Douillard et al. 2023, arXiv:2311.08105) for every H in `--hs` and wire format in `--dtypes`.

Then, with one rank, DiLoCo's outer step alone (a lookahead-style Nesterov step every H steps on the change
of a single replica) against plain training, also at equal tokens. macrun's worker runs any one-rank job
without a strategy, so this one starts `distributed.train.train` with a one-rank `DiLoCoStrategy` itself.

For each run it reads rank 0's metrics.jsonl (bytes_sent, val_loss) and scores the final checkpoint on
`--eval-batches` validation batches (more than the run's own eval, same windows for every run). Bytes
are what one rank put on the wire, as the strategies count them (the ring's 2(n-1)/n share of an
allreduce; int8 is all-gathered, see distributed/compress.py), with the one-off start-up broadcast both
in (`bytes`) and out (`steady`: per step between the first and the last evaluation).

Reference: "Scaling Laws for DiLoCo" (Charles et al. 2025, arXiv:2503.09799), Table 4: with 4 replicas
and H=30 a 35M model loses 2.0% against data parallel. Targets here: DiLoCo H=100 int8 within 2% of
DDP's validation loss while sending >= 400x fewer bytes; with one rank, DiLoCo not worse than plain.

    python benchmarks/diloco_vs_ddp.py --json runs/bench/diloco_vs_ddp.json            # ~15 min, 2 cores
    python benchmarks/diloco_vs_ddp.py --size mini --seq-len 128 --batch 16 --steps 2000 # on a Mac
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import mlx.core as mx

from distributed.checkpoint import latest_checkpoint
from distributed.config import config_from_dict, load_config
from distributed.data import val_batches
from distributed.models.gpt import build_model, count_params, loss_fn
from launcher.api import launch
from launcher.training import plan_training

ROOT = Path(__file__).resolve().parents[1]

LOSS_TARGET = 1.02  # DiLoCo H=100 int8 val loss / DDP's
BYTES_TARGET = 400.0  # DDP's bytes / DiLoCo H=100 int8's

# One rank of DiLoCo: macrun's worker gives a one-rank job no strategy, so this starts the loop itself.
ONE_RANK_DILOCO = """
import sys
from pathlib import Path
from distributed.config import load_config
from distributed.diloco import DiLoCoStrategy
from distributed.train import train
config, data, run_dir = sys.argv[1:4]
cfg = load_config(config)
strategy = DiLoCoStrategy.from_config(None, cfg.strategy, log=lambda m: print(m, flush=True))
print(f"strategy diloco: one rank, H={cfg.strategy.inner_steps}", flush=True)
result = train(cfg, data_dir=Path(data), run_dir=Path(run_dir), strategy=strategy, log=lambda m: print(m, flush=True))
print(f"done: step {result.step} · loss {result.loss:.3f} · val {result.val_loss:.3f}", flush=True)
"""


@dataclass
class Run:
    """One training run of the grid and what it measured."""

    name: str
    ranks: int
    mode: str  # "ddp", "diloco" or "plain" (one rank, no strategy)
    h: int | None = None
    dtype: str | None = None
    val_loss: float = math.nan  # the final checkpoint on --eval-batches batches
    run_val_loss: float = math.nan  # the run's own last eval (rank 0's metrics.jsonl)
    train_loss: float = math.nan  # mean loss of the last logging window
    bytes: int = 0  # rank 0's bytes_sent at the end
    steady_bytes_per_step: float = 0.0  # between the first and last eval: no start-up broadcast
    seconds: float = 0.0  # wall time of the launch
    tokens: int = 0
    curve: list[dict[str, float]] = field(default_factory=list)  # (step, val_loss, bytes_sent) at each eval


def overrides_for(args: argparse.Namespace, workdir: Path) -> list[str]:
    """The --set overrides shared by every run: model, data, schedule; evals on every H's round boundary."""
    eval_every = max(args.hs) if args.steps % max(args.hs) == 0 else 0
    return [f"model.size={args.size}", f"data.seq_len={args.seq_len}", f"data.max_bytes={args.max_bytes}",
            f"train.steps={args.steps}", f"train.batch_size={args.batch}", f"train.eval_interval={eval_every}",
            "train.checkpoint_interval=0", "train.keep_checkpoints=1", f"train.log_interval={args.log_interval}",
            f"run.output_dir={workdir}", *args.set]


def run_one(args: argparse.Namespace, workdir: Path, run: Run, log: Any) -> Run:
    """Train `run` through the launcher and read back what it measured."""
    sets = overrides_for(args, workdir) + [f"run.name={run.name}"]
    if run.mode in ("ddp", "diloco"):
        sets.append(f"strategy.mode={run.mode}")
    if run.h is not None:
        sets += [f"strategy.inner_steps={run.h}", f"strategy.exchange_dtype={run.dtype or 'float32'}"]
    if run.mode == "diloco":
        sets += args.diloco_set
    lines: list[str] = []
    cfg, spec = plan_training(args.config, sets, nproc=run.ranks, emit=lines.append)
    if run.mode == "diloco" and run.ranks == 1:
        spec = replace(spec, argv=["python", "-c", ONE_RANK_DILOCO, spec.argv[3], spec.argv[5], spec.argv[7]])
    began = time.perf_counter()
    result = launch(replace(spec, heartbeat_timeout=300), emit=lines.append)
    run.seconds = time.perf_counter() - began
    if result.exit_code != 0:
        tail = "\n".join(lines[-30:])
        raise SystemExit(f"{run.name} failed with exit code {result.exit_code}:\n{tail}")
    strategy_line = next((line for line in lines if "strategy " in line and ":" in line), "")
    if args.verbose:
        log(f"  {strategy_line}")
    run_dir = spec.run_dir
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "val_loss" in r]
    run.curve = [{"step": r["step"], "val_loss": r["val_loss"], "bytes_sent": r["bytes_sent"]} for r in evals]
    run.run_val_loss, run.train_loss, run.bytes = evals[-1]["val_loss"], rows[-1]["loss"], rows[-1]["bytes_sent"]
    if len(evals) >= 2:
        first, last = evals[0], evals[-1]
        run.steady_bytes_per_step = (last["bytes_sent"] - first["bytes_sent"]) / (last["step"] - first["step"])
    run.tokens = cfg.train.steps * cfg.train.batch_size * cfg.data.seq_len * run.ranks
    run.val_loss = score_checkpoint(run_dir, args.eval_batches)
    if not args.keep:
        shutil.rmtree(run_dir, ignore_errors=True)
    return run


def score_checkpoint(run_dir: Path, batches: int) -> float:
    """Mean validation loss of the run's final checkpoint on `batches` evenly spaced validation batches."""
    ckpt, warnings = latest_checkpoint(run_dir / "checkpoints")
    if ckpt is None:
        raise SystemExit(f"no checkpoint in {run_dir / 'checkpoints'}: {'; '.join(warnings)}")
    cfg = config_from_dict(ckpt.meta["config"])
    model = build_model(cfg.model, cfg.data.seq_len, cfg.run.seed)
    model.update(ckpt.tree("model"))
    model.eval()
    data = val_batches(run_dir / "data" / "val.bin", cfg.data.seq_len, cfg.train.batch_size, batches)
    losses = [loss_fn(model, mx.array(x), mx.array(y)) for x, y in data]
    return float(mx.mean(mx.stack(losses)).item())


def grid(args: argparse.Namespace) -> list[Run]:
    """Every run, DDP first (the reference), then DiLoCo per H and format, then the one-rank pair."""
    runs = [Run("ddp", args.ranks, "ddp")]
    runs += [Run(f"diloco-h{h}-{d}", args.ranks, "diloco", h, d) for h in args.hs for d in args.dtypes]
    if not args.no_one_rank:
        runs.append(Run("plain-1rank", 1, "plain"))
        runs += [Run(f"diloco-h{h}-1rank", 1, "diloco", h, "float32") for h in args.hs]
    return runs


def summarise(runs: list[Run]) -> dict[str, Any]:
    """Ratios to the reference of each group (DDP for N ranks, plain training for one) and the targets."""
    ddp = next(r for r in runs if r.mode == "ddp")
    plain = next((r for r in runs if r.mode == "plain"), None)
    rows = []
    for r in runs:
        ref = plain if r.ranks == 1 and plain is not None else ddp
        rows.append({**r.__dict__, "loss_ratio": r.val_loss / ref.val_loss,
                     "byte_ratio": ref.bytes / r.bytes if r.bytes else None,
                     "steady_byte_ratio": (ref.steady_bytes_per_step / r.steady_bytes_per_step
                                           if r.steady_bytes_per_step else None)})
    targets: dict[str, Any] = {}
    h100 = next((row for row in rows if row["mode"] == "diloco" and row["ranks"] > 1 and row["h"] == 100
                 and row["dtype"] == "int8"), None)
    if h100:
        targets["diloco_h100_int8_loss_ratio"] = {"value": h100["loss_ratio"], "target": f"<= {LOSS_TARGET}",
                                                  "met": h100["loss_ratio"] <= LOSS_TARGET}
        targets["diloco_h100_int8_byte_ratio"] = {"value": h100["byte_ratio"], "target": f">= {BYTES_TARGET:.0f}",
                                                  "met": h100["byte_ratio"] >= BYTES_TARGET,
                                                  "steady": h100["steady_byte_ratio"]}
    one = [row for row in rows if row["ranks"] == 1 and row["mode"] == "diloco"]
    if one and plain is not None:
        targets["one_rank_diloco_vs_plain"] = {"value": {f"H={row['h']}": row["loss_ratio"] for row in one},
                                               "target": "<= 1.0", "met": all(row["loss_ratio"] <= 1.0 for row in one)}
    return {"rows": rows, "targets": targets}


def table(summary: dict[str, Any]) -> str:
    head = (f"{'run':<20} {'ranks':>5} {'val loss':>9} {'ratio':>7} {'run val':>8} {'bytes/rank':>11} "
            f"{'fewer x':>8} {'steady x':>9} {'time':>6}")
    lines = [head, "-" * len(head)]
    for r in summary["rows"]:
        fewer = f"{r['byte_ratio']:.1f}" if r["byte_ratio"] else "-"
        steady = f"{r['steady_byte_ratio']:.1f}" if r["steady_byte_ratio"] else "-"
        lines.append(f"{r['name']:<20} {r['ranks']:>5} {r['val_loss']:>9.4f} {r['loss_ratio']:>7.4f} "
                     f"{r['run_val_loss']:>8.4f} {r['bytes'] / 1e6:>9.2f}MB {fewer:>8} {steady:>9} "
                     f"{r['seconds']:>5.0f}s")
    for name, t in summary["targets"].items():
        value = t["value"]
        shown = ", ".join(f"{k} {v:.4f}" for k, v in value.items()) if isinstance(value, dict) else f"{value:.4g}"
        lines.append(f"target {name}: {shown} (want {t['target']}) {'met' if t['met'] else 'MISSED'}")
    return "\n".join(lines)


def git_commit() -> str:
    done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    return done.stdout.strip() or "unknown"


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=str(ROOT / "configs" / "quickstart.yaml"))
    p.add_argument("--steps", type=int, default=600, help="steps per rank, the same for every run (a multiple of "
                   "every H keeps the evals on round boundaries)")
    p.add_argument("--size", default="tiny", help="model.size (quickstart: mini)")
    p.add_argument("--seq-len", type=int, default=32, help="data.seq_len (quickstart: 128)")
    p.add_argument("--batch", type=int, default=8, help="train.batch_size per rank (quickstart: 16)")
    p.add_argument("--max-bytes", type=int, default=4_000_000, help="data.max_bytes")
    p.add_argument("--ranks", type=int, default=4)
    p.add_argument("--hs", type=lambda s: [int(x) for x in s.split(",")], default=[10, 50, 100],
                   help="DiLoCo inner steps, comma-separated")
    p.add_argument("--dtypes", type=lambda s: s.split(","), default=["float32", "int8"],
                   help="DiLoCo exchange formats, comma-separated (float32, bfloat16, float16, int8)")
    p.add_argument("--eval-batches", type=int, default=64, help="validation batches to score each final checkpoint")
    p.add_argument("--log-interval", type=int, default=50)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a config override for every run, e.g. train.lr=1.0e-3")
    p.add_argument("--diloco-set", action="append", default=[], metavar="KEY=VALUE",
                   help="a config override for the DiLoCo runs only, e.g. strategy.outer_momentum=0.5")
    p.add_argument("--no-one-rank", action="store_true", help="skip the one-rank DiLoCo vs plain comparison")
    p.add_argument("--workdir", type=Path, default=None, help="where the runs go (default: a temp folder)")
    p.add_argument("--keep", action="store_true", help="keep each run's folder (checkpoints, data, logs)")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--verbose", action="store_true", help="print each run's strategy line")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="diloco-vs-ddp-"))
    workdir.mkdir(parents=True, exist_ok=True)
    runs = grid(args)
    started = time.perf_counter()
    print(f"{len(runs)} runs of {args.steps} steps: model {args.size}, {args.ranks} ranks x batch {args.batch} x "
          f"{args.seq_len} tokens, H in {args.hs}, exchange {args.dtypes}; runs in {workdir}", flush=True)
    try:
        for i, run in enumerate(runs, 1):
            run_one(args, workdir, run, print)
            print(f"[{i}/{len(runs)}] {run.name}: val {run.val_loss:.4f} (run's own eval {run.run_val_loss:.4f}) · "
                  f"{run.bytes / 1e6:.2f} MB sent per rank · {run.seconds:.0f} s", flush=True)
    finally:
        if args.workdir is None and not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    summary = summarise(runs)
    print(table(summary))
    elapsed = time.perf_counter() - started
    print(f"total {elapsed / 60:.1f} min")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        cfg = load_config(args.config, overrides_for(args, workdir))
        params = count_params(build_model(cfg.model, cfg.data.seq_len, cfg.run.seed))
        args.json.write_text(json.dumps({
            "benchmark": "diloco_vs_ddp", "config": str(args.config), "steps": args.steps, "size": args.size,
            "params": params, "seq_len": args.seq_len, "batch": args.batch, "ranks": args.ranks, "hs": args.hs,
            "dtypes": args.dtypes, "eval_batches": args.eval_batches, "overrides": overrides_for(args, workdir),
            "diloco_overrides": args.diloco_set,
            **summary, "seconds": elapsed, "commit": git_commit(), "mlx": mx.__version__,
            "python": platform.python_version(), "machine": platform.machine(),
            "time": time.strftime("%Y-%m-%dT%H:%M:%S")}, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
