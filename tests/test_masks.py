"""Masked Batch Normalization (``mask=``): statistics over the positions a mask selects.

* The statistics, the running-statistics update and y at the selected positions
  are those of BN over the selected values gathered into a dense array, to the
  exactness bars; every position is normalised with them; what the other
  positions hold (NaN, Inf, huge values) changes nothing else.
* The gradients are those of the float64 reference (the exact gradient of the
  masked function: sums over every position, the terms through the statistics
  only where they came from), to the bars, and agree with central finite
  differences in float64.
* An all-True mask, of any broadcastable shape, gives the same bits as no mask.
* Bad masks, and training with fewer than 2 selected values, raise before
  anything changes.  Inference takes a mask and ignores it (the statistics are
  the running ones).
"""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from test_gradients import FD_BAR, central_difference

import cupybn
from cupybn.testing import (
    batch_norm_errors,
    exceeded,
    probe_dy,
    reference_backward,
    reference_forward,
    running_stats_update,
    tolerance,
)
from cupybn.testing.reference import full_mask
from cupybn.testing.strategies import FLOAT_DTYPES, batch_norm_inputs
from cupybn.testing.tolerances import finfo


def positions(inputs):
    x, axis = inputs.x, inputs.axis % inputs.x.ndim
    return tuple(x.shape[:axis]) + tuple(x.shape[axis + 1:])


@st.composite
def masks(draw, inputs, all_true=False):
    """A mask for ``inputs``: its shape the positions' shape with some axes 1 and some
    leading axes dropped (broadcast), selecting at least 2 values per channel."""
    shape = list(positions(inputs))
    for k in range(len(shape)):
        if draw(st.booleans()) and draw(st.booleans()):
            shape[k] = 1
    shape = shape[draw(st.integers(0, len(shape) - 1)):] if draw(st.booleans()) else shape
    rng = inputs.rng(7)
    if all_true:
        return np.ones(shape, bool)
    mask = rng.random(shape) < draw(st.sampled_from([0.2, 0.5, 0.8, 0.95]))
    full = full_mask(mask, inputs.x.shape, inputs.axis)
    if np.count_nonzero(full) < 2:  # too few: select the first two positions that broadcast apart
        flat = mask.reshape(-1)
        flat[: min(flat.size, 2)] = True
        if np.count_nonzero(full_mask(mask, inputs.x.shape, inputs.axis)) < 2:
            mask[...] = True
    return mask


def padded(inputs, mask, fill):
    """x with ``fill`` where the mask is False (x's layout kept)."""
    x = inputs.relayout(np.array(inputs.x))
    if fill is not None:
        x[~np.broadcast_to(full_mask(mask, x.shape, inputs.axis), x.shape)] = fill
    return x


MASKED_INPUTS = dict(dtype_names=FLOAT_DTYPES, min_count=4)


@given(inputs=batch_norm_inputs(**MASKED_INPUTS), data=st.data(), fill=st.sampled_from([None, np.nan, np.inf, 1e4]))
def test_statistics_are_those_of_the_selected_values_and_every_position_is_normalised(backend, inputs, data, fill):
    mask = data.draw(masks(inputs))
    x, axis, tol = padded(inputs, mask, fill), inputs.axis, tolerance(inputs.x.dtype)
    pdt = inputs.param_dtype
    rm, rv = np.zeros(inputs.channels, pdt), np.ones(inputs.channels, pdt)
    y, saved = cupybn.batch_norm(x, inputs.gamma, inputs.beta, running_mean=rm, running_var=rv, axis=axis,
                                 eps=inputs.eps, mask=mask, backend=backend)
    ref = reference_forward(x, inputs.gamma, inputs.beta, axis=axis, eps=inputs.eps, mask=mask)
    assert saved.total_count == ref.m
    # every position normalised: y to the bar wherever it is within x's dtype's range, and
    # NaN or Inf where x holds them (only there: the statistics never see them)
    finite = np.isfinite(ref.y) & (np.abs(ref.y) < float(finfo(x.dtype).max) / 2)
    assert np.all(np.isfinite(y[finite])) and not np.any(np.isfinite(y[~np.isfinite(ref.y)]))
    errors = batch_norm_errors(np.where(finite, y.astype(np.float64), 0.0), saved.var, None,
                               ref._replace(y=np.where(finite, ref.y, 0.0)), None)
    assert not exceeded(errors, tol), (errors, inputs)
    want_mean, want_var = running_stats_update(np.zeros(inputs.channels), np.ones(inputs.channels), ref, 0.1)
    assert np.max(np.abs(rm - want_mean) / np.maximum(1, np.abs(want_mean))) <= tol.var
    assert np.max(np.abs(rv - want_var) / want_var) <= tol.var


@given(inputs=batch_norm_inputs(**MASKED_INPUTS), data=st.data())
def test_gradients_are_the_references_to_the_bars(backend, inputs, data):
    mask = data.draw(masks(inputs))
    x, axis = inputs.x, inputs.axis
    ref = reference_forward(x, inputs.gamma, inputs.beta, axis=axis, eps=inputs.eps, mask=mask)
    dy = probe_dy(ref, axis, x.dtype, inputs.rng(2))
    _, saved = cupybn.batch_norm(x, inputs.gamma, inputs.beta, axis=axis, eps=inputs.eps, mask=mask,
                                 backend=backend)
    grads = cupybn.batch_norm_backward(dy, saved)
    ref_grads = reference_backward(dy, ref, inputs.gamma, axis=axis)
    errors = batch_norm_errors(ref.y, None, grads, ref, ref_grads)
    errors.pop("y")
    # dx vanishes when the selected values of a channel are too few to leave noise (m <= 2)
    if ref.m <= 2:
        errors.pop("dx", None)
    assert not exceeded(errors, tolerance(x.dtype)), (errors, inputs)


SMALL_FLOAT64 = dict(dtype_names=("float64",), max_size=40, max_offset=10.0, scale_range=(0.1, 10.0), min_count=4)


@given(inputs=batch_norm_inputs(**SMALL_FLOAT64), data=st.data())
def test_gradients_match_finite_differences_of_the_masked_function(numpy_routes, inputs, data):
    mask = data.draw(masks(inputs))
    x, gamma, beta, axis, eps = inputs.x, inputs.gamma, inputs.beta, inputs.axis, inputs.eps
    w = inputs.rng(1).standard_normal(x.shape)

    def loss(x_, gamma_, beta_):
        y, _ = cupybn.batch_norm(x_, gamma_, beta_, axis=axis, eps=eps, mask=mask, backend=numpy_routes)
        return float(np.sum(w * y))

    _, saved = cupybn.batch_norm(x, gamma, beta, axis=axis, eps=eps, mask=mask, backend=numpy_routes)
    dx, dgamma, dbeta = cupybn.batch_norm_backward(w, saved)
    ref = reference_forward(x, gamma, beta, axis=axis, eps=eps, mask=mask)
    h = 1e-5 * float(np.min(1.0 / ref.inv_std))
    checks = [("dx", dx, central_difference(lambda a: loss(a, gamma, beta), x, h))]
    if gamma is not None:
        checks.append(("dgamma", dgamma, central_difference(lambda a: loss(x, a, beta), gamma, 1e-5)))
    if beta is not None:
        checks.append(("dbeta", dbeta, central_difference(lambda a: loss(x, gamma, a), beta, 1e-5)))
    for name, got, fd in checks:
        scale = max(float(np.linalg.norm(fd)), float(np.linalg.norm(w)))
        assert np.linalg.norm(got - fd) <= 10 * FD_BAR * scale, (name, inputs)


@given(inputs=batch_norm_inputs(dtype_names=FLOAT_DTYPES), data=st.data())
def test_an_all_true_mask_gives_the_same_bits_as_no_mask(backend, inputs, data):
    mask = data.draw(masks(inputs, all_true=True))
    pdt = inputs.param_dtype
    results = []
    for m in (None, mask):
        rm, rv = np.zeros(inputs.channels, pdt), np.ones(inputs.channels, pdt)
        y, saved = cupybn.batch_norm(inputs.x, inputs.gamma, inputs.beta, running_mean=rm, running_var=rv,
                                     axis=inputs.axis, eps=inputs.eps, mask=m, backend=backend)
        dy = np.ones_like(y)
        results.append([y, saved.mean, saved.mean_lo, saved.var, rm, rv, *cupybn.batch_norm_backward(dy, saved)])
    for a, b in zip(*results, strict=True):
        assert (a is None and b is None) or np.asarray(a).tobytes() == np.asarray(b).tobytes()


def test_a_synchronised_masked_call_is_the_whole_batchs_masked_call(backend):
    from cupybn.distributed import ThreadWorld  # noqa: PLC0415

    rng = np.random.default_rng(4)
    x = (rng.standard_normal((12, 3, 9)) * 2 + 5).astype(np.float32)
    mask = rng.random((12, 9)) < 0.6
    mask[:4] = False  # a rank whose shard selects nothing
    dy = rng.standard_normal(x.shape).astype(np.float32)
    cuts = [0, 4, 7, 12]
    y_all, saved_all = cupybn.batch_norm(x, mask=mask, backend=backend)
    dx_all = cupybn.batch_norm_backward(dy, saved_all)[0]

    def rank(comm):
        part = slice(cuts[comm.rank], cuts[comm.rank + 1])
        y, saved = cupybn.batch_norm(x[part], mask=mask[part], backend=backend, comm=comm)
        return y, cupybn.batch_norm_backward(dy[part], saved)[0], saved.total_count

    results = ThreadWorld(3, timeout=60).run(rank)
    tol = tolerance(np.float32)
    assert all(count == np.count_nonzero(mask) for _, _, count in results)
    assert np.max(np.abs(np.concatenate([r[0] for r in results]) - y_all)) <= 4 * tol.y
    dx = np.concatenate([r[1] for r in results])
    assert np.linalg.norm(dx - dx_all) <= tol.dx * np.linalg.norm(dx_all)


def test_a_layer_takes_a_mask_in_training_and_ignores_it_in_eval(backend):
    rng = np.random.default_rng(5)
    x = rng.standard_normal((6, 4, 10)).astype(np.float32)
    mask = rng.random((6, 10)) < 0.5
    layer = cupybn.BatchNorm(4, backend=backend)
    rm, rv = np.zeros(4, np.float32), np.ones(4, np.float32)
    y_fn, _ = cupybn.batch_norm(x, np.ones(4, np.float32), np.zeros(4, np.float32), running_mean=rm,
                                running_var=rv, mask=mask, backend=backend)
    assert np.array_equal(layer(x, mask=mask), y_fn) and np.array_equal(layer.running_var, rv)
    layer.eval()
    assert np.array_equal(layer(x, mask=mask), layer(x))


# ---- bad input ------------------------------------------------------------------------
@pytest.mark.parametrize("mask,error,match", [
    (np.ones((4, 5), np.float32), TypeError, "mask must have dtype bool"),
    ([[True]], TypeError, "mask must be a NumPy or CuPy array"),
    (np.ones((4, 3, 5), bool), ValueError, r"mask must be broadcastable to x's shape without the channel axis, "
                                            r"\(4, 5\)"),
    (np.ones((3,), bool), ValueError, "mask must be broadcastable"),
    (np.zeros((4, 5), bool), ValueError, "the mask selects 0 per channel"),
    (np.arange(20).reshape(4, 5) == 7, ValueError, "the mask selects 1 per channel"),
])
@pytest.mark.parametrize("training", [True, False], ids=["training", "inference"])
def test_a_bad_mask_raises_before_anything_changes(mask, error, match, training):
    if not training and "selects" in match:
        return  # inference takes any mask of the right kind: the statistics are the running ones
    x = np.random.default_rng(0).standard_normal((4, 3, 5)).astype(np.float32)
    rm, rv = np.zeros(3, np.float32), np.ones(3, np.float32)
    with pytest.raises(error, match=match):
        cupybn.batch_norm(x, running_mean=rm, running_var=rv, mask=mask, training=training)
    assert np.all(rm == 0) and np.all(rv == 1)


@given(inputs=batch_norm_inputs(**MASKED_INPUTS), data=st.data())
def test_a_masked_call_is_batch_norm_of_the_selected_values_gathered_into_a_dense_array(backend, inputs, data):
    mask = data.draw(masks(inputs))
    x, axis, tol = inputs.x, inputs.axis % inputs.x.ndim, tolerance(inputs.x.dtype)
    kept = np.broadcast_to(full_mask(mask, x.shape, axis), x.shape)
    dense = np.moveaxis(x, axis, -1)[np.moveaxis(kept, axis, -1)].reshape(-1, inputs.channels)  # (m, C)
    pdt = inputs.param_dtype
    runs = []
    for values, extra in ((x, dict(axis=axis, mask=mask)), (dense, dict(axis=1))):
        rm, rv = np.zeros(inputs.channels, pdt), np.ones(inputs.channels, pdt)
        y, saved = cupybn.batch_norm(values, inputs.gamma, inputs.beta, running_mean=rm, running_var=rv,
                                     eps=inputs.eps, backend=backend, **extra)
        runs.append((y, saved, rm, rv))
    (y, saved, rm, rv), (y_dense, saved_dense, rm_dense, rv_dense) = runs
    assert saved.total_count == dense.shape[0]
    # two results, each within its bar of the exact one
    assert np.all(np.abs(saved.var - saved_dense.var) <= 2 * tol.var * saved_dense.var + 1e-30)
    assert np.all(np.abs(rv - rv_dense) <= 2 * tol.var * rv_dense)
    assert np.all(np.abs(rm - rm_dense) <= 2 * tol.var * np.maximum(1, np.abs(rm_dense)))
    selected = np.moveaxis(y, axis, -1)[np.moveaxis(kept, axis, -1)].reshape(-1, inputs.channels)
    assert np.all(np.abs(selected.astype(np.float64) - y_dense) <= 2 * tol.y * np.maximum(1, np.abs(y_dense)))
