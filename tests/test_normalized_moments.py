"""Per channel, y has mean beta and variance gamma**2 * var / (var + eps).

This is the defining property of Batch Normalization, checked from x's own
statistics (computed here in float64) rather than from a reference y.  The
allowed deviation follows from the y bar: if every y is within
d = tol * max(1, |y|) of the exact value, its mean is within d and its standard
deviation within d as well.
"""
import numpy as np
from hypothesis import given

import cupybn
from cupybn.testing import tolerance
from cupybn.testing.strategies import FLOAT_DTYPES, batch_norm_inputs


def channel_moments(a, axis):
    """float64 per-channel mean and (biased) variance of ``a``."""
    a = np.moveaxis(np.asarray(a).astype(np.float64), axis, 0).reshape(a.shape[axis], -1)
    mean = a.mean(axis=1)
    return mean, ((a - mean[:, None]) ** 2).mean(axis=1)


@given(batch_norm_inputs(dtype_names=FLOAT_DTYPES, params=("both", "gamma", "beta", "none")))
def test_output_has_mean_beta_and_variance_gamma2_var_over_var_plus_eps(backend, inputs):
    x, axis = inputs.x, inputs.axis
    y, _ = cupybn.batch_norm(x, inputs.gamma, inputs.beta, axis=axis, eps=inputs.eps, backend=backend)
    _, var_x = channel_moments(x, axis)
    y_mean, y_var = channel_moments(y, axis)

    gamma = np.ones(inputs.channels) if inputs.gamma is None else inputs.gamma.astype(np.float64)
    beta = np.zeros(inputs.channels) if inputs.beta is None else inputs.beta.astype(np.float64)
    want_var = gamma**2 * var_x / (var_x + inputs.eps)
    # |y| <= |beta| + |gamma| * sqrt(m - 1): the largest a normalised value can be
    y_bound = np.abs(beta) + np.abs(gamma) * np.sqrt(max(inputs.count - 1, 1))
    d = tolerance(x.dtype).y * np.maximum(1.0, y_bound)

    assert np.all(np.abs(y_mean - beta) <= d), (inputs, y_mean - beta, d)
    assert np.all(np.abs(np.sqrt(y_var) - np.sqrt(want_var)) <= d), (inputs, np.sqrt(y_var) - np.sqrt(want_var), d)
