"""Folding inference-mode BN into the layer before it (cupybn.fold_batch_norm): the
folded layer gives what the layer followed by BN in eval mode gives, to float32
rounding, for linear weights and 1-D, 2-D and 3-D convolution weights with the
output channels first or last; the usual mistakes give errors that name them."""
import numpy as np
import pytest
from conftest import needs_gpu
from hypothesis import given
from hypothesis import strategies as st
from numpy.lib.stride_tricks import sliding_window_view

import cupybn


def conv(x, w):
    """Valid convolution (cross-correlation) of x (N, Cin, *S) with w (out, in, *K), in w's
    dtype for float32 inputs (float64 when both are float64)."""
    k = w.shape[2:]
    spatial = tuple(range(2, x.ndim))
    windows = sliding_window_view(x, k, axis=spatial)  # (N, Cin, *S', *K)
    d = len(k)
    letters = "def"[:d]
    kernel = "ijkl"[:d]
    return np.einsum(f"nc{letters}{kernel},oc{kernel}->no{letters}", windows, w)


def affine_layer(x, w, b):
    """The layer: linear for 2-D w, else convolution; output channels on axis 1."""
    u = x @ w.T if w.ndim == 2 else conv(x, w)
    return u + b.reshape((1, -1) + (1,) * (u.ndim - 2))


@st.composite
def layers(draw):
    spatial = draw(st.integers(0, 3))
    c_in, c_out = draw(st.integers(1, 6)), draw(st.integers(1, 6))
    kernel = tuple(draw(st.lists(st.integers(1, 3), min_size=spatial, max_size=spatial)))
    size = tuple(k + draw(st.integers(0, 2)) for k in kernel)
    seed = draw(st.integers(0, 2**16))
    rng = np.random.default_rng(seed)
    dtype = draw(st.sampled_from([np.float32, np.float64]))
    x = rng.standard_normal((3, c_in, *size)).astype(dtype)
    w = (rng.standard_normal((c_out, c_in, *kernel)) / np.sqrt(c_in * max(1, np.prod(kernel)))).astype(dtype)
    b = rng.standard_normal(c_out).astype(dtype) if draw(st.booleans()) else None
    offset = draw(st.sampled_from([0.0, 3.0, 1e3]))
    bn = dict(running_mean=(offset + rng.standard_normal(c_out)).astype(dtype),
              running_var=(10.0 ** rng.uniform(-4, 3, c_out)).astype(dtype),
              gamma=rng.normal(1, 0.5, c_out).astype(dtype) if draw(st.booleans()) else None,
              beta=rng.standard_normal(c_out).astype(dtype) if draw(st.booleans()) else None,
              eps=draw(st.sampled_from([1e-5, 1e-3])))
    return x, w, b, bn, draw(st.booleans())


def reference(x, w, b, bn):
    """The layer, then BN in eval mode, in float64."""
    f64 = {k: (np.asarray(v, np.float64) if isinstance(v, np.ndarray) else v) for k, v in bn.items()}
    u = affine_layer(x.astype(np.float64), w.astype(np.float64), np.zeros(w.shape[0]) if b is None else
                     b.astype(np.float64))
    shape = (1, -1) + (1,) * (u.ndim - 2)
    y = (u - f64["running_mean"].reshape(shape)) / np.sqrt(f64["running_var"].reshape(shape) + bn["eps"])
    if bn["gamma"] is not None:
        y = y * f64["gamma"].reshape(shape)
    if bn["beta"] is not None:
        y = y + f64["beta"].reshape(shape)
    return y


@given(layers())
def test_the_folded_layer_gives_the_layer_followed_by_bn(case):
    x, w, b, bn, channels_last = case
    if channels_last:  # (k..., in, out): the output channels on the last axis
        order = (*range(2, w.ndim), 1, 0)
        folded_w, folded_b = cupybn.fold_batch_norm(w.transpose(order), b, axis=-1, **bn)
        folded_w = folded_w.transpose(np.argsort(order))
    else:
        folded_w, folded_b = cupybn.fold_batch_norm(w, b, axis=0, **bn)
    assert folded_w.dtype == w.dtype and folded_b.dtype == w.dtype and folded_w.shape == w.shape
    y = affine_layer(x, folded_w, folded_b)
    want = reference(x, w, b, bn)
    # float32 rounding: the weights and bias rounded once, then the sums of the layer
    unit = np.finfo(x.dtype).eps
    terms = w.shape[1] * int(np.prod(w.shape[2:])) + 3
    bound = terms * unit * (affine_layer(np.abs(x).astype(np.float64), np.abs(folded_w).astype(np.float64),
                                         np.abs(folded_b).astype(np.float64)) + np.abs(want))
    assert np.all(np.abs(y - want) <= bound), float(np.max(np.abs(y - want) / bound))


def test_the_layer_folds_with_its_own_state():
    rng = np.random.default_rng(0)
    bn = cupybn.BatchNorm(4, eps=1e-3)
    for _ in range(3):
        bn(rng.standard_normal((16, 4)).astype(np.float32) * 3 + 2)
    bn.gamma[...] = rng.normal(1, 0.5, 4)
    w, b = rng.standard_normal((4, 5)).astype(np.float32), rng.standard_normal(4).astype(np.float32)
    folded = bn.fold(w, b)
    direct = cupybn.fold_batch_norm(w, b, running_mean=bn.running_mean, running_var=bn.running_var,
                                    gamma=bn.gamma, beta=bn.beta, eps=1e-3)
    assert all(a.tobytes() == d.tobytes() for a, d in zip(folded, direct, strict=True))
    x = rng.standard_normal((7, 5)).astype(np.float32)
    y = bn.eval()(x @ w.T + b)
    np.testing.assert_allclose(x @ folded[0].T + folded[1], y, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="track_running_stats=False"):
        cupybn.BatchNorm(4, track_running_stats=False).fold(w, b)


W = np.ones((4, 3, 2, 2), np.float32)
STATS = dict(running_mean=np.zeros(4, np.float32), running_var=np.ones(4, np.float32))


@pytest.mark.parametrize("args, kwargs, error, message", [
    ((W,), {**STATS, "axis": 1}, ValueError, r"running_mean must have shape \(3,\)"),
    ((W,), {**STATS, "axis": 4}, ValueError, "axis must be in"),
    ((W[0, 0, 0],), STATS, ValueError, "weight must have at least 2 dimensions"),
    ((W.astype(np.int32),), STATS, TypeError, "weight must have a floating dtype"),
    ((W.tolist(),), STATS, TypeError, "weight must be a NumPy or CuPy array"),
    ((W, np.ones(3, np.float32)), STATS, ValueError, r"bias must have shape \(4,\)"),
    ((W,), {**STATS, "running_var": -np.ones(4, np.float32)}, ValueError, "running_var must not be negative"),
    ((W,), {**STATS, "eps": 0.0}, ValueError, "eps must be a finite number > 0"),
    ((W,), {**STATS, "gamma": np.ones(2, np.float32)}, ValueError, r"gamma must have shape \(4,\)"),
])
def test_mistakes_give_errors_that_name_them(args, kwargs, error, message):
    with pytest.raises(error, match=message):
        cupybn.fold_batch_norm(*args, **kwargs)


@needs_gpu
def test_folding_cupy_arrays_gives_the_numpy_bits_cupy_gpu():
    import cupy

    rng = np.random.default_rng(1)
    w, b = rng.standard_normal((8, 3, 3, 3)).astype(np.float32), rng.standard_normal(8).astype(np.float32)
    stats = dict(running_mean=rng.standard_normal(8).astype(np.float32),
                 running_var=rng.uniform(0.1, 2, 8).astype(np.float32), gamma=rng.standard_normal(8).astype(np.float32))
    on_host = cupybn.fold_batch_norm(w, b, **stats)
    on_gpu = cupybn.fold_batch_norm(cupy.asarray(w), cupy.asarray(b), **{k: cupy.asarray(v) for k, v in stats.items()})
    assert all(isinstance(a, cupy.ndarray) for a in on_gpu)
    # float64 multiply and divide are correctly rounded on both: the same bits
    assert all(h.tobytes() == cupy.asnumpy(g).tobytes() for h, g in zip(on_host, on_gpu, strict=True))
