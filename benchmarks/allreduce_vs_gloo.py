"""Bus bandwidth of macrun's all-reduce (MLX's ring backend) against torch.distributed's gloo, same ranks, same run.

Both collectives run in the same processes, launched by macrun (so on the same hosts and links), size by size,
alternating which goes first each iteration so machine noise hits both alike. Both results are checked.
busbw = size / time · 2(n−1)/n (NCCL-tests); an iteration's time is the slowest rank's.

    .venv/bin/python benchmarks/allreduce_vs_gloo.py --nproc 2 --json runs/bench/allreduce_vs_gloo.json
    HOME=/tmp/macrun-lab/master-home .venv/bin/python benchmarks/allreduce_vs_gloo.py \\
        --hosts hosts-with-torch.json --link network --sizes 16M --iters 3

torch is needed on every rank (it is a benchmark-only requirement, not a macrun dependency). On hosts, gloo
binds the interface of the host's address (the launcher sets GLOO_SOCKET_IFNAME), so compare with
`--link network`: over Thunderbolt MLX would use the cables and gloo the network. Target: macrun's busbw
>= gloo's at every size >= 16 MB.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

EVENT = "MACRUN-GLOO "


# ---- rank side (runs on every rank, with the env contract) ----------------------------------------------


def measure_size(nbytes: int, iters: int, group: Any, world: int, rank: int) -> dict[str, Any]:
    """Both all-reduces of one float32 size: per-iteration times (slowest rank) and wrong elements (all ranks)."""
    import mlx.core as mx
    import torch
    import torch.distributed as dist

    n, want = nbytes // 4, world * (world + 1) / 2
    x = mx.full((n,), float(rank + 1), dtype=mx.float32)
    mx.eval(x)
    source = torch.full((n,), float(rank + 1), dtype=torch.float32)
    buf = source.clone()
    times: dict[str, list[float]] = {"mlx": [], "gloo": []}
    cpu: dict[str, list[float]] = {"mlx": [], "gloo": []}  # CPU seconds of this process, all its threads
    wrong = {"mlx": 0, "gloo": 0}

    def run_mlx(record: bool) -> None:
        began, began_cpu = time.perf_counter(), time.process_time()
        y = mx.distributed.all_sum(x, group=group)
        mx.eval(y)
        took, used = time.perf_counter() - began, time.process_time() - began_cpu
        wrong["mlx"] += int(mx.sum(y != want).item())
        if record:
            times["mlx"].append(took)
            cpu["mlx"].append(used)

    def run_gloo(record: bool) -> None:
        buf.copy_(source)  # gloo reduces in place: restore the input outside the timed part
        began, began_cpu = time.perf_counter(), time.process_time()
        dist.all_reduce(buf)
        took, used = time.perf_counter() - began, time.process_time() - began_cpu
        wrong["gloo"] += int((buf != want).sum().item())
        if record:
            times["gloo"].append(took)
            cpu["gloo"].append(used)

    run_mlx(False)
    run_gloo(False)
    for i in range(iters):
        for fn in (run_mlx, run_gloo) if i % 2 == 0 else (run_gloo, run_mlx):
            fn(True)
    row: dict[str, Any] = {"bytes": nbytes, "iterations": iters}
    bad = torch.tensor([wrong["mlx"], wrong["gloo"]], dtype=torch.int64)
    dist.all_reduce(bad)
    for k, name in enumerate(("mlx", "gloo")):
        t = torch.tensor(times[name], dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        slowest = t.tolist()
        median = statistics.median(slowest)
        used = torch.tensor([statistics.median(cpu[name])], dtype=torch.float64)
        dist.all_reduce(used)  # summed over ranks: the CPU one all-reduce costs the whole job
        row[name] = {"time_s": {"median": median, "min": min(slowest), "max": max(slowest)},
                     "busbw_bytes_s": nbytes / median * 2 * (world - 1) / world, "wrong": int(bad[k]),
                     "cpu_s": float(used[0])}
    row["ratio"] = row["mlx"]["busbw_bytes_s"] / row["gloo"]["busbw_bytes_s"]
    return row


def rank_main(sizes: list[int], iters: int, threads: int | None) -> int:
    import mlx.core as mx
    import torch
    import torch.distributed as dist

    if threads:
        torch.set_num_threads(threads)
    group = mx.distributed.init(backend="ring", strict=True)
    dist.init_process_group("gloo", init_method="env://")
    rank, world = group.rank(), group.size()
    rows = []
    for nbytes in sizes:
        rows.append(measure_size(nbytes, iters, group, world, rank))
        if rank == 0:
            print(EVENT + json.dumps(rows[-1]), flush=True)
    dist.destroy_process_group()
    return 0 if all(r["mlx"]["wrong"] == 0 and r["gloo"]["wrong"] == 0 for r in rows) else 1


# ---- driver ---------------------------------------------------------------------------------------------


def driver_main(args: argparse.Namespace) -> int:
    repo = Path(__file__).resolve().parent.parent
    if str(repo) not in sys.path:  # run as a file: `python benchmarks/allreduce_vs_gloo.py`
        sys.path.insert(0, str(repo))
    from launcher.benchmark import parse_sizes, source_version
    from launcher.jobs.api import LaunchSpec, launch
    from launcher.room.hosts import load_hosts
    from launcher.views.benchview import format_rate, format_size, format_time

    sizes = parse_sizes(args.sizes)
    hosts = load_hosts(args.hosts) if args.hosts else None
    script = Path(__file__).resolve()
    rank_args = ["--rank-side", "--sizes", ",".join(map(str, sizes)), "--iters", str(args.iters)]
    if args.threads:
        rank_args += ["--threads", str(args.threads)]
    argv = ["python", script.name if hosts else str(script), *rank_args]
    rows: list[dict[str, Any]] = []
    ring: list[str] = []

    def emit(line: str) -> None:
        at = line.find(EVENT)
        if at >= 0:
            rows.append(json.loads(line[at + len(EVENT):]))
            r = rows[-1]
            m, g = r["mlx"], r["gloo"]
            print(f"{format_size(r['bytes'])}: MLX ring {format_rate(m['busbw_bytes_s'])} "
                  f"({format_time(m['time_s']['median'])}, CPU {format_time(m['cpu_s'])}), gloo "
                  f"{format_rate(g['busbw_bytes_s'])} ({format_time(g['time_s']['median'])}, CPU "
                  f"{format_time(g['cpu_s'])}), ratio {r['ratio']:.2f}", flush=True)
            return
        if line.startswith("ring "):
            ring.append(line)
        if args.verbose or "error" in line.lower() or "Traceback" in line:
            print(line, flush=True)

    spec = LaunchSpec(argv=argv, run_dir=Path(args.run_dir).resolve(), name="allreduce-vs-gloo", hosts=hosts,
                      nproc=args.nproc, files={script.name: script} if hosts else {}, link=args.link)
    result = launch(spec, emit=emit)
    world = len(hosts) if hosts else args.nproc
    print(f"\n{world} ranks, {ring[0] if ring else 'local ranks over loopback'}")
    print(f"{'size':>9}  {'MLX ring busbw':>15}  {'gloo busbw':>12}  {'MLX/gloo':>8}  {'CPU MLX':>9}  "
          f"{'CPU gloo':>9}  checks")
    for r in rows:
        ok = "ok" if r["mlx"]["wrong"] == 0 and r["gloo"]["wrong"] == 0 else "WRONG"
        print(f"{format_size(r['bytes']):>9}  {format_rate(r['mlx']['busbw_bytes_s']):>15}  "
              f"{format_rate(r['gloo']['busbw_bytes_s']):>12}  {r['ratio']:>8.2f}  "
              f"{format_time(r['mlx']['cpu_s']):>9}  {format_time(r['gloo']['cpu_s']):>9}  {ok}")
    print("busbw = size / time · 2(n−1)/n, time = slowest rank, median over iterations; CPU = CPU time of one "
          "all-reduce summed over ranks (all threads)")
    if args.json:
        import platform

        import torch

        doc = {"benchmark": "allreduce_vs_gloo", "world_size": world, "ring": ring[0] if ring else None,
               "macrun": source_version(), "torch": torch.__version__, "platform": platform.platform(),
               "cpus": os.cpu_count(), "load_avg": os.getloadavg(), "rows": rows, "exit_code": result.exit_code}
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(doc, indent=2) + "\n")
        print(f"wrote {args.json}")
    return result.exit_code


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rank-side", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--hosts", help="hosts.json (each host's python must have torch); default: local ranks")
    p.add_argument("--nproc", type=int, default=2, help="local ranks when there is no --hosts")
    p.add_argument("--link", default="network", help="auto | thunderbolt | network (default network: see above)")
    p.add_argument("--sizes", default="16M,64M,256M", help="bytes per all-reduce (float32)")
    p.add_argument("--iters", type=int, default=5, help="timed iterations per size and backend")
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads on every rank (0: torch's default)")
    p.add_argument("--run-dir", default="runs/bench/allreduce-vs-gloo")
    p.add_argument("--json", help="write every figure here")
    p.add_argument("--verbose", action="store_true", help="show the launcher's and the ranks' other output")
    args = p.parse_args()
    if args.rank_side:
        return rank_main([int(s) for s in args.sizes.split(",")], args.iters, args.threads or None)
    return driver_main(args)


if __name__ == "__main__":
    sys.exit(main())
