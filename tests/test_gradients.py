"""batch_norm_backward gives the derivatives of batch_norm.

* Central finite differences of a random scalar loss L = sum(w * y), in float64,
  agree with (dx, dgamma, dbeta) for dy = w, in training and inference mode.
* The structure of the training-mode gradient: per channel sum(dx) = 0 (y does
  not change when a channel is shifted), dbeta = sum(dy), dgamma = sum(dy * x_hat)
  and sum(dx * x_hat) = gamma * inv_std * dgamma * eps / (var + eps), which is the
  textbook "sum(dx * x_hat) = 0" once eps is accounted for (with eps > 0, scaling
  a channel about its mean does change y a little).
* Inference mode treats the statistics as constants: dx = dy * gamma * inv_std.

Gradient errors are measured against the sums of absolute terms of the formulas
(``gradient_magnitudes``): the rounding error of a sum is bounded by its terms,
not its value, and dx can be tiny (with two values per channel it is ~0).
"""
import numpy as np
from hypothesis import given

import cupybn
from cupybn.testing import gradient_magnitudes, reference_forward, tolerance
from cupybn.testing.reference import per_channel, reduce_axes
from cupybn.testing.strategies import FLOAT_DTYPES, batch_norm_inputs
from cupybn.testing.tolerances import finfo

FD_BAR = 1e-6  # central differences in float64 with h = 1e-5 * sqrt(var + eps) are good to ~1e-9


def loss_and_grads(inputs, backend, training, running=None):
    """The function L(x, gamma, beta) = sum(w * y) and the library's gradients at the inputs."""
    x, axis, eps = inputs.x, inputs.axis, inputs.eps
    w = inputs.rng(1).standard_normal(x.shape)
    stats = {} if running is None else dict(running_mean=running[0], running_var=running[1])

    def loss(x_, gamma_, beta_):
        y, _ = cupybn.batch_norm(x_, gamma_, beta_, axis=axis, eps=eps, training=training,
                                 backend=backend, **{k: v.copy() for k, v in stats.items()})
        return float(np.sum(w * y))

    _, saved = cupybn.batch_norm(x, inputs.gamma, inputs.beta, axis=axis, eps=eps, training=training,
                                 backend=backend, **{k: v.copy() for k, v in stats.items()})
    return loss, w, cupybn.batch_norm_backward(w, saved)


def central_difference(f, a, h):
    """d f / d a (a float64 array, perturbed one element at a time)."""
    grad = np.empty(a.shape)
    for i in np.ndindex(a.shape):
        plus, minus = a.copy(), a.copy()
        plus[i] += h
        minus[i] -= h
        grad[i] = (f(plus) - f(minus)) / (2 * h)
    return grad


def assert_matches_finite_differences(inputs, backend, training, running=None):
    loss, w, (dx, dgamma, dbeta) = loss_and_grads(inputs, backend, training, running)
    x, gamma, beta = inputs.x, inputs.gamma, inputs.beta
    if training:
        ref = reference_forward(x, gamma, beta, axis=inputs.axis, eps=inputs.eps)
    else:
        ref = reference_forward(x, gamma, beta, axis=inputs.axis, eps=inputs.eps, training=False,
                                running_mean=running[0], running_var=running[1])
    # y varies on the scale sqrt(var + eps), which can be far below the data's scale
    # (two nearly equal values per channel and a tiny eps)
    h = 1e-5 * float(np.min(1.0 / ref.inv_std))
    fd_dx = central_difference(lambda a: loss(a, gamma, beta), x, h)
    fd_dgamma = central_difference(lambda g: loss(x, g, beta), gamma, 1e-5)
    fd_dbeta = central_difference(lambda b: loss(x, gamma, b), beta, 1e-5)
    mag_dx, mag_dgamma, mag_dbeta = gradient_magnitudes(w, ref, gamma, axis=inputs.axis)
    for name, got, fd, mag in (("dx", dx, fd_dx, mag_dx), ("dgamma", dgamma, fd_dgamma, mag_dgamma),
                               ("dbeta", dbeta, fd_dbeta, mag_dbeta)):
        err = np.linalg.norm(got - fd) / np.linalg.norm(mag)
        assert err <= FD_BAR, (name, err, inputs)


SMALL_FLOAT64 = dict(dtype_names=("float64",), max_size=48, max_offset=10.0, scale_range=(0.1, 10.0))


@given(batch_norm_inputs(**SMALL_FLOAT64))
def test_training_gradients_match_finite_differences(backend, inputs):
    assert_matches_finite_differences(inputs, backend, training=True)


@given(batch_norm_inputs(**SMALL_FLOAT64))
def test_inference_gradients_match_finite_differences(backend, inputs):
    rng = inputs.rng(2)
    c = inputs.channels
    running = (rng.normal(0, 2, c) * inputs.scale, rng.uniform(0.1, 4, c) * inputs.scale**2)
    assert_matches_finite_differences(inputs, backend, training=False, running=running)


def _backward(inputs, backend, dy_stream=1):
    x = inputs.x
    dy = inputs.relayout(inputs.rng(dy_stream).standard_normal(x.shape).astype(x.dtype))
    _, saved = cupybn.batch_norm(x, inputs.gamma, inputs.beta, axis=inputs.axis, eps=inputs.eps,
                                 backend=backend)
    ref = reference_forward(x, inputs.gamma, inputs.beta, axis=inputs.axis, eps=inputs.eps)
    return dy, ref, cupybn.batch_norm_backward(dy, saved)


@given(batch_norm_inputs(dtype_names=FLOAT_DTYPES, params=("both", "gamma")))
def test_dx_sums_to_zero_and_is_orthogonal_to_x_hat_up_to_eps(backend, inputs):
    dy, ref, (dx, _, _) = _backward(inputs, backend)
    axis, ndim = inputs.axis, inputs.x.ndim
    axes = reduce_axes(ndim, axis)
    mag_dx, _, _ = gradient_magnitudes(dy, ref, inputs.gamma, axis=axis)
    dx64 = dx.astype(np.float64)

    assert np.all(np.abs(dx64.sum(axis=axes)) <= tolerance(inputs.x.dtype).dx * mag_dx.sum(axis=axes))
    # sum(dx * x_hat) = gamma * inv_std * dgamma * (1 - mean(x_hat**2)) = ... * eps / (var + eps)
    dgamma_ref = (dy.astype(np.float64) * ref.x_hat).sum(axis=axes)
    want = inputs.gamma.astype(np.float64) * ref.inv_std * dgamma_ref * inputs.eps / (ref.var + inputs.eps)
    got = (dx64 * ref.x_hat).sum(axis=axes)
    assert np.all(np.abs(got - want) <= tolerance(inputs.x.dtype).dx * (mag_dx * np.abs(ref.x_hat)).sum(axis=axes))


@given(batch_norm_inputs(dtype_names=FLOAT_DTYPES))
def test_dbeta_is_sum_dy_and_dgamma_is_sum_dy_x_hat(backend, inputs):
    dy, ref, (_, dgamma, dbeta) = _backward(inputs, backend)
    axes = reduce_axes(inputs.x.ndim, inputs.axis)
    dy64 = dy.astype(np.float64)
    bar = tolerance(inputs.x.dtype).dparams
    assert dbeta.dtype == inputs.beta.dtype and dgamma.dtype == inputs.gamma.dtype
    assert np.all(np.abs(dbeta - dy64.sum(axis=axes)) <= bar * np.abs(dy64).sum(axis=axes))
    assert np.all(np.abs(dgamma - (dy64 * ref.x_hat).sum(axis=axes))
                  <= bar * np.abs(dy64 * ref.x_hat).sum(axis=axes))


@given(batch_norm_inputs(dtype_names=FLOAT_DTYPES, params=("both", "beta")))
def test_inference_dx_is_dy_times_gamma_times_inv_std(backend, inputs):
    x, axis, c = inputs.x, inputs.axis, inputs.channels
    rng = inputs.rng(2)
    pdt = inputs.param_dtype
    running_mean = (rng.normal(0, 2, c) * inputs.scale).astype(pdt)
    running_var = (rng.uniform(0.1, 4, c) * inputs.scale**2).astype(pdt)
    dy = inputs.relayout(rng.standard_normal(x.shape).astype(x.dtype))
    _, saved = cupybn.batch_norm(x, inputs.gamma, inputs.beta, running_mean=running_mean,
                                 running_var=running_var, training=False, axis=axis, eps=inputs.eps,
                                 backend=backend)
    dx, dgamma, dbeta = cupybn.batch_norm_backward(dy, saved)
    assert (dgamma is None) == (inputs.gamma is None)  # no gamma in the forward call: no gradient

    inv_std = 1.0 / np.sqrt(running_var.astype(np.float64) + inputs.eps)
    gamma = 1.0 if inputs.gamma is None else per_channel(inputs.gamma, x.ndim, axis)
    want = dy.astype(np.float64) * gamma * per_channel(inv_std, x.ndim, axis)
    tiny = float(finfo(x.dtype).smallest_subnormal)  # dx may round into the subnormals
    assert np.all(np.abs(dx.astype(np.float64) - want) <= tolerance(x.dtype).dx * np.abs(want) + tiny)
    axes = reduce_axes(x.ndim, axis)
    dy64 = dy.astype(np.float64)
    assert np.all(np.abs(dbeta - dy64.sum(axis=axes)) <= tolerance(x.dtype).dparams * np.abs(dy64).sum(axis=axes))
