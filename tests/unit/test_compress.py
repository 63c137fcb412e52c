"""Wire formats of the DiLoCo exchange: gathered int8 error bound, 16-bit round trips, byte counts, single-rank sums
(the int8 all_sum, int4 and int2 on several ranks: test_compress_formats.py)."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from distributed.compress import (
    BLOCK,
    INT8_BLOCK,
    cast_round_trip,
    dequantize_int8,
    gather_bytes,
    quantize_int8,
    ring_bytes,
    ring_sum_bytes,
    sum_valid,
    wire_bytes,
)


def _values(n: int, seed: int = 0) -> np.ndarray:
    """Pseudo-gradient-like values: mostly small, heavy tails, a block of exact zeros, varied magnitudes."""
    rng = np.random.default_rng(seed)
    x = rng.standard_t(3, size=n).astype(np.float32) * 1e-3
    x[INT8_BLOCK:2 * INT8_BLOCK] = 0.0
    x[2 * INT8_BLOCK:3 * INT8_BLOCK] *= 1e4  # a block of much larger values
    x[-1] = 0.37  # the largest value of the last, partial block
    return x


def test_int8_error_is_at_most_half_a_step_per_element() -> None:
    n = 3 * INT8_BLOCK + 1000  # a partial last block
    x = _values(n)
    q, scales = quantize_int8(mx.array(x))
    assert q.dtype == mx.int8 and q.size == n and scales.size == 4
    back = np.array(dequantize_int8(q, scales))
    s = np.array(scales)
    expected = np.abs(x.reshape(-1)[: 3 * INT8_BLOCK].reshape(3, INT8_BLOCK)).max(axis=1) / 127
    np.testing.assert_allclose(s[:3], expected, rtol=1e-6)
    per_element = np.repeat(s, INT8_BLOCK)[:n]
    err = np.abs(x - back)
    # |x - dequant(quant(x))| <= scale/2, up to float32 rounding of q * scale.
    assert np.all(err <= per_element / 2 * (1 + 1e-6) + 1e-12)
    assert np.all(back[INT8_BLOCK:2 * INT8_BLOCK] == 0.0)  # a zero block is exact
    assert back[-1] == pytest.approx(0.37, rel=1e-6)  # the block maximum is exact: it maps to +-127
    # The bound is tight in practice (a quantiser that truncated would reach a full step).
    assert err.max() > 0.4 * per_element[np.argmax(err)]


def test_int8_uses_the_whole_range_and_keeps_signs() -> None:
    x = np.linspace(-1, 1, INT8_BLOCK, dtype=np.float32)
    q, _ = quantize_int8(mx.array(x))
    q = np.array(q)
    assert q.min() == -127 and q.max() == 127
    assert np.all(np.sign(q[np.abs(x) > 1 / 127]) == np.sign(x[np.abs(x) > 1 / 127]))


@pytest.mark.parametrize(("dtype", "rel"), [("bfloat16", 2.0**-8), ("float16", 2.0**-11)])
def test_16_bit_round_trip_is_within_half_an_ulp(dtype: str, rel: float) -> None:
    x = np.random.default_rng(1).normal(size=10_000).astype(np.float32)
    x = x[np.abs(x) > 1e-3]  # away from float16's subnormals
    back = np.array(cast_round_trip(mx.array(x), dtype))
    assert np.all(np.abs(back - x) <= rel * np.abs(x))
    assert np.any(back != x)  # it really was rounded
    assert np.array_equal(np.array(cast_round_trip(mx.array(x), "float32")), x)


def test_byte_counts() -> None:
    assert ring_bytes(1000, 1) == 0 and ring_bytes(1000, 2) == 1000 and ring_bytes(1000, 4) == 1500
    assert gather_bytes(1000, 1) == 0 and gather_bytes(1000, 4) == 3000
    n = 10_000  # 3 int8 blocks
    assert wire_bytes(n, 2, "float32") == (n + 1) * 4
    assert wire_bytes(n, 4, "bfloat16") == ring_sum_bytes(n + 1, 2, 4)  # exact: segments round up
    assert abs(wire_bytes(n, 4, "bfloat16") - 2 * 3 * (n + 1) * 2 // 4) <= 2 * 2
    assert wire_bytes(n, 2, "int8") == n + 4 * 4  # int8 payload + 3 scales + the flag, sent to 1 peer
    assert wire_bytes(n, 4, "int8-gather") == 3 * (n + 16)
    # From 3 ranks int8 is an all_sum: 2(n-1)/n of the int8 payload and the flag, and the all_max of the scales.
    assert wire_bytes(n, 4, "int8") == ring_sum_bytes(n + 1, 1, 4) + ring_sum_bytes(-(-n // BLOCK), 4, 4)
    # int8 gathering beats a float32 ring by 4x at n=2 and breaks even at n=8; the all_sum stays ~4x.
    big = 1 << 24
    assert wire_bytes(big, 2, "float32") / wire_bytes(big, 2, "int8") == pytest.approx(4, rel=1e-3)
    assert wire_bytes(big, 8, "float32") / wire_bytes(big, 8, "int8-gather") == pytest.approx(1, rel=1e-3)
    assert wire_bytes(big, 8, "float32") / wire_bytes(big, 8, "int8") == pytest.approx(4, rel=0.05)
    assert wire_bytes(n, 1, "int8") == 0


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16", "int8"])
def test_single_rank_sum_and_invalid_contribution(dtype: str) -> None:
    x = mx.array(_values(5000, seed=2))
    total, count = sum_valid(x, True, None, dtype)
    assert float(count) == 1.0
    np.testing.assert_allclose(np.array(total), np.array(cast_round_trip(x, dtype)), rtol=0, atol=1e-7)
    nan = x * mx.array(float("nan"))
    total, count = sum_valid(nan, False, None, dtype)
    assert float(count) == 0.0 and np.all(np.array(total) == 0.0)


def test_unknown_dtype_is_refused() -> None:
    with pytest.raises(ValueError, match="int3"):
        sum_valid(mx.zeros(3), True, None, "int3")
