"""Constant channels and non-finite values.

* A constant channel has variance 0, so x - mean = 0 and y = beta *exactly*,
  whatever the constant (0, 1e6, ...), eps or gamma; the other channels are not
  affected.
* NaN and Inf in x propagate to y with no exception and no warning, even under
  ``np.errstate(all="raise")``: in training mode a non-finite value poisons the
  statistics of its channel (all of that channel's y is non-finite) and nothing
  else; in inference mode it poisons only its own output.
"""
import warnings

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import cupybn
from cupybn.testing import max_rel_error, reference_forward, tolerance
from cupybn.testing.strategies import FLOAT_DTYPES, batch_norm_inputs


def channel_view(a, axis, c):
    return np.take(a, c, axis=axis)


def set_channel(a, axis, c, value):
    index = [slice(None)] * a.ndim
    index[axis] = c
    a[tuple(index)] = value


@st.composite
def constant_channels(draw):
    inputs = draw(batch_norm_inputs(dtype_names=FLOAT_DTYPES, params=("both", "gamma", "beta", "none")))
    x = inputs.relayout(np.array(inputs.x))  # a writeable copy in the drawn layout
    axis = inputs.axis % x.ndim
    big = 1e6 if x.dtype.name in ("float32", "float64") else 6e4
    chosen = draw(st.sets(st.integers(0, inputs.channels - 1), min_size=1), label="constant channels")
    for c in sorted(chosen):
        # a constant from the data itself (any magnitude the strategy produced) or a round one
        from_data = channel_view(x, axis, c).flat[0]
        value = draw(st.sampled_from([from_data, 0.0, big, -big, 1.0]), label=f"constant of channel {c}")
        set_channel(x, axis, c, value)
    inputs.x = x
    return inputs, sorted(chosen)


@given(constant_channels())
def test_constant_channel_gives_beta_exactly(backend, case):
    inputs, constant = case
    x, axis = inputs.x, inputs.axis % inputs.x.ndim
    y, _ = cupybn.batch_norm(x, inputs.gamma, inputs.beta, axis=axis, eps=inputs.eps, backend=backend)
    beta = np.zeros(inputs.channels, x.dtype) if inputs.beta is None else inputs.beta.astype(x.dtype)
    for c in constant:
        got = channel_view(y, axis, c)
        assert np.all(got == beta[c]), (
            f"channel {c} is the constant {channel_view(x, axis, c).flat[0]!r}: y = {got.flat[0]!r}, "
            f"beta = {beta[c]!r}")
    ref = reference_forward(x, inputs.gamma, inputs.beta, axis=axis, eps=inputs.eps)
    assert max_rel_error(y, ref.y) <= tolerance(x.dtype).y


@pytest.mark.parametrize("constant", [0.0, 1.0, -3.25, 1e6, -1e6])
def test_large_and_round_constants_give_beta_exactly(backend, constant):
    x = np.random.default_rng(0).standard_normal((8, 3, 6)).astype(np.float32)
    x[:, 1] = constant
    gamma, beta = np.array([1.0, 0.7, 2.0], np.float32), np.array([0.0, -1.5, 3.0], np.float32)
    y, saved = cupybn.batch_norm(x, gamma, beta, backend=backend)
    assert np.all(y[:, 1] == beta[1])
    assert saved.var[1] == 0
    dx, _, _ = cupybn.batch_norm_backward(np.ones_like(x), saved)
    assert np.all(dx[:, 1] == 0)  # dy constant too: dx = gamma * inv_std * (dy - mean(dy)) = 0


@st.composite
def with_non_finite(draw, max_bad=3):
    inputs = draw(batch_norm_inputs(dtype_names=FLOAT_DTYPES, min_count=2))
    x = np.array(inputs.x)  # C order copy we can write into
    n_bad = draw(st.integers(1, min(max_bad, x.size)))
    flat = draw(st.lists(st.integers(0, x.size - 1), min_size=n_bad, max_size=n_bad, unique=True))
    values = draw(st.lists(st.sampled_from([np.nan, np.inf, -np.inf]), min_size=n_bad, max_size=n_bad))
    bad = np.zeros(x.shape, bool)
    for i, v in zip(flat, values, strict=True):
        x.flat[i] = v
        bad.flat[i] = True
    inputs.x = inputs.relayout(x)
    return inputs, bad


def finite_part_matches(y, ref_y, keep, dtype):
    """y matches the reference wherever ``keep`` is True."""
    return max_rel_error(np.where(keep, y.astype(np.float64), 0), np.where(keep, ref_y, 0)) <= tolerance(dtype).y


@given(with_non_finite())
def test_nan_and_inf_propagate_in_training(backend, case):
    inputs, bad = case
    x, axis = inputs.x, inputs.axis % inputs.x.ndim
    with warnings.catch_warnings(), np.errstate(all="raise"):
        warnings.simplefilter("error")
        y, saved = cupybn.batch_norm(x, inputs.gamma, inputs.beta, axis=axis, eps=inputs.eps, backend=backend)
        cupybn.batch_norm_backward(np.ones_like(x), saved)
    reduce = tuple(a for a in range(x.ndim) if a != axis)
    poisoned = np.any(bad, axis=reduce, keepdims=True) & np.ones(x.shape, bool)
    assert not np.isfinite(y[poisoned]).any()
    ref = reference_forward(x, inputs.gamma, inputs.beta, axis=axis, eps=inputs.eps)
    assert finite_part_matches(y, ref.y, ~poisoned, x.dtype)


@given(with_non_finite())
def test_nan_and_inf_propagate_only_to_their_own_output_in_inference(backend, case):
    inputs, bad = case
    x, axis = inputs.x, inputs.axis % inputs.x.ndim
    # running statistics of the distribution x was drawn from
    running_mean = np.full(inputs.channels, inputs.offset * inputs.scale, inputs.param_dtype)
    running_var = np.full(inputs.channels, inputs.scale**2, inputs.param_dtype)
    with warnings.catch_warnings(), np.errstate(all="raise"):
        warnings.simplefilter("error")
        y, saved = cupybn.batch_norm(x, inputs.gamma, inputs.beta, running_mean=running_mean,
                                     running_var=running_var, training=False, axis=axis, eps=inputs.eps,
                                     backend=backend)
        cupybn.batch_norm_backward(np.ones_like(x), saved)
    assert not np.isfinite(y[bad]).any()
    assert np.array_equal(np.isnan(y[np.isnan(x)]), np.ones(np.isnan(x).sum(), bool))
    ref = reference_forward(x, inputs.gamma, inputs.beta, axis=axis, eps=inputs.eps, training=False,
                            running_mean=running_mean, running_var=running_var)
    assert finite_part_matches(y, ref.y, ~bad, x.dtype)
