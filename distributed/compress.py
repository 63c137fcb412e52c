"""How DiLoCo's pseudo-gradients cross the wire: float32, a 16-bit cast, or block-wise int8, summed over ranks.

Every exchange also carries a validity flag per rank (1 = my contribution is finite, 0 = count me out), so
one collective gives both the sum of the valid contributions and how many there were.

Wire formats and what one rank sends (n ranks, P values, ring algorithm):

* float32 / bfloat16 / float16: the values are cast and summed with one ring all_sum, the flag riding as
  one extra element. Each rank sends 2(n-1)/n of the payload (reduce-scatter, then all-gather). The
  16-bit sums are rounded in 16 bits at each hop; float16 overflows above 65504 (the caller checks).
* int8: an int8 all_sum would overflow (n ranks of +-127), and summing in int32 sends as many bytes as
  float32. So each rank quantises its own values (symmetric, one float32 scale per block of 4096 values)
  and the int8 payloads plus scales are *gathered*; every rank dequantises and sums locally. A ring
  all_gather makes each rank send (n-1) times its own payload: 4x fewer bytes than float32 for n=2,
  2x for n=4, break-even at n=8 (and break-even with bfloat16 at n=4). The error is independent of n:
  each value is off by at most half its block's scale (`quantize_int8`).
"""

from __future__ import annotations

import math

import mlx.core as mx

EXCHANGE_DTYPES = ("float32", "bfloat16", "float16", "int8")
INT8_BLOCK = 4096  # values per int8 scale: the scales cost 4/4096 = 0.1% extra bytes
_FLOAT_DTYPES = {"float32": mx.float32, "bfloat16": mx.bfloat16, "float16": mx.float16}


def ring_bytes(payload_bytes: int, world_size: int) -> int:
    """Bytes one rank sends in a ring all_sum of `payload_bytes`: 2(n-1)/n of the payload."""
    return 0 if world_size <= 1 else (2 * (world_size - 1) * payload_bytes) // world_size


def gather_bytes(own_bytes: int, world_size: int) -> int:
    """Bytes one rank sends in a ring all_gather where every rank contributes `own_bytes`: (n-1) of them."""
    return 0 if world_size <= 1 else (world_size - 1) * own_bytes


def num_blocks(size: int, block: int = INT8_BLOCK) -> int:
    return max(1, math.ceil(size / block))


def wire_bytes(size: int, world_size: int, dtype: str, block: int = INT8_BLOCK) -> int:
    """Bytes this rank puts on the wire to exchange `size` float values (plus the validity flag)."""
    if dtype == "int8":
        return gather_bytes(size + 4 * (num_blocks(size, block) + 1), world_size)
    return ring_bytes((size + 1) * _FLOAT_DTYPES[dtype].size, world_size)


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
    """x as it arrives after crossing the wire alone in `dtype` (cast there and back to float32)."""
    if dtype == "int8":
        return dequantize_int8(*quantize_int8(x))
    return x.astype(_FLOAT_DTYPES[dtype]).astype(mx.float32)


def sum_valid(x: mx.array, valid: bool, group: mx.distributed.Group | None, dtype: str,
              block: int = INT8_BLOCK) -> tuple[mx.array, mx.array]:
    """Sum a 1-D float32 array over the ranks whose `valid` is true, sent as `dtype`.

    Returns (sum as float32, number of valid ranks as a float32 scalar), both lazy: evaluating them runs
    the collective. An invalid rank sends zeros and flag 0, so nothing of it (not even a NaN) reaches
    the others. With no group (one rank) nothing is sent.
    """
    if dtype not in EXCHANGE_DTYPES:
        raise ValueError(f"exchange dtype {dtype!r} is not one of {', '.join(EXCHANGE_DTYPES)}")
    x = x.astype(mx.float32) if valid else mx.zeros(x.shape, dtype=mx.float32)
    flag = mx.array([1.0 if valid else 0.0], dtype=mx.float32)
    alone = group is None or group.size() == 1
    if dtype == "int8":
        q, scales = quantize_int8(x, block)
        if alone:
            return dequantize_int8(q, scales, block), flag[0]
        # One all_gather: [int8 values | float32 scales and the flag, viewed as bytes].
        meta = mx.concatenate([scales, flag])
        packed = mx.concatenate([q, mx.view(meta, mx.int8)])
        gathered = mx.distributed.all_gather(packed, group=group).reshape(group.size(), -1)
        total = mx.zeros(x.shape, dtype=mx.float32)
        count = mx.array(0.0)
        for r in range(group.size()):
            row = gathered[r]
            rmeta = mx.view(row[q.size:], mx.float32)
            rflag = rmeta[-1]
            # Multiplying by the flag is belt and braces: an invalid rank already sent zeros.
            total = total + dequantize_int8(row[:q.size], rmeta[:-1], block) * rflag
            count = count + rflag
        return total, count
    wire = mx.concatenate([x, flag]).astype(_FLOAT_DTYPES[dtype])
    if not alone:
        wire = mx.distributed.all_sum(wire, group=group)
    wire = wire.astype(mx.float32)
    return wire[:-1], wire[-1]
