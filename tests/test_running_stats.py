"""Running statistics follow new = (1 - momentum) * old + momentum * batch.

The batch variance in the update is the unbiased one, var * m / (m - 1), where m
is the number of values per channel; the normalisation itself uses the biased
one.  The layer's momentum=None is a cumulative average, and
num_batches_tracked counts the training steps.
"""
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import cupybn
from cupybn.testing import reference_forward, running_stats_update, tolerance
from cupybn.testing.strategies import FLOAT_DTYPES, batch_norm_inputs, make_x


def initial_stats(inputs):
    rng = inputs.rng(3)
    c, pdt = inputs.channels, inputs.param_dtype
    mean = (rng.normal(0, 3, c) * inputs.scale).astype(pdt)
    var = (rng.uniform(0.1, 5, c) * inputs.scale**2).astype(pdt)
    return mean, var


@given(batch_norm_inputs(dtype_names=FLOAT_DTYPES), st.floats(0, 1))
def test_update_is_momentum_blend_with_unbiased_variance(backend, inputs, momentum):
    old_mean, old_var = initial_stats(inputs)
    running_mean, running_var = old_mean.copy(), old_var.copy()
    cupybn.batch_norm(inputs.x, inputs.gamma, inputs.beta, running_mean=running_mean, running_var=running_var,
                      momentum=momentum, axis=inputs.axis, eps=inputs.eps, backend=backend)
    ref = reference_forward(inputs.x, axis=inputs.axis, eps=inputs.eps)
    want_mean, want_var = running_stats_update(old_mean, old_var, ref, momentum)

    # Each term carries the batch statistics' relative error; the mean's error is
    # relative to the spread of the data as well as to the mean itself.
    bar = 2 * tolerance(inputs.x.dtype).var
    m = inputs.count
    mean_scale = (1 - momentum) * np.abs(old_mean) + momentum * (np.abs(ref.mean) + np.sqrt(ref.var))
    var_scale = (1 - momentum) * old_var + momentum * ref.var * m / (m - 1)
    assert running_mean.dtype == old_mean.dtype and running_var.dtype == old_var.dtype
    assert np.all(np.abs(running_mean - want_mean) <= bar * mean_scale), (running_mean, want_mean)
    assert np.all(np.abs(running_var - want_var) <= bar * var_scale), (running_var, want_var)


@given(batch_norm_inputs(dtype_names=FLOAT_DTYPES))
def test_momentum_zero_leaves_running_stats_bit_for_bit_unchanged(backend, inputs):
    old_mean, old_var = initial_stats(inputs)
    running_mean, running_var = old_mean.copy(), old_var.copy()
    cupybn.batch_norm(inputs.x, running_mean=running_mean, running_var=running_var, momentum=0.0,
                      axis=inputs.axis, backend=backend)
    assert running_mean.tobytes() == old_mean.tobytes() and running_var.tobytes() == old_var.tobytes()


@given(batch_norm_inputs(dtype_names=FLOAT_DTYPES))
def test_inference_leaves_running_stats_bit_for_bit_unchanged(backend, inputs):
    old_mean, old_var = initial_stats(inputs)
    running_mean, running_var = old_mean.copy(), old_var.copy()
    cupybn.batch_norm(inputs.x, running_mean=running_mean, running_var=running_var, training=False,
                      momentum=0.5, axis=inputs.axis, backend=backend)
    assert running_mean.tobytes() == old_mean.tobytes() and running_var.tobytes() == old_var.tobytes()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_two_values_per_channel_use_the_unbiased_variance(backend, dtype):
    # values 0 and 2: mean 1, biased variance 1, unbiased variance 2 (m / (m - 1) = 2)
    x = np.array([[0.0, 10.0], [2.0, 14.0]], dtype)
    running_mean, running_var = np.zeros(2, dtype), np.ones(2, dtype)
    _, saved = cupybn.batch_norm(x, running_mean=running_mean, running_var=running_var, momentum=1.0,
                                 backend=backend)
    np.testing.assert_array_equal(running_mean, [1.0, 12.0])
    np.testing.assert_array_equal(running_var, [2.0, 8.0])
    np.testing.assert_array_equal(saved.var, [1.0, 4.0])  # normalisation uses the biased variance


def test_repeated_steps_are_an_exponential_moving_average(backend):
    rng = np.random.default_rng(4)
    running_mean, running_var = np.zeros(3, np.float64), np.ones(3, np.float64)
    want_mean, want_var = running_mean.copy(), running_var.copy()
    for step in range(5):
        x = make_x((10, 3, 4), np.float64, step * 3.0, 1.0 + step, rng)
        cupybn.batch_norm(x, running_mean=running_mean, running_var=running_var, momentum=0.25,
                          backend=backend)
        ref = reference_forward(x)
        want_mean, want_var = running_stats_update(want_mean, want_var, ref, 0.25)
    np.testing.assert_allclose(running_mean, want_mean, rtol=1e-12)
    np.testing.assert_allclose(running_var, want_var, rtol=1e-12)


@pytest.mark.parametrize("momentum", [None, 0.1])
def test_layer_momentum_none_is_a_cumulative_average(backend, momentum):
    rng = np.random.default_rng(5)
    bn = cupybn.BatchNorm(3, momentum=momentum, dtype=np.float64, backend=backend)
    batches = [make_x((6, 3, 5), np.float64, 2.0 * k, 1.0 + k, rng) for k in range(4)]
    want_mean, want_var = np.zeros(3), np.ones(3)
    for k, x in enumerate(batches):
        bn(x)
        ref = reference_forward(x)
        # PyTorch's convention: momentum None means a step k (from 0) weighs the batch 1 / (k + 1)
        want_mean, want_var = running_stats_update(want_mean, want_var, ref,
                                                   1.0 / (k + 1) if momentum is None else momentum)
        assert bn.num_batches_tracked == k + 1
    np.testing.assert_allclose(bn.running_mean, want_mean, rtol=1e-12)
    np.testing.assert_allclose(bn.running_var, want_var, rtol=1e-12)
    if momentum is None:  # plain averages of the batch statistics
        refs = [reference_forward(x) for x in batches]
        np.testing.assert_allclose(bn.running_mean, np.mean([r.mean for r in refs], axis=0), rtol=1e-12)
        np.testing.assert_allclose(bn.running_var, np.mean([r.var * 30 / 29 for r in refs], axis=0), rtol=1e-12)


def test_layer_eval_does_not_count_or_update(backend):
    bn = cupybn.BatchNorm(2, backend=backend)
    x = make_x((8, 2), np.float32, 1.0, 1.0, np.random.default_rng(6))
    bn(x)
    mean, var = bn.running_mean.copy(), bn.running_var.copy()
    bn.eval()
    bn(x)
    assert bn.num_batches_tracked == 1
    assert bn.running_mean.tobytes() == mean.tobytes() and bn.running_var.tobytes() == var.tobytes()
