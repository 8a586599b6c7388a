"""The CuPy backend's masked kernels, on the host harness.

``tests/test_masks.py`` checks masked calls against the float64 reference on
every backend.  This file covers what only the CuPy backend has: the masked
paths run clean under the race check and AddressSanitizer/UBSan (forward and
backward, planar and rows layouts, a strided view, every dtype, with and without
the epilogue) and give the unsanitized bits; positions outside the mask get
``a * g`` exactly whatever x holds there; synchronised BN's masked pieces.
Launch counts of masked calls are in ``tests/test_launch_counts.py``.
"""
from __future__ import annotations

import numpy as np
import pytest

from cupybn.testing.hostcuda import host_cupy_backend

SHAPES = {"planar": (3, 3, 10), "rows": (40, 3, 1)}  # (outer, C, inner) views, as api.py hands them over


def masked_inputs(shape, dtype, seed=0):
    """x3 (offset from 0), a (outer, 1, inner) mask selecting about 60% of the
    positions (at least 2), its count, and per-channel parameters."""
    rng = np.random.default_rng(seed)
    outer, channels, inner = shape
    x3 = (rng.standard_normal(shape) * 2 + 7).astype(dtype)
    mask = rng.random((outer, 1, inner)) < 0.6
    mask.reshape(-1)[:2] = True
    pdt = np.float64 if dtype == np.float64 else np.float32
    gamma, beta = np.linspace(0.5, 2, channels, dtype=pdt), np.linspace(-1, 1, channels, dtype=pdt)
    return x3, mask, int(np.count_nonzero(mask)), gamma, beta


def run_masked_paths(backend, x3, mask, count, gamma, beta, epilogue):
    """A masked training forward (running statistics updated) and its backward,
    with the fused epilogue (residual, ReLU, dz) or without.  Returns every output."""
    channels = x3.shape[1]
    pdt = gamma.dtype
    rm, rv = np.zeros(channels, pdt), np.ones(channels, pdt)
    dy3 = np.random.default_rng(3).standard_normal(x3.shape).astype(x3.dtype)
    extra = {}
    if epilogue:
        extra = {"residual": np.random.default_rng(9).standard_normal(x3.shape).astype(x3.dtype), "relu": True}
    y3, *saved = backend.forward_train(x3, gamma, beta, 1e-5, rm, rv, 0.1, **extra, mask=mask, count=count)
    relu_y = y3 if epilogue else None
    grads = backend.backward(dy3, x3, *saved, gamma, beta, True, relu_y=relu_y, want_dz=epilogue, mask=mask,
                             count=count)
    return [y3, *saved, rm, rv, *(g for g in grads if g is not None)]


# A sanitized build of the masked kernels costs 1-2 minutes of compiling per dtype and tool on
# 2 cores: AddressSanitizer on float16 (the widest set of conversions) and the race check on
# float32.  The kernels' indexing does not depend on the dtype.
@pytest.mark.parametrize("sanitize,dtype", [("address", np.float16), ("race", np.float32)])
def test_the_masked_paths_run_clean_under_the_sanitizers_and_give_the_unsanitized_bits(sanitize, dtype):
    checked, plain = host_cupy_backend(sanitize), host_cupy_backend()
    cases = [masked_inputs(shape, dtype) for shape in SHAPES.values()]
    x3, mask, count, gamma, beta = masked_inputs((6, 3, 10), dtype)
    mask = np.ascontiguousarray(mask[::2])  # as api.py hands masks over
    cases.append((x3[::2], mask, int(np.count_nonzero(mask)), gamma, beta))  # the general path
    for x3, mask, count, gamma, beta in cases:
        for epilogue in (False, True):
            got = run_masked_paths(checked, x3, mask, count, gamma, beta, epilogue)
            want = run_masked_paths(plain, x3, mask, count, gamma, beta, epilogue)
            assert len(got) == len(want)
            for a, b in zip(got, want, strict=True):
                np.testing.assert_array_equal(a, b)
    # synchronised BN's masked pieces (the same kernels)
    x3, mask, count, gamma, beta = cases[0]
    moments = checked.shard_moments(x3, mask=mask, count=count)
    for a, b in zip(moments, plain.shard_moments(x3, mask=mask, count=count), strict=True):
        np.testing.assert_array_equal(a, b)
    dy3 = np.ones_like(x3)
    args = (dy3, x3, moments[0], moments[1], np.ones(3, moments[0].dtype), gamma, np.ones(3), np.ones(3), count)
    np.testing.assert_array_equal(checked.input_gradient(*args, mask=mask), plain.input_gradient(*args, mask=mask))


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
@pytest.mark.parametrize("layout", list(SHAPES) + ["strided"])
def test_positions_outside_the_mask_get_a_times_g_exactly_whatever_x_holds_there(layout, dtype):
    backend = host_cupy_backend()
    if layout == "strided":
        x3, mask, _, gamma, beta = masked_inputs((6, 3, 10), dtype, seed=1)
        x3, mask = x3[::2], np.ascontiguousarray(mask[::2])
    else:
        x3, mask, _, gamma, beta = masked_inputs(SHAPES[layout], dtype, seed=1)
    count = int(np.count_nonzero(mask))
    outside = np.broadcast_to(~mask, x3.shape)
    x3 = np.array(x3)
    x3[outside] = np.resize(np.array([np.inf, -np.inf, np.nan, 6e4], dtype), int(outside.sum()))
    if layout == "strided":
        x3 = np.repeat(x3, 2, axis=0)[::2]  # a strided view again, the same values
    y3, mean_hi, mean_lo, var, inv_std = backend.forward_train(x3, gamma, beta, 1e-5, mask=mask, count=count)
    assert np.all(np.isfinite(mean_hi)) and np.all(np.isfinite(var)) and np.all(var > 0)
    dy3 = np.random.default_rng(4).standard_normal(x3.shape).astype(dtype)
    dx3, _, _ = backend.backward(dy3, x3, mean_hi, mean_lo, var, inv_std, gamma, beta, True, mask=mask, count=count)
    acc = mean_hi.dtype
    a = (gamma.astype(np.float64) * inv_std.astype(np.float64)).astype(acc)  # finish_grad's coefficient a
    want = (a[None, :, None] * dy3.astype(acc)).astype(dtype)
    assert np.array_equal(dx3[outside], want[outside])
    # (inside the mask dx takes dgamma, a sum over every position: not finite with this padding)
