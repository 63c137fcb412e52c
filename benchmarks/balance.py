"""Balanced DDP or DiLoCo against equal shares with one slow rank: the fast ranks' idle time per step, steps/s.

`--ranks` local ranks (MLX ring on loopback), each pinned to its own CPU with `taskset`; the last one is the
slow Mac: it runs in a cgroup with a CPU quota (`--slow-quota` of one core; cgroup v1 or v2, needs root),
or, where no cgroup can be made, shares its CPU with a busy loop (about half a core). Runs alternate
strategy.balance off / auto (`--repeats` pairs) so machine noise hits both alike.

Each rank times its step with the worker's own `measure_step_seconds`, agrees on shares with
`distributed.balance.agree_shares` (auto) and trains with the real sampler and `DDPStrategy` (shares,
gradient weights, bucketed all_sum). The step is cut in three evaluations so the wait can be timed:
forward+backward, the all_sum, the AdamW update. A fast rank's time in the all_sum is its idle time (plus
the transfer itself, which the slow rank's own all_sum time shows). steps/s is rank 0's over the timed steps.
With `--strategy diloco` the ranks train with the real `DiLoCoStrategy` (H = `--inner-steps`, shares weighting
the pseudo-gradients): a fast rank's idle time is its wait at each round's exchange, spread over the round.

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0 \\
        .venv/bin/python benchmarks/balance.py --steps 30 --repeats 2 --json runs/bench/balance.json
    (same) benchmarks/balance.py --strategy diloco --inner-steps 5 --steps 30 --json runs/bench/balance_diloco.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]

# One rank. argv: out_dir data_dir config_json balance warmup steps
RANK = r"""
import json, statistics, sys, time
from pathlib import Path
import mlx.core as mx
import mlx.nn as nn
from distributed.balance import agree_shares
from distributed.config import config_from_dict
from distributed.data import BatchSampler
from distributed.diloco import DiLoCoStrategy
from distributed.models.gpt import build_model, loss_fn
from distributed.strategy import DDPStrategy
from distributed.train import make_optimizer
from distributed.worker import measure_step_seconds

out, data, cfg = Path(sys.argv[1]), Path(sys.argv[2]), config_from_dict(json.loads(sys.argv[3]))
mode, warmup, steps, kind, h = sys.argv[4], int(sys.argv[5]), int(sys.argv[6]), sys.argv[7], int(sys.argv[8])
group = mx.distributed.init(backend="ring", strict=True)
rank, world, batch = group.rank(), group.size(), cfg.train.batch_size
seconds = measure_step_seconds(cfg, group=group)
if mode == "auto":  # every rank counts as its own host here: the slow one is the other Mac
    plan = agree_shares(batch / seconds, batch * world, group)
    shares, speeds, line = plan.shares, plan.speeds, plan.describe()
else:  # the speeds, for the record, but equal shares
    speeds = mx.distributed.all_gather(mx.array([batch / seconds]), group=group).tolist()
    shares, line = (batch,) * world, "balance off"
model = build_model(cfg.model, cfg.data.seq_len, cfg.run.seed)
optimizer = make_optimizer(cfg)
optimizer.init(model.trainable_parameters())
if kind == "diloco":  # the real DiLoCo exchange, weighted by the shares (plain averaging as the outer step)
    strategy = DiLoCoStrategy(group, inner_steps=h, outer_lr=1.0, outer_momentum=0.0)
    strategy.shares = tuple(shares) if len(set(shares)) > 1 else None
else:
    strategy = DDPStrategy(group, shares=shares)
strategy.setup(model, rank=rank, world_size=world)
strategy.grad_weight = shares[rank] * world / sum(shares)
sampler = BatchSampler(data / "train.bin", cfg.data.seq_len, batch, rank, world, cfg.run.seed, shares=shares)
state = [model.state, optimizer.state]
grads_of = mx.compile(lambda x, y: nn.value_and_grad(model, loss_fn)(model, x, y), inputs=state, outputs=state)
reduce = mx.compile(strategy.reduce_gradients)
compute, wait = [], []
for step in range(warmup + steps):
    if step == warmup:
        mx.eval(mx.distributed.all_sum(mx.array(1.0), group=group))  # start the clock together
        began = time.perf_counter()
    x, y = (mx.array(a) for a in sampler.batch(step))
    t0 = time.perf_counter()
    loss, grads = grads_of(x, y)
    mx.eval(loss, grads)
    t1 = time.perf_counter()
    if kind == "diloco":  # compute = the step with its update; waiting = the round's exchange, per step
        optimizer.update(model, grads)
        mx.eval(state)
        t1 = time.perf_counter()
        strategy.after_step(model, optimizer, step + 1)
        t2 = time.perf_counter()
    else:
        grads = reduce(grads)
        mx.eval(grads)
        t2 = time.perf_counter()
        optimizer.update(model, grads)
        mx.eval(state)
    if step >= warmup:
        compute.append(t1 - t0)
        wait.append(t2 - t1)
elapsed = time.perf_counter() - began
(out / f"rank{rank}.json").write_text(json.dumps({
    "rank": rank, "shares": list(shares), "speeds": speeds, "line": line, "measured_step_s": seconds,
    "steps_per_s": steps / elapsed, "compute_s": statistics.median(compute),
    # DDP waits every step (median); DiLoCo once a round (the mean over steps spreads it over the round's steps)
    "wait_s": statistics.fmean(wait) if kind == "diloco" else statistics.median(wait)}))
"""


def free_ports(count: int) -> list[int]:
    socks = [socket.socket() for _ in range(count)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class SlowCpu:
    """The slow rank's CPU: a cgroup CPU quota where one can be made, else a busy loop beside it."""

    def __init__(self, cpu: int, quota: float) -> None:
        self.cpu, self.quota = cpu, quota
        self.procs_file: Path | None = None
        self.dir: Path | None = None
        self.spinner: subprocess.Popen[bytes] | None = None
        name = f"macrun-balance-{os.getpid()}"
        period = 10_000  # µs: a short period, so a step of tens of ms is slowed evenly, not in bursts
        for base, v2 in ((Path("/sys/fs/cgroup/cpu"), False), (Path("/sys/fs/cgroup"), True)):
            try:
                d = base / name
                d.mkdir()
            except OSError:
                continue
            try:
                if v2:
                    (d / "cpu.max").write_text(f"{int(period * quota)} {period}")
                else:
                    (d / "cpu.cfs_period_us").write_text(str(period))
                    (d / "cpu.cfs_quota_us").write_text(str(int(period * quota)))
            except OSError:
                d.rmdir()
                continue
            self.dir, self.procs_file = d, d / "cgroup.procs"
            break
        if self.dir is None:
            self.spinner = subprocess.Popen(["taskset", "-c", str(cpu), sys.executable, "-c", "while True: pass"])
        self.how = (f"cgroup quota {quota:.0%} of CPU {cpu}" if self.dir else
                    f"a busy loop sharing CPU {cpu} (no cgroup could be made: about half a core)")

    def wrap(self, argv: list[str]) -> list[str]:
        pin = ["taskset", "-c", str(self.cpu)]
        if self.procs_file is None:
            return pin + argv
        # Join the cgroup before exec, so every thread the rank starts is in it.
        return ["sh", "-c", f'echo $$ > {self.procs_file} && exec "$@"', "sh", *pin, *argv]

    def close(self) -> None:
        if self.spinner is not None:
            self.spinner.kill()
            self.spinner.wait()
        if self.dir is not None:
            for _ in range(50):  # the rank's threads may take a moment to leave
                try:
                    self.dir.rmdir()
                    break
                except OSError:
                    time.sleep(0.1)


def run_once(args: argparse.Namespace, work: Path, data: Path, mode: str, slow: SlowCpu, tag: str) -> dict[str, Any]:
    out = work / tag
    out.mkdir(parents=True)
    (out / "rank.py").write_text(RANK)
    hostfile = out / "hostfile.json"
    hostfile.write_text(json.dumps([[f"127.0.0.1:{p}"] for p in free_ports(args.ranks)]))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MLX_HOSTFILE": str(hostfile), "OPENBLAS_NUM_THREADS": "1"}
    cfg = {"model": {"size": args.size, "activation": "relu2"}, "data": {"seq_len": args.seq_len},
           "train": {"batch_size": args.batch, "warmup_steps": 2}}
    warmup = args.inner_steps if args.strategy == "diloco" else 3  # DiLoCo: one round, then whole rounds
    argv = [sys.executable, str(out / "rank.py"), str(out), str(data), json.dumps(cfg), mode, str(warmup),
            str(args.steps), args.strategy, str(args.inner_steps)]
    cpus = os.cpu_count() or 1
    procs = []
    for r in range(args.ranks):
        cmd = slow.wrap(argv) if r == args.ranks - 1 else ["taskset", "-c", str(r % cpus), *argv]
        procs.append(subprocess.Popen(cmd, env={**env, "MLX_RANK": str(r)}, cwd=out, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    try:
        for p in procs:
            output, _ = p.communicate(timeout=args.timeout)
            if p.returncode:
                raise SystemExit(f"a rank failed ({mode}):\n{output[-3000:]}")
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(args.ranks)]
    fast = ranks[:-1]
    return {"balance": mode, "shares": ranks[0]["shares"], "speeds": ranks[0]["speeds"], "line": ranks[0]["line"],
            "steps_per_s": ranks[0]["steps_per_s"],
            "fast_idle_s": statistics.mean(r["wait_s"] for r in fast), "slow_wait_s": ranks[-1]["wait_s"],
            "fast_compute_s": statistics.mean(r["compute_s"] for r in fast), "slow_compute_s": ranks[-1]["compute_s"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ranks", type=int, default=2, help="local ranks; the last one is slowed (default 2)")
    p.add_argument("--slow-quota", type=float, default=0.35, help="the slow rank's share of one CPU (cgroup)")
    p.add_argument("--steps", type=int, default=30, help="timed steps per run (after 3 warm-up steps)")
    p.add_argument("--repeats", type=int, default=2, help="pairs of runs (off, auto)")
    p.add_argument("--size", default="tiny")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch", type=int, default=8, help="train.batch_size: the global batch is ranks × this")
    p.add_argument("--strategy", choices=("ddp", "diloco"), default="ddp",
                   help="ddp: idle in each step's all_sum; diloco: idle at each round's exchange, spread per step")
    p.add_argument("--inner-steps", type=int, default=5, help="DiLoCo's H (--steps is rounded up to whole rounds)")
    p.add_argument("--timeout", type=float, default=300)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    if args.strategy == "diloco":
        args.steps = -(-args.steps // args.inner_steps) * args.inner_steps
    if shutil.which("taskset") is None:
        raise SystemExit("benchmarks/balance.py pins ranks with taskset (util-linux)")

    from distributed.config import config_from_dict
    from distributed.data import prepare_data

    slow = SlowCpu((args.ranks - 1) % (os.cpu_count() or 1), args.slow_quota)
    runs = []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            data = Path(tmp) / "data"
            prepare_data(config_from_dict({"data": {"max_bytes": 400_000, "seq_len": args.seq_len}}).data, data)
            what = f"DiLoCo H={args.inner_steps}" if args.strategy == "diloco" else "DDP"
            print(f"{what}, {args.ranks} ranks, the last slowed by {slow.how}; {args.size} GPT, batch {args.batch} × "
                  f"{args.seq_len} per rank, {args.steps} timed steps per run", flush=True)
            for i in range(args.repeats):
                for mode in ("off", "auto"):
                    run = run_once(args, Path(tmp), data, mode, slow, f"{mode}{i}")
                    runs.append(run)
                    print(f"{mode:>4} #{i}: shares {run['shares']} · {run['steps_per_s']:.2f} steps/s · fast ranks "
                          f"idle {run['fast_idle_s'] * 1e3:.0f} ms/step (compute {run['fast_compute_s'] * 1e3:.0f}"
                          f" ms) · slow rank compute {run['slow_compute_s'] * 1e3:.0f} ms, waiting "
                          f"{run['slow_wait_s'] * 1e3:.0f} ms · {run['line']}", flush=True)
    finally:
        slow.close()
    # Per pair (off #i, auto #i ran back to back), then the median: noise that lasts a pair cancels.
    pairs = [{"steps_per_s_ratio": auto["steps_per_s"] / off["steps_per_s"],
              "idle_ratio": auto["fast_idle_s"] / max(off["fast_idle_s"], 1e-9)}
             for off, auto in zip(runs[0::2], runs[1::2], strict=True)]
    speedup = statistics.median(p["steps_per_s_ratio"] for p in pairs)
    idle = statistics.median(p["idle_ratio"] for p in pairs)
    print("per pair, auto/off: steps/s " + ", ".join(f"{p['steps_per_s_ratio']:.2f}" for p in pairs)
          + " · fast ranks' idle " + ", ".join(f"{p['idle_ratio']:.2f}" for p in pairs))
    print(f"median ratio auto/off: steps/s {speedup:.2f} (target > 1), fast ranks' idle per step {idle:.2f} "
          f"(target < 0.5)")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
        args.json.write_text(json.dumps({
            "benchmark": "balance", "args": {k: str(v) for k, v in vars(args).items()}, "slowed_by": slow.how,
            "runs": runs, "pairs": pairs, "steps_per_s_ratio": speedup, "idle_ratio": idle,
            "commit": commit.stdout.strip(), "python": platform.python_version(),
            "time": time.strftime("%Y-%m-%dT%H:%M:%S")}, indent=2))


if __name__ == "__main__":
    main()
