"""Exactness: results agree with a float64 computation on the same inputs, at the
bars of ``cupybn.testing.tolerances``, whatever the offset of x (up to 1e6
standard deviations), the layout, the channel axis or the block structure.

Large offsets are where Batch Normalization goes wrong: the mean must be
subtracted without losing the bits that make up the signal, and the variance must
not be formed as E[x^2] - E[x]^2.
"""
import zlib

import numpy as np
import pytest
from hypothesis import given

import cupybn
from cupybn.testing import (
    batch_norm_errors,
    exceeded,
    probe_dy,
    reference_backward,
    reference_forward,
    rel_error,
    tolerance,
)
from cupybn.testing.strategies import (
    batch_norm_inputs,
    channels_last,
    make_params,
    make_x,
)

# Gradient bars are norm-wise relative; probe_dy keeps the exact gradients away
# from zero, and dx needs enough values per channel for that (see probe_dy).
GRADIENT_MIN_COUNT = 16


def errors_of(x, gamma, beta, *, axis, eps, backend, rng=None, dy_layout=None):
    """Run forward (+ backward with a probe_dy from ``rng``, if given) and measure every error."""
    y, saved = cupybn.batch_norm(x, gamma, beta, axis=axis, eps=eps, backend=backend)
    ref = reference_forward(x, gamma, beta, axis=axis, eps=eps)
    grads = ref_grads = None
    if rng is not None:
        dy = probe_dy(ref, axis, x.dtype, rng)
        if dy_layout is not None:
            dy = dy_layout(dy)
        grads = cupybn.batch_norm_backward(dy, saved)
        ref_grads = reference_backward(dy, ref, gamma, axis=axis)
    return batch_norm_errors(y, saved.var, grads, ref, ref_grads)


def assert_exact(errors, dtype, context):
    over = exceeded(errors, tolerance(dtype))
    assert not over, f"{context}: errors {over} above {tolerance(dtype)} (all errors: {errors})"


# ---- Hypothesis: small arrays, every layout, axis, offset and eps ----------------------------
LOW_PRECISION = ("float32", "float16")


@given(batch_norm_inputs(dtype_names=LOW_PRECISION, params=("both", "gamma", "beta", "none")))
def test_forward_matches_reference(backend, inputs):
    errors = errors_of(inputs.x, inputs.gamma, inputs.beta, axis=inputs.axis, eps=inputs.eps,
                       backend=backend)
    assert_exact(errors, inputs.x.dtype, inputs)


@given(batch_norm_inputs(dtype_names=LOW_PRECISION, min_count=GRADIENT_MIN_COUNT))
def test_gradients_match_reference(backend, inputs):
    errors = errors_of(inputs.x, inputs.gamma, inputs.beta, axis=inputs.axis, eps=inputs.eps,
                       backend=backend, rng=inputs.rng(1), dy_layout=inputs.relayout)
    assert_exact(errors, inputs.x.dtype, inputs)


# float64 too must lose nothing to the offset: a float64 mean rounded once costs
# ulp(offset) / std in y, dx and dgamma (~5e-11 at 1e6 std), so it is kept as a hi/lo pair.
@given(batch_norm_inputs(dtype_names=("float64",), min_count=GRADIENT_MIN_COUNT))
def test_float64_matches_reference(backend, inputs):
    errors = errors_of(inputs.x, inputs.gamma, inputs.beta, axis=inputs.axis, eps=inputs.eps,
                       backend=backend, rng=inputs.rng(1), dy_layout=inputs.relayout)
    assert_exact(errors, inputs.x.dtype, inputs)


@given(batch_norm_inputs(dtype_names=LOW_PRECISION, min_count=GRADIENT_MIN_COUNT))
def test_many_blocks_match_reference(backend, tiny_blocks, inputs):
    # Blocks of a handful of values: the per-block partial sums, their combination,
    # channel-split blocks (and, with two threads, the work split) on every example.
    with tiny_blocks():
        errors = errors_of(inputs.x, inputs.gamma, inputs.beta, axis=inputs.axis, eps=inputs.eps,
                           backend=backend, rng=inputs.rng(1), dy_layout=inputs.relayout)
    assert_exact(errors, inputs.x.dtype, inputs)


# ---- fixed realistic sizes: the real block structure (several blocks per call) -------------
REALISTIC = [
    pytest.param((16, 8, 32, 32), id="16x8x32x32"),
    pytest.param((32, 16, 32, 32), id="32x16x32x32"),   # more than one block of 2**18 values
    pytest.param((2, 3, 80, 80), id="2x3x80x80"),        # inner 6400: rows summed in many runs
    pytest.param((5000, 3), id="5000x3"),                # 2-D, N > 4096
    pytest.param((70000, 4), id="70000x4"),              # 2-D, more than one block
    pytest.param((2048, 8, 2), id="2048x8x2"),           # inner of 2
]


def _check_realistic_size(backend, shape, layout, offset, dtype):
    rng = np.random.default_rng(zlib.crc32(repr((shape, layout, offset, np.dtype(dtype).name)).encode()))
    x = make_x(shape, dtype, offset, 1.0, rng)
    gamma, beta = make_params(shape[1], np.float32, rng)
    relayout = (lambda a: channels_last(a, 1)) if layout == "channels-last" else (lambda a: a)
    errors = errors_of(relayout(x), gamma, beta, axis=1, eps=1e-5, backend=backend, rng=rng,
                       dy_layout=relayout)
    assert_exact(errors, dtype, f"{shape} {layout} offset {offset:g}")


@pytest.mark.parametrize("offset", [0.0, 1e2, 1e4, 1e6])
@pytest.mark.parametrize("layout", ["nchw", "channels-last"])
@pytest.mark.parametrize("shape", REALISTIC)
def test_float32_realistic_sizes_match_reference(backend, shape, layout, offset):
    _check_realistic_size(backend, shape, layout, offset, np.float32)


@pytest.mark.parametrize("offset", [0.0, 1e2, 1e4])  # float16 ends at 65504
@pytest.mark.parametrize("layout", ["nchw", "channels-last"])
@pytest.mark.parametrize("shape", [(16, 8, 32, 32), (2, 3, 80, 80), (5000, 3), (2048, 8, 2)])
def test_float16_realistic_sizes_match_reference(backend, shape, layout, offset):
    _check_realistic_size(backend, shape, layout, offset, np.float16)


@pytest.mark.parametrize("offset", [0.0, 1e2, 1e4, 1e6])
def test_float64_keeps_full_precision_at_large_offsets(backend, offset):
    # The offset must cost float64 results no more than it costs float32 ones
    # (nothing): see test_float64_matches_reference.
    rng = np.random.default_rng(7)
    x = make_x((64, 4, 16), np.float64, offset, 1.0, rng)
    gamma, beta = make_params(4, np.float64, rng)
    errors = errors_of(x, gamma, beta, axis=1, eps=1e-5, backend=backend, rng=rng)
    assert_exact(errors, np.float64, f"offset {offset:g}")


# ---- data that fool a sampled estimate of the mean ----------------------------------------
@pytest.mark.parametrize("period", [2, 3, 8, 32, 64, 128])
@pytest.mark.parametrize("shape, layout", [((8, 3, 1024), "nchw"), ((4096, 3), "nchw"),
                                           ((8, 3, 32, 32), "channels-last")])
def test_periodic_outliers_match_reference(backend, shape, layout, period):
    # Every period-th value (in memory order) is 1000 std above the rest, at an offset
    # of 1e4 std: an evenly strided sample of x can land on the outliers only, or
    # miss them all, and the statistics must not trust it.
    rng = np.random.default_rng(period)
    x = make_x(shape, np.float32, 1e4, 1.0, rng)
    relayout = (lambda a: channels_last(a, 1)) if layout == "channels-last" else (lambda a: a)
    x = relayout(x)
    flat = x.reshape(-1) if x.flags.c_contiguous else x.transpose(0, 2, 3, 1).reshape(-1)
    assert np.shares_memory(flat, x)  # a view in memory order, not a copy
    flat[::period] += np.float32(1000.0)
    gamma, beta = make_params(shape[1], np.float32, rng)
    errors = errors_of(x, gamma, beta, axis=1, eps=1e-5, backend=backend, rng=rng, dy_layout=relayout)
    assert_exact(errors, np.float32, f"{shape} {layout} period {period}")


def test_dgamma_is_exact_when_eps_dominates_the_variance(backend):
    # A nearly dead channel: std 1e-3 at 30 std from zero, eps = 1e-3 >> var = 1e-6, and an
    # upstream gradient with a mean (dbeta ~ m).  |mean * inv_std| < 1 here although the
    # mean is 30 std away, and sum(dy * (x - mean)) must still not be formed as
    # sum(dy * x) - mean * sum(dy), which cancels.
    rng = np.random.default_rng(11)
    x = make_x((64, 4, 16, 16), np.float32, 30.0, 1e-3, rng)
    gamma, beta = np.ones(4, np.float32), np.zeros(4, np.float32)
    y, saved = cupybn.batch_norm(x, gamma, beta, eps=1e-3, backend=backend)
    dy = (1.0 + rng.standard_normal(x.shape)).astype(np.float32)
    ref = reference_forward(x, gamma, beta, eps=1e-3)
    grads = cupybn.batch_norm_backward(dy, saved)
    errors = batch_norm_errors(y, saved.var, grads, ref, reference_backward(dy, ref, gamma))
    assert_exact(errors, np.float32, "eps >> var")


def test_variance_of_coarsely_quantized_float16_data_is_exact(backend):
    # float16 data 500 std from zero take only a dozen distinct values, so the
    # rounding errors of the float32 partial sums of (x - shift)**2 add up instead of
    # averaging out; the statistics are float32 results and must keep the float32 bar.
    # (A case found by Hypothesis; (22, 3, 7) with axis 2 is 66 rows of 7 channels.)
    x = make_x((22, 3, 7), np.float16, 500.0, 0.5, np.random.default_rng(14))
    _, saved = cupybn.batch_norm(x, axis=2, backend=backend)
    errors = {"var": rel_error(saved.var, reference_forward(x, axis=2).var)}
    assert_exact(errors, np.float16, "float16 at 500 std")


# ---- a mean guess far from the mean ---------------------------------------------------------
@pytest.mark.parametrize("layout", ["nchw", "channels-last", "2-d"])
def test_a_far_off_mean_guess_costs_no_accuracy(backend, layout):
    # The float32 paths shift x by a guess of the mean taken from a sparse sample
    # (every outer/16-th row of the (outer, C, inner) view) before summing; here
    # every row of that sample is an outlier, 30 standard deviations of the whole
    # from its mean, so sums about the guess cancel by a factor of ~1000 and must
    # be taken again about the mean.
    rng = np.random.default_rng(7)
    shape = (16000, 3) if layout == "2-d" else (16000, 3, 2, 2)
    x = rng.standard_normal(shape).astype(np.float32)
    x[::1000] = 1e3
    if layout == "channels-last":
        x = channels_last(x, 1)
    gamma, beta = make_params(3, np.float32, rng)
    errors = errors_of(x, gamma, beta, axis=1, eps=1e-5, backend=backend, rng=np.random.default_rng(1))
    assert_exact(errors, x.dtype, layout)
