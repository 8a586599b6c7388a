"""Symmetries of Batch Normalization.

* Affine invariance: BN(a*x + b) with eps*a**2 equals BN(x) for a > 0 (and is
  -(BN(x) - beta) + beta for a < 0): the output depends on x only through its
  standardised values.
* Batch permutation equivariance: reordering x along any non-channel axis
  reorders y (and dx) the same way and changes nothing else.

Inputs are built so that a*x + b is exact in x's dtype (integers times a power of
two), so both sides see exactly the data they should and any difference beyond
the rounding of y is the library's.
"""
import math

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

import cupybn
from cupybn.testing import gradient_magnitudes, gradients_close, max_rel_error, reference_forward, tolerance
from cupybn.testing.strategies import (
    arrange,
    batch_norm_inputs,
    dtypes,
    make_params,
    memory_layouts,
    offsets,
    param_dtype,
    seeds,
    shapes_and_axes,
)
from cupybn.testing.tolerances import finfo


@st.composite
def exactly_shiftable(draw):
    """``(x, x2, a, axis, dtype, rng)`` with ``x2 = a*x + b`` exact, a a power of two.

    x = n * 2**-s for integers n ~ N(0, 2**s); b is a multiple of a * 2**-s chosen
    so that x2 is still within the dtype's significand (up to ~1e6 std for float32).
    """
    shape, axis = draw(shapes_and_axes())
    dtype = draw(dtypes())
    digits = finfo(dtype).nmant + 1
    s = draw(st.integers(3, 8))
    k = draw(st.integers(-4, 4) if dtype == np.float16 else st.integers(-20, 20))
    offset = draw(offsets())
    rng = np.random.default_rng(draw(seeds()))
    n = np.round(rng.standard_normal(shape) * 2.0**s)
    room = 2.0**digits - np.abs(n).max() - 1  # |n + shift| must stay below 2**digits
    shift = math.copysign(min(abs(round(offset * 2.0**s)), room), offset)
    name, order, steps = draw(memory_layouts(len(shape), axis))
    x = arrange((n * 2.0**-s).astype(dtype), order, steps)
    x2_exact = (n + shift) * 2.0 ** (k - s)
    x2 = arrange(x2_exact.astype(dtype), order, steps)
    assert np.array_equal(x2.astype(np.float64), x2_exact)  # the construction is exact
    return x, x2, 2.0**k, axis, rng


@given(exactly_shiftable(), st.sampled_from([1e-5, 1e-3, 0.5]))
def test_scaling_and_shifting_x_leaves_y_unchanged(backend, case, eps):
    x, x2, a, axis, rng = case
    gamma, beta = make_params(x.shape[axis], param_dtype(x.dtype), rng)
    y, _ = cupybn.batch_norm(x, gamma, beta, axis=axis, eps=eps, backend=backend)
    y2, _ = cupybn.batch_norm(x2, gamma, beta, axis=axis, eps=eps * a * a, backend=backend)
    # each is within one y bar of the same exact result
    assert max_rel_error(y2, y) <= 2 * tolerance(x.dtype).y


@given(batch_norm_inputs(dtype_names=("float64",)), st.floats(1e-3, 1e3), st.floats(-1e3, 1e3))
def test_any_positive_scale_leaves_float64_y_unchanged(backend, inputs, a, b):
    x, axis = inputs.x, inputs.axis
    x2 = a * x + b * inputs.scale
    kw = dict(axis=axis, backend=backend)
    y, _ = cupybn.batch_norm(x, inputs.gamma, inputs.beta, eps=inputs.eps, **kw)
    y2, _ = cupybn.batch_norm(x2, inputs.gamma, inputs.beta, eps=inputs.eps * a * a, **kw)
    # a*x + b is rounded twice: each value moves by up to u * (|a*x| + |x2|), and so
    # does the mean, which moves y by up to twice that times |gamma| * inv_std
    ref2 = reference_forward(x2, inputs.gamma, axis=axis, eps=inputs.eps * a * a)
    moved = np.abs(a * x) + np.abs(x2)
    max_moved = np.moveaxis(moved, axis, 0).reshape(inputs.channels, -1).max(axis=1)
    u = np.finfo(np.float64).eps / 2
    rounding = float(np.max(2 * u * max_moved * np.abs(inputs.gamma) * ref2.inv_std))
    assert max_rel_error(y2, y) <= 2 * tolerance(np.float64).y + rounding


@given(batch_norm_inputs(params=("gamma",)))
def test_negating_x_negates_y(backend, inputs):
    kw = dict(axis=inputs.axis, eps=inputs.eps, backend=backend)
    y, _ = cupybn.batch_norm(inputs.x, inputs.gamma, **kw)
    y_neg, _ = cupybn.batch_norm(-inputs.x, inputs.gamma, **kw)
    assert max_rel_error(-y_neg, y) <= 2 * tolerance(inputs.x.dtype).y


@given(batch_norm_inputs(min_count=4), st.data())
def test_permuting_the_batch_permutes_y_and_dx(backend, inputs, data):
    x, axis = inputs.x, inputs.axis % inputs.x.ndim
    batch_axes = [a for a in range(x.ndim) if a != axis and x.shape[a] > 1]
    if not batch_axes:  # every non-channel axis has length 1: nothing to permute
        batch_axes = [a for a in range(x.ndim) if a != axis]
    along = data.draw(st.sampled_from(batch_axes), label="axis permuted")
    perm = np.asarray(data.draw(st.permutations(range(x.shape[along])), label="permutation"))
    dy = inputs.relayout(inputs.rng(1).standard_normal(x.shape).astype(x.dtype))
    kw = dict(axis=inputs.axis, eps=inputs.eps, backend=backend)

    y, saved = cupybn.batch_norm(x, inputs.gamma, inputs.beta, **kw)
    dx, dgamma, dbeta = cupybn.batch_norm_backward(dy, saved)
    y_p, saved_p = cupybn.batch_norm(np.take(x, perm, axis=along), inputs.gamma, inputs.beta, **kw)
    dx_p, dgamma_p, dbeta_p = cupybn.batch_norm_backward(np.take(dy, perm, axis=along), saved_p)

    tol = tolerance(x.dtype)
    assert max_rel_error(y_p, np.take(y, perm, axis=along)) <= 2 * tol.y
    # The gradients are sums whose order changed: bound the differences by the
    # sums of absolute terms (their condition), not by the results, which may be ~0.
    ref = reference_forward(x, inputs.gamma, inputs.beta, axis=axis, eps=inputs.eps)
    magnitudes = gradient_magnitudes(dy, ref, inputs.gamma, axis=axis)
    unpermuted = (np.take(dx_p, np.argsort(perm), axis=along), dgamma_p, dbeta_p)
    assert gradients_close(unpermuted, (dx, dgamma, dbeta), magnitudes, tol)
