"""The fused epilogue ``y = act(BN(x) + residual)`` and its backward pass.

* Forward: the fused y is the unfused composition (batch_norm, then ``+ residual``
  in x's dtype, then ReLU) bit for bit in float32 and float64, where BN's value
  is already rounded to the arithmetic dtype before the add; float16 and
  bfloat16 round once instead of twice, so they may differ from it by the
  rounding of the composition's intermediate.  In training and inference, any
  layout of x and of the residual, with and without gamma/beta.
* Backward: the gradients are those of plain BN applied to the ReLU's gradient
  ``g = y <= 0 ? 0 : dy`` (the same bits), dz is g (dy itself without ReLU), and
  in float64 all of them agree with central finite differences of the fused
  function.
* The conventions: every value <= 0 (-0.0 too) becomes +0.0, NaN stays NaN,
  and the gradient is zero where y == 0.
* Bad arguments raise before anything changes.
"""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from test_gradients import FD_BAR, central_difference

import cupybn
from cupybn.backends._epilogue import relu_in_place
from cupybn.testing import gradient_magnitudes, gradients_close, reference_forward, tolerance
from cupybn.testing.strategies import FLOAT_DTYPES, arrange, batch_norm_inputs, memory_layouts

EPILOGUES = [(True, None), (True, "relu"), (False, "relu")]


def running_stats(inputs):
    rng = inputs.rng(5)
    channels = inputs.channels
    return (rng.standard_normal(channels).astype(inputs.param_dtype) * inputs.scale,
            (rng.uniform(0.5, 2.0, channels) * inputs.scale**2).astype(inputs.param_dtype))


def residual_like(inputs, data, scale=None):
    """A residual shaped like x, in a memory layout drawn independently of x's."""
    x = inputs.x
    _, order, steps = data.draw(memory_layouts(x.ndim, inputs.axis))
    z = inputs.rng(3).standard_normal(x.shape) * (1.0 if scale is None else scale)
    return arrange(z.astype(x.dtype), order, steps)


def composition(y_bn, z, relu):
    """The unfused epilogue in x's dtype: ``+ z``, then ReLU (<= 0 to +0, NaN kept)."""
    s = y_bn if z is None else y_bn + z
    return np.where(s <= 0, np.zeros((), s.dtype), s) if relu else s


def call(inputs, backend, training, running, **epilogue):
    """batch_norm on a copy of the running statistics: (y, saved, running after)."""
    rm, rv = (a.copy() for a in running)
    y, saved = cupybn.batch_norm(inputs.x, inputs.gamma, inputs.beta, running_mean=rm, running_var=rv,
                                 training=training, axis=inputs.axis, eps=inputs.eps, backend=backend, **epilogue)
    return y, saved, (rm, rv)


def close(a, b) -> bool:
    """Equal but for the order of a sum: a few ulps of the arithmetic dtype, of the largest value."""
    eps = np.finfo(np.float64 if a.dtype == np.float64 else np.float32).eps
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    return bool(np.all(np.abs(a64 - b64) <= 16 * eps * np.max(np.abs(b64), initial=0.0)))


def same_bits(a, b) -> bool:
    a, b = np.ascontiguousarray(a), np.ascontiguousarray(b)
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


@pytest.mark.parametrize("with_residual,activation", EPILOGUES, ids=["residual", "residual-relu", "relu"])
@given(inputs=batch_norm_inputs(dtype_names=FLOAT_DTYPES), training=st.booleans(), data=st.data())
def test_fused_output_is_the_unfused_composition(backend, with_residual, activation, inputs, training, data):
    running = running_stats(inputs)
    z = residual_like(inputs, data, inputs.scale) if with_residual else None
    y_bn, _, running_bn = call(inputs, backend, training, running)
    y, saved, running_fused = call(inputs, backend, training, running, residual=z, activation=activation)
    expected = composition(y_bn, z, activation == "relu")
    assert y.dtype == inputs.x.dtype and y.strides == y_bn.strides  # x's layout, as without the epilogue
    if inputs.x.dtype in (np.float32, np.float64):
        assert same_bits(y, expected), inputs
    else:  # one rounding instead of two: within the composition's own rounding of y_bn
        y64, bn64, expected64 = (a.astype(np.float64) for a in (y, y_bn, expected))
        finite = np.isfinite(bn64) & np.isfinite(expected64)  # an overflowed y_bn: the composition is off
        with np.errstate(invalid="ignore"):
            ulp = np.spacing(np.maximum(np.abs(bn64), np.abs(expected64)).astype(inputs.x.dtype)).astype(np.float64)
        with np.errstate(invalid="ignore"):  # Inf - Inf outside `finite`
            diff = np.abs(y64 - expected64)
        assert np.all(diff[finite] <= 1.5 * ulp[finite]), inputs
        assert np.array_equal(y64[~np.isfinite(expected64) & np.isfinite(bn64)],
                              expected64[~np.isfinite(expected64) & np.isfinite(bn64)], equal_nan=True)
    for fused, plain in zip(running_fused, running_bn, strict=True):
        assert same_bits(fused, plain)
    assert saved.residual == with_residual and saved.activation == activation
    assert (saved.y is y) == (activation == "relu")


@pytest.mark.parametrize("with_residual,activation", EPILOGUES, ids=["residual", "residual-relu", "relu"])
@given(inputs=batch_norm_inputs(dtype_names=FLOAT_DTYPES), training=st.booleans(), data=st.data())
def test_gradients_are_plain_batch_norms_of_the_relus_gradient(backend, with_residual, activation, inputs,
                                                                training, data):
    running = running_stats(inputs)
    z = residual_like(inputs, data, inputs.scale) if with_residual else None
    y, saved, _ = call(inputs, backend, training, running, residual=z, activation=activation)
    _, saved_bn, _ = call(inputs, backend, training, running)
    _, order, steps = data.draw(memory_layouts(y.ndim, inputs.axis))
    dy = arrange(inputs.rng(4).standard_normal(y.shape).astype(y.dtype), order, steps)
    grads = cupybn.batch_norm_backward(dy, saved)
    assert len(grads) == (4 if with_residual else 3)
    g = dy if activation is None else arrange(np.where(y <= 0, np.zeros((), dy.dtype), dy), order, steps)
    # The NumPy backend's sums take strided and contiguous blocks in different orders,
    # and the gate's output is contiguous: the same bits where dy's (outer, C, inner)
    # view is contiguous too.
    # Otherwise equal to the rounding of sums in another order: each term's, at most.
    exact = saved.layout.to3d(dy).flags.c_contiguous or activation is None
    plain = cupybn.batch_norm_backward(g, saved_bn)
    if exact:
        for a, b in zip(grads[:3], plain, strict=True):
            assert (a is None and b is None) or same_bits(a, b), inputs
    else:
        ref = reference_forward(inputs.x, inputs.gamma, inputs.beta, axis=inputs.axis, eps=inputs.eps,
                                training=training, running_mean=running[0], running_var=running[1])
        magnitudes = gradient_magnitudes(g, ref, inputs.gamma, axis=inputs.axis)
        assert gradients_close(grads[:3], plain, magnitudes, tolerance(inputs.x.dtype)), inputs
    if with_residual:
        dz = grads[3]
        assert dz is dy if activation is None else same_bits(dz, g)


KINK_MARGIN = 1e-3
SMALL_FLOAT64 = dict(dtype_names=("float64",), max_size=40, max_offset=10.0, scale_range=(0.1, 10.0))


@pytest.mark.parametrize("with_residual,activation", EPILOGUES, ids=["residual", "residual-relu", "relu"])
@given(inputs=batch_norm_inputs(**SMALL_FLOAT64), training=st.booleans(), data=st.data())
def test_gradients_match_finite_differences_of_the_fused_function(numpy_routes, with_residual, activation, inputs,
                                                                  training, data):
    x, gamma, beta, axis, eps = inputs.x, inputs.gamma, inputs.beta, inputs.axis, inputs.eps
    running = running_stats(inputs)
    relu = activation == "relu"
    y_bn, _, _ = call(inputs, numpy_routes, training, running)
    z = residual_like(inputs, data) if with_residual else np.zeros(x.shape)
    # Keep every pre-activation value away from ReLU's kink, where differences are
    # not derivatives (a step of h moves y by about 1e-4 at most).
    pre = y_bn + z
    z = z + np.where(np.abs(pre) < KINK_MARGIN, 10 * KINK_MARGIN - pre, 0.0)
    if not with_residual:  # no residual to move the kink: only examples clear of it count
        if relu and np.any(np.abs(y_bn) < KINK_MARGIN):
            return
        z = None
    w = inputs.rng(1).standard_normal(x.shape)

    def loss(x_, gamma_, beta_, z_):
        rm, rv = (a.copy() for a in running)
        y, _ = cupybn.batch_norm(x_, gamma_, beta_, running_mean=rm, running_var=rv, training=training, axis=axis,
                                 eps=eps, residual=z_, activation=activation, backend=numpy_routes)
        return float(np.sum(w * y))

    rm, rv = (a.copy() for a in running)
    _, saved = cupybn.batch_norm(x, gamma, beta, running_mean=rm, running_var=rv, training=training, axis=axis,
                                 eps=eps, residual=z, activation=activation, backend=numpy_routes)
    grads = cupybn.batch_norm_backward(w, saved)
    # y varies on the scale of each channel's sqrt(var + eps) (test_gradients.py)
    ref = reference_forward(x, gamma, beta, axis=axis, eps=eps, training=training, running_mean=running[0],
                            running_var=running[1])
    h = 1e-5 * float(np.min(1.0 / ref.inv_std))
    checks = [("dx", grads[0], central_difference(lambda a: loss(a, gamma, beta, z), x, h))]
    if gamma is not None:
        checks.append(("dgamma", grads[1], central_difference(lambda a: loss(x, a, beta, z), gamma, 1e-5)))
    if beta is not None:
        checks.append(("dbeta", grads[2], central_difference(lambda a: loss(x, gamma, a, z), beta, 1e-5)))
    if z is not None:
        checks.append(("dz", grads[3], central_difference(lambda a: loss(x, gamma, beta, a), z, 1e-5)))
    for name, got, fd in checks:
        scale = max(float(np.linalg.norm(fd)), float(np.linalg.norm(w)))
        assert np.linalg.norm(got - fd) <= FD_BAR * scale * 10, (name, inputs)


# float32 and float64: there y_bn is BN's value in the arithmetic dtype, so y_bn - y_bn is exactly 0
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("training", [True, False], ids=["training", "inference"])
def test_where_y_is_zero_the_gradient_is_zero(backend, dtype, training):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((6, 3, 5)).astype(dtype)
    running = dict(running_mean=np.zeros(3, dtype), running_var=np.ones(3, dtype))
    y_bn, _ = cupybn.batch_norm(x, backend=backend, training=training, **running)
    y, saved = cupybn.batch_norm(x, residual=-y_bn, activation="relu", backend=backend, training=training,
                                 **running)
    assert np.all(y == 0) and not np.any(np.signbit(y))
    dx, _, _, dz = cupybn.batch_norm_backward(rng.standard_normal(x.shape).astype(dtype), saved)
    assert np.all(dz == 0) and np.all(dx == 0)


def test_relu_maps_negative_zero_to_positive_zero():
    a = np.array([-0.0, 0.0, -1.0, np.nan, 2.0], np.float32)
    relu_in_place(a)
    assert np.array_equal(a, [0, 0, 0, np.nan, 2], equal_nan=True) and not np.any(np.signbit(a[:3]))


def test_relu_keeps_nan_and_lets_its_gradient_through(backend):
    x = np.arange(24, dtype=np.float32).reshape(4, 3, 2)
    z = np.zeros_like(x)
    z[1, 2, 1] = np.nan
    y, saved = cupybn.batch_norm(x, residual=z, activation="relu", backend=backend, training=False,
                                 running_mean=np.zeros(3, np.float32), running_var=np.ones(3, np.float32))
    assert np.isnan(y[1, 2, 1]) and np.isnan(y).sum() == 1
    dy = np.ones_like(x)
    dx, _, _, dz = cupybn.batch_norm_backward(dy, saved)
    assert dz[1, 2, 1] == 1 and np.array_equal(dz, (~(y <= 0)).astype(np.float32))


# ---- bad input --------------------------------------------------------------------
def _arrays():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, 3, 5)).astype(np.float32)
    return x, np.zeros(3, np.float32), np.ones(3, np.float32)


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(activation="gelu"), ValueError, "activation must be None or 'relu'"),
    (dict(activation=True), TypeError, "activation must be None or 'relu'"),
    (dict(residual=np.zeros((4, 3), np.float32)), ValueError, r"residual must have the shape of x"),
    (dict(residual=np.zeros((4, 3, 5), np.float64)), TypeError, "residual must have the dtype of x"),
    (dict(residual=[[0.0]]), TypeError, "residual must be a NumPy or CuPy array"),
    (dict(residual=np.ma.zeros((4, 3, 5), np.float32)), TypeError, "residual must be an ndarray"),
])
def test_a_bad_epilogue_argument_raises_before_anything_changes(kwargs, error, match):
    x, rm, rv = _arrays()
    with pytest.raises(error, match=match):
        cupybn.batch_norm(x, running_mean=rm, running_var=rv, **kwargs)
    assert np.all(rm == 0) and np.all(rv == 1)


def test_y_changed_in_place_after_a_relu_forward_is_refused_in_backward():
    x, _, _ = _arrays()
    y, saved = cupybn.batch_norm(x, activation="relu")
    y[...] = 1.0
    with pytest.raises(RuntimeError, match="y was changed in place"):
        cupybn.batch_norm_backward(np.ones_like(x), saved)


# ---- the NumPy backend's blocks and compiled kernels, at sizes Hypothesis does not draw ----
@pytest.mark.parametrize("shape,axis", [((2, 3, 2500), 1), ((3000, 70), 1), ((20, 9, 9, 40), -1)],
                         ids=["planar-chunks", "rows-chunks", "channels-last"])
@pytest.mark.parametrize("threads", [1, 2])
def test_large_arrays_in_blocks_and_chunks_keep_the_composition(shape, axis, threads, tiny_blocks):
    rng = np.random.default_rng(1)
    x = rng.standard_normal(shape).astype(np.float32) + 2
    z = np.asfortranarray(rng.standard_normal(shape).astype(np.float32))  # another layout than x's
    dy = rng.standard_normal(shape).astype(np.float32)
    # The blocked route sums a strided block of dy and the gate's contiguous copy of
    # one in different orders (BLAS): equal but for that order.  The compiled kernels
    # read both alike: the same bits.
    for be, equal in ((cupybn.NumpyBackend(threads=threads), same_bits),
                      (cupybn.NumpyBackend(threads=threads, compiled_values=0, small_values=0, tiny_values=0), close)):
        with tiny_blocks():
            y_bn, saved_bn = cupybn.batch_norm(x, axis=axis, backend=be)
            y, saved = cupybn.batch_norm(x, axis=axis, residual=z, activation="relu", backend=be)
            assert same_bits(y, composition(y_bn, z, True))
            g = np.where(y <= 0, np.float32(0), dy)
            dx, dgamma, dbeta, dz = cupybn.batch_norm_backward(dy, saved)
            assert same_bits(dz, g)
            for fused, plain in zip((dx, dgamma, dbeta), cupybn.batch_norm_backward(g, saved_bn), strict=True):
                assert fused is None and plain is None or equal(fused, plain)


# ---- the layer ----------------------------------------------------------------------
def test_a_layer_with_relu_and_a_residual_is_batch_norm_with_them(backend):
    rng = np.random.default_rng(2)
    x = rng.standard_normal((8, 4, 6)).astype(np.float32)
    z = rng.standard_normal(x.shape).astype(np.float32)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    layer = cupybn.BatchNorm(4, activation="relu", backend=backend)
    rm, rv = np.zeros(4, np.float32), np.ones(4, np.float32)
    y_fn, saved = cupybn.batch_norm(x, np.ones(4, np.float32), np.zeros(4, np.float32), running_mean=rm,
                                    running_var=rv, residual=z, activation="relu", backend=backend)
    dx_fn, dgamma_fn, _, dz_fn = cupybn.batch_norm_backward(dy, saved)
    assert same_bits(layer(x, residual=z), y_fn)
    dx, dz = layer.backward(dy)
    assert same_bits(dx, dx_fn) and same_bits(dz, dz_fn) and same_bits(layer.grad_gamma, dgamma_fn)
    assert same_bits(layer.running_mean, rm) and same_bits(layer.running_var, rv)
    assert same_bits(layer(x), cupybn.batch_norm(x, activation="relu", running_mean=rm, running_var=rv,
                                                 backend=backend)[0])
    assert not isinstance(layer.backward(dy), tuple)  # no residual in the last call: dx alone


def test_a_layers_activation_is_checked_and_kept_by_checkpoints():
    import pickle  # noqa: PLC0415

    with pytest.raises(ValueError, match="activation must be None or 'relu'"):
        cupybn.BatchNorm(3, activation="tanh")
    layer = pickle.loads(pickle.dumps(cupybn.BatchNorm(3, activation="relu")))
    assert layer.activation == "relu" and "activation='relu'" in repr(layer)
    with pytest.raises(ValueError, match="applies activation='relu' after BN, which no weight can hold"):
        layer.fold(np.eye(3, dtype=np.float32))
    old = cupybn.BatchNorm(3)
    del old.__dict__["activation"]  # a layer pickled before the setting existed
    assert pickle.loads(pickle.dumps(old)).activation is None


# ---- synchronised calls -----------------------------------------------------------------
@pytest.mark.parametrize("with_residual,activation", EPILOGUES, ids=["residual", "residual-relu", "relu"])
def test_a_synchronised_call_with_an_epilogue_is_the_synchronised_composition(backend, with_residual, activation):
    from cupybn.distributed import ThreadWorld  # noqa: PLC0415

    rng = np.random.default_rng(3)
    x = rng.standard_normal((10, 3, 7)).astype(np.float32) + 1
    z = rng.standard_normal(x.shape).astype(np.float32) if with_residual else None
    dy = rng.standard_normal(x.shape).astype(np.float32)
    cuts = [0, 0, 3, 10]  # an empty shard too

    def rank(comm):
        part = slice(cuts[comm.rank], cuts[comm.rank + 1])
        xs, dys, zs = x[part], dy[part], None if z is None else z[part]
        rms = [(np.zeros(3, np.float32), np.ones(3, np.float32)) for _ in range(2)]
        y, saved = cupybn.batch_norm(xs, running_mean=rms[0][0], running_var=rms[0][1], residual=zs,
                                     activation=activation, backend=backend, comm=comm)
        y_bn, saved_bn = cupybn.batch_norm(xs, running_mean=rms[1][0], running_var=rms[1][1], backend=backend,
                                           comm=comm)
        grads = cupybn.batch_norm_backward(dys, saved)
        g = dys if activation is None else np.where(y <= 0, np.float32(0), dys)
        plain = cupybn.batch_norm_backward(g, saved_bn)
        return y, composition(y_bn, zs, activation == "relu"), grads, plain, g, rms

    for y, expected, grads, plain, g, rms in ThreadWorld(3, timeout=60).run(rank):
        assert same_bits(y, expected) and same_bits(grads[0], plain[0]) and same_bits(rms[0][0], rms[1][0])
        assert len(grads) == 3 + with_residual and (not with_residual or same_bits(grads[3], g))
