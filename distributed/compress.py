"""How DiLoCo's pseudo-gradients cross the wire: float32, a 16-bit cast, int8, int4 or int2, summed over ranks.

Every exchange also carries a validity flag per rank (1 = my contribution is finite, 0 = count me out), so
one exchange gives both the sum of the valid contributions and how many there were; an invalid rank sends
zeros, so nothing of it (not even a NaN) reaches the others. `exchange(delta, valid, group, dtype, state)` is
the one entry point; the formats are generators of collectives (distributed.compress_wire), so the same
code runs on a real group and in the unit tests' in-process simulation.

Formats, with what one rank sends per exchange of P values (n ranks; exact formulas in `wire_bytes`):

* float32 / bfloat16 / float16: cast, one ring all_sum with the flag as one more element: 2(n-1)/n of
  the payload (6·P bytes at n=4 in float32, 3·P in 16 bits). 16-bit sums round in 16 bits at each hop;
  float16 overflows above 65504 (the caller checks).
* int8, n >= 3: one all_max agrees a float32 scale per block of `BLOCK` values (the largest |value| of any
  rank / L, L = floor(127/n)); each rank rounds its values stochastically into -L..L, so MLX's ring
  all_sum adds n of them in int8 without overflow, exactly; the flag is one more int8. 2(n-1)/n·P bytes
  plus the scales: 1.52·P at n=4. The sum is unbiased and each value is off by less than n·scale.
* int8, n <= 2: the old all_gather of each rank's own int8 (127 levels, one scale per 4096 values, round
  to nearest). Kept because at n=2 it sends the same P bytes as the all_sum but at twice the levels and
  with its own scale per rank (error at most half a step of the rank's own block: `quantize_int8`); from
  n=3 on the all_gather's (n-1)·P bytes lose.
* int4 / int2: a reduce-scatter then all-gather ring over send/recv, re-quantising at each hop
  (distributed.compress_ring): 0.77·P and 0.40·P bytes at n=4. int2 keeps an error-feedback residual per
  rank in `ExchangeState`.

The float and int8 results are lazy: evaluating them runs the collectives, on whatever stream is current,
so an overlapped exchange can `mx.async_eval` them. int4 and int2 are not: MLX's recv has no inputs, so a
lazy graph cannot order a recv against its send, and `exchange` runs their hops one `mx.eval` at a time
(distributed.compress_wire.run_on_group); to overlap them, a caller would have to run `exchange` on a thread
of its own (not tried here).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import mlx.core as mx

from distributed.compress_ring import (
    BLOCK,
    ERROR_FEEDBACK,
    LEVELS,
    blocks_of,
    ring_bytes_exact,
    ring_program,
    stochastic_round,
)
from distributed.compress_wire import Program, Request, ring_sum_bytes, run_on_group, simulate

EXCHANGE_DTYPES = ("float32", "bfloat16", "float16", "int8", "int4", "int2")
INT8_BLOCK = 4096  # values per scale of the gathered int8 (n <= 2): 4/4096 = 0.1% extra bytes
_FLOAT_DTYPES = {"float32": mx.float32, "bfloat16": mx.bfloat16, "float16": mx.float16}
_FORMATS = (*EXCHANGE_DTYPES, "int8-sum", "int8-gather")  # int8 picks one of the last two by world size

def ring_bytes(payload_bytes: int, world_size: int) -> int:
    """Bytes one rank sends in a ring all_sum of `payload_bytes`, to first order: 2(n-1)/n of the payload.

    `ring_sum_bytes` is exact (arrays with fewer items than ranks are padded, segments round up).
    """
    return 0 if world_size <= 1 else (2 * (world_size - 1) * payload_bytes) // world_size


def gather_bytes(own_bytes: int, world_size: int) -> int:
    """Bytes one rank sends in a ring all_gather where every rank contributes `own_bytes`: (n-1) of them."""
    return 0 if world_size <= 1 else (world_size - 1) * own_bytes


def num_blocks(size: int, block: int = INT8_BLOCK) -> int:
    return max(1, math.ceil(size / block))


def int8_format(world_size: int) -> str:
    """The int8 collective for this world size (see the module docstring)."""
    return "int8-gather" if world_size <= 2 else "int8-sum"


def wire_bytes(size: int, world_size: int, dtype: str, block: int = INT8_BLOCK, *, rank: int = 0) -> int:
    """Exact bytes `rank` puts on the wire to exchange `size` float values (plus the validity flag).

    The same numbers `run_on_group` counts at each collective (distributed.compress_wire).
    """
    if world_size <= 1:
        return 0
    if dtype == "int8":
        dtype = int8_format(world_size)
    if dtype == "int8-gather":
        return gather_bytes(size + 4 * (num_blocks(size, block) + 1), world_size)
    if dtype == "int8-sum":
        return (ring_sum_bytes(num_blocks(size, BLOCK), 4, world_size, rank)
                + ring_sum_bytes(size + 1, 1, world_size, rank))
    if dtype in LEVELS:
        return ring_bytes_exact(size, world_size, dtype, rank)
    return ring_sum_bytes(size + 1, _FLOAT_DTYPES[dtype].size, world_size, rank)


def quantize_int8(x: mx.array, block: int = INT8_BLOCK) -> tuple[mx.array, mx.array]:
    """Symmetric block-wise int8 quantisation of a 1-D float array: (q: int8 of x's length, scales: float32).

    Each block of `block` values gets scale = max|x| / 127 and q = round(x / scale), so that for every
    value |x - dequantize_int8(q, scales)| <= scale / 2 (round to nearest; a block of zeros has scale 0
    and is restored exactly). Values must be finite.
    """
    n = x.size
    blocks = num_blocks(n, block)
    padded = mx.pad(x.astype(mx.float32), (0, blocks * block - n)).reshape(blocks, block)
    scales = mx.max(mx.abs(padded), axis=1) / 127.0
    safe = mx.where(scales > 0, scales, 1.0)[:, None]
    q = mx.clip(mx.round(padded / safe), -127, 127).astype(mx.int8)
    return q.reshape(-1)[:n], scales


def dequantize_int8(q: mx.array, scales: mx.array, block: int = INT8_BLOCK) -> mx.array:
    """The float32 values that `quantize_int8` encoded as (q, scales)."""
    n = q.size
    blocks = scales.size
    padded = mx.pad(q.astype(mx.float32), (0, blocks * block - n)).reshape(blocks, block)
    return (padded * scales[:, None]).reshape(-1)[:n]


def cast_round_trip(x: mx.array, dtype: str) -> mx.array:
    """x as it arrives after crossing the wire alone in `dtype` (float32, 16 bits or the gathered int8)."""
    if dtype == "int8":
        return dequantize_int8(*quantize_int8(x))
    return x.astype(_FLOAT_DTYPES[dtype]).astype(mx.float32)


@dataclass(slots=True)
class ExchangeState:
    """What one rank carries from one exchange to the next: its random stream and int2's residual.

    Keys are drawn from (seed, rank, draw number), never from MLX's global random state, so the exchange
    does not shift the training's own random numbers and a rerun draws the same roundings.
    """

    rank: int = 0
    seed: int = 0
    draws: int = 0  # keys handed out so far
    residual: mx.array | None = None  # int2 error feedback: this rank's quantisation errors of the last exchange

    def keys(self, count: int) -> list[mx.array]:
        base = ((self.seed & 0xFFFF) << 48) | ((self.rank & 0xFFFF) << 32)
        out = [mx.random.key(base | ((self.draws + i) & 0xFFFFFFFF)) for i in range(count)]
        self.draws += count
        return out


@dataclass(frozen=True, slots=True)
class Exchanged:
    """The result of one exchange: the sum over valid ranks, their number, and the bytes this rank sent."""

    total: mx.array
    count: mx.array
    bytes_sent: int = 0
    arrays: tuple[mx.array, ...] = field(default=())  # anything else to evaluate with the result (the residual)


def exchange(delta: mx.array, valid: bool, group: mx.distributed.Group | None, dtype: str,
             state: ExchangeState | None = None) -> Exchanged:
    """Sum a 1-D float32 array over the ranks whose `valid` is true, sent as `dtype`.

    float32, 16-bit and int8 results are lazy (evaluating them runs the collectives); int4 and int2 run
    their ring hop by hop here (see distributed.compress_wire.run_on_group for why), and their results
    are lazy only in the last decoding. `state` is this rank's (needed for int8 with n >= 3, int4, int2;
    a fresh one is used if None). With no group (one rank) nothing is sent.
    """
    if dtype not in _FORMATS:
        raise ValueError(f"exchange dtype {dtype!r} is not one of {', '.join(EXCHANGE_DTYPES)}")
    n = 1 if group is None else group.size()
    rank = 0 if group is None else group.rank()
    state = state if state is not None else ExchangeState(rank=rank)
    out: list[mx.array] = []
    total, count, sent = run_on_group(program(delta, valid, rank, n, dtype, state, out), group)
    if out:
        state.residual = out[0]
    return Exchanged(total, count, sent, tuple(out))


def exchange_simulated(deltas: list[mx.array], valid: list[bool], dtype: str,
                       states: list[ExchangeState] | None = None) -> list[Exchanged]:
    """`exchange` for n ranks at once in this process (no sockets): what each rank would get and send.

    The ranks run the same code as on a group (distributed.compress_wire.simulate); with the same states
    they draw the same roundings, so integer formats give bit for bit what real ranks give.
    """
    n = len(deltas)
    states = states if states is not None else [ExchangeState(rank=r) for r in range(n)]
    outs: list[list[mx.array]] = [[] for _ in range(n)]
    programs = [program(deltas[r], valid[r], r, n, dtype, states[r], outs[r]) for r in range(n)]
    results = []
    for state, out, (total, count, sent) in zip(states, outs, simulate(programs), strict=True):
        if out:
            state.residual = out[0]
        results.append(Exchanged(total, count, sent, tuple(out)))
    return results


def program(x: mx.array, valid: bool, rank: int, world_size: int, dtype: str, state: ExchangeState,
            out_residual: list[mx.array]) -> Program:
    """The generator of collectives for one rank and format (run by run_on_group or simulate)."""
    if dtype == "int8":
        dtype = int8_format(world_size)
    if dtype in LEVELS:
        keys = None if ERROR_FEEDBACK[dtype] else state.keys(world_size)
        residual = state.residual if ERROR_FEEDBACK[dtype] else None
        if residual is not None and residual.shape != x.shape:
            residual = None  # a different exchange (another model): start the feedback afresh
        return ring_program(x, valid, rank, world_size, dtype, keys, residual, out_residual)
    x = x.astype(mx.float32) if valid else mx.zeros(x.shape, dtype=mx.float32)
    if dtype == "int8-sum":
        return _int8_sum(x, valid, world_size, state.keys(1)[0])
    if dtype == "int8-gather":
        return _int8_gather(x, valid)
    return _float_sum(x, valid, _FLOAT_DTYPES[dtype])


def _float_sum(x: mx.array, valid: bool, dtype: mx.Dtype) -> Program:
    flag = mx.array([1.0 if valid else 0.0], dtype=mx.float32)
    wire = yield Request("sum", mx.concatenate([x, flag]).astype(dtype))
    wire = wire.astype(mx.float32)
    return wire[:-1], wire[-1]


def int8_levels(world_size: int) -> int:
    """L such that n values in -L..L sum in int8 without overflow."""
    levels = 127 // world_size
    if levels < 1:
        raise ValueError(f"int8 all_sum needs at most 127 ranks, not {world_size}; use exchange_dtype int4")
    return levels


def _int8_sum(x: mx.array, valid: bool, world_size: int, key: mx.array) -> Program:
    levels = int8_levels(world_size)
    xb = blocks_of(x, BLOCK)
    largest = yield Request("max", mx.max(mx.abs(xb), axis=1))  # the same on every rank: a max is exact
    scales = largest / levels
    safe = mx.where(scales > 0, scales, 1.0)[:, None]
    # |x| <= largest, so x/scale lies in -L..L and stochastic rounding stays there (clip: float rounding).
    q = stochastic_round(mx.clip(xb / safe, -levels, levels), key)
    flag = mx.array([1 if valid else 0], dtype=mx.int8)
    wire = mx.concatenate([mx.clip(q, -levels, levels).astype(mx.int8).reshape(-1)[:x.size], flag])
    summed = yield Request("sum", wire)
    total = (blocks_of(summed[:-1].astype(mx.float32), BLOCK) * scales[:, None]).reshape(-1)[:x.size]
    return total, summed[-1].astype(mx.float32)


def _int8_gather(x: mx.array, valid: bool) -> Program:
    flag = mx.array([1.0 if valid else 0.0], dtype=mx.float32)
    q, scales = quantize_int8(x)
    # One all_gather: [int8 values | float32 scales and the flag, viewed as bytes].
    gathered = yield Request("gather", mx.concatenate([q, mx.view(mx.concatenate([scales, flag]), mx.int8)]))
    total = mx.zeros(x.shape, dtype=mx.float32)
    count = mx.array(0.0)
    for r in range(gathered.shape[0]):
        meta = mx.view(gathered[r][q.size:], mx.float32)
        # Multiplying by the flag is belt and braces: an invalid rank already sent zeros.
        total = total + dequantize_int8(gathered[r][:q.size], meta[:-1]) * meta[-1]
        count = count + meta[-1]
    return total, count


def sum_valid(x: mx.array, valid: bool, group: mx.distributed.Group | None, dtype: str,
              block: int = INT8_BLOCK) -> tuple[mx.array, mx.array]:
    """(sum over valid ranks, number of valid ranks) of `exchange` with a fresh state; `block` is unused."""
    result = exchange(x, valid, group, dtype)
    return result.total, result.count

