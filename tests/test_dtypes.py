"""dtypes: y and dx have x's dtype, parameters and statistics the parameter dtype
(float32 for float16/bfloat16/float32 data, float64 for float64), and narrow data
are accumulated in float32 or wider, never in their own precision.
"""
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
    tolerance,
)
from cupybn.testing.strategies import FLOAT_DTYPES, batch_norm_inputs, make_params, make_x

try:
    import ml_dtypes
except ImportError:  # bfloat16 is optional (pip install cupybn[bfloat16])
    ml_dtypes = None

needs_bfloat16 = pytest.mark.skipif(ml_dtypes is None, reason="bfloat16 needs ml_dtypes, which is not installed")


@given(batch_norm_inputs(dtype_names=FLOAT_DTYPES))
def test_output_and_statistics_dtypes(backend, inputs):
    x = inputs.x
    pdt = inputs.param_dtype
    y, saved = cupybn.batch_norm(x, inputs.gamma, inputs.beta, axis=inputs.axis, backend=backend)
    dx, dgamma, dbeta = cupybn.batch_norm_backward(y, saved)
    assert y.dtype == x.dtype and dx.dtype == x.dtype
    assert saved.mean.dtype == pdt and saved.var.dtype == pdt and saved.inv_std.dtype == pdt
    assert dgamma.dtype == inputs.gamma.dtype and dbeta.dtype == inputs.beta.dtype


def test_gradients_have_their_parameters_dtype(backend):
    x = make_x((6, 3, 4), np.float32, 0.0, 1.0, np.random.default_rng(0))
    gamma, beta = np.ones(3, np.float64), np.zeros(3, np.float16)
    _, saved = cupybn.batch_norm(x, gamma, beta, backend=backend)
    _, dgamma, dbeta = cupybn.batch_norm_backward(x, saved)
    assert dgamma.dtype == np.float64 and dbeta.dtype == np.float16


@pytest.mark.parametrize("offset", [0.0, 1e3])
def test_float16_statistics_accumulate_in_float32(backend, offset):
    # 16384 values near 1000 sum to ~1.6e7: far beyond float16's 65504, and
    # a float16 running sum would stop growing at 2048 or so.  The variance of
    # such data must still be exact to float32's bar.
    x = make_x((64, 2, 256), np.float16, offset, 1.0, np.random.default_rng(1))
    running_mean, running_var = np.zeros(2, np.float32), np.ones(2, np.float32)
    y, saved = cupybn.batch_norm(x, running_mean=running_mean, running_var=running_var, momentum=1.0,
                                 backend=backend)
    ref = reference_forward(x)
    assert np.all(np.isfinite(y))
    assert np.all(np.abs(saved.var - ref.var) <= tolerance(np.float16).var * ref.var)
    # the mean's error is measured against the spread (its bar near a zero mean)
    np.testing.assert_allclose(running_mean, ref.mean, rtol=1e-6, atol=1e-6 * float(np.sqrt(ref.var.max())))
    np.testing.assert_allclose(running_var, ref.var * ref.m / (ref.m - 1), rtol=1e-6)


def test_float16_gradient_sums_accumulate_in_float32(backend):
    # dbeta = sum(dy) over 16384 ones is 16384: exact in float32, and not reachable
    # by a float16 running sum (which sticks at 2048)
    x = make_x((64, 2, 256), np.float16, 0.0, 1.0, np.random.default_rng(2))
    _, saved = cupybn.batch_norm(x, np.ones(2, np.float32), np.zeros(2, np.float32), backend=backend)
    _, _, dbeta = cupybn.batch_norm_backward(np.ones_like(x), saved)
    np.testing.assert_array_equal(dbeta, [16384.0, 16384.0])


# ---- bfloat16 (through ml_dtypes) ---------------------------------------------------------
# Only the NumPy backend has bfloat16 (CuPy has no bfloat16 arrays).
@pytest.fixture(scope="module", params=[1, 2], ids=["numpy-threads1", "numpy-threads2"])
def bfloat16_backend(request):
    return cupybn.NumpyBackend(threads=request.param)


@needs_bfloat16
@given(inputs=batch_norm_inputs(dtype_names=("bfloat16",), min_count=16))
def test_bfloat16_matches_reference(bfloat16_backend, inputs):
    backend = bfloat16_backend
    x = inputs.x
    y, saved = cupybn.batch_norm(x, inputs.gamma, inputs.beta, axis=inputs.axis, eps=inputs.eps, backend=backend)
    ref = reference_forward(x, inputs.gamma, inputs.beta, axis=inputs.axis, eps=inputs.eps)
    dy = inputs.relayout(probe_dy(ref, inputs.axis, x.dtype, inputs.rng(1)))
    grads = cupybn.batch_norm_backward(dy, saved)
    errors = batch_norm_errors(y, saved.var, grads, ref, reference_backward(dy, ref, inputs.gamma, axis=inputs.axis))
    assert y.dtype == x.dtype and grads[0].dtype == x.dtype
    assert saved.var.dtype == np.float32 and grads[1].dtype == np.float32
    assert not exceeded(errors, tolerance(x.dtype)), errors


@needs_bfloat16
def test_bfloat16_layer_and_inference(bfloat16_backend):
    backend = bfloat16_backend
    bf16 = np.dtype(ml_dtypes.bfloat16)
    x = make_x((16, 3, 8), bf16, 5.0, 2.0, np.random.default_rng(3))
    bn = cupybn.BatchNorm(3, dtype=bf16, backend=backend)
    assert bn.gamma.dtype == np.float32 and bn.running_var.dtype == np.float32
    y = bn(x)
    assert y.dtype == bf16
    bn.eval()
    y_eval = bn(x)
    ref = reference_forward(x, bn.gamma, bn.beta, training=False, running_mean=bn.running_mean,
                            running_var=bn.running_var)
    assert y_eval.dtype == bf16
    assert batch_norm_errors(y_eval, None, None, ref, None)["y"] <= tolerance(bf16).y


def test_float64_parameters_with_float32_data_are_accepted(backend):
    x = make_x((6, 3, 4), np.float32, 0.0, 1.0, np.random.default_rng(4))
    gamma, beta = make_params(3, np.float64, np.random.default_rng(5))
    y, _ = cupybn.batch_norm(x, gamma, beta, backend=backend)
    assert y.dtype == np.float32
    ref = reference_forward(x, gamma, beta)
    assert batch_norm_errors(y, None, None, ref, None)["y"] <= tolerance(np.float32).y


@needs_bfloat16
def test_a_backend_without_bfloat16_refuses_it_before_any_work():
    from cupybn.testing.hostcuda import host_cupy_backend

    x = make_x((16, 3, 8), np.dtype(ml_dtypes.bfloat16), 0.0, 1.0, np.random.default_rng(4))
    running_mean, running_var = np.zeros(3, np.float32), np.ones(3, np.float32)
    with pytest.raises(TypeError, match=r"x has dtype bfloat16, which the host backend does not support "
                                        r"\(it takes float16, float32, float64\)"):
        cupybn.batch_norm(x, running_mean=running_mean, running_var=running_var, backend=host_cupy_backend())
    assert not running_mean.any() and (running_var == 1).all()
