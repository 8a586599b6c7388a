"""Subnormal input: kept on the NumPy backend, flushed to zero on the CuPy backend.

CuPy compiles every kernel with ``-ftz=true``, so on a GPU float32 arithmetic
reads a subnormal (|x| < 2**-126, about 1.18e-38) as zero and flushes subnormal
results to zero; the host harness runs the CuPy backend's kernels the same way
("cupy-host").  The NumPy backend computes in IEEE arithmetic.  So a float32
channel of values near 1e-39 has mean 0, variance 0 and y = beta exactly on the
CuPy backend, while the NumPy backend keeps its (tiny) mean and deviations.
Both are within float32's bar of the float64 result, which is beta plus less
than 1e-30.  float16 subnormals (2**-24 to 2**-14) are normal float32 numbers,
which the kernels compute in, so both backends keep them.  (docs/numerics.md)
"""
from __future__ import annotations

import numpy as np
import pytest

import cupybn
from cupybn.testing import max_rel_error, reference_backward, reference_forward, tolerance
from cupybn.testing.hostcuda import host_cupy_backend

TINY = np.float32(2.0**-126)  # the smallest normal float32


@pytest.fixture(scope="module")
def cupy_host():
    return host_cupy_backend(threads=64, sm_count=2)


def subnormal_batch(dtype=np.float32, scale=1e-39):
    """(8, 3, 5): channel 0 subnormal, channel 1 subnormal and negative, channel 2 normal."""
    rng = np.random.default_rng(39)
    x = rng.uniform(0.1, 1.0, (8, 3, 5)) * scale
    x[:, 1] *= -1
    x[:, 2] = rng.standard_normal((8, 5))
    return x.astype(dtype)


def run(x, backend, gamma, beta):
    rm, rv = np.zeros(3, np.float32), np.ones(3, np.float32)
    y, saved = cupybn.batch_norm(x, gamma, beta, running_mean=rm, running_var=rv, backend=backend)
    dy = np.linspace(-1, 1, x.size, dtype=x.dtype).reshape(x.shape)
    grads = cupybn.batch_norm_backward(dy, saved)
    return y, saved, grads, rm, dy


def test_float32_subnormal_channels_flush_on_the_cupy_backend_and_stay_on_numpy(cupy_host):
    x = subnormal_batch()
    assert (np.abs(x[:, :2]) < TINY).all() and (x[:, :2] != 0).all()
    gamma, beta = np.array([2.0, 3.0, 1.5], np.float32), np.zeros(3, np.float32)
    y_np, s_np, g_np, rm_np, dy = run(x, cupybn.NumpyBackend(threads=1), gamma, beta)
    y_cp, s_cp, g_cp, rm_cp, _ = run(x, cupy_host, gamma, beta)

    # NumPy: IEEE.  The mean is the subnormal mean (to a couple of its ulps, 2**-149),
    # and y keeps the deviations, scaled by 1/sqrt(eps).
    ref = reference_forward(x, gamma, beta)
    assert np.abs(s_np.mean[:2] - ref.mean[:2]).max() <= 2 * 2.0**-149
    assert (y_np[:, :2] != 0).any() and (rm_np[:2] != 0).all()
    # CuPy backend: every subnormal reads as zero, so the channel is constant zero.
    assert (s_cp.mean[:2] == 0).all() and (s_cp.var[:2] == 0).all()
    assert (y_cp[:, :2] == 0).all() and (rm_cp[:2] == 0).all()
    # Both are right to float32's bar, and the normal channel is untouched.
    tol = tolerance(np.float32)
    for y in (y_np, y_cp):
        assert max_rel_error(y, ref.y) <= tol.y
    np.testing.assert_allclose(y_cp[:, 2], y_np[:, 2], rtol=1e-6, atol=1e-6)
    # Gradients: x_hat is below 1e-30 either way, so dx, dgamma, dbeta agree.
    ref_dx, ref_dgamma, ref_dbeta = reference_backward(dy, ref, gamma)
    for dx, dgamma, dbeta in (g_np, g_cp):
        assert max_rel_error(dx, ref_dx) <= tol.dx
        assert max_rel_error(dgamma, ref_dgamma) <= tol.dparams and max_rel_error(dbeta, ref_dbeta) <= tol.dparams


def test_beta_is_exact_on_a_flushed_channel(cupy_host):
    x = subnormal_batch()
    beta = np.array([0.25, -7.0, 0.0], np.float32)
    y, _ = cupybn.batch_norm(x, np.ones(3, np.float32), beta, backend=cupy_host)
    assert (y[:, 0] == beta[0]).all() and (y[:, 1] == beta[1]).all()


def test_float16_subnormals_are_kept_on_both_backends(cupy_host):
    x = subnormal_batch(np.float16, scale=2.0**-16)  # below 2**-14: float16 subnormals
    assert (np.abs(x[:, :2].astype(np.float32)) < 2.0**-14).all() and (x[:, :2] != 0).all()
    _, s_np = cupybn.batch_norm(x, backend=cupybn.NumpyBackend(threads=1))
    y_cp, s_cp = cupybn.batch_norm(x, backend=cupy_host)
    assert (s_cp.mean[:2] != 0).all()
    np.testing.assert_allclose(s_cp.mean, s_np.mean, rtol=1e-6)
    assert max_rel_error(y_cp, reference_forward(x).y) <= tolerance(np.float16).y
