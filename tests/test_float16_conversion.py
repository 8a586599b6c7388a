"""The NumPy backend's float16 conversions give exactly NumPy's bits.

Every float16 value, every tie between neighbours and the float32 values next
to each tie, plus random bit patterns: rounding, subnormals, overflow and NaN.
"""
import numpy as np

from cupybn.backends._float16 import narrow_to_half, widen_half


def _all_halves():
    return np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(np.float16)


def _hard_float32_values():
    halves = _all_halves()
    finite = halves[np.isfinite(halves)]
    with np.errstate(over="ignore"):
        upper = np.nextafter(finite, np.float16(np.inf)).astype(np.float64)
    ties = ((finite.astype(np.float64) + upper) / 2).astype(np.float32)
    rng = np.random.default_rng(0)
    scaled = (rng.standard_normal(1 << 18) * 10.0 ** rng.integers(-12, 6, 1 << 18)).astype(np.float32)
    random_bits = rng.integers(0, 2**32, 1 << 18, dtype=np.uint64).astype(np.uint32).view(np.float32)
    edges = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 65504, 65519.996, 65520, 65536, 3e38,
                      2.0**-14, 2.0**-24, 2.0**-25, 3 * 2.0**-26, 1e-30], np.float32)
    return np.concatenate([halves.astype(np.float32), ties, np.nextafter(ties, np.float32(np.inf)),
                           np.nextafter(ties, np.float32(-np.inf)), scaled, random_bits, edges, -edges])


def test_narrowing_matches_numpy_bit_for_bit():
    values = _hard_float32_values()
    with np.errstate(all="ignore"):
        expected = values.astype(np.float16)
    got = np.empty_like(expected)
    narrow_to_half(values, got, np.empty(values.shape, np.uint32), np.empty(values.shape, np.uint32))
    both_nan = np.isnan(expected) & np.isnan(got)
    mismatched = (expected.view(np.uint16) != got.view(np.uint16)) & ~both_nan
    assert not mismatched.any(), values[mismatched][:10]
    assert np.array_equal(np.isnan(expected), np.isnan(got))


def test_narrowing_writes_into_strided_output():
    values = np.linspace(-3, 3, 24, dtype=np.float32).reshape(4, 6)
    out = np.zeros((4, 12), np.float16)[:, ::2]
    narrow_to_half(values, out, np.empty(values.shape, np.uint32), np.empty(values.shape, np.uint32))
    assert np.array_equal(out, values.astype(np.float16))


def test_widening_is_exact_for_every_half():
    halves = _all_halves()
    got = np.empty(halves.shape, np.float32)
    widen_half(halves, got)
    expected = halves.astype(np.float32)
    same = (got.view(np.uint32) == expected.view(np.uint32)) | (np.isnan(got) & np.isnan(expected))
    assert same.all()
