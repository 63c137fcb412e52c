"""The rank side of `macrun benchmark`: what the ring's collectives and the links deliver, measured on every rank.

    python -m distributed.bench allreduce --sizes 1024,16777216 --dtype float32 --iters 20
    python -m distributed.bench latency --sizes 4,64,512,4096 --iters 50 --pings 20
    python -m distributed.bench bandwidth --seconds 0.5

The launcher starts this on every rank, exactly as it starts training (same env contract, same ring, same
links). Rank 0 reports each figure as one line `MACRUN-BENCH <json>` on stdout; `macrun benchmark` reads
those lines out of the rank's output stream and hides them. Going through stdout rather than the store keeps
the results in rank 0's log even when the launcher dies, and needs no hook into the launcher's store.

- allreduce / latency: first the raw TCP throughput of every ring link, all links at once as a collective
  loads them (`distributed.links.measure_ring`); then per size, after warm-up, the time of `all_sum` on
  every rank (an iteration ends when the slowest rank has its result: the per-iteration maximum over
  ranks), with every result checked against the exact expected sum. Bus bandwidth follows the NCCL-tests
  convention, busbw = algbw · 2(n−1)/n (Patarasuk & Yuan, "Bandwidth optimal all-reduce algorithms for
  clusters of workstations", 2009: a ring all-reduce sends 2(n−1)/n of the data over each link).
  latency adds ping-pongs of a 4-byte array between ring neighbours (`mx.distributed.send`/`recv`).
- bandwidth: one TCP probe per ordered pair of hosts and per link the two share (same IPv4 subnet), one
  at a time so each gets the link alone. Hosts are the first rank of each host; on one host, the ranks.

mlx is imported only by the collective benchmarks; nothing here imports the launcher.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from distributed.env import RankEnv
from distributed.errors import MacrunError, UsageError, report
from distributed.heartbeat import start_heartbeat
from distributed.links import Link, hostfile_address, list_links, measure_ring, run_probe, serve_probe
from distributed.store import StoreClient

EVENT_PREFIX = "MACRUN-BENCH "
TYPES = ("allreduce", "bandwidth", "latency")
DTYPES = {"float32": 4, "bfloat16": 2, "float16": 2}
# Largest integer up to which every integer is exact in the dtype: the check's sums stay below it.
EXACT_UP_TO = {"float32": 2 ** 24, "bfloat16": 2 ** 8, "float16": 2 ** 11}
PATTERN_PERIOD = 4  # element i of rank r holds (r+1)·(1 + i mod period): a misplaced chunk shows
STORE_TIMEOUT_S = 120.0


def emit_event(name: str, /, **fields: Any) -> None:
    """Print one result line for the launcher (rank 0 only calls this)."""
    print(EVENT_PREFIX + json.dumps({"event": name, **fields}, separators=(",", ":")), flush=True)


def parse_event(line: str) -> dict[str, Any] | None:
    """The event in an output line (a `[rank 0 host] ` prefix is allowed), or None when it is not one."""
    at = line.find(EVENT_PREFIX)
    if at < 0:
        return None
    try:
        event = json.loads(line[at + len(EVENT_PREFIX):])
    except ValueError:
        return None
    return event if isinstance(event, dict) and "event" in event else None


def busbw(nbytes: int, seconds: float, world: int) -> float:
    """Bus bandwidth of an all-reduce in bytes/s (NCCL-tests): algorithm bandwidth · 2(n−1)/n."""
    return nbytes / seconds * 2 * (world - 1) / world if seconds > 0 else 0.0


def check_period(world: int, dtype: str) -> int:
    """How many distinct values the check pattern uses so that every partial sum stays exact in `dtype`.

    0 means no pattern is exact (a huge ring in bf16): results are then compared with a tolerance.
    """
    total = world * (world + 1) // 2
    return min(PATTERN_PERIOD, EXACT_UP_TO[dtype] // total)


def timing(seconds: Sequence[float]) -> dict[str, float]:
    """Median and spread of per-iteration times."""
    ordered = sorted(seconds)
    return {"median": statistics.median(ordered), "min": ordered[0], "max": ordered[-1],
            "mean": statistics.fmean(ordered), "stdev": statistics.stdev(ordered) if len(ordered) > 1 else 0.0}


def host_facts(env: RankEnv) -> dict[str, Any]:
    """What identifies this rank's machine in a result file."""
    facts: dict[str, Any] = {"rank": env.rank, "local_rank": env.local_rank, "hostname": socket.gethostname(),
                             "platform": platform.platform(), "machine": platform.machine(),
                             "python": platform.python_version()}
    try:
        from importlib import metadata

        facts["mlx"] = metadata.version("mlx")
    except Exception:  # no MLX (a bandwidth run on a host without it) is a fact, not an error
        facts["mlx"] = None
    return facts


# ---- collectives -------------------------------------------------------------------------------------


def find_wrong(got: Any, want: Any, exact: bool) -> tuple[int, int, float, float]:
    """Compare an all-reduce result with the expected sum (MLX arrays): (wrong elements, first wrong index,
    its value, the expected value), the index -1 when all are right. Inexact checks allow 1% relative error."""
    import mlx.core as mx

    if exact:
        bad = got != want
    else:
        bad = mx.abs(got.astype(mx.float32) - want.astype(mx.float32)) > 1e-2 * mx.abs(want.astype(mx.float32))
    wrong = int(mx.sum(bad).item())
    if not wrong:
        return 0, -1, 0.0, 0.0
    first = int(mx.argmax(bad.astype(mx.int32)).item())
    return wrong, first, float(got[first].item()), float(want[first].item())


def planted_fault(rank: int) -> int | None:
    """Fault injection for tests: MACRUN_BENCH_FAULT=<rank>:<iteration> makes that rank corrupt one element of
    that iteration's result (counted from 0, warm-up included), so the check's path to the user is exercised."""
    spec = os.environ.get("MACRUN_BENCH_FAULT", "")
    target, _, iteration = spec.partition(":")
    return int(iteration or 0) if target.isdigit() and int(target) == rank else None


class Collectives:
    """The ring group and the few collective measurements, on one rank."""

    def __init__(self, env: RankEnv, dtype: str) -> None:
        import mlx.core as mx

        self.mx = mx
        self.env = env
        self.dtype_name = dtype
        self.dtype = getattr(mx, dtype)
        self.group = mx.distributed.init(backend=env.mlx_backend, strict=True)  # "jaccl" when chosen
        self.rank, self.world = self.group.rank(), self.group.size()

    def agree_max(self, values: Sequence[float]) -> list[float]:
        """The element-wise maximum over ranks (all ranks get the same list)."""
        mx = self.mx
        out = mx.distributed.all_max(mx.array(list(values), dtype=mx.float32), group=self.group)
        return [float(v) for v in out.tolist()]

    def operands(self, elements: int) -> tuple[Any, Any, bool]:
        """This rank's input and the exact expected sum, both evaluated; and whether the check is exact."""
        mx = self.mx
        period = check_period(self.world, self.dtype_name)
        index = mx.arange(elements, dtype=mx.int32) % max(period, 1) + 1 if period else mx.ones((elements,))
        x = (index.astype(mx.float32) * (self.rank + 1)).astype(self.dtype)
        want = (index.astype(mx.float32) * (self.world * (self.world + 1) // 2)).astype(self.dtype)
        mx.eval(x, want)
        return x, want, period > 0

    def all_reduce(self, nbytes: int, *, iters: int, warmup: int, budget_s: float,
                   on_start: Callable[[int, float], None]) -> dict[str, Any]:
        """Time `all_sum` of `nbytes` bytes; every result (warm-up included) is checked."""
        mx = self.mx
        elements = nbytes // DTYPES[self.dtype_name]
        x, want, exact = self.operands(elements)
        wrong_total, first_wrong, checked = 0, (-1, -1, 0.0, 0.0), 0
        fault = planted_fault(self.rank)
        sync = mx.zeros((1,), dtype=mx.float32)

        def once() -> float:
            nonlocal wrong_total, first_wrong, checked
            # Ranks check results at different speeds; a one-element all_sum first lines them up again (to
            # within one hop), so the next timing does not include another rank's checking.
            mx.eval(mx.distributed.all_sum(sync, group=self.group))
            began = time.perf_counter()
            got = mx.distributed.all_sum(x, group=self.group)
            mx.eval(got)
            took = time.perf_counter() - began
            if fault == checked:
                got = got + (mx.arange(elements) == elements // 2).astype(got.dtype)
            wrong, index, value, expected = find_wrong(got, want, exact)
            checked += 1
            if wrong and not wrong_total:
                first_wrong = (checked - 1, index, value, expected)
            wrong_total += wrong
            return took

        # One agreed figure decides how many iterations follow: ranks must run the same number of collectives.
        first = self.agree_max([once()])[0]
        more_warmup = max(warmup - 1, 0) if first * warmup <= budget_s / 2 else 0
        timed = min(iters, max(3, int(budget_s / max(first, 1e-9))))
        on_start(timed, first * (more_warmup + timed))
        for _ in range(more_warmup):
            once()
        local = [once() for _ in range(timed)]
        seconds = self.agree_max(local)
        wrongs = mx.distributed.all_gather(mx.array([min(wrong_total, 2**31 - 1), *first_wrong[:2]], dtype=mx.int32),
                                           group=self.group).tolist()
        values = mx.distributed.all_gather(mx.array(first_wrong[2:], dtype=mx.float32), group=self.group).tolist()
        stats = timing(seconds)
        bad_ranks = [r for r in range(self.world) if wrongs[3 * r] > 0]
        check: dict[str, Any] = {"passed": not bad_ranks, "exact": exact, "results": checked * self.world,
                                 "wrong_elements": sum(wrongs[3 * r] for r in range(self.world))}
        if bad_ranks:
            r = bad_ranks[0]
            check["first"] = {"rank": r, "iteration": wrongs[3 * r + 1], "index": wrongs[3 * r + 2],
                              "got": values[2 * r], "want": values[2 * r + 1]}
        return {"bytes": nbytes, "elements": elements, "dtype": self.dtype_name, "iterations": timed,
                "warmup": 1 + more_warmup, "time_s": stats, "algbw_bytes_s": nbytes / stats["median"],
                "busbw_bytes_s": busbw(nbytes, stats["median"], self.world), "check": check}

    def ping_pong(self, a: int, b: int, pings: int) -> list[float] | None:
        """Round trips of a 4-byte array between neighbours a and b, timed on a; None on other ranks."""
        mx = self.mx
        if self.rank not in (a, b):
            return None
        token = mx.array([float(self.rank)], dtype=mx.float32)
        mx.eval(token)
        times = []
        for i in range(pings + 2):  # the first two warm the path: not counted
            began = time.perf_counter()
            if self.rank == a:
                mx.eval(mx.distributed.send(token, b, group=self.group))
                mx.eval(mx.distributed.recv((1,), mx.float32, b, group=self.group))
                if i >= 2:
                    times.append(time.perf_counter() - began)
            else:
                got = mx.distributed.recv((1,), mx.float32, a, group=self.group)
                mx.eval(got)
                mx.eval(mx.distributed.send(got, a, group=self.group))
        return times if self.rank == a else None


def ring_links(client: StoreClient, env: RankEnv, seconds: float, tag: str) -> list[dict[str, Any]]:
    """Each ring link's one-way TCP throughput and RTT, measured with all links busy at once."""
    if not env.mlx_hostfile:
        raise UsageError("MLX_HOSTFILE is not set", hint="start the benchmark with `macrun benchmark`")
    found = measure_ring(client, env.rank, env.world_size, hostfile_address(env.mlx_hostfile, env.rank),
                         seconds=seconds, concurrent=True, tag=tag, timeout=STORE_TIMEOUT_S)
    return [{"rank": r, "to": (r + 1) % env.world_size, **m.to_dict()} for r, m in enumerate(found)]


def run_collectives(args: argparse.Namespace, env: RankEnv, client: StoreClient) -> None:
    """allreduce and latency: link throughput, then every size, then (latency) ping-pongs."""
    coll = Collectives(env, args.dtype)
    lead = env.rank == 0
    links = ring_links(client, env, args.probe_seconds, "bench/links")
    if lead:
        emit_event("links", links=links)
    for nbytes in args.sizes:
        def started(iterations: int, estimate: float, nbytes: int = nbytes) -> None:
            if lead:
                emit_event("size-start", bytes=nbytes, iterations=iterations, estimate_s=estimate)

        row = coll.all_reduce(nbytes, iters=args.iters, warmup=args.warmup, budget_s=args.budget,
                              on_start=started)
        if lead:
            emit_event("size", **row)
    if args.type == "latency":
        pairs = [(r, (r + 1) % env.world_size) for r in range(env.world_size if env.world_size > 2 else 1)]
        for k, (a, b) in enumerate(pairs):
            times = coll.ping_pong(a, b, args.pings)
            if times is not None:
                client.set_json(f"bench/pingpong/{k}", timing(times))
            if lead:
                emit_event("pingpong", rank=a, to=b, pings=args.pings,
                           time_s=client.get_json(f"bench/pingpong/{k}", STORE_TIMEOUT_S))
            client.barrier(f"bench/pingpong-done/{k}", env.world_size, STORE_TIMEOUT_S)


# ---- point-to-point bandwidth -----------------------------------------------------------------------


def shared_paths(mine: Sequence[Link], theirs: Sequence[Link], same_host: bool) -> list[dict[str, Any]]:
    """Every link two hosts share: per pair of interfaces on one IPv4 subnet, the narrowest subnet's addresses.

    Two ranks of one host share only loopback.
    """
    if same_host:
        return [{"kind": "loopback", "from_iface": "lo", "from_addr": "127.0.0.1", "to_iface": "lo",
                 "to_addr": "127.0.0.1"}]
    best: dict[tuple[str, str], tuple[int, str, dict[str, Any]]] = {}
    for a in mine:
        for b in theirs:
            if not (a.up and b.up) or "loopback" in (a.kind, b.kind):
                continue
            for ia in a.interfaces:
                for ib in b.interfaces:
                    if ia.network != ib.network or ia.ip == ib.ip:
                        continue
                    kind = "thunderbolt" if a.kind == b.kind == "thunderbolt" else a.kind
                    path = {"kind": kind, "from_iface": a.name, "from_addr": str(ia.ip), "to_iface": b.name,
                            "to_addr": str(ib.ip)}
                    key = (-ia.network.prefixlen, str(ia.ip))
                    old = best.get((a.name, b.name))
                    if old is None or key < old[:2]:
                        best[(a.name, b.name)] = (*key, path)
    return [entry[2] for _, entry in sorted(best.items())]


def run_bandwidth(args: argparse.Namespace, env: RankEnv, client: StoreClient) -> None:
    """Probe every ordered pair of hosts over every link they share, one probe at a time."""
    world, rank = env.world_size, env.rank
    server = serve_probe("0.0.0.0", timeout=STORE_TIMEOUT_S)
    try:
        client.set_json(f"bench/bw/info/{rank}", {"local_rank": env.local_rank, "port": server.port,
                                                  "links": [link.to_dict() for link in list_links()]})
        info = [client.get_json(f"bench/bw/info/{r}", STORE_TIMEOUT_S) for r in range(world)]
        heads = [r for r in range(world) if info[r]["local_rank"] == 0]
        same_host = len(heads) < 2
        members = list(range(world)) if same_host else heads
        links = {r: [Link.from_dict(d) for d in info[r]["links"]] for r in members}
        tasks = [(a, b, path) for a in members for b in members if a != b
                 for path in shared_paths(links[a], links[b], same_host)]
        if rank == 0:
            emit_event("pairs-start", count=len(tasks), members=members, same_host=same_host)
        for k, (a, b, path) in enumerate(tasks):
            if rank == a:
                if k:
                    client.get(f"bench/bw/pair/{k - 1}", STORE_TIMEOUT_S)
                try:
                    found: dict[str, Any] = run_probe(
                        path["to_addr"], int(info[b]["port"]), seconds=args.seconds, pings=args.pings,
                        bind_ip=None if same_host else path["from_addr"], timeout=30).to_dict()
                except MacrunError as exc:
                    found = {"error": exc.message}
                client.set_json(f"bench/bw/pair/{k}", found)
            if rank == 0:
                emit_event("pair", rank=a, to=b, **path, **client.get_json(f"bench/bw/pair/{k}", STORE_TIMEOUT_S))
        client.barrier("bench/bw/done", world, STORE_TIMEOUT_S * max(len(tasks), 1))
    finally:
        server.close()


# ---- entry point ------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m distributed.bench", description=__doc__.splitlines()[0])
    p.add_argument("type", choices=TYPES)
    p.add_argument("--sizes", default="1024", help="comma-separated sizes in bytes")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    p.add_argument("--iters", type=int, default=20, help="at most this many timed iterations per size")
    p.add_argument("--warmup", type=int, default=2, help="untimed iterations before them (at least 1)")
    p.add_argument("--budget", type=float, default=10.0,
                   help="seconds per size: fewer iterations (never below 3) when one takes long")
    p.add_argument("--probe-seconds", type=float, default=0.5, help="how long each link probe streams")
    p.add_argument("--seconds", type=float, default=0.5, help="bandwidth: how long each pair's probe streams")
    p.add_argument("--pings", type=int, default=20, help="round trips per ping-pong")
    args = p.parse_args(argv)
    try:
        args.sizes = [int(s) for s in str(args.sizes).split(",") if s]
    except ValueError:
        p.error(f"--sizes {args.sizes!r} is not a list of byte counts")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        env = RankEnv.from_environ()
        client = StoreClient.from_env(env, timeout=STORE_TIMEOUT_S)
        heartbeat = start_heartbeat(client, env.rank)
        client.set_json(f"bench/host/{env.rank}", {**host_facts(env), "link": env.link})
        if env.rank == 0:
            hosts = [client.get_json(f"bench/host/{r}", STORE_TIMEOUT_S) for r in range(env.world_size)]
            emit_event("start", type=args.type, world=env.world_size, link=env.link, hosts=hosts,
                       pid=os.getpid())
        if args.type == "bandwidth":
            run_bandwidth(args, env, client)
        else:
            if env.world_size < 2:
                raise UsageError("a collective benchmark needs at least two ranks",
                                 hint="use --nproc 2 or a hosts file with two hosts")
            run_collectives(args, env, client)
        client.barrier("bench/end", env.world_size, STORE_TIMEOUT_S)
        if env.rank == 0:
            emit_event("done")
        heartbeat.set()
        return 0
    except MacrunError as exc:
        return report(exc)


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["DTYPES", "EVENT_PREFIX", "TYPES", "busbw", "check_period", "emit_event", "find_wrong", "main",
           "parse_event", "shared_paths", "timing"]
