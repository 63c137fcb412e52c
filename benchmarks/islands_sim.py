"""Thunderbolt islands, simulated: one Wi-Fi ring (DDP), DiLoCo for all over Wi-Fi, or islands (DDP inside
each cabled island, DiLoCo between islands), per step, for a room and a few model sizes.

Why a simulation and not a run: macrun cannot run islands yet (docs/islands.md says what building them
takes), and the question "is it worth building?" is answered by arithmetic on measured numbers. The model
is the cost model's own (`distributed.costmodel.ring_allreduce_seconds`, alpha-beta), fed with links fitted
from `macrun benchmark --type allreduce` in the emulated lab, plus one fact the lab showed: Wi-Fi is one
shared medium, so a ring of n members over it gets 1/n of the airtime per link (4 ranks: 47.9 Mbit/s
busbw, 2 ranks: 95 Mbit/s, on the same 200 Mbit/s segment). A cable is private: its bandwidth is its own.

What each strategy pays (M = model bytes, H = DiLoCo inner steps, k = an island's size, m = islands):
- ddp-wifi:  every step, ring(M) over Wi-Fi across all N ranks (no overlap, as macrun's DDP step).
- diloco-wifi: every H steps, ring(M) over Wi-Fi across all N ranks (every rank is a DiLoCo worker).
- islands: every step ring(M) over each island's cables; every H steps ring(M) over Wi-Fi among the m
  island leaders, then the leader hands the island the new weights (one more ring(M) over the cables).
  A round lasts as long as its slowest island: singletons wait for the cabled islands' extra allreduce.

Not modelled: loss. DiLoCo with fewer workers (m < N) tracks DDP more closely (Douillard et al. 2023,
arXiv:2311.08105, Table 4: more replicas, a larger gap), so at equal H islands lose less than DiLoCo-for-all;
benchmarks/diloco_vs_ddp.py measures losses. Nor compute imbalance (issue 14 part 3 balances it).

    .venv/bin/python benchmarks/islands_sim.py                       # the issue's room, measured lab numbers
    .venv/bin/python benchmarks/islands_sim.py --room 2,2 --inner-steps 100 --json runs/bench/islands.json
    .venv/bin/python benchmarks/islands_sim.py --tb-json tb.json --wifi-json wifi.json   # refit from a run
    .venv/bin/python benchmarks/islands_sim.py --lab /tmp/macrun-lab   # check the model on a lab of 4 hosts

`--lab` measures, on a running lab (`python -m tests.lab.labctl up --hosts 4`), the room's three rings in
the same four processes (each holds two or three MLX rings at once, see docs/islands.md): the flat Wi-Fi
ring of 4, the h0-h1 island over its cable, the leaders' ring h0, h2, h3 over Wi-Fi; and prints each beside
the model's prediction. Each rank checks every result.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from distributed.costmodel import format_seconds, ring_allreduce_seconds  # noqa: E402

# Measured in the emulated lab on 2026-11-30 (4 hosts, `labctl up --hosts 4`, a loaded 2-core machine,
# load average 9-14), with `macrun benchmark --hosts H --link L --sizes S --json J`:
#   Thunderbolt pair (h0-h1, --link thunderbolt): 16 MiB 131 ms, 64 MiB 336 ms (median of 20)
#   Wi-Fi pair (h0, h1, --link network):          1 MiB 89.1 ms, 16 MiB 1.41 s
#   Wi-Fi, 4 hosts (--link network):              1 MiB 294 ms, 16 MiB 4.21 s
# and `--type bandwidth`: Thunderbolt 6.1 Gbit/s, Wi-Fi 192 Mbit/s per pair alone (TCP, medians).
MIB = 1 << 20
TB_PAIR_POINTS = ((16 * MIB, 0.131), (64 * MIB, 0.336))
WIFI_PAIR_POINTS = ((1 * MIB, 0.0891), (16 * MIB, 1.41))
WIFI_FOUR_POINTS = ((1 * MIB, 0.294), (16 * MIB, 4.21))
# One rank's step, `distributed.worker.measure_step_seconds` on configs/small.yaml (10.77M parameters) at
# batch 8 x 128 tokens, OpenBLAS, same machine: 4.23 s, i.e. 6·P·T/t = 15.7 GFLOP/s.
LAB_FLOPS = 15.65e9
LAB_TOKENS_PER_STEP = 8 * 128


@dataclass(frozen=True, slots=True)
class Link:
    """A link as the alpha-beta model sees it; `shared` = one medium whose airtime all ring members split."""

    bandwidth_bytes_s: float  # per link for a cable; the whole segment's airtime when shared
    latency_s: float
    shared: bool = False


@dataclass(frozen=True, slots=True)
class Result:
    """One strategy on one model: the time of an average step and what crosses each medium per step."""

    strategy: str
    step_seconds: float  # wall time per training step, communication amortised over a round
    compute_seconds: float  # of which compute
    tokens_per_second: float  # the whole room's
    wifi_bytes_per_step: float  # bytes all members put on the Wi-Fi, per step
    cable_bytes_per_step: float  # bytes sent over Thunderbolt cables (all cables), per step


def fit_alpha_beta(points: Sequence[tuple[float, float]], world_size: int) -> tuple[float, float]:
    """(per-link bandwidth bytes/s, latency s) of `ring_allreduce_seconds` fitted to measured (bytes, s).

    Least squares on t = a·x + b with x = 2(n-1)/n·bytes and b = 2(n-1)·latency; a negative intercept (noise
    on small sizes) is clamped to zero latency."""
    if world_size < 2 or len(points) < 2:
        raise ValueError("need world_size >= 2 and at least two (bytes, seconds) points")
    n = world_size
    xs = [2 * (n - 1) / n * b for b, _ in points]
    ts = [t for _, t in points]
    mx_, mt = sum(xs) / len(xs), sum(ts) / len(ts)
    var = sum((x - mx_) ** 2 for x in xs)
    if var <= 0:
        raise ValueError("need at least two different sizes")
    slope = sum((x - mx_) * (t - mt) for x, t in zip(xs, ts, strict=True)) / var
    if slope <= 0:
        raise ValueError("times do not grow with size: cannot fit a bandwidth")
    intercept = max(0.0, mt - slope * mx_)
    return 1.0 / slope, intercept / (2 * (n - 1))


def allreduce_seconds(nbytes: float, members: int, link: Link) -> float:
    """A ring allreduce over `link`: on a shared medium each of the n links gets 1/n of the airtime."""
    if members <= 1:
        return 0.0
    per_link = link.bandwidth_bytes_s / members if link.shared else link.bandwidth_bytes_s
    return ring_allreduce_seconds(nbytes, members, per_link, link.latency_s)


def ring_bytes(nbytes: float, members: int) -> float:
    """Bytes all members of a ring allreduce send together: 2(n-1)/n·nbytes each."""
    return 0.0 if members <= 1 else 2 * (members - 1) * nbytes


def simulate(room: Sequence[int], model_bytes: float, step_seconds: float, tokens_per_step: int,
             inner_steps: int, cable: Link, wifi: Link, exchange_bytes: float | None = None) -> list[Result]:
    """The three strategies for `room` (island sizes, e.g. (2, 1, 1): two cabled Macs and two loners).

    `model_bytes` is what DDP all-reduces per step (float32 gradients), `exchange_bytes` what DiLoCo's outer
    step exchanges (default the same; int8 is a quarter), `tokens_per_step` one rank's."""
    if not room or min(room) < 1 or inner_steps < 1 or step_seconds <= 0:
        raise ValueError("need islands of >= 1 rank, inner_steps >= 1 and step_seconds > 0")
    world, islands, h = sum(room), len(room), inner_steps
    outer = model_bytes if exchange_bytes is None else exchange_bytes
    room_tokens = world * tokens_per_step
    results = []

    t = step_seconds + allreduce_seconds(model_bytes, world, wifi)
    results.append(Result("ddp-wifi", t, step_seconds, room_tokens / t, ring_bytes(model_bytes, world), 0.0))

    t = step_seconds + allreduce_seconds(outer, world, wifi) / h
    results.append(Result("diloco-wifi", t, step_seconds, room_tokens / t, ring_bytes(outer, world) / h, 0.0))

    inner = max(h * (step_seconds + allreduce_seconds(model_bytes, k, cable)) for k in room)
    handout = max(allreduce_seconds(outer, k, cable) for k in room)
    t = (inner + allreduce_seconds(outer, islands, wifi) + handout) / h
    cable_bytes = sum(ring_bytes(model_bytes, k) + ring_bytes(outer, k) / h for k in room)
    results.append(Result("islands", t, step_seconds, room_tokens / t, ring_bytes(outer, islands) / h, cable_bytes))
    return results


def parse_room(text: str) -> tuple[int, ...]:
    """'2,1,1' -> (2, 1, 1): the size of each cabled island (1 = a Mac with no cable)."""
    try:
        room = tuple(int(p) for p in text.split(","))
    except ValueError:
        raise ValueError(f"--room {text!r}: give island sizes separated by commas, e.g. 2,1,1") from None
    if not room or min(room) < 1:
        raise ValueError(f"--room {text!r}: every island has at least one Mac")
    return room


def points_from_json(path: Path) -> tuple[int, list[tuple[float, float]]]:
    """(world size, [(bytes, median seconds)]) from a `macrun benchmark --type allreduce --json` file."""
    data = json.loads(path.read_text())
    return int(data["world_size"]), [(r["bytes"], r["time_s"]["median"]) for r in data["results"]]


def measured_links(tb_json: Path | None, wifi_json: Path | None) -> tuple[Link, Link]:
    """The cable and the Wi-Fi, fitted from the recorded lab figures or from the given benchmark files."""
    tb_n, tb_points = points_from_json(tb_json) if tb_json else (2, list(TB_PAIR_POINTS))
    wifi_n, wifi_points = points_from_json(wifi_json) if wifi_json else (4, list(WIFI_FOUR_POINTS))
    tb_bw, tb_lat = fit_alpha_beta(tb_points, tb_n)
    wifi_bw, wifi_lat = fit_alpha_beta(wifi_points, wifi_n)
    return Link(tb_bw, tb_lat), Link(wifi_bw * wifi_n, wifi_lat, shared=True)  # airtime = n x per-link share


# One lab rank: argv out_dir rank nbytes repeats. Rings: flat.json (all), island.json (ranks 0, 1),
# leaders.json (ranks 0, 2, 3). A second ring needs MLX's group cache emptied first (docs/islands.md).
LAB_RANK = r"""
import ctypes, json, os, statistics, sys, time
from pathlib import Path
import mlx.core as mx
out, rank, nbytes, reps = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
lib = Path(mx.__file__).parent / "lib" / ("libmlx.dylib" if sys.platform == "darwin" else "libmlx.so")
clear = ctypes.CDLL(str(lib))._ZN3mlx4core11distributed14clear_backendsEv
def ring(rank_in, hostfile):
    clear()
    os.environ.update(MLX_RANK=str(rank_in), MLX_HOSTFILE=str(out / hostfile))
    return mx.distributed.init(strict=True, backend="ring")
flat = ring(rank, "flat.json")
island = ring(rank, "island.json") if rank in (0, 1) else None
leaders = ring({0: 0, 2: 1, 3: 2}[rank], "leaders.json") if rank != 1 else None
x = mx.ones((nbytes // 4,))
def timed(g):
    times = []
    for _ in range(reps):
        mx.eval(mx.distributed.all_sum(mx.zeros((1,)), group=g))  # start together
        began = time.perf_counter()
        y = mx.distributed.all_sum(x, group=g)
        mx.eval(y)
        times.append(time.perf_counter() - began)
        if not bool(mx.all(y == g.size()).item()):
            raise SystemExit(f"rank {rank}: wrong all_sum")
    return statistics.median(times)
res = {"flat": timed(flat)}
for name, g in (("island", island), ("leaders", leaders)):
    mx.eval(mx.distributed.all_sum(mx.zeros((1,)), group=flat))
    if g is not None:
        res[name] = timed(g)
(out / f"rank{rank}.json").write_text(json.dumps(res))
"""


def measure_lab(state_dir: Path, nbytes: int, repeats: int) -> dict[str, float]:
    """Median seconds of one all_sum of `nbytes` on each ring (slowest rank), on a running lab of >= 4 hosts."""
    import tempfile

    from tests.lab.labnet import Lab

    lab = Lab.load(state_dir)
    if len(lab.hosts) < 4:
        raise ValueError(f"the lab in {state_dir} has {len(lab.hosts)} hosts: bring one up with --hosts 4")
    h = lab.hosts[:4]
    out = Path(tempfile.mkdtemp(prefix="islands-", dir=str(state_dir)))
    (out / "rank.py").write_text(LAB_RANK)
    port = 23100  # each host is its own network namespace: only another job on the same lab could clash
    (out / "flat.json").write_text(json.dumps([[f"{x.wifi_ip}:{port}"] for x in h]))
    (out / "island.json").write_text(json.dumps([[f"{h[0].tb['thunderbolt0']}:{port + 1}"],
                                                 [f"{h[1].tb['thunderbolt1']}:{port + 1}"]]))
    (out / "leaders.json").write_text(json.dumps([[f"{h[i].wifi_ip}:{port + 2}"] for i in (0, 2, 3)]))
    procs = [lab.popen(h[r], [h[r].python, str(out / "rank.py"), str(out), str(r), str(nbytes), str(repeats)])
             for r in range(4)]
    try:
        codes = [p.wait(timeout=120 + 30 * repeats) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    if codes != [0] * 4:
        raise RuntimeError(f"lab ranks exited with {codes}; their files are in {out}")
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(4)]
    return {k: max(r[k] for r in ranks if k in r) for k in ("flat", "island", "leaders")}


def _bytes(n: float) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n:.0f} B"


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--room", default="2,1,1", help="island sizes (default 2,1,1: two cabled Studios, two laptops)")
    p.add_argument("--params", default="1e6,1.1e7,5e7,1.24e8", help="model sizes in parameters")
    p.add_argument("--inner-steps", type=int, default=50, help="DiLoCo H")
    p.add_argument("--exchange-bytes", type=float, default=4.0, help="bytes per parameter in DiLoCo's exchange")
    p.add_argument("--flops", type=float, default=LAB_FLOPS, help="one rank's training FLOP/s (default: lab)")
    p.add_argument("--tokens", type=int, default=LAB_TOKENS_PER_STEP, help="tokens per rank per step")
    p.add_argument("--tb-json", type=Path, help="a `macrun benchmark` JSON over a Thunderbolt island")
    p.add_argument("--wifi-json", type=Path, help="a `macrun benchmark` JSON over the Wi-Fi")
    p.add_argument("--cable-gbit", type=float, help="what-if: the cable's bandwidth instead of the fitted one")
    p.add_argument("--cable-latency-ms", type=float, help="what-if: the cable's latency instead of the fitted one")
    p.add_argument("--lab", type=Path, metavar="STATE_DIR", help="measure the rings on this running lab instead")
    p.add_argument("--lab-mib", type=int, default=16, help="--lab: MiB per all_sum")
    p.add_argument("--json", type=Path, help="write every figure here")
    a = p.parse_args(argv)
    if a.lab:
        return lab_check(a)
    try:
        room = parse_room(a.room)
        sizes = [float(s) for s in a.params.split(",")]
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    cable, wifi = measured_links(a.tb_json, a.wifi_json)
    cable = Link(cable.bandwidth_bytes_s if a.cable_gbit is None else a.cable_gbit * 1e9 / 8,
                 cable.latency_s if a.cable_latency_ms is None else a.cable_latency_ms / 1e3)
    print(f"room {'+'.join(map(str, room))} ({sum(room)} ranks, {len(room)} islands), H={a.inner_steps}, "
          f"{a.flops / 1e9:.1f} GFLOP/s per rank, {a.tokens} tokens per rank-step")
    print(f"cable {cable.bandwidth_bytes_s * 8 / 1e9:.2f} Gbit/s, {cable.latency_s * 1e3:.1f} ms; "
          f"Wi-Fi {wifi.bandwidth_bytes_s * 8 / 1e6:.0f} Mbit/s shared, {wifi.latency_s * 1e3:.1f} ms")
    rows = []
    print(f"{'params':>8} {'strategy':<12} {'step':>8} {'compute':>8} {'tokens/s':>9} {'vs ddp':>7} "
          f"{'Wi-Fi/step':>11} {'cable/step':>11}")
    for params in sizes:
        step = 6 * params * a.tokens / a.flops
        results = simulate(room, 4 * params, step, a.tokens, a.inner_steps, cable, wifi, a.exchange_bytes * params)
        for r in results:
            print(f"{params / 1e6:7.1f}M {r.strategy:<12} {format_seconds(r.step_seconds):>8} "
                  f"{format_seconds(r.compute_seconds):>8} {r.tokens_per_second:9.0f} "
                  f"{r.tokens_per_second / results[0].tokens_per_second:6.2f}x "
                  f"{_bytes(r.wifi_bytes_per_step):>11} {_bytes(r.cable_bytes_per_step):>11}")
            rows.append({"params": params, **asdict(r)})
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps({"room": room, "inner_steps": a.inner_steps, "flops": a.flops,
                                      "tokens": a.tokens, "cable": asdict(cable), "wifi": asdict(wifi),
                                      "results": rows}, indent=1) + "\n")
        print(f"wrote {a.json}")
    return 0


def lab_check(a: argparse.Namespace) -> int:
    """Measured against modelled: the three rings of the 2+1+1 room, in the lab."""
    cable, wifi = measured_links(a.tb_json, a.wifi_json)
    nbytes = a.lab_mib * MIB
    got = measure_lab(a.lab, nbytes, 5)
    want = {"flat": allreduce_seconds(nbytes, 4, wifi), "island": allreduce_seconds(nbytes, 2, cable),
            "leaders": allreduce_seconds(nbytes, 3, wifi)}
    names = {"flat": "4 ranks over Wi-Fi", "island": "island h0-h1 over its cable",
             "leaders": "leaders h0, h2, h3 over Wi-Fi"}
    print(f"all_sum of {a.lab_mib} MiB, median of 5, slowest rank; each process holds its rings at once")
    for k in ("flat", "island", "leaders"):
        print(f"  {names[k]:<32} measured {format_seconds(got[k]):>8}   modelled {format_seconds(want[k]):>8}")
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps({"bytes": nbytes, "measured": got, "modelled": want}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
