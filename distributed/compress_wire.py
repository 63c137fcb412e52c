"""Where a compressed exchange meets MLX's collectives: the requests a format makes, their exact bytes, two drivers.

A wire format (distributed.compress, distributed.compress_ring) is written as a generator that yields
`Request`s (an all_sum, an all_max, an all_gather, or a "shift": send to the right neighbour, receive from
the left) and is sent back each reply. Two drivers run it:

* `run_on_group` on a real `mx.distributed` group (MLX's own collectives only; no transport of ours). It
  counts the bytes this rank puts on the wire *at the collective*, with the formulas below.
* `simulate` runs n ranks' generators in lockstep in one process (pure: no sockets), so the unit tests check
  every format against NumPy with the very code the ranks run.

Bytes one rank sends, read off MLX 0.32's ring backend (mlx/distributed/ring/ring.cpp) and checked against
the kernel's TCP counters in tests/integration/test_compress_ranks.py:

* all_sum / all_max of `count` items of `itemsize` bytes (`ring_sum_bytes`): fewer items than ranks are
  padded to n. The array is cut into r = max(1, min(2·links, bytes // (n·256 KiB))) sub-rings, the odd ones
  running the other way round; each sub-ring of d items cuts its items into n segments of ceil(d/n) and a
  rank sends segments rank+k·dir for k = 0..2n-3 (reduce-scatter, then all-gather): every segment twice
  but the last two, once. So 2d minus two segments: exactly 2(n-1)/n of the payload when n divides d.
* all_gather: (n-1) times the rank's own array.
* send: the array's bytes.
`links` is the number of addresses per rank in the hostfile; macrun writes one (distributed.topology).
"""

from __future__ import annotations

import math
from collections.abc import Generator
from dataclasses import dataclass
from functools import reduce

import mlx.core as mx

RING_MIN_SEND = 262144  # bytes: MLX's ring splits an all_sum across sockets only above n times this


@dataclass(frozen=True, slots=True)
class Request:
    """One collective a wire format asks for. op: "sum", "max", "gather" or "shift"."""

    op: str
    array: mx.array
    recv_size: int = 0  # "shift" only: how many items of `array`'s dtype arrive from the left neighbour


# A wire format: yields requests, is sent each reply, returns (sum of the valid values, number of valid ranks).
Program = Generator[Request, mx.array, tuple[mx.array, mx.array]]


def ring_sum_bytes(count: int, itemsize: int, world_size: int, rank: int = 0, links: int = 1) -> int:
    """Exact bytes `rank` sends in MLX's ring all_sum/all_max of `count` items (see the module docstring)."""
    n = world_size
    if n <= 1 or count == 0:
        return 0
    count = max(count, n)
    reduces = max(1, min(2 * links, count * itemsize // (n * RING_MIN_SEND)))
    step = math.ceil(count / reduces)
    total = 0
    for i in range(reduces):
        d = min(count, (i + 1) * step) - i * step
        seg = math.ceil(d / n)
        direction = -1 if i % 2 else 1

        def length(k: int, d: int = d, seg: int = seg) -> int:
            return max(0, min((k + 1) * seg, d) - k * seg)

        once = length((rank + (n - 2) * direction) % n) + length((rank + (n - 1) * direction) % n)
        total += 2 * d - once
    return total * itemsize


def request_bytes(request: Request, world_size: int, rank: int) -> int:
    """Bytes `rank` puts on the wire to serve `request` in a group of `world_size`."""
    if world_size <= 1:
        return 0
    a = request.array
    if request.op in ("sum", "max"):
        return ring_sum_bytes(a.size, a.itemsize, world_size, rank)
    if request.op == "gather":
        return (world_size - 1) * a.nbytes
    return a.nbytes  # shift


def run_on_group(program: Program, group: mx.distributed.Group | None) -> tuple[mx.array, mx.array, int]:
    """Run a wire format on this rank's group: (sum, valid ranks, bytes this rank sent).

    Sums, maxima and gathers stay lazy (the caller's eval runs them). A shift is evaluated on the spot:
    MLX's recv takes no input, so nothing in a lazy graph orders it against the send beside it, and a
    blocking send that meets a blocking send deadlocks. So even ranks send first and odd ranks receive
    first: around any ring some rank receives first, so no cycle of senders can form.
    """
    n = 1 if group is None else group.size()
    rank = 0 if group is None else group.rank()
    sent = 0
    try:
        request = next(program)
        while True:
            if group is None or n == 1:
                reply = _alone(request)
            else:
                reply = _collective(request, group, rank, n)
                sent += request_bytes(request, n, rank)
            request = program.send(reply)
    except StopIteration as done:
        total, count = done.value
    return total, count, sent


def _alone(request: Request) -> mx.array:
    if request.op == "gather":
        return request.array[None]
    if request.op == "shift":
        raise RuntimeError("a ring shift needs at least two ranks")
    return request.array


def _collective(request: Request, group: mx.distributed.Group, rank: int, n: int) -> mx.array:
    a = request.array
    if request.op == "sum":
        return mx.distributed.all_sum(a, group=group)
    if request.op == "max":
        return mx.distributed.all_max(a, group=group)
    if request.op == "gather":
        return mx.distributed.all_gather(a[None], group=group)
    right, left = (rank + 1) % n, (rank - 1) % n
    if rank % 2 == 0:
        mx.eval(mx.distributed.send(a, right, group=group))
        got = mx.distributed.recv((request.recv_size,), a.dtype, left, group=group)
        mx.eval(got)
    else:
        got = mx.distributed.recv((request.recv_size,), a.dtype, left, group=group)
        mx.eval(got)
        mx.eval(mx.distributed.send(a, right, group=group))
    return got


def simulate(programs: list[Program]) -> list[tuple[mx.array, mx.array, int]]:
    """Run n ranks' programs in lockstep in this process: [(sum, valid ranks, bytes sent)] per rank.

    The collectives are computed here (int8 sums wrap exactly as MLX's ring does); the bytes are what
    `run_on_group` would count. For tests and for checking a format without a group.
    """
    n = len(programs)
    sent = [0] * n
    results: list[tuple[mx.array, mx.array] | None] = [None] * n
    requests: list[Request] = []
    for r, p in enumerate(programs):
        try:
            requests.append(next(p))
        except StopIteration as stop:  # a format that needs no collective (one rank)
            results[r] = stop.value
    if len(requests) < n:
        if requests:
            raise RuntimeError("some ranks finished the exchange while others did not")
        return [(*res, 0) for res in results]  # type: ignore[misc]
    while True:
        ops = {r.op for r in requests}
        if len(ops) != 1:
            raise RuntimeError(f"ranks disagree on the next collective: {sorted(ops)}")
        op = ops.pop()
        arrays = [r.array for r in requests]
        if op == "sum":
            replies = [reduce(mx.add, arrays)] * n
        elif op == "max":
            replies = [reduce(mx.maximum, arrays)] * n
        elif op == "gather":
            replies = [mx.stack(arrays)] * n
        else:
            replies = [arrays[(r - 1) % n] for r in range(n)]
            if any(reply.size != req.recv_size for reply, req in zip(replies, requests, strict=True)):
                raise RuntimeError("a shifted message does not have the size its receiver expects")
        for r, req in enumerate(requests):
            sent[r] += request_bytes(req, n, r)
        done = 0
        for r, p in enumerate(programs):
            try:
                requests[r] = p.send(replies[r])
            except StopIteration as stop:
                results[r] = stop.value
                done += 1
        if done == n:
            return [(*res, s) for res, s in zip(results, sent, strict=True)]  # type: ignore[misc]
        if done:
            raise RuntimeError("some ranks finished the exchange while others did not")
