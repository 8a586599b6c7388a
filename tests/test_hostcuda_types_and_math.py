"""The host harness gives kernels CUDA's types and math: __half, vector types, math, atomics.

Kernels are in tests/cuda/half.cu, vector_types.cu, math.cu and atomics.cu.
Each test checks one property against NumPy or exact rational arithmetic:
bit-exact where CUDA's operation is exact or correctly rounded, within CUDA's
documented ulp bound where the GPU's function is approximate (the host's may be
more exact; hostcuda/math.h lists the differences).

The kernels here are built with IEEE subnormals (``ftz=False``, NVRTC's default)
so that the arithmetic itself is checked everywhere; CuPy's ``-ftz=true`` (the
default of every hostcuda module, as of every CuPy kernel) has tests of its own
at the end.
"""
from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
from cuda_kernels import module
from hypothesis import given, settings
from hypothesis import strategies as st

from cupybn.testing import hostcuda

GRID, BLOCK = (2,), (64,)  # the kernels loop grid-stride, so any shape covers every element


def kernel(source: str, name: str, sanitize: str | None = None, *, ftz: bool = False) -> hostcuda.Function:
    return module(source, sanitize, ftz).get_function(name)


# ---- exact reference arithmetic -------------------------------------------------------

FORMATS = {np.float16: (11, -14, 15), np.float32: (24, -126, 127), np.float64: (53, -1022, 1023)}


def round_exact(q: Fraction, dtype) -> float:
    """The rational q rounded to nearest even in dtype (as a Python float, exact)."""
    if q == 0:
        return 0.0
    precision, emin, emax = FORMATS[dtype]
    a = abs(q)
    e = a.numerator.bit_length() - a.denominator.bit_length()
    if Fraction(2) ** e > a:
        e -= 1  # now 2**e <= a < 2**(e+1)
    ulp = Fraction(2) ** (max(e, emin) - (precision - 1))
    scaled = a / ulp
    n, rest = divmod(scaled.numerator, scaled.denominator)
    if 2 * rest > scaled.denominator or (2 * rest == scaled.denominator and n % 2 == 1):
        n += 1
    v = n * ulp
    magnitude = math.inf if v >= Fraction(2) ** (emax + 1) else float(v)
    return -magnitude if q < 0 else magnitude


def exact_fma(a: np.ndarray, b: np.ndarray, c: np.ndarray, dtype) -> np.ndarray:
    """a*b + c rounded once, elementwise; zeros and non-finite values by IEEE's rules."""
    wide = np.longdouble if dtype is np.float64 else np.float64
    out = np.empty(a.shape, dtype)
    for i, (x, y, z) in enumerate(zip(a.tolist(), b.tolist(), c.tolist(), strict=True)):
        if not all(map(math.isfinite, (x, y, z))):
            out[i] = wide(x) * wide(y) + wide(z)  # inf/NaN cases: the product cannot overflow here
            continue
        q = Fraction(x) * Fraction(y) + Fraction(z)
        # An exact zero is -0 only when the product is a zero of the same sign as a zero c.
        product_negative = (math.copysign(1, x) < 0) != (math.copysign(1, y) < 0)
        negative_zero = x * y == 0 and z == 0 and product_negative and math.copysign(1, z) < 0
        out[i] = round_exact(q, dtype) if q != 0 else (-0.0 if negative_zero else 0.0)
    return out


def same(actual: np.ndarray, expected: np.ndarray) -> None:
    """Bit-identical, except that any NaN matches any NaN."""
    actual, expected = np.asarray(actual), np.asarray(expected, dtype=actual.dtype)
    both_nan = np.isnan(actual) & np.isnan(expected)
    bits = {2: np.uint16, 4: np.uint32, 8: np.uint64}[actual.itemsize]
    mismatch = (actual.view(bits) != expected.view(bits)) & ~both_nan
    if mismatch.any():
        i = np.flatnonzero(mismatch)[:8]
        raise AssertionError(f"{mismatch.sum()} mismatches, e.g. at {i.tolist()}: got {actual[i].tolist()}, "
                             f"expected {expected[i].tolist()}")


def ulp_error(actual: np.ndarray, reference: np.ndarray, dtype) -> np.ndarray:
    """|actual - reference| in units of the last place of reference (in dtype)."""
    ref_in_dtype = np.abs(reference.astype(dtype))
    ulp = np.spacing(ref_in_dtype).astype(np.float64)
    return np.abs(actual.astype(np.float64) - reference.astype(np.float64)) / ulp


def float32_bits(n: int, min_size: int = 1):
    return st.lists(st.integers(0, 2**32 - 1), min_size=min_size, max_size=n).map(
        lambda v: np.array(v, np.uint32).view(np.float32))


def half_bits(n: int, min_size: int = 1):
    return st.lists(st.integers(0, 2**16 - 1), min_size=min_size, max_size=n).map(
        lambda v: np.array(v, np.uint16).view(np.float16))


# Values that sit on rounding boundaries of binary16.
HALF_EDGES = np.array(
    [0.0, -0.0, 1.0, 65504.0, 65519.99, 65520.0, -65520.0, 1e9, -1e-9, 2.0**-24, 2.0**-25, 1.5 * 2.0**-24,
     2.0**-25 + 2.0**-40, 2.0**-14, 2.0**-14 - 2.0**-25, 1 + 2.0**-11, 1 + 3 * 2.0**-11, 1 + 2.0**-11 + 2.0**-23,
     1 + 2.0**-11 + 2.0**-40,
     2049.0, 2051.0, math.inf, -math.inf, math.nan, 1e-45, -3e-39],
    np.float64,
)


# ---- __half ---------------------------------------------------------------------------

def run_float_to_half(x: np.ndarray):
    n = x.size
    outs = [np.zeros(n, np.float16) for _ in range(5)] + [np.zeros(n, np.float32)]
    kernel("half.cu", "float_to_half")(GRID, BLOCK, (x, *outs, np.int32(n)))
    return outs


def directed(x: np.ndarray, mode: str) -> np.ndarray:
    """x rounded to float16 toward zero, down or up: the nearest-even result, stepped back if it overshot."""
    h = x.astype(np.float16)
    wide_h, wide_x = h.astype(np.float64), x.astype(np.float64)
    if mode == "rz":
        step = np.abs(wide_h) > np.abs(wide_x)
        target = np.zeros_like(h)
    elif mode == "rd":
        step, target = wide_h > wide_x, np.full_like(h, -np.inf)
    else:
        step, target = wide_h < wide_x, np.full_like(h, np.inf)
    return np.where(step, np.nextafter(h, target), h)


@settings(deadline=None)
@given(x=float32_bits(300))
def test_float_to_half_rounds_to_nearest_even_in_every_bit_pattern(x):
    x = np.concatenate([x, HALF_EDGES.astype(np.float32)])
    rn, rz, rd, ru, implicit, back = run_float_to_half(x)
    with np.errstate(over="ignore"):
        expected = x.astype(np.float16)
    same(rn, expected)
    same(implicit, expected)
    same(back, expected.astype(np.float32))


@settings(deadline=None)
@given(x=float32_bits(300))
def test_float_to_half_directed_roundings_bracket_the_value(x):
    x = np.concatenate([x, HALF_EDGES.astype(np.float32)])
    _, rz, rd, ru, _, _ = run_float_to_half(x)
    with np.errstate(over="ignore", invalid="ignore"):
        for got, mode in [(rz, "rz"), (rd, "rd"), (ru, "ru")]:
            same(got, directed(x, mode))


@settings(deadline=None)
@given(x=st.lists(st.integers(0, 2**64 - 1), min_size=1, max_size=300).map(
    lambda v: np.array(v, np.uint64).view(np.float64)))
def test_double_to_half_rounds_once_not_through_float(x):
    x = np.concatenate([x, HALF_EDGES])
    out, implicit = np.zeros(x.size, np.float16), np.zeros(x.size, np.float16)
    kernel("half.cu", "double_to_half")(GRID, BLOCK, (x, out, implicit, np.int32(x.size)))
    with np.errstate(over="ignore"):
        expected = x.astype(np.float16)  # NumPy rounds double -> half directly
    same(out, expected)
    same(implicit, expected)
    # 1 + 2^-11 + 2^-40 is just above a tie; through float it would become the tie and round down to 1.
    assert out[np.flatnonzero(x == 1 + 2.0**-11 + 2.0**-40)[0]] == np.float16(1 + 2.0**-10)


def test_every_half_bit_pattern_converts_to_float_exactly():
    bits = np.arange(2**16, dtype=np.uint16)
    out, implicit = np.zeros(bits.size, np.float32), np.zeros(bits.size, np.float32)
    ubits, sbits = np.zeros(bits.size, np.uint16), np.zeros(bits.size, np.int16)
    kernel("half.cu", "half_bits_to_float")(GRID, BLOCK, (bits, out, implicit, ubits, sbits, np.int32(bits.size)))
    same(out, bits.view(np.float16).astype(np.float32))
    same(implicit, out)
    np.testing.assert_array_equal(ubits, bits)
    np.testing.assert_array_equal(sbits, bits.view(np.int16))


def run_half_arithmetic(a, b, c):
    n = a.size
    out = np.zeros(15 * n, np.float16)
    kernel("half.cu", "half_arithmetic")(GRID, BLOCK, (a, b, c, out, np.int32(n)))
    return out.reshape(15, n)


def reference_max(a, b, pick_larger: bool):
    """CUDA's __hmax/__hmin: a NaN operand is ignored, +0 counts as larger than -0."""
    out = np.empty_like(a)
    for i, (x, y) in enumerate(zip(a, b, strict=True)):
        if np.isnan(x) or np.isnan(y):
            out[i] = y if np.isnan(x) else x
        elif x == y:
            out[i] = y if np.signbit(x) == pick_larger else x
        else:
            out[i] = max(x, y) if pick_larger else min(x, y)
    return out


def check_half_arithmetic(a, b, c):
    got = run_half_arithmetic(a, b, c)
    wa, wb, wc = (v.astype(np.float64) for v in (a, b, c))
    with np.errstate(all="ignore"):
        # + - * are exact in double, / is rounded twice harmlessly (53 >= 2*11 + 2): one rounding to half.
        expected = [(wa + wb), (wa - wb), (wa * wb), (wa / wb)]
        expected = [e.astype(np.float16) for e in expected]
        fma = exact_fma(a, b, c, np.float16)
        compound = ((wa + wb).astype(np.float16).astype(np.float64) * wc).astype(np.float16)
    for k, e in enumerate(expected):
        same(got[k], e)          # __hadd __hsub __hmul __hdiv
        same(got[5 + k], e)      # operators + - * /
    same(got[4], fma)
    same(got[9], compound)
    same(got[10], -a)
    same(got[11], -a)
    same(got[12], np.abs(a))
    same(got[13], reference_max(a, b, True))
    same(got[14], reference_max(a, b, False))


@settings(deadline=None)
@given(data=st.data(), n=st.integers(1, 200))
def test_half_arithmetic_is_correctly_rounded(data, n):
    a, b, c = (data.draw(half_bits(n, n)) for _ in range(3))
    check_half_arithmetic(a, b, c)


# Operands whose combinations are the special cases: signed zeros, infinities, NaN, extremes.
HALF_SPECIALS = np.array([0.0, -0.0, 1.0, -1.0, np.inf, -np.inf, np.nan, 2.0**-24, -(2.0**-24), 65504.0, -65504.0,
                          2.0**-14, 0.5, 3.0], np.float16)


def test_half_arithmetic_is_correctly_rounded_for_every_first_operand():
    rng = np.random.default_rng(1)
    a = np.arange(2**16, dtype=np.uint16).view(np.float16)
    b, c = (rng.integers(0, 2**16, a.size, dtype=np.uint16).view(np.float16) for _ in range(2))
    # ... and every triple of special operands.
    sa, sb, sc = (g.ravel() for g in np.meshgrid(HALF_SPECIALS, HALF_SPECIALS, HALF_SPECIALS, indexing="ij"))
    check_half_arithmetic(np.concatenate([a, sa]), np.concatenate([b, sb]), np.concatenate([c, sc]))


@settings(deadline=None)
@given(data=st.data(), n=st.integers(1, 200))
def test_half_comparisons_are_ordered_except_not_equal_operator(data, n):
    a, b = data.draw(half_bits(n, n)), data.draw(half_bits(n, n))
    out = np.zeros(n, np.int32)
    kernel("half.cu", "half_compare")(GRID, BLOCK, (a, b, out, np.int32(n)))
    x, y = a.astype(np.float64), b.astype(np.float64)
    conditions = [x == y, ~(x == y), x < y, x <= y, x > y, x >= y,  # operators: != is unordered
                  x == y, (x < y) | (x > y), x < y, x <= y, x > y, x >= y,  # __heq ... __hge: all ordered
                  np.isnan(x), x == np.inf, x == -np.inf]
    expected = sum(c.astype(np.int32) << k for k, c in enumerate(conditions))
    np.testing.assert_array_equal(out, expected)


def saturate_to(values: np.ndarray, dtype, nan_value: int) -> np.ndarray:
    """Integral (or infinite, or NaN) floats as dtype the way cvt does it: clamped, NaN -> nan_value."""
    info = np.iinfo(dtype)
    out = [nan_value if math.isnan(v) else info.max if v > info.max else info.min if v < info.min else int(v)
           for v in values.tolist()]
    return np.array(out, dtype)


@settings(deadline=None)
@given(ints=st.lists(st.integers(-(2**31), 2**31 - 1), min_size=1, max_size=200), data=st.data())
def test_half_integer_conversions_round_to_nearest_even_and_saturate(ints, data):
    x = np.array(ints, np.int32)
    h = data.draw(half_bits(x.size, x.size))
    n = x.size
    from_int, implicit = np.zeros(n, np.float16), np.zeros(n, np.float16)
    rn, rz, implicit_int = (np.zeros(n, np.int32) for _ in range(3))
    args = (x, from_int, implicit, h, rn, rz, implicit_int, np.int32(n))
    kernel("half.cu", "half_int_conversions")(GRID, BLOCK, args)
    with np.errstate(over="ignore"):
        expected = x.astype(np.float64).astype(np.float16)  # int32 -> double is exact
    same(from_int, expected)
    same(implicit, expected)
    wide = h.astype(np.float64)
    with np.errstate(invalid="ignore"):  # rint/trunc of a signaling NaN
        nearest, truncated = np.rint(wide), np.trunc(wide)
    np.testing.assert_array_equal(rn, saturate_to(nearest, np.int32, 0))
    np.testing.assert_array_equal(rz, saturate_to(truncated, np.int32, 0))
    np.testing.assert_array_equal(implicit_int, rz)


@settings(deadline=None)
@given(pairs=st.lists(st.tuples(st.floats(-70000, 70000, width=32), st.floats(-70000, 70000, width=32)),
                      min_size=1, max_size=100))
def test_half2_helpers_pack_low_and_high_lanes(pairs):
    x = np.array(pairs, np.float32).reshape(-1)
    out = np.zeros(4 * x.size, np.float32)
    kernel("half.cu", "half2_ops")(GRID, BLOCK, (x, out, np.int32(x.size // 2)))
    got = out.reshape(-1, 8)
    with np.errstate(over="ignore", invalid="ignore"):
        h = x.astype(np.float16).reshape(-1, 2)
        wide = h.astype(np.float64)
        lanes = [h, (wide + 1).astype(np.float16), (wide * wide).astype(np.float16), h[:, ::-1]]
    same(got, np.concatenate(lanes, axis=1).astype(np.float32))


# ---- vector types --------------------------------------------------------------------

# (sizeof, alignof) on 64-bit Linux, from CUDA 12's vector_types.h.
VECTOR_LAYOUTS = {
    "char": [(1, 1), (2, 2), (3, 1), (4, 4)], "uchar": [(1, 1), (2, 2), (3, 1), (4, 4)],
    "short": [(2, 2), (4, 4), (6, 2), (8, 8)], "ushort": [(2, 2), (4, 4), (6, 2), (8, 8)],
    "int": [(4, 4), (8, 8), (12, 4), (16, 16)], "uint": [(4, 4), (8, 8), (12, 4), (16, 16)],
    "long": [(8, 8), (16, 16), (24, 8), (32, 16)], "ulong": [(8, 8), (16, 16), (24, 8), (32, 16)],
    "longlong": [(8, 8), (16, 16), (24, 8), (32, 16)], "ulonglong": [(8, 8), (16, 16), (24, 8), (32, 16)],
    "float": [(4, 4), (8, 8), (12, 4), (16, 16)], "double": [(8, 8), (16, 16), (24, 8), (32, 16)],
}


def test_vector_types_have_cuda_sizes_and_alignments():
    out = np.full(2 * 48, -1, np.int32)
    kernel("vector_types.cu", "vector_layouts")((1,), (1,), (out,))
    names = [f"{t}{w}" for t in VECTOR_LAYOUTS for w in range(1, 5)]
    got = {name: tuple(layout) for name, layout in zip(names, out.reshape(-1, 2).tolist(), strict=True)}
    expected = {f"{t}{w + 1}": layout for t, ls in VECTOR_LAYOUTS.items() for w, layout in enumerate(ls)}
    assert got == expected


@settings(deadline=None)
@given(n4=st.integers(1, 300))
def test_float4_and_double2_accesses_keep_member_order(n4):
    x = np.arange(4 * n4, dtype=np.float32)
    out = np.zeros_like(x)
    kernel("vector_types.cu", "reverse_float4")(GRID, BLOCK, (x, out, np.int32(n4)))
    np.testing.assert_array_equal(out.reshape(-1, 4), x.reshape(-1, 4)[:, ::-1])
    d = np.arange(4 * n4, dtype=np.float64) * 0.5
    dout = np.zeros_like(d)
    kernel("vector_types.cu", "swap_double2")(GRID, BLOCK, (d, dout, np.int32(2 * n4)))
    np.testing.assert_array_equal(dout.reshape(-1, 2), d.reshape(-1, 2)[:, ::-1])


def test_make_vector_functions_fill_members_in_order():
    out = np.zeros(45, np.int64)
    kernel("vector_types.cu", "make_vectors")((1,), (1,), (out,))
    expected = [-1, 2, -3, 4, 250, 251, 252, -300, 301, 65535, 1, 2, 3, -7, 8, -9, 4000000000, 5,
                -10000000000, 11, 12, -13, 14, -15, 16, 17, 18, 19, 1, -3, 5, 3, -4, 5, -6, 20, 21, 22, 23, 24, 25,
                26, 27]
    np.testing.assert_array_equal(out[: len(expected)], expected)


# ---- math ----------------------------------------------------------------------------

def rsqrt_correctly_rounded(x: np.ndarray) -> np.ndarray:
    """1/sqrt(x) for float32 x >= 0, rounded to nearest by exact midpoint tests."""
    out = np.empty_like(x)
    with np.errstate(divide="ignore"):
        guess = (1.0 / np.sqrt(x.astype(np.float64))).astype(np.float32)
    for i, (v, r) in enumerate(zip(x.tolist(), guess.tolist(), strict=True)):
        if not (v > 0 and math.isfinite(v)):
            out[i] = r
            continue
        r = np.float32(r)
        while True:  # y < mid <=> mid^2 * v > 1
            lo = (Fraction(float(r)) + Fraction(float(np.nextafter(r, np.float32(0))))) / 2
            hi = (Fraction(float(r)) + Fraction(float(np.nextafter(r, np.float32(np.inf))))) / 2
            if lo * lo * Fraction(v) > 1:
                r = np.nextafter(r, np.float32(0))
            elif hi * hi * Fraction(v) < 1:
                r = np.nextafter(r, np.float32(np.inf))
            else:
                break
        out[i] = r
    return out


def is_signaling_nan(x: np.ndarray) -> np.ndarray:
    return np.isnan(x) & ((x.view(np.uint32) & 0x400000) == 0)


def roundf(x: np.ndarray) -> np.ndarray:
    """C's roundf: halfway cases away from zero (x + 0.5 is exact in double)."""
    wide = x.astype(np.float64)
    return np.where(np.abs(wide) < 2.0**23, np.trunc(wide + np.copysign(0.5, wide)), wide).astype(np.float32)


@settings(deadline=None)
@given(data=st.data(), n=st.integers(1, 100))
def test_correctly_rounded_float_intrinsics_match_ieee(data, n):
    a, b, c = (data.draw(float32_bits(n, n)) for _ in range(3))
    out = np.zeros(20 * n, np.float32)
    kernel("math.cu", "float_exact")(GRID, BLOCK, (a, b, c, out, np.int32(n)))
    got = out.reshape(20, n)
    with np.errstate(all="ignore"):
        fma = exact_fma(a, b, c, np.float32)
        expected = {0: a + b, 1: a - b, 2: a * b, 3: a / b, 4: fma, 5: fma, 6: (a * b) + c,
                    7: np.float32(1) / a, 8: np.sqrt(np.abs(a)), 9: np.sqrt(np.abs(a)),
                    10: rsqrt_correctly_rounded(np.abs(a)), 13: np.copysign(a, b), 14: np.floor(a),
                    15: np.ceil(a), 16: np.trunc(a), 17: roundf(a), 18: np.rint(a),
                    19: np.where(np.isnan(a), np.float32(0), np.clip(a, 0, 1)) + np.float32(0)}
    for k, e in expected.items():
        same(got[k], e)
    # fminf/fmaxf: NaN ignored; the sign of a zero result is not specified, so compare values.
    # A signaling NaN operand is left out: the GPU ignores it like any NaN, glibc returns NaN.
    quiet = ~(is_signaling_nan(a) | is_signaling_nan(b))
    np.testing.assert_array_equal(got[11][quiet], np.fmin(a, b)[quiet])
    np.testing.assert_array_equal(got[12][quiet], np.fmax(a, b)[quiet])


# CUDA's documented maximum ulp errors (CUDA C++ Programming Guide, "Mathematical Functions").
FLOAT_ULP_BOUNDS = {"rsqrtf": 2, "expf": 2, "exp2f": 2, "logf": 1, "log2f": 1, "powf": 4, "exp(float)": 2}


@settings(deadline=None)
@given(x=st.lists(st.floats(-80, 80, width=32), min_size=1, max_size=200),
       y=st.lists(st.floats(-4, 4, width=32), min_size=200, max_size=200))
def test_approximate_float_functions_are_within_cuda_ulp_bounds(x, y):
    a = np.array(x, np.float32)
    a = np.where(a == 0, np.float32(1.5), a)  # log(0), 1/sqrt(0) are exact special cases: tested elsewhere
    b = np.array(y[: a.size], np.float32)
    b = np.where(np.abs(b) < 2.0**-20, np.float32(3), b)
    n = a.size
    out = np.zeros(10 * n, np.float32)
    kernel("math.cu", "float_approx")(GRID, BLOCK, (a, b, out, np.int32(n)))
    got = out.reshape(10, n)
    wa, wb = a.astype(np.float64), b.astype(np.float64)
    with np.errstate(over="ignore"):
        references = {"rsqrtf": (0, 1 / np.sqrt(np.abs(wa))), "expf": (1, np.exp(wa)), "exp2f": (2, np.exp2(wa)),
                      "logf": (3, np.log(np.abs(wa))), "log2f": (4, np.log2(np.abs(wa))),
                      "powf": (5, np.abs(wa) ** wb), "exp(float)": (9, np.exp(wa))}
    for name, (k, ref) in references.items():
        finite = np.abs(ref) < np.finfo(np.float32).max / 2
        err = ulp_error(got[k][finite], ref[finite], np.float32)
        assert err.max(initial=0) <= FLOAT_ULP_BOUNDS[name], name
    # __expf: 2 + floor(|1.173 x|) ulp; __logf: 2^-21.41 absolute in [0.5, 2], else 3 ulp;
    # __fdividef: 2 ulp for |y| in [2^-126, 2^126].
    ok = np.abs(np.exp(wa)) < np.finfo(np.float32).max / 2
    assert (ulp_error(got[6][ok], np.exp(wa)[ok], np.float32) <= 2 + np.floor(np.abs(1.173 * wa[ok]))).all()
    log_ref = np.log(np.abs(wa))
    near_one = (np.abs(wa) >= 0.5) & (np.abs(wa) <= 2)
    assert (np.abs(got[7][near_one] - log_ref[near_one]) <= 2.0**-21.41).all()
    assert (ulp_error(got[7][~near_one], log_ref[~near_one], np.float32) <= 3).all()
    assert (ulp_error(got[8], wa / wb, np.float32) <= 2).all()


@settings(deadline=None)
@given(data=st.data(), n=st.integers(1, 100))
def test_double_intrinsics_are_correctly_rounded(data, n):
    finite = st.floats(-1e300, 1e300, allow_subnormal=True).filter(lambda v: v != 0)
    a, b, c = (np.array(data.draw(st.lists(finite, min_size=n, max_size=n)), np.float64) for _ in range(3))
    out = np.zeros(12 * n, np.float64)
    kernel("math.cu", "double_ops")(GRID, BLOCK, (a, b, c, out, np.int32(n)))
    got = out.reshape(12, n)
    with np.errstate(all="ignore"):
        fma = exact_fma(a, b, c, np.float64)
        for k, e in enumerate([a + b, a * b, a / b, fma, fma, 1.0 / a, np.sqrt(np.abs(a)), np.fmin(a, b),
                               np.fmax(a, b)]):
            same(got[k], e)
        # rsqrt, exp, log: CUDA's bound is 1 ulp; the float64 reference adds up to half an ulp of its own.
        for k, ref in [(9, 1 / np.sqrt(np.abs(a))), (10, np.exp(a)), (11, np.log(np.abs(a)))]:
            ok = np.isfinite(ref) & (np.abs(ref) > 1e-300)
            assert (ulp_error(got[k][ok], ref[ok], np.float64) <= 1.5).all(), k


CONVERSION_EDGES = np.array([0.5, 1.5, 2.5, -0.5, -2.5, 2.0**31, -(2.0**31), 2.0**31 - 128, 4.3e9, 2.0**63,
                             -(2.0**63), 1e30, -1e30, math.inf, -math.inf, math.nan, -0.0, 0.49999997],
                            np.float32)


@settings(deadline=None)
@given(x=float32_bits(200), ints=st.lists(st.integers(-(2**63), 2**63 - 1), min_size=200, max_size=200))
def test_float_integer_conversions_saturate_and_map_nan_like_cvt(x, ints):
    x = np.concatenate([x, CONVERSION_EDGES])
    n = x.size
    longs = np.resize(np.array(ints, np.int64), n)
    int32s = (longs & 0xFFFFFFFF).astype(np.uint32).view(np.int32)
    d = np.resize(np.array(ints, np.int64).view(np.float64), n)
    out32, out64, outf = np.zeros(3 * n, np.int32), np.zeros(n, np.int64), np.zeros(3 * n, np.float32)
    kernel("math.cu", "conversions")(GRID, BLOCK, (x, d, int32s, longs, out32, out64, outf, np.int32(n)))
    with np.errstate(invalid="ignore"):  # rint/trunc of a signaling NaN
        nearest, truncated = np.rint(x.astype(np.float64)), np.trunc(x.astype(np.float64))
    np.testing.assert_array_equal(out32[:n], saturate_to(nearest, np.int32, 0))
    np.testing.assert_array_equal(out32[n:2 * n], saturate_to(truncated, np.int32, 0))
    np.testing.assert_array_equal(out32[2 * n:].view(np.uint32), saturate_to(nearest, np.uint32, 0))
    np.testing.assert_array_equal(out64, saturate_to(nearest, np.int64, np.iinfo(np.int64).min))
    same(outf[:n], int32s.astype(np.float64).astype(np.float32))  # int32 -> double is exact
    same(outf[n:2 * n], np.array([round_exact(Fraction(v), np.float32) for v in longs.tolist()], np.float32))
    with np.errstate(all="ignore"):
        same(outf[2 * n:], d.astype(np.float32))


def brev32(v: int) -> int:
    return int(f"{v:032b}"[::-1], 2)


def signed(v: int, bits: int) -> int:
    return v - (1 << bits) if v >> (bits - 1) else v


@settings(deadline=None)
@given(st.lists(st.tuples(st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1), st.integers(0, 2**64 - 1)),
                min_size=1, max_size=100))
def test_bit_intrinsics_and_min_max_match_integer_arithmetic(triples):
    triples += [(0, 0, 0), (1, 2**31, 2**63), (2**32 - 1, 2**32 - 1, 2**64 - 1)]
    u = np.array([t[0] for t in triples], np.uint32)
    v = np.array([t[1] for t in triples], np.uint32)
    w = np.array([t[2] for t in triples], np.uint64)
    n = u.size
    out = np.zeros(20 * n, np.uint64)
    kernel("math.cu", "bit_intrinsics")(GRID, BLOCK, (u, v, w, out, np.int32(n)))
    got = out.reshape(20, n)
    for i, (x, y, z) in enumerate(triples):
        sx, sy, sz = signed(x, 32), signed(y, 32), signed(z, 64)
        expected = [
            bin(x).count("1"), bin(z).count("1"), 32 - x.bit_length(), 64 - z.bit_length(),
            (x & -x).bit_length(), (z & -z).bit_length(), brev32(x), (x * y) >> 32, ((sx * sy) >> 32) % 2**32,
            x, x, z, z >> 32, z & 0xFFFFFFFF, (x << 32) | y,
            min(sx, sy) % 2**32, max(x, y),  # max(int, unsigned int) compares as unsigned
            min(x, y), max(sz, sx) % 2**64, min(z, y),
        ]
        assert got[:, i].tolist() == expected, (x, y, z)


def test_classification_of_floats_and_doubles():
    values = [0.0, -0.0, 1.0, -1.0, math.inf, -math.inf, math.nan, -math.nan, 1e-40, 3e38]
    x = np.array(values, np.float32)
    d = np.array(values[::-1], np.float64)
    out = np.zeros(x.size, np.int32)
    kernel("math.cu", "classify")((1,), (32,), (x, d, out, np.int32(x.size)))
    flags = [np.isnan(x), np.isinf(x), np.isfinite(x), np.signbit(x),
             np.isnan(d), np.isinf(d), np.isfinite(d), np.signbit(d)]
    np.testing.assert_array_equal(out, sum(f.astype(np.int32) << k for k, f in enumerate(flags)))


def test_ldg_loads_the_same_values_as_plain_loads():
    x = np.arange(64, dtype=np.float32) * 1.25
    h = (np.arange(16) - 8).astype(np.float16) / np.float16(4)
    out = np.zeros(64, np.float32)
    kernel("math.cu", "ldg_loads")(GRID, BLOCK, (x, h, out, np.int32(16)))
    v = x.reshape(-1, 4)
    np.testing.assert_array_equal(out.reshape(-1, 4), np.column_stack([v[:, 3], v[:, 0], v[:, 2], h]))


# ---- atomics -------------------------------------------------------------------------

def test_atomic_adds_from_many_blocks_lose_no_update():
    grid, block, reps = 4, 64, 2
    threads = grid * block
    counters = [np.zeros(1, t) for t in (np.int32, np.uint32, np.uint64, np.float32, np.float64)]
    isub, usub = np.full(1, 10, np.int32), np.full(1, 10, np.uint32)
    hsum, scoped = np.zeros(1, np.float16), np.zeros(1, np.int32)
    kernel("atomics.cu", "atomic_sums")((grid,), (block,), (*counters, isub, usub, hsum, scoped, np.int32(reps)))
    gid = np.arange(threads)
    assert [c[0] for c in counters] == [threads * reps, 2 * threads * reps, 3 * threads * reps,
                                        reps * (gid % 5).sum(), reps * (gid % 7).sum()]
    assert isub[0] == 10 - threads * reps
    assert usub[0] == (10 - threads * reps) % 2**32  # unsigned wraps
    assert hsum[0] == threads * reps  # 512: every step of 1 is exact in half
    assert scoped[0] == 2 * threads * reps


@pytest.mark.parametrize("start, addend, expected", [
    (0.0, 1e-40, 0.0),         # subnormal operand flushed
    (1e-40, 0.0, 0.0),         # subnormal stored value flushed
    (-1e-40, 1.0, 1.0),
    (2.0**-125, -1.5 * 2.0**-126, 0.0),  # normal operands, subnormal result: flushed
    (-(2.0**-125), 1.5 * 2.0**-126, -0.0),  # ... to a zero of the same sign
    (1.5, 2.25, 3.75),
])
def test_float_atomic_add_flushes_subnormals_like_the_gpu(start, addend, expected):
    target, old = np.array([start], np.float32), np.zeros(1, np.float32)
    kernel("atomics.cu", "atomic_add_subnormal")((1,), (1,), (target, np.array([addend], np.float32), old))
    same(target, np.array([expected], np.float32))
    same(old, np.array([start], np.float32))  # the old value comes back unflushed


@settings(deadline=None)
@given(values=st.lists(st.integers(-(2**31), 2**31 - 1), min_size=1, max_size=256))
def test_atomic_min_max_find_the_extremes(values):
    v = np.array(values, np.int32)
    imax, imin = np.array([-(2**31)], np.int32), np.array([2**31 - 1], np.int32)
    umax, umin = np.zeros(1, np.uint32), np.array([2**32 - 1], np.uint32)
    llmax, ullmin = np.array([-(2**63)], np.int64), np.array([2**64 - 1], np.uint64)
    kernel("atomics.cu", "atomic_extrema")((4,), (64,), (v, imax, imin, umax, umin, llmax, ullmin, np.int32(v.size)))
    u = v.view(np.uint32)
    assert (imax[0], imin[0], umax[0], umin[0]) == (v.max(), v.min(), u.max(), u.min())
    assert llmax[0] == int(v.max()) * 10**9
    assert int(ullmin[0]) == min(int(x) << 20 for x in u.tolist())


@settings(deadline=None)
@given(n=st.integers(1, 256))
def test_atomic_exchange_hands_out_every_value_once(n):
    slot, fslot, uslot = np.array([-1], np.int32), np.array([-1], np.float32), np.array([7], np.uint64)
    taken, ftaken, utaken = np.zeros(n, np.int32), np.zeros(n, np.float32), np.zeros(n, np.uint64)
    kernel("atomics.cu", "atomic_exchanges")((4,), (64,), (slot, taken, fslot, ftaken, uslot, utaken, np.int32(n)))
    ids = list(range(n))
    assert sorted([*taken.tolist(), int(slot[0])]) == [-1, *ids]
    assert sorted([*ftaken.tolist(), float(fslot[0])]) == [-1.0, *ids]
    assert sorted([*utaken.tolist(), int(uslot[0])]) == sorted([7, *(i << 33 for i in ids)])


@settings(deadline=None)
@given(n=st.integers(1, 256), limit=st.integers(0, 40), start=st.integers(0, 45))
def test_atomic_inc_dec_wrap_at_the_limit(n, limit, start):
    inc, dec = np.array([start], np.uint32), np.array([start], np.uint32)
    inc_taken, dec_taken = np.zeros(n, np.uint32), np.zeros(n, np.uint32)
    kernel("atomics.cu", "atomic_wrapping")((4,), (64,),
                                            (inc, inc_taken, dec, dec_taken, np.uint32(limit), np.int32(n)))
    # Sequential model: the threads' order is unknown, but the sequence of values is not.
    i_seq, d_seq, i, d = [], [], start, start
    for _ in range(n):
        i_seq.append(i)
        d_seq.append(d)
        i = 0 if i >= limit else i + 1
        d = limit if d == 0 or d > limit else d - 1
    assert sorted(inc_taken.tolist()) == sorted(i_seq) and inc[0] == i
    assert sorted(dec_taken.tolist()) == sorted(d_seq) and dec[0] == d


@settings(deadline=None)
@given(n=st.integers(1, 256))
def test_atomic_bitwise_ops_combine_all_threads(n):
    or_word, and_word = np.zeros(1, np.int32), np.array([2**32 - 1], np.uint32)
    xor_word, or64 = np.zeros(1, np.uint32), np.zeros(1, np.uint64)
    kernel("atomics.cu", "atomic_bits")((4,), (64,), (or_word, and_word, xor_word, or64, np.int32(n)))
    gids = range(n)
    xor = 0
    for g in gids:
        xor ^= 1 << (g % 32)
    assert int(or_word[0]) == sum(1 << b for b in {g % 31 for g in gids})
    assert int(and_word[0]) == (2**32 - 1) & ~sum(1 << b for b in {g % 32 for g in gids})
    assert int(xor_word[0]) == xor
    assert int(or64[0]) == sum(1 << b for b in {g % 64 for g in gids})


def run_cas_lock(sanitize, grid, block, reps):
    lock, counter = np.zeros(1, np.int32), np.zeros(1, np.int32)
    small, wide = np.zeros(1, np.uint16), np.zeros(1, np.uint64)
    kernel("atomics.cu", "cas_lock", sanitize)((grid,), (block,), (lock, counter, small, wide, np.int32(reps)))
    threads = grid * block
    assert (lock[0], counter[0], small[0], int(wide[0])) == (0, threads * reps, threads, threads << 32)


def test_cas_spin_lock_with_fences_serialises_critical_sections():
    run_cas_lock(None, 2, 64, 3)


def test_fenced_lock_is_race_free_under_the_race_check():
    # The lock's atomics are relaxed: only the fences order the plain counter
    # updates, so this fails if the race check cannot see __threadfence().
    run_cas_lock("race", 2, 16, 2)


@pytest.mark.parametrize("sanitize", [None, "race"])
def test_last_block_reduction_sees_every_partial_sum(sanitize):
    grid, block = 5, 32
    x = np.arange(grid * block, dtype=np.int32) - 40
    partial, ticket, total = np.zeros(grid, np.int32), np.zeros(1, np.uint32), np.zeros(1, np.int32)
    kernel("atomics.cu", "last_block_sum", sanitize)((grid,), (block,), (x, partial, ticket, total))
    np.testing.assert_array_equal(partial, x.reshape(grid, block).sum(axis=1))
    assert (total[0], ticket[0]) == (x.sum(), 0)


# ---- flush to zero (-ftz=true, as CuPy compiles every kernel) ----------------------------

def test_float_arithmetic_flushes_subnormals_as_cupy_compiles_it():
    # Operand 1e-40 is read as zero; the product 1e-20 * 1e-20 = 1e-40 becomes zero.
    a = np.array([1e-40, 1e-20, -1e-40, 1.5], np.float32)
    b = np.array([0.0, 1e-20, 0.0, 2.0], np.float32)
    c = np.zeros(4, np.float32)
    got = {}
    for ftz in (False, True):
        out = np.zeros(20 * 4, np.float32)
        kernel("math.cu", "float_exact", ftz=ftz)(GRID, BLOCK, (a, b, c, out, np.int32(4)))
        got[ftz] = out.reshape(20, 4)
    same(got[False][0], a + b)
    same(got[False][2], a * b)
    same(got[True][0], np.array([0.0, 2e-20, 0.0, 3.5], np.float32))  # (-0) + 0 is +0
    same(got[True][2], np.array([0.0, 0.0, -0.0, 3.0], np.float32))


def test_half_subnormals_are_not_flushed_their_arithmetic_is_float():
    # A __half subnormal (below 6.1e-5) is a normal float, so -ftz=true leaves half arithmetic alone.
    tiny = np.array([2.0**-24, 3 * 2.0**-24, 2.0**-15, -(2.0**-20)], np.float16)
    ones = np.ones(4, np.float16)
    outs = []
    for ftz in (False, True):
        out = np.zeros(16 * 4, np.float16)
        kernel("half.cu", "half_arithmetic", ftz=ftz)(GRID, BLOCK, (tiny, ones, tiny, out, np.int32(4)))
        outs.append(out)
    same(outs[True], outs[False])
    same(outs[True].reshape(-1, 4)[2], tiny * ones)  # __hmul keeps the subnormals
