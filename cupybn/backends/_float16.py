"""float16 <-> float32 conversion for the NumPy backend.

NumPy converts float32 to float16 one value at a time, at about 1.5 ns per
value, and at about 60 ns per value when the result is subnormal or zero (tiny
gradients, for instance).  These versions use whole-array integer arithmetic:
about 1 ns per value whatever the values, with the same bits as NumPy's cast
(round to nearest, ties to even; overflow to infinity; NaN stays NaN).
"""
from __future__ import annotations

import functools

import numpy as np

_ABS = np.uint32(0x7FFF_FFFF)
_REBIAS_AND_ROUND = np.uint32(0xC800_0FFF)  # -(112 << 23) + 0xfff: exponent 127 -> 15, round at bit 13
_MIN_NORMAL_HALF = np.uint32(0x3880_0000)    # 2**-14 as float32 bits
_OVERFLOW = np.uint32(0x4780_0000)           # 65536.0: rounds to infinity from here on
_INF = np.uint32(0x7F80_0000)
_HALF_BITS = np.uint32(0x3F00_0000)          # 0.5 as float32 bits


@functools.cache
def half_table():
    """float32 value of every float16 bit pattern (256 KiB)."""
    return np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(np.float16).astype(np.float32)


def widen_half(src, out):
    """float16 ``src`` -> float32 ``out`` (same shape), by table look-up."""
    np.take(half_table(), src.view(np.uint16), out=out, mode="clip")


def narrow_to_half(src, out, a, r):
    """float32 ``src`` -> float16 ``out``, rounding to nearest even.

    ``a`` and ``r`` are uint32 scratch arrays shaped like ``src``.
    """
    u = src.view(np.uint32)
    np.bitwise_and(u, _ABS, out=a)
    # Normal results: add 0xfff plus the lowest kept bit (ties to even), rebias
    # the exponent and drop 13 mantissa bits.
    np.right_shift(a, 13, out=r)
    np.bitwise_and(r, 1, out=r)
    np.add(r, a, out=r)
    np.add(r, _REBIAS_AND_ROUND, out=r)
    np.right_shift(r, 13, out=r)
    # Subnormal results: adding 0.5 makes the float32 adder round |x| to a
    # multiple of 2**-24, the float16 subnormal step; its low bits are the result.
    small = a < _MIN_NORMAL_HALF
    if small.any():
        np.add(a.view(np.float32), np.float32(0.5), out=r.view(np.float32), where=small)
        np.subtract(r, _HALF_BITS, out=r, where=small)
    big = a >= _OVERFLOW
    if big.any():
        np.copyto(r, np.uint32(0x7C00), where=big)
        np.copyto(r, np.uint32(0x7E00), where=a > _INF)
    np.right_shift(u, 16, out=a)
    np.bitwise_and(a, 0x8000, out=a)
    np.bitwise_or(r, a, out=r)
    np.copyto(out.view(np.uint16), r, casting="unsafe")
