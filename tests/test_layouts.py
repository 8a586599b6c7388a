"""Memory layout is invisible in the numbers and preserved in the outputs.

The same values in C order (NCHW for a 4-d x), channels-last, any transposed
buffer or a non-contiguous strided view give the same y, dx, dgamma and dbeta
(up to summation order), and y and dx come back in x's memory layout:
channels-last in, channels-last out.
"""
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import cupybn
from cupybn.testing import gradient_magnitudes, gradients_close, max_rel_error, reference_forward, tolerance
from cupybn.testing.strategies import (
    FLOAT_DTYPES,
    LAYOUTS,
    arrange,
    batch_norm_inputs,
    channels_last,
    memory_layouts,
)


def memory_order(a):
    """Axes of length > 1, slowest-varying first (by |stride|)."""
    return [ax for ax in sorted(range(a.ndim), key=lambda ax: -abs(a.strides[ax])) if a.shape[ax] > 1]


def compact_strides(a):
    """Strides (of axes of length > 1) of a compact array with a's axis order and itemsize."""
    strides, step = {}, a.itemsize
    for ax in reversed(memory_order(a)):
        strides[ax] = step
        step *= a.shape[ax]
    return strides


def assert_same_layout(out, x):
    """out is compact, in x's axis order (and so has x's strides when x is compact)."""
    got = {ax: out.strides[ax] for ax in range(out.ndim) if out.shape[ax] > 1}
    assert got == compact_strides(x), (out.strides, x.strides, x.shape)


@given(batch_norm_inputs(dtype_names=FLOAT_DTYPES), st.data())
def test_every_layout_gives_the_same_numbers(backend, inputs, data):
    x, axis = inputs.x, inputs.axis
    values = np.array(x)  # C order
    dy_values = inputs.rng(1).standard_normal(x.shape).astype(x.dtype)
    tol = tolerance(x.dtype)
    kw = dict(axis=axis, eps=inputs.eps, backend=backend)
    y0, saved0 = cupybn.batch_norm(values, inputs.gamma, inputs.beta, **kw)
    grads0 = cupybn.batch_norm_backward(dy_values, saved0)
    ref = reference_forward(values, inputs.gamma, inputs.beta, axis=axis, eps=inputs.eps)
    magnitudes = gradient_magnitudes(dy_values, ref, inputs.gamma, axis=axis)
    for layout in LAYOUTS:
        _, order, steps = data.draw(memory_layouts(x.ndim, axis, layouts=(layout,)), label=layout)
        x_l, dy_l = arrange(values, order, steps), arrange(dy_values, order, steps)
        y, saved = cupybn.batch_norm(x_l, inputs.gamma, inputs.beta, **kw)
        dx, dgamma, dbeta = cupybn.batch_norm_backward(dy_l, saved)
        # two results each within the bar of the exact one are within twice the bar of each other
        assert max_rel_error(y, y0) <= 2 * tol.y, layout
        assert gradients_close((dx, dgamma, dbeta), grads0, magnitudes, tol), layout
        assert_same_layout(y, x_l)
        assert_same_layout(dx, x_l)


@given(batch_norm_inputs())
def test_outputs_keep_the_memory_layout_of_x(backend, inputs):
    x = inputs.x
    y, saved = cupybn.batch_norm(x, inputs.gamma, inputs.beta, axis=inputs.axis, backend=backend)
    dx, _, _ = cupybn.batch_norm_backward(np.ascontiguousarray(x), saved)  # dy's own layout is irrelevant
    assert_same_layout(y, x)
    assert_same_layout(dx, x)
    assert y.shape == x.shape and y.dtype == x.dtype
    assert not np.shares_memory(y, x) and not np.shares_memory(dx, x)


@pytest.mark.parametrize("shape", [(8, 16, 4, 4), (8, 3, 5), (6, 7, 2, 3, 2)])
def test_channels_last_in_gives_channels_last_out(backend, shape):
    x = channels_last(np.random.default_rng(0).standard_normal(shape).astype(np.float32), 1)
    y, saved = cupybn.batch_norm(x, axis=1, backend=backend)
    dx, _, _ = cupybn.batch_norm_backward(y, saved)
    for out in (y, dx):
        assert out.strides == x.strides
        assert out.strides[1] == out.itemsize  # channels vary fastest


@pytest.mark.parametrize("axis", [0, 1, 2, -1])
def test_broadcast_input_with_zero_strides(backend, axis):
    # np.broadcast_to gives read-only views with stride 0 along the repeated axes
    row = np.random.default_rng(1).standard_normal((1, 5, 6)).astype(np.float32)
    x = np.broadcast_to(row, (4, 5, 6))
    y, _ = cupybn.batch_norm(x, axis=axis, backend=backend)
    ref = reference_forward(x, axis=axis)
    assert max_rel_error(y, ref.y) <= tolerance(np.float32).y
    assert y.flags.writeable


def test_single_channel_and_length_one_axes(backend):
    x = np.random.default_rng(2).standard_normal((1, 1, 7, 1, 9)).astype(np.float32)
    for axis in range(x.ndim):
        if x.size // x.shape[axis] < 2:
            continue
        y, _ = cupybn.batch_norm(x, axis=axis, backend=backend)
        assert max_rel_error(y, reference_forward(x, axis=axis).y) <= tolerance(np.float32).y
