"""Results are bit-for-bit reproducible: the same call gives the same bits, and
so does any number of threads (block partials are combined in a fixed order).
"""
import numpy as np
import pytest
from hypothesis import given

import cupybn
from cupybn.testing.strategies import FLOAT_DTYPES, batch_norm_inputs, channels_last, make_params, make_x

THREAD_COUNTS = (1, 2, 3)
# float32 goes to the compiled kernels by default; the NumPy paths are checked too.
ROUTES = {"default": {}, "numpy-paths": {"compiled_values": 0}}


def all_outputs(inputs_or_x, backend, gamma=None, beta=None, axis=1, eps=1e-5, dy=None):
    """Every result of a training step, as bytes: y, saved stats, running stats, gradients."""
    x = inputs_or_x
    c = x.shape[axis]
    pdt = np.float64 if x.dtype == np.float64 else np.float32
    running_mean, running_var = np.zeros(c, pdt), np.ones(c, pdt)
    y, saved = cupybn.batch_norm(x, gamma, beta, running_mean=running_mean, running_var=running_var,
                                 axis=axis, eps=eps, backend=backend)
    grads = cupybn.batch_norm_backward(x if dy is None else dy, saved)
    arrays = (y, saved.mean, saved.mean_lo, saved.var, saved.inv_std, running_mean, running_var, *grads)
    return [None if a is None else (np.ascontiguousarray(a).tobytes(), a.strides) for a in arrays]


def _call(inputs, backend):
    dy = inputs.relayout(inputs.rng(1).standard_normal(inputs.x.shape).astype(inputs.x.dtype))
    return all_outputs(inputs.x, backend, inputs.gamma, inputs.beta, inputs.axis, inputs.eps, dy)


@given(batch_norm_inputs(dtype_names=FLOAT_DTYPES))
def test_same_call_twice_gives_identical_bits(backend, inputs):
    assert _call(inputs, backend) == _call(inputs, backend)


@pytest.mark.parametrize("route", ROUTES)
@given(inputs=batch_norm_inputs(dtype_names=FLOAT_DTYPES))
def test_thread_count_does_not_change_bits_with_many_blocks(tiny_blocks, route, inputs):
    # tiny blocks: even these small arrays are cut into many blocks, shared among threads
    with tiny_blocks():
        results = [_call(inputs, cupybn.NumpyBackend(threads=n, **ROUTES[route])) for n in THREAD_COUNTS]
    assert all(r == results[0] for r in results[1:])


@pytest.mark.parametrize("shape, layout", [
    ((32, 16, 32, 32), "nchw"),           # two planar blocks
    ((64, 64, 32, 32), "nchw"),           # compiled kernels: from PARALLEL_VALUES on, threads share the work
    ((2, 3, 80, 80), "nchw"),             # rows longer than one block
    ((16, 8, 64, 64), "channels-last"),   # rows family, several blocks
    ((70000, 4), "nchw"),                 # 2-D, several blocks
])
@pytest.mark.parametrize("route", ROUTES)
def test_thread_count_does_not_change_bits_at_realistic_sizes(shape, layout, route):
    rng = np.random.default_rng(0)
    x = make_x(shape, np.float32, 1e3, 1.0, rng)
    if layout == "channels-last":
        x = channels_last(x, 1)
    gamma, beta = make_params(shape[1], np.float32, rng)
    results = [all_outputs(x, cupybn.NumpyBackend(threads=n, **ROUTES[route]), gamma, beta) for n in THREAD_COUNTS]
    assert all(r == results[0] for r in results[1:])


def test_default_backend_and_explicit_backend_agree():
    x = make_x((8, 5, 33), np.float32, 10.0, 1.0, np.random.default_rng(1))
    assert all_outputs(x, None) == all_outputs(x, cupybn.NumpyBackend(threads=1))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_row_dots_are_one_blas_dot_per_run_on_numpy_1_and_2(dtype):
    # NumPy 1.x has no np.vecdot; its fallback must give the same bits, so a
    # result does not depend on which NumPy computed it.
    from cupybn.backends import _dots

    rng = np.random.default_rng(3)
    a = rng.standard_normal((2, 3, 4, 256)).astype(dtype) + dtype(1e3)
    b = rng.standard_normal((2, 3, 4, 256)).astype(dtype)
    ones = np.ones(256, dtype)
    per_row = np.array([np.dot(r, s) for r, s in zip(a.reshape(-1, 256), b.reshape(-1, 256), strict=True)])
    per_row_sum = np.array([np.dot(r, ones) for r in a.reshape(-1, 256)])
    for vecdot in {_dots.vecdot, _dots._matmul_vecdot}:
        assert np.array_equal(vecdot(a, b).reshape(-1), per_row)
        assert np.array_equal(vecdot(a, ones).reshape(-1), per_row_sum)
