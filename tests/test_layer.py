"""The BatchNorm layer is the functional API plus the state PyTorch users expect.

train mode normalises with batch statistics and updates the running ones; eval
mode uses the running statistics (or the batch's, without running statistics);
backward returns dx and stores grad_gamma/grad_beta; parameters are float32 for
float16 data.
"""
import numpy as np
import pytest

import cupybn
from cupybn.testing.strategies import channels_last, make_x


def data(shape=(8, 4, 5, 3), dtype=np.float32, offset=2.0, seed=0):
    return make_x(shape, dtype, offset, 1.5, np.random.default_rng(seed))


def test_defaults(backend):
    bn = cupybn.BatchNorm(4, backend=backend)
    assert bn.training and bn.affine and bn.track_running_stats
    np.testing.assert_array_equal(bn.gamma, np.ones(4))
    np.testing.assert_array_equal(bn.beta, np.zeros(4))
    np.testing.assert_array_equal(bn.running_mean, np.zeros(4))
    np.testing.assert_array_equal(bn.running_var, np.ones(4))
    assert bn.num_batches_tracked == 0 and bn.grad_gamma is None and bn.grad_beta is None
    assert bn.train() is bn and bn.eval() is bn and not bn.training
    assert bn.train(True).training
    assert "BatchNorm(4" in repr(bn)


def test_train_mode_is_batch_norm_with_running_stats(backend):
    x = data()
    bn = cupybn.BatchNorm(4, momentum=0.3, backend=backend)
    bn.gamma[:] = [1.0, 2.0, -0.5, 0.25]
    bn.beta[:] = [0.0, 1.0, -2.0, 0.5]
    running_mean, running_var = np.zeros(4, np.float32), np.ones(4, np.float32)
    y_want, saved = cupybn.batch_norm(x, bn.gamma, bn.beta, running_mean=running_mean, running_var=running_var,
                                      momentum=0.3, backend=backend)
    y = bn(x)
    np.testing.assert_array_equal(y, y_want)
    np.testing.assert_array_equal(bn.running_mean, running_mean)
    np.testing.assert_array_equal(bn.running_var, running_var)
    assert bn.num_batches_tracked == 1

    dy = data(seed=1)
    dx = bn.backward(dy)
    dx_want, dgamma, dbeta = cupybn.batch_norm_backward(dy, saved)
    np.testing.assert_array_equal(dx, dx_want)
    np.testing.assert_array_equal(bn.grad_gamma, dgamma)
    np.testing.assert_array_equal(bn.grad_beta, dbeta)


def test_eval_mode_uses_running_stats(backend):
    bn = cupybn.BatchNorm(4, backend=backend)
    for seed in range(3):
        bn(data(seed=seed))
    bn.eval()
    x = data(seed=9)
    y = bn(x)
    y_want, saved = cupybn.batch_norm(x, bn.gamma, bn.beta, running_mean=bn.running_mean,
                                      running_var=bn.running_var, training=False, backend=backend)
    np.testing.assert_array_equal(y, y_want)
    # inference backward: dx = dy * gamma * inv_std
    dx = bn.backward(np.ones_like(x))
    np.testing.assert_allclose(dx, np.broadcast_to((1 / np.sqrt(bn.running_var + bn.eps))[None, :, None, None],
                                                   x.shape), rtol=1e-6)
    assert bn.grad_gamma is not None and bn.grad_beta is not None


def test_affine_false_has_no_parameters_and_no_parameter_gradients(backend):
    bn = cupybn.BatchNorm(4, affine=False, backend=backend)
    assert bn.gamma is None and bn.beta is None and not bn.affine
    x = data()
    y = bn(x)
    np.testing.assert_array_equal(y, cupybn.batch_norm(x, backend=backend)[0])
    dx = bn.backward(data(seed=1))
    assert dx.shape == x.shape
    assert bn.grad_gamma is None and bn.grad_beta is None


def test_without_running_stats_eval_uses_batch_stats(backend):
    bn = cupybn.BatchNorm(4, track_running_stats=False, backend=backend)
    assert bn.running_mean is None and bn.running_var is None and bn.num_batches_tracked is None
    x = data()
    y_train = bn(x)
    y_eval = bn.eval()(x)
    np.testing.assert_array_equal(y_train, y_eval)
    np.testing.assert_array_equal(y_eval, cupybn.batch_norm(x, bn.gamma, bn.beta, backend=backend)[0])


@pytest.mark.parametrize("dtype, param_dtype", [(np.float16, np.float32), (np.float32, np.float32),
                                                (np.float64, np.float64)])
def test_parameter_dtype_follows_data_dtype(backend, dtype, param_dtype):
    bn = cupybn.BatchNorm(4, dtype=dtype, backend=backend)
    for a in (bn.gamma, bn.beta, bn.running_mean, bn.running_var):
        assert a.dtype == param_dtype
    x = data(dtype=dtype)
    y = bn(x)
    assert y.dtype == dtype
    bn.backward(np.ones_like(x))
    assert bn.grad_gamma.dtype == param_dtype and bn.grad_beta.dtype == param_dtype
    assert bn.running_mean.dtype == param_dtype and bn.running_var.dtype == param_dtype


def test_channels_last_layer(backend):
    x = channels_last(data(), 1).transpose(0, 2, 3, 1)  # NHWC view of channels-last memory
    assert x.flags.c_contiguous
    bn = cupybn.BatchNorm(4, axis=-1, backend=backend)
    y = bn(x)
    assert y.flags.c_contiguous
    np.testing.assert_allclose(y.mean(axis=(0, 1, 2)), 0, atol=1e-6)
    dx = bn.backward(np.ones_like(x))
    assert dx.shape == x.shape


def test_second_backward_uses_the_latest_forward(backend):
    bn = cupybn.BatchNorm(4, backend=backend)
    bn(data(seed=0))
    x = data(seed=1)
    bn(x)
    dy = data(seed=2)
    dx = bn.backward(dy)
    _, saved = cupybn.batch_norm(x, bn.gamma, bn.beta, backend=backend)
    np.testing.assert_array_equal(dx, cupybn.batch_norm_backward(dy, saved)[0])


@pytest.mark.parametrize("layer_dtype, x_dtype", [(np.float32, np.float64), (np.float64, np.float32),
                                                  (np.float32, np.float16)])
def test_layer_refuses_data_of_another_dtype_and_changes_nothing(layer_dtype, x_dtype):
    bn = cupybn.BatchNorm(4, dtype=layer_dtype)
    before = {k: np.copy(v) for k, v in bn.state_dict().items()}
    with pytest.raises(TypeError, match=rf"x has dtype {np.dtype(x_dtype).name}, the layer takes "
                                        rf"{np.dtype(layer_dtype).name} data"):
        bn(data(dtype=x_dtype))
    assert all(np.array_equal(before[k], v) for k, v in bn.state_dict().items())
    assert bn.num_batches_tracked == 0
