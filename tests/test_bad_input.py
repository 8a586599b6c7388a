"""Bad arguments raise TypeError/ValueError naming the argument, before any work.

Every case is a call that would otherwise be valid, with one argument spoiled;
the running statistics passed alongside must be bit-for-bit unchanged after
the error (nothing is written before all checks have passed).
"""
import re

import numpy as np
import pytest

import cupybn

C = 3


class ForeignArray:
    """An array from some other library: has dtype, shape and __array__, isn't NumPy's."""

    __module__ = "otherlib"

    def __init__(self, a):
        self._a = np.asarray(a)
        self.dtype, self.shape, self.ndim, self.size = self._a.dtype, self._a.shape, self._a.ndim, self._a.size
        self.strides = self._a.strides

    def __array__(self, dtype=None, copy=None):
        return self._a


def x_ok():
    return np.random.default_rng(0).standard_normal((4, C, 5)).astype(np.float32)


def params_ok():
    return np.ones(C, np.float32), np.zeros(C, np.float32)


def read_only(a):
    a = a.copy()
    a.flags.writeable = False
    return a


# (id, exception, message pattern, keyword arguments that replace the valid ones)
FORWARD_CASES = [
    ("x-int", TypeError, r"^x must have a floating dtype", dict(x=np.ones((4, C, 5), np.int32))),
    ("x-bool", TypeError, r"^x must have a floating dtype", dict(x=np.ones((4, C, 5), bool))),
    ("x-complex", TypeError, r"^x must have a floating dtype", dict(x=np.ones((4, C, 5), np.complex64))),
    ("x-list", TypeError, r"^x must be", dict(x=[[1.0, 2.0, 3.0]] * 4)),
    ("x-rank1", ValueError, r"^x must have at least 2 dimensions", dict(x=np.ones(C, np.float32))),
    ("x-empty", ValueError, r"^x must not be empty", dict(x=np.ones((0, C, 5), np.float32))),
    ("x-empty-spatial", ValueError, r"^x must not be empty", dict(x=np.ones((4, C, 0), np.float32))),
    ("x-foreign", TypeError, r"x\b", dict(x=ForeignArray(x_ok()))),
    ("axis-too-big", ValueError, r"^axis must be in \[-3, 2\]", dict(axis=3)),
    ("axis-too-negative", ValueError, r"^axis must be in", dict(axis=-4)),
    ("axis-float", TypeError, r"^axis must be an int", dict(axis=1.0)),
    ("axis-str", TypeError, r"^axis must be an int", dict(axis="c")),
    ("x-matrix", TypeError, r"^x must be an ndarray, not np.matrix", dict(x=np.asmatrix(np.ones((4, C), np.float32)),
                                                                          gamma=None, beta=None, running_mean=None,
                                                                          running_var=None)),
    ("x-masked", TypeError, r"^x must be an ndarray, not a masked array", dict(x=np.ma.masked_less(x_ok(), 0))),
    ("gamma-masked", TypeError, r"^gamma must be an ndarray, not a masked array",
     dict(gamma=np.ma.masked_equal(np.ones(C, np.float32), 1))),
    ("gamma-shape", ValueError, r"^gamma must have shape \(3,\)", dict(gamma=np.ones(C + 1, np.float32))),
    ("gamma-2d", ValueError, r"^gamma must have shape", dict(gamma=np.ones((C, 1), np.float32))),
    ("gamma-int", TypeError, r"^gamma must have a floating dtype", dict(gamma=np.ones(C, np.int64))),
    ("gamma-list", TypeError, r"^gamma must be", dict(gamma=[1.0] * C)),
    ("gamma-foreign", TypeError, r"gamma", dict(gamma=ForeignArray(np.ones(C, np.float32)))),
    ("beta-shape", ValueError, r"^beta must have shape", dict(beta=np.zeros(C - 1, np.float32))),
    ("beta-int", TypeError, r"^beta must have a floating dtype", dict(beta=np.zeros(C, np.int32))),
    ("beta-foreign", TypeError, r"beta", dict(beta=ForeignArray(np.zeros(C, np.float32)))),
    ("running_mean-shape", ValueError, r"^running_mean must have shape", dict(running_mean=np.zeros(2, np.float32))),
    ("running_mean-int", TypeError, r"^running_mean must have a floating dtype",
     dict(running_mean=np.zeros(C, np.int64))),
    ("running_mean-foreign", TypeError, r"running_mean", dict(running_mean=ForeignArray(np.zeros(C, np.float32)))),
    ("running_var-shape", ValueError, r"^running_var must have shape", dict(running_var=np.ones(C + 2, np.float32))),
    ("running_var-int", TypeError, r"^running_var must have a floating dtype", dict(running_var=np.ones(C, np.int8))),
    ("running_var-read-only", ValueError, r"^running_var must be writeable",
     dict(running_var=read_only(np.ones(C, np.float32)))),
    ("running_mean-read-only", ValueError, r"^running_mean must be writeable",
     dict(running_mean=read_only(np.zeros(C, np.float32)))),
    ("running_var-missing", ValueError, r"running_mean and running_var must be given together",
     dict(running_var=None)),
    ("eps-zero", ValueError, r"^eps must be a finite number > 0", dict(eps=0.0)),
    ("eps-negative", ValueError, r"^eps must be", dict(eps=-1e-5)),
    ("eps-nan", ValueError, r"^eps must be", dict(eps=float("nan"))),
    ("eps-inf", ValueError, r"^eps must be", dict(eps=float("inf"))),
    ("eps-str", TypeError, r"^eps must be a real number", dict(eps="1e-5")),
    ("momentum-negative", ValueError, r"^momentum must be in \[0, 1\]", dict(momentum=-0.1)),
    ("momentum-above-one", ValueError, r"^momentum must be in \[0, 1\]", dict(momentum=1.5)),
    ("momentum-nan", ValueError, r"^momentum must be", dict(momentum=float("nan"))),
    ("momentum-bool", TypeError, r"^momentum must be a real number", dict(momentum=True)),
    ("training-int", TypeError, r"^training must be a bool", dict(training=1)),
    ("one-value-per-channel", ValueError, r"at least 2 values per channel", dict(x=x_ok()[:1, :, :1])),
    ("one-value-per-channel-2d", ValueError, r"at least 2 values per channel", dict(x=np.ones((1, C), np.float32))),
    ("backend-refuses-foreign-x", TypeError, r"backend .* cannot take otherlib arrays \(x",
     dict(x=ForeignArray(x_ok()), gamma=None, beta=None, running_mean=None, running_var=None,
          backend=cupybn.NumpyBackend(threads=1))),
]


@pytest.mark.parametrize("exc, pattern, spoiled", [pytest.param(*c[1:], id=c[0]) for c in FORWARD_CASES])
def test_bad_forward_argument_raises_and_changes_nothing(exc, pattern, spoiled):
    gamma, beta = params_ok()
    running_mean = np.arange(C, dtype=np.float32)
    running_var = np.arange(1, C + 1, dtype=np.float32)
    before = running_mean.tobytes(), running_var.tobytes()
    kwargs = dict(x=x_ok(), gamma=gamma, beta=beta, running_mean=running_mean, running_var=running_var,
                  training=True, momentum=0.1, eps=1e-5, axis=1)
    kwargs.update(spoiled)
    with pytest.raises(exc, match=pattern):
        cupybn.batch_norm(kwargs.pop("x"), kwargs.pop("gamma"), kwargs.pop("beta"), **kwargs)
    assert (running_mean.tobytes(), running_var.tobytes()) == before


def test_inference_without_running_stats_raises():
    with pytest.raises(ValueError, match=r"training=False needs running_mean and running_var"):
        cupybn.batch_norm(x_ok(), training=False)


def test_read_only_running_stats_are_fine_in_inference():
    stats = read_only(np.zeros(C, np.float32)), read_only(np.ones(C, np.float32))
    cupybn.batch_norm(x_ok(), running_mean=stats[0], running_var=stats[1], training=False)


def test_one_value_per_channel_is_fine_in_inference():
    y, _ = cupybn.batch_norm(np.ones((1, C), np.float32), running_mean=np.zeros(C, np.float32),
                             running_var=np.ones(C, np.float32), training=False)
    assert y.shape == (1, C)


@pytest.fixture
def saved():
    return cupybn.batch_norm(x_ok(), *params_ok())[1]


@pytest.mark.parametrize("exc, pattern, dy", [
    pytest.param(ValueError, r"^dy must have the shape of x", np.ones((4, C, 4), np.float32), id="dy-shape"),
    pytest.param(ValueError, r"^dy must have the shape of x", np.ones((4, 5, C), np.float32), id="dy-transposed"),
    pytest.param(TypeError, r"^dy must have the dtype of x", np.ones((4, C, 5), np.float64), id="dy-dtype"),
    pytest.param(TypeError, r"^dy must have the dtype of x", np.ones((4, C, 5), np.float16), id="dy-float16"),
    pytest.param(TypeError, r"dy", ForeignArray(np.ones((4, C, 5), np.float32)), id="dy-foreign"),
    pytest.param(TypeError, r"^dy must be", [[1.0]], id="dy-list"),
    pytest.param(TypeError, r"^dy must be an ndarray, not a masked array",
                 np.ma.masked_less(np.ones((4, C, 5), np.float32), 0), id="dy-masked"),
])
def test_bad_dy_raises(saved, exc, pattern, dy):
    with pytest.raises(exc, match=pattern):
        cupybn.batch_norm_backward(dy, saved)


def test_saved_must_come_from_batch_norm():
    with pytest.raises(TypeError, match=r"^saved must be the BatchNormSaved"):
        cupybn.batch_norm_backward(np.ones((4, C, 5), np.float32), {"x": x_ok()})


@pytest.mark.parametrize("exc, pattern, kwargs", [
    pytest.param(ValueError, r"^num_features must be a positive int", dict(num_features=0), id="zero-features"),
    pytest.param(TypeError, r"^num_features must be a positive int", dict(num_features=True), id="bool-features"),
    pytest.param(TypeError, r"^num_features must be a positive int", dict(num_features=2.0), id="float-features"),
    pytest.param(TypeError, r"^axis must be an int", dict(axis="c"), id="axis-str"),
    pytest.param(TypeError, r"^axis must be an int", dict(axis=1.0), id="axis-float"),
    pytest.param(ValueError, r"^momentum must be in \[0, 1\] or None", dict(momentum=2.0), id="momentum"),
    pytest.param(ValueError, r"^eps must be a finite number > 0", dict(eps=0.0), id="eps"),
    pytest.param(TypeError, r"^dtype must be float16, bfloat16, float32 or float64", dict(dtype=np.int32), id="dtype"),
])
def test_bad_layer_arguments_raise(exc, pattern, kwargs):
    kwargs = {"num_features": C, **kwargs}
    with pytest.raises(exc, match=pattern):
        cupybn.BatchNorm(kwargs.pop("num_features"), **kwargs)


def test_layer_rejects_wrong_channel_count_and_changes_nothing():
    bn = cupybn.BatchNorm(C + 1)
    before = bn.running_mean.tobytes(), bn.running_var.tobytes()
    with pytest.raises(ValueError, match=re.escape("x has 3 channels on axis 1")):
        bn(x_ok())
    assert (bn.running_mean.tobytes(), bn.running_var.tobytes()) == before
    assert bn.num_batches_tracked == 0


def test_layer_backward_needs_a_forward_call():
    with pytest.raises(RuntimeError, match=r"backward\(\) needs a forward call first"):
        cupybn.BatchNorm(C).backward(np.ones((4, C, 5), np.float32))


def test_layer_bad_input_changes_nothing():
    bn = cupybn.BatchNorm(C)
    before = bn.running_mean.tobytes(), bn.running_var.tobytes()
    with pytest.raises(ValueError, match=r"at least 2 values per channel"):
        bn(np.ones((1, C), np.float32))
    with pytest.raises(TypeError, match=r"^x must have a floating dtype"):
        bn(np.ones((4, C), np.int64))
    assert (bn.running_mean.tobytes(), bn.running_var.tobytes()) == before
    assert bn.num_batches_tracked == 0


def test_mixed_array_libraries_name_both():
    with pytest.raises(TypeError, match=r"different libraries.*numpy: x.*otherlib: gamma"):
        cupybn.batch_norm(x_ok(), ForeignArray(np.ones(C, np.float32)))


def test_numpy_scalars_are_taken_wherever_python_numbers_are():
    x = x_ok()
    y, saved = cupybn.batch_norm(x, training=np.bool_(True), eps=np.float32(1e-5), momentum=np.float64(0.1),
                                 axis=np.int64(1))
    assert saved.training is True and y.shape == x.shape
    bn = cupybn.BatchNorm(np.int64(C), axis=np.int32(-2), eps=np.float64(1e-3), momentum=np.float32(0.5))
    assert (bn.num_features, bn.axis) == (C, -2) and type(bn.num_features) is int
    np.testing.assert_array_equal(bn(x), cupybn.batch_norm(x, eps=1e-3, axis=1)[0])


@pytest.mark.parametrize("change", [
    pytest.param(lambda x: x.__iadd__(100), id="x += 100"),
    pytest.param(lambda x: np.maximum(x, 0, out=x), id="relu in place"),
    pytest.param(lambda x: x.__setitem__((-1, -1), x[-1, -1] + 1), id="the last row and channel"),
])
@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
def test_backward_refuses_an_x_changed_in_place_since_the_forward_call(change, layout):
    x = np.random.default_rng(0).standard_normal((6, 3, 5, 4), dtype=np.float32)
    axis = 1
    if layout == "nhwc":
        x, axis = np.ascontiguousarray(x.transpose(0, 2, 3, 1)), -1
    _, saved = cupybn.batch_norm(x, axis=axis)
    dy = np.ones_like(x)
    x2 = x.copy()
    dx_before = cupybn.batch_norm_backward(dy, saved)[0]
    change(x)
    with pytest.raises(RuntimeError, match="x was changed in place after the forward call"):
        cupybn.batch_norm_backward(dy, saved)
    bn = cupybn.BatchNorm(3, axis=axis)
    bn(x2)
    change(x2)
    with pytest.raises(RuntimeError, match="x was changed in place"):
        bn.backward(dy)
    assert dx_before.shape == x.shape


def test_backward_accepts_an_x_rewritten_with_the_same_values():
    x = np.random.default_rng(0).standard_normal((6, 3), dtype=np.float32)
    x[0, 0] = np.nan
    _, saved = cupybn.batch_norm(x)
    dx = cupybn.batch_norm_backward(np.ones_like(x), saved)[0]
    x[...] = x.copy()
    np.testing.assert_array_equal(cupybn.batch_norm_backward(np.ones_like(x), saved)[0], dx)


@pytest.mark.parametrize("name", ["small_values", "tiny_values"])
@pytest.mark.parametrize("value", [-1, 1.5, True, "8"])
def test_numpy_backend_route_limits_must_be_counts(name, value):
    with pytest.raises(ValueError, match=rf"^{name} must be an int >= 0 or None, got {re.escape(repr(value))}"):
        cupybn.NumpyBackend(**{name: value})


def test_a_backend_that_is_not_one_is_named_in_the_error():
    x = np.ones((4, 3), np.float32)
    with pytest.raises(TypeError, match="backend must be a cupybn backend .* got str"):
        cupybn.batch_norm(x, backend="numpy")
