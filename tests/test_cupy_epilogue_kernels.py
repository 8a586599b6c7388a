"""The CuPy backend's fused epilogue (residual add and ReLU), at the backend level on the host harness.

The forward kernels store relu(BN(x) + z), added in the arithmetic type and
rounded once; the backward kernels pass dy through the ReLU (0 where y <= 0)
before the gradient sums and dx, and may write that masked dy as the residual's
gradient.  Each property is checked against the backend's own unfused calls:
the planar and rows families, 16-byte packs and single values, strided views
(the general path), float16/float32/float64, training and inference.
"""
from __future__ import annotations

import hashlib
import platform

import numpy as np
import pytest

from cupybn.testing.hostcuda import host_cupy_backend

DTYPES = [np.float16, np.float32, np.float64]
EPS = 1e-5


@pytest.fixture(scope="module")
def backend():
    # Several slices per channel, so the reductions' cross-block merge runs too.
    return host_cupy_backend(threads=64, sm_count=8, values_per_thread=2)


def _aligned(a):
    """A C-contiguous copy of ``a`` starting on a 16-byte boundary (packs wherever the shape allows)."""
    buffer = np.empty(a.nbytes + 16, np.uint8)
    start = -buffer.ctypes.data % 16
    out = buffer[start:start + a.nbytes].view(a.dtype).reshape(a.shape)
    out[...] = a
    return out


def _misaligned(a):
    """A C-contiguous copy of ``a`` one element past a 16-byte boundary (no packs)."""
    buffer = np.empty(a.nbytes + 16 + a.itemsize, np.uint8)
    start = -buffer.ctypes.data % 16 + a.itemsize
    out = buffer[start:start + a.nbytes].view(a.dtype).reshape(a.shape)
    out[...] = a
    return out


def _strided(a):
    """``a`` as every other outer row of a larger array: not C-contiguous."""
    big = np.zeros((2 * a.shape[0], *a.shape[1:]), a.dtype)
    big[::2] = a
    return big[::2]


# name: (x3's shape, layout of x3 and dy3, layout of the residual and relu_y)
CASES = {
    "planar-packs": ((4, 3, 16), _aligned, _aligned),
    "planar-peeled": ((3, 3, 35), _aligned, np.asfortranarray),  # rows not whole packs; z and y copied to C order
    "rows-packs": ((40, 5, 1), _aligned, _misaligned),  # a misaligned z: the normalisation alone reads no packs
    "rows-singles": ((33, 3, 1), _aligned, _aligned),  # 99 values: no whole number of packs
    "general": ((4, 3, 10), _strided, _strided),  # strided x3 and dy3: the general path, z and y read in place
}


def _inputs(case, dtype, seed=0):
    shape, layout, _ = CASES[case]
    rng = np.random.default_rng(seed)
    channels = shape[1]
    pdt = np.float64 if dtype == np.float64 else np.float32
    x3 = layout((rng.standard_normal(shape) * 2 + 3).astype(dtype))
    params = {"gamma": rng.uniform(0.5, 2, channels).astype(pdt), "beta": rng.standard_normal(channels).astype(pdt),
              "running_mean": (rng.standard_normal(channels) + 3).astype(pdt),
              "running_var": rng.uniform(2, 6, channels).astype(pdt)}
    return x3, params, rng


def _forward(backend, x3, params, training, **epilogue):
    g, b = params["gamma"], params["beta"]
    if training:
        return backend.forward_train(x3, g, b, EPS, **epilogue)
    return backend.forward_infer(x3, g, b, params["running_mean"], params["running_var"], EPS, **epilogue)


def _residual(case, y_bn, rng):
    """A residual for y_bn with a NaN and a value that cancels y_bn exactly (y = +0 there)."""
    z = rng.standard_normal(y_bn.shape).astype(y_bn.dtype)
    z.flat[0] = np.nan
    z.flat[1] = -y_bn.flat[1]
    return CASES[case][2](z)


def _same_bits(a, b):
    """Equal bit for bit, where NaN matches NaN (whatever its payload)."""
    a, b = np.asarray(a), np.asarray(b)
    both_nan = np.isnan(a) & np.isnan(b)
    return a.shape == b.shape and a.dtype == b.dtype and bool(np.all(
        (a.view(f"u{a.itemsize}") == b.view(f"u{b.itemsize}")) | both_nan))


def _within_one_ulp(got, want, *operands):
    """float16: |got - want| at most one float16 ulp of the largest of want and the operands (NaN matches NaN)."""
    magnitude = np.max([np.abs(np.asarray(a, np.float64)) for a in (want, *operands)], axis=0)
    ulp = np.spacing(np.nan_to_num(magnitude).astype(np.float16)).astype(np.float64)
    error = np.abs(got.astype(np.float64) - want.astype(np.float64))
    return bool(np.all((error <= ulp) | (np.isnan(got) & np.isnan(want))))


@pytest.mark.parametrize("training", [True, False], ids=["train", "infer"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", list(CASES))
def test_the_fused_forward_is_the_unfused_composition_rounded_once(backend, case, dtype, training):
    x3, params, rng = _inputs(case, dtype)
    y_bn, *stats = _forward(backend, x3, params, training)
    z3 = _residual(case, y_bn, rng)
    with np.errstate(invalid="ignore"):
        s = y_bn + z3  # in the data's dtype, as an unfused residual add would be
    for residual, relu in [(True, False), (False, True), (True, True)]:
        y, *fused_stats = _forward(backend, x3, params, training, residual=z3 if residual else None, relu=relu)
        assert all(_same_bits(a, b) for a, b in zip(fused_stats, stats, strict=True))
        before = s if residual else y_bn
        with np.errstate(invalid="ignore"):
            want = np.where(before <= 0, 0, before).astype(dtype) if relu else before
        assert y.flags.c_contiguous
        if dtype == np.float16 and residual:  # one rounding instead of two
            assert _within_one_ulp(y, want, y_bn, z3), (residual, relu)
        else:
            assert _same_bits(y, want), (residual, relu)
        if relu:  # no negatives and no -0; NaN stays NaN
            assert not np.any(np.signbit(y[~np.isnan(y)])) and np.isnan(y.flat[0]) == residual


@pytest.mark.parametrize("training", [True, False], ids=["train", "infer"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", list(CASES))
def test_the_backward_through_the_relu_is_the_plain_backward_of_the_masked_gradient(backend, case, dtype, training):
    x3, params, rng = _inputs(case, dtype, seed=1)
    y_bn, *_ = _forward(backend, x3, params, training)
    z3 = _residual(case, y_bn, rng)
    y, *saved = _forward(backend, x3, params, training, residual=z3, relu=True)
    assert (y == 0).any() and (y > 0).any() and np.isnan(y).any()  # the mask has both sides, and a NaN y
    layout, y_layout = CASES[case][1], CASES[case][2]
    dy3 = layout(rng.standard_normal(x3.shape).astype(dtype))
    with np.errstate(invalid="ignore"):
        g3 = layout(np.where(y <= 0, 0, dy3).astype(dtype))  # y == 0 gives 0; a NaN y passes dy
    g, b = params["gamma"], params["beta"]
    plain = backend.backward(g3, x3, *saved, g, b, training)
    fused = backend.backward(dy3, x3, *saved, g, b, training, relu_y=y_layout(y), want_dz=True)
    assert len(fused) == 4
    assert all(_same_bits(a, c) for a, c in zip(fused[:3], plain, strict=True))
    assert _same_bits(fused[3], np.asarray(g3))
    without_dz = backend.backward(dy3, x3, *saved, g, b, training, relu_y=y)
    assert len(without_dz) == 3 and all(_same_bits(a, c) for a, c in zip(without_dz, plain, strict=True))


def test_a_misaligned_residual_costs_the_normalisation_its_packs_but_not_the_statistics(backend):
    # The statistics' packs decide their summation order: a residual must not change them.
    x3 = _aligned(np.ones((4, 3, 16), np.float32))
    for residual, packs in [(_aligned(x3), [4, 4]), (_misaligned(x3), [4, 1])]:
        plan = backend._plan("train", x3, elementwise_reads=residual, epilogue=True)
        assert [_pack_size(launch.kernel.name) for launch in (plan.reduction, plan.elementwise)] == packs
        assert plan.elementwise.kernel.name.endswith(", true>")


def _pack_size(name):
    """The pack size of a planar or elementwise kernel: its last numeric template argument."""
    return [int(a) for a in name.rstrip(">").split("<")[1].split(", ") if a.isdigit()][-1]


@pytest.mark.parametrize("case", ["planar-packs", "general"])
def test_without_a_relu_the_residuals_gradient_is_dy_itself(backend, case):
    x3, params, rng = _inputs(case, np.float32, seed=2)
    y, *saved = _forward(backend, x3, params, True, residual=CASES[case][2](np.ones(x3.shape, np.float32)))
    dy3 = CASES[case][1](rng.standard_normal(x3.shape).astype(np.float32))
    plain = backend.backward(dy3, x3, *saved, params["gamma"], params["beta"], True)
    *grads, dz3 = backend.backward(dy3, x3, *saved, params["gamma"], params["beta"], True, want_dz=True)
    assert dz3 is dy3 and all(_same_bits(a, c) for a, c in zip(grads, plain, strict=True))


@pytest.mark.parametrize("dtype", DTYPES)
def test_relu_gradient_is_dy_where_y_is_positive_and_zero_elsewhere(backend, dtype):
    rng = np.random.default_rng(3)
    y3 = rng.standard_normal((3, 4, 5)).astype(dtype)
    y3.flat[:4] = [0.0, -0.0, np.nan, np.inf]
    dy3 = _strided(rng.standard_normal((3, 4, 5)).astype(dtype))  # any strides
    g3 = backend.relu_gradient(dy3, y3)
    with np.errstate(invalid="ignore"):
        want = np.where(y3 <= 0, 0, dy3).astype(dtype)
    assert g3.flags.c_contiguous and _same_bits(g3, want)
    assert list(g3.flat[:4]) == [0, 0, dy3.flat[2], dy3.flat[3]]


@pytest.mark.parametrize("dtype", DTYPES)
def test_the_synchronised_normalize_takes_the_same_epilogue(backend, dtype):
    x3, params, rng = _inputs("rows-singles", dtype, seed=4)
    channels = x3.shape[1]
    mean, mean_lo = rng.standard_normal(channels) + 3, np.zeros(channels)
    var = rng.uniform(1, 5, channels)
    args = (x3, mean, mean_lo, var, params["gamma"], params["beta"], EPS)
    y_bn = backend.normalize(*args)
    z3 = _strided(_residual("rows-singles", y_bn, rng))
    with np.errstate(invalid="ignore"):
        s = y_bn + z3
        want = np.where(s <= 0, 0, s).astype(dtype)
    y = backend.normalize(*args, residual=z3, relu=True)
    assert _within_one_ulp(y, want, y_bn, z3) if dtype == np.float16 else _same_bits(y, want)
    assert _same_bits(backend.normalize(*args, relu=True), np.where(y_bn <= 0, 0, y_bn).astype(dtype))


def _outputs_digest(backend, case, dtype):
    """sha256 of every output of a training forward (running statistics too), an
    inference forward and the backward of each, without an epilogue.  The inputs
    are integer arithmetic, so they are the same bits on every machine."""
    shape, layout, _ = CASES[case]
    n = int(np.prod(shape))
    pdt = np.float64 if dtype == np.float64 else np.float32

    def values(scale, shift, count=n):
        return (np.arange(count) * 2654435761 % 65521 / 65521 * scale + shift).astype(dtype)

    x3, dy3 = layout(values(6, 1).reshape(shape)), layout(values(2, -1).reshape(shape))
    gamma, beta = values(1, 0.5, shape[1]).astype(pdt), values(2, -1, shape[1]).astype(pdt)
    running_mean, running_var = values(2, 3, shape[1]).astype(pdt), values(3, 1, shape[1]).astype(pdt)
    digest = hashlib.sha256()
    train = backend.forward_train(x3, gamma, beta, EPS, running_mean, running_var, 0.1)
    infer = backend.forward_infer(x3, gamma, beta, running_mean, running_var, EPS)
    for out in (train, (running_mean, running_var), backend.backward(dy3, x3, *train[1:], gamma, beta, True),
                infer, backend.backward(dy3, x3, *infer[1:], gamma, beta, False)):
        for a in out:
            digest.update(np.ascontiguousarray(a).tobytes())
    return digest.hexdigest()[:32]


# Recorded from the kernels before the epilogue existed (the same backend
# settings); a deliberate change of the numerics records them again.
_DIGESTS_BEFORE_THE_EPILOGUE = {
    ("planar-packs", "float16"): "897231a092782c22d586642cff3c5f11",
    ("planar-packs", "float32"): "6002144c2572d079f32ece1948e2c2a3",
    ("planar-packs", "float64"): "b1d7664fd6a93b61902e87bc4339ca44",
    ("planar-peeled", "float16"): "321f82c770a255bbe8506125d942dee8",
    ("planar-peeled", "float32"): "dc817613f33238b5c1bef9db220201db",
    ("planar-peeled", "float64"): "e33928ceb4158b946bff5545b419abee",
    ("rows-packs", "float16"): "51cef574864cbbf77c4b89de5c530d8b",
    ("rows-packs", "float32"): "a30afd765a576d4243c87295a53dbb4b",
    ("rows-packs", "float64"): "0dcddd6a12467c2d178ce8c24c2db6d6",
    ("rows-singles", "float16"): "43e6813275a340c9a9022ac7bcdadbec",
    ("rows-singles", "float32"): "612ce0e06aeed85ca005213f7679c46b",
    ("rows-singles", "float64"): "9e34f50b486f0e0531b8ba3c722fa9ac",
    ("general", "float16"): "20251c97f8cac81edd049d3d1071a7ef",
    ("general", "float32"): "6fcb0f3eb7b9d458f611d60a486c31eb",
    ("general", "float64"): "7aec4b5b24238de4f042f4a4e4877cdd",
}


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"),
                    reason="recorded on x86-64, where g++ contracts no multiply-add the kernels do not ask for")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", list(CASES))
def test_without_an_epilogue_the_kernels_give_the_bits_they_gave_before_it(backend, case, dtype):
    assert _outputs_digest(backend, case, dtype) == _DIGESTS_BEFORE_THE_EPILOGUE[case, np.dtype(dtype).name]
