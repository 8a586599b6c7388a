"""Host ElementwiseKernel and ReductionKernel: CuPy's semantics, checked against NumPy.

Every distinct generated source costs one g++ compile (about a second, cached on
disk afterwards), so the kernels below are module-level and reused: Hypothesis
varies shapes, layouts and axes, which changes at most the number of dimensions
in the source, never the types.
"""
from __future__ import annotations

import shutil

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cupybn.testing import hostcuda
from cupybn.testing.hostcuda import _cupy_kernels as ck
from cupybn.testing.hostcuda._cupy_kernels import ElementwiseKernel, ReductionKernel

needs_compiler = pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++")

# Hypothesis runs of compiled kernels: the first example may compile, so no deadline.
compiled_settings = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# ---------------------------------------------------------------------------
# Strategies: shapes, layouts and values
# ---------------------------------------------------------------------------

def _values(shape, dtype, seed):
    """Small integers, exact in every float dtype, so that sums compare exactly."""
    return np.random.default_rng(seed).integers(-8, 9, size=shape).astype(dtype)


@st.composite
def strided_views(draw, shape, dtype=np.float32):
    """An array of ``shape`` whose memory layout is drawn: C order, transposed, stepped or reversed."""
    seed = draw(st.integers(0, 2**32 - 1))
    steps = [draw(st.sampled_from([1, 2, -1])) for _ in shape]
    order = draw(st.permutations(range(len(shape)))) if shape else []
    base_shape = [n * abs(s) for n, s in zip(shape, steps, strict=True)]
    base = _values([base_shape[ax] for ax in order], dtype, seed)
    if not shape:
        return base
    view = base.transpose(np.argsort(order))[tuple(slice(None, None, s) for s in steps)]
    assert view.shape == tuple(shape)
    return view


shapes = st.lists(st.integers(1, 5), min_size=0, max_size=3).map(tuple)


@st.composite
def broadcastable_pairs(draw):
    """Two shapes that broadcast together: the second drops leading axes and sets some to 1."""
    full = draw(st.lists(st.integers(1, 4), min_size=1, max_size=3))
    cut = draw(st.integers(0, len(full)))
    other = [1 if draw(st.booleans()) else n for n in full[cut:]]
    pair = (tuple(full), tuple(other))
    return pair if draw(st.booleans()) else pair[::-1]


# ---------------------------------------------------------------------------
# Parsing, type binding and index collapsing (no compiler needed)
# ---------------------------------------------------------------------------

def test_parse_params_reads_placeholders_dtype_names_and_keywords():
    x, y, z, w = ck.parse_params("T x, raw T y, float32 z, _non_const int64 w", True)
    assert (x.name, x.ctype, x.dtype, x.raw, x.is_const) == ("x", "T", None, False, True)
    assert (y.raw, y.ctype) == (True, "T")
    assert (z.ctype, z.dtype) == ("float", np.dtype(np.float32))
    assert (w.ctype, w.is_const) == ("long long", False)
    assert ck.parse_params("", False) == ()


def test_parse_params_uses_numpy_dtype_names_so_float_means_double():
    (p,) = ck.parse_params("float x", True)
    assert p.dtype == np.float64 and p.ctype == "double"


@pytest.mark.parametrize("text", ["x", "T x,", "const T x", "T"])
def test_parse_params_rejects_malformed_parameters(text):
    with pytest.raises(ValueError):
        ck.parse_params(text, True)


def test_parse_params_rejects_complex_dtypes():
    with pytest.raises(TypeError, match="complex"):
        ck.parse_params("complex64 x", True)


def test_kernel_name_must_be_a_c_identifier():
    with pytest.raises(ValueError, match="Invalid kernel name"):
        ElementwiseKernel("T x", "T y", "y = x", name="not a name")
    with pytest.raises(ValueError, match="Invalid kernel name"):
        ReductionKernel("T x", "T y", "x", "a + b", "y = a", "0", name="1sum")


def test_i_is_not_a_valid_parameter_name():
    with pytest.raises(ValueError, match="'i'"):
        ElementwiseKernel("T i", "T y", "y = i")


def test_bind_types_lets_outputs_bind_placeholders_before_inputs():
    ins = ck.parse_params("T x, T s", True)
    outs = ck.parse_params("T y", False)
    f64 = np.dtype(np.float64)
    in_types, out_types, type_map = ck.bind_types(ins, outs, [None, None], [f64])
    assert in_types == (f64, f64) and out_types == (f64,) and type_map == (("T", f64),)


def test_bind_types_rejects_arrays_that_disagree_on_a_placeholder():
    ins = ck.parse_params("T x, T y", True)
    with pytest.raises(TypeError, match="Type is mismatched"):
        ck.bind_types(ins, (), [np.dtype(np.float32), np.dtype(np.float64)], None)


def test_bind_types_rejects_an_array_of_the_wrong_concrete_dtype():
    ins = ck.parse_params("float32 x", True)
    with pytest.raises(TypeError, match="Type is mismatched"):
        ck.bind_types(ins, (), [np.dtype(np.float64)], None)


def test_bind_types_rejects_a_placeholder_that_no_array_binds():
    ins = ck.parse_params("T x", True)
    outs = ck.parse_params("T y", False)
    with pytest.raises(TypeError, match="no array argument binds it"):
        ck.bind_types(ins, outs, [None], None)


def _byte_offsets(shape, strides):
    """Byte offset of every element, in C order of ``shape``."""
    if not shape:
        return [0]
    grids = np.indices(shape).reshape(len(shape), -1)
    return list(np.asarray(strides) @ grids)


@given(st.data())
def test_collapse_dims_keeps_the_element_at_every_linear_index(data):
    shape = data.draw(shapes)
    views = [data.draw(strided_views(shape)) for _ in range(data.draw(st.integers(1, 3)))]
    new_shape, new_strides = ck.collapse_dims(shape, [v.strides for v in views])
    assert int(np.prod(new_shape)) == int(np.prod(shape))
    assert len(new_shape) <= max(len(shape), 1)
    for view, strides in zip(views, new_strides, strict=True):
        assert _byte_offsets(new_shape, strides) == _byte_offsets(shape, view.strides)


def test_collapse_dims_merges_a_c_contiguous_array_into_one_axis():
    a = np.empty((2, 3, 4), np.float32)
    assert ck.collapse_dims(a.shape, [a.strides]) == ((24,), [(4,)])


def test_collapse_dims_keeps_a_broadcast_axis_apart():
    a = np.broadcast_to(np.empty(4, np.float32), (3, 4))
    assert ck.collapse_dims(a.shape, [a.strides]) == ((3, 4), [(0, 4)])


# ---------------------------------------------------------------------------
# Elementwise kernels
# ---------------------------------------------------------------------------

axpy = ElementwiseKernel("T x, T y", "T z", "z = x + y * T(2)", "axpy")


@needs_compiler
@compiled_settings
@given(st.data())
def test_elementwise_broadcasts_non_contiguous_inputs_like_numpy(data):
    shape_x, shape_y = data.draw(broadcastable_pairs())
    x = data.draw(strided_views(shape_x))
    y = data.draw(strided_views(shape_y))
    z = axpy(x, y)
    assert z.dtype == np.float32 and z.flags.c_contiguous
    np.testing.assert_array_equal(z, x + y * np.float32(2))  # float32 as the kernel, under NumPy 1 and 2


@needs_compiler
def test_elementwise_writes_into_a_given_non_contiguous_output():
    x = _values((3, 4), np.float32, 1)
    y = _values((4,), np.float32, 2)
    out = np.zeros((4, 6), np.float32).T[::2]  # (3, 4) view of a bigger buffer, strided both ways
    result = axpy(x, y, out)
    assert result is out
    np.testing.assert_array_equal(out, x + y * 2)
    assert np.count_nonzero(out.base) == np.count_nonzero(x + y * 2)  # nothing written outside the view


@needs_compiler
def test_elementwise_keeps_shapes_when_reduce_dims_is_false():
    # The loop over a 3-d shape, uncollapsed, must still visit every element once.
    k = ElementwiseKernel("T x, T y", "T z", "z = x + y * T(2)", "axpy", reduce_dims=False)
    x = _values((2, 3, 4), np.float32, 3)
    np.testing.assert_array_equal(k(x, x), x * 3)


@needs_compiler
def test_elementwise_casts_python_scalars_to_the_bound_type():
    k = ElementwiseKernel("T x, T s, float64 d", "T z", "z = x * s + T(d)", "scale_shift")
    x = _values((5,), np.float32, 4)
    z = k(x, 0.5, 3)  # s becomes float32 like x, d a float64
    assert z.dtype == np.float32
    np.testing.assert_array_equal(z, x * np.float32(0.5) + np.float32(3))


def test_elementwise_scalar_out_of_range_of_its_type_raises():
    k = ElementwiseKernel("T x, int8 s", "T z", "z = x + s", "add_int8")
    with pytest.raises(OverflowError):
        k(np.zeros(3, np.float32), 300)


def test_elementwise_raises_when_only_scalars_decide_the_loop():
    with pytest.raises(ValueError, match="Loop size is undecided"):
        axpy(1.0, 2.0, np.float32(0))


@needs_compiler
def test_elementwise_raw_parameter_is_indexed_by_i_over_its_own_shape():
    reverse = ElementwiseKernel("raw T x", "T y", "y = x[_ind.size() - 1 - i]", "reverse")
    x = np.arange(12, dtype=np.float32).reshape(3, 4)[:, ::-1]  # raw and non-contiguous: C order of x
    y = np.empty(12, np.float32)
    reverse(x, y)
    np.testing.assert_array_equal(y, x.ravel()[::-1])


@needs_compiler
def test_elementwise_raw_parameter_takes_a_multi_index():
    transpose = ElementwiseKernel(
        "raw T x", "T y",
        "const ptrdiff_t rows = x.shape()[0]; y = x[{i % rows, i / rows}]", "transpose")
    x = _values((3, 5), np.float32, 5)
    y = np.empty((5, 3), np.float32)
    transpose(x, y)
    np.testing.assert_array_equal(y, x.T)


@needs_compiler
def test_elementwise_size_sets_the_loop_when_every_array_is_raw():
    double = ElementwiseKernel("raw T x", "raw T y", "y[i] = x[i] * T(2)", "double_raw")
    x = _values((7,), np.float64, 6)
    y = double(x, size=4)  # raw outputs are allocated with shape (size,)
    assert y.shape == (4,)
    np.testing.assert_array_equal(y, x[:4] * 2)


def test_elementwise_size_with_a_non_raw_array_raises():
    with pytest.raises(ValueError, match="'size'"):
        axpy(np.zeros(3, np.float32), np.zeros(3, np.float32), size=3)


def test_elementwise_raw_output_without_size_raises():
    k = ElementwiseKernel("T x", "raw T y", "y[i] = x", "raw_out")
    with pytest.raises(ValueError, match="Undecided"):
        k(np.zeros(3, np.float32))


@needs_compiler
def test_elementwise_returns_a_tuple_for_several_outputs_and_none_for_no_return():
    ops = dict(in_params="T x", out_params="T y, T z", operation="y = x + T(1); z = x - T(1)", name="plus_minus")
    x = _values((6,), np.float64, 7)
    y, z = ElementwiseKernel(**ops)(x)
    np.testing.assert_array_equal(y, x + 1)
    np.testing.assert_array_equal(z, x - 1)
    y2, z2 = np.empty_like(x), np.empty_like(x)
    assert ElementwiseKernel(**ops, no_return=True)(x, y2, z2) is None
    np.testing.assert_array_equal(z2, x - 1)


@needs_compiler
def test_elementwise_return_tuple_wraps_a_single_output():
    k = ElementwiseKernel("T x, T y", "T z", "z = x + y * T(2)", "axpy", return_tuple=True)
    x = np.ones(3, np.float32)
    (z,) = k(x, x)
    np.testing.assert_array_equal(z, 3 * x)


@needs_compiler
def test_elementwise_preamble_and_loop_prep_see_the_placeholder_typedefs():
    k = ElementwiseKernel(
        "T x", "T y", "y = twice(x) + offset", "twice_plus",
        preamble="__device__ T twice(T v) { return v + v; }",
        loop_prep="const T offset = T(3)", after_loop="(void)offset")
    x = _values((9,), np.int32, 8)
    np.testing.assert_array_equal(k(x), 2 * x + 3)


@needs_compiler
def test_elementwise_runs_float16_arrays_and_scalars():
    k = ElementwiseKernel("T x, T s", "T y, float32 w", "w = float(x) * s; y = T(w)", "half_scale")
    x = np.array([0.1, -2.5, 1000, 2045], np.float16)
    y, w = k(x, 3)  # s becomes float16(3), y rounds the float product once (6135 to 6136)
    assert y.dtype == np.float16
    np.testing.assert_array_equal(w, x.astype(np.float32) * 3)
    np.testing.assert_array_equal(y, (x.astype(np.float32) * 3).astype(np.float16))


@needs_compiler
def test_elementwise_float16_values_compute_in_float_like_cupy():
    # (1 + 2**-10)**2 needs 21 significant bits: exact in float, rounded in half.
    square = ElementwiseKernel("T x", "float32 y, T z, T low", "y = x * x; z = x * x; low = min(x, T(-x))",
                               "half_square")
    x = np.array([1 + 2**-10, -3.5, 0.1], np.float16)
    y, z, low = square(x)
    exact = x.astype(np.float32) ** 2
    np.testing.assert_array_equal(y, exact)
    np.testing.assert_array_equal(z, exact.astype(np.float16))
    assert y[0] != np.float32(z[0])
    np.testing.assert_array_equal(low, -abs(x))


@needs_compiler
def test_elementwise_handles_bool_outputs_and_zero_dimensional_arrays():
    k = ElementwiseKernel("T x", "bool y", "y = x > T(0)", "positive")
    np.testing.assert_array_equal(k(np.array([-1, 0, 2], np.int64)), [False, False, True])
    y = k(np.array(3.0))
    assert y.shape == () and bool(y)


@needs_compiler
@pytest.mark.parametrize("block_size", [None, 3])
def test_elementwise_visits_every_element_exactly_once(block_size):
    # More elements than threads, so each thread takes several; a revisit would add twice.
    accumulate = ElementwiseKernel("T x", "T y", "y += x", "accumulate")
    x = _values((5, 61), np.float64, 15) + 100
    y = np.zeros_like(x)
    accumulate(x, y, block_size=block_size)
    np.testing.assert_array_equal(y, x)


def test_elementwise_returns_empty_outputs_for_an_empty_loop():
    x = np.zeros((0, 3), np.float32)
    assert axpy(x, x).shape == (0, 3)


def test_elementwise_argument_count_must_be_inputs_or_inputs_and_outputs():
    with pytest.raises(TypeError, match="Wrong number of arguments"):
        axpy(np.zeros(3, np.float32))


def test_elementwise_rejects_mismatched_array_types():
    with pytest.raises(TypeError, match="Type is mismatched"):
        axpy(np.zeros(3, np.float32), np.zeros(3, np.float64))


def test_elementwise_rejects_an_output_of_another_type():
    x = np.zeros(3, np.float32)
    with pytest.raises(TypeError, match="Type is mismatched"):
        axpy(x, x, np.zeros(3, np.float64))


def test_elementwise_rejects_an_output_of_another_shape():
    x = np.zeros((2, 3), np.float32)
    with pytest.raises(ValueError, match="Out shape is mismatched"):
        axpy(x, x, np.zeros((1, 3), np.float32))


def test_elementwise_rejects_a_read_only_output():
    x = np.zeros(3, np.float32)
    out = np.zeros(3, np.float32)
    out.flags.writeable = False
    with pytest.raises(ValueError, match="read-only"):
        axpy(x, x, out)


def test_elementwise_rejects_shapes_that_do_not_broadcast():
    with pytest.raises(ValueError, match="broadcast"):
        axpy(np.zeros(3, np.float32), np.zeros(4, np.float32))


@pytest.mark.parametrize("bad", [np.zeros(3, np.complex64), [1.0, 2.0], 1j])
def test_elementwise_rejects_unsupported_arguments(bad):
    with pytest.raises(TypeError):
        axpy(bad, np.zeros(3, np.float32))


def test_elementwise_block_size_must_be_positive():
    x = np.zeros(3, np.float32)
    with pytest.raises(ValueError, match="block_size"):
        axpy(x, x, block_size=0)


# ---------------------------------------------------------------------------
# Reduction kernels
# ---------------------------------------------------------------------------

rsum = ReductionKernel("T x", "T y", "x", "a + b", "y = a", "0", "rsum")


@st.composite
def axis_arguments(draw, ndim):
    """None, an int (maybe negative) or a tuple of distinct axes (maybe negative)."""
    if ndim == 0 or draw(st.booleans()):
        return None
    axes = draw(st.lists(st.integers(0, ndim - 1), min_size=1, max_size=ndim, unique=True))
    axes = [ax - ndim if draw(st.booleans()) else ax for ax in axes]
    return axes[0] if len(axes) == 1 and draw(st.booleans()) else tuple(axes)


@needs_compiler
@compiled_settings
@given(st.data())
def test_reduction_sums_like_numpy_over_any_axes_and_layout(data):
    x = data.draw(strided_views(data.draw(shapes), np.float64))
    axis = data.draw(axis_arguments(x.ndim))
    keepdims = data.draw(st.booleans())
    y = rsum(x, axis=axis, keepdims=keepdims)
    expected = np.sum(x, axis=axis, keepdims=keepdims)
    assert y.shape == expected.shape and y.dtype == np.float64
    np.testing.assert_array_equal(y, expected)


@needs_compiler
@pytest.mark.parametrize("axis", [None, 1, (0, 2)])
def test_reduction_mean_and_max_follow_numpy(axis):
    x = _values((4, 6, 10), np.float64, 20)[:, ::-2, ::2] - 10  # all negative: max must not be 0
    mean = ReductionKernel("T x", "T y", "x", "a + b", "y = a / (_in_ind.size() / _out_ind.size())", "0", "rmean")
    amax = ReductionKernel("T x", "T y", "x", "(a > b ? a : b)", "y = a", "-INFINITY", "rmax")
    np.testing.assert_allclose(mean(x, axis=axis), np.mean(x, axis=axis), rtol=1e-15)
    np.testing.assert_array_equal(amax(x, axis=axis), np.max(x, axis=axis))


@needs_compiler
def test_reduction_covers_more_outputs_than_threads():
    x = _values((3, 2 * ck.MAX_THREADS + 5), np.float64, 16)
    np.testing.assert_array_equal(rsum(x, axis=0), x.sum(axis=0))


@needs_compiler
def test_reduction_broadcasts_its_inputs_and_takes_scalars():
    weighted = ReductionKernel("T x, T w, T scale", "T y", "x * w * scale", "a + b", "y = a", "0", "weighted_sum")
    x = _values((3, 4), np.float64, 9)
    w = _values((4,), np.float64, 10)
    np.testing.assert_array_equal(weighted(x, w, 2, axis=0), np.sum(x * w * 2, axis=0))
    np.testing.assert_array_equal(weighted(x, w, 0.5, axis=1), np.sum(x * w * 0.5, axis=1))


@needs_compiler
def test_reduction_writes_into_out_with_keepdims():
    x = _values((3, 4), np.float64, 11)
    out = np.full((6, 2), np.nan)[::2, :1]  # (3, 1), strided
    assert rsum(x, out=out, axis=1, keepdims=True) is out
    np.testing.assert_array_equal(out, np.sum(x, axis=1, keepdims=True))


@needs_compiler
def test_reduction_accumulates_in_a_wider_reduce_type():
    ones = np.ones(4096, np.float16)
    narrow = ReductionKernel("T x", "T y", "x", "a + b", "y = a", "0", "half_sum")
    wide = ReductionKernel("T x", "T y", "x", "a + b", "y = T(a)", "0", "half_sum_wide", reduce_type="float")
    assert float(narrow(ones)) == 2048  # float16 stops counting at 2048 (2048 + 1 rounds back down)
    assert float(wide(ones)) == 4096


@needs_compiler
def test_reduction_fills_every_output_but_returns_the_first():
    both = ReductionKernel("T x", "T total, T squared", "x", "a + b", "total = a, squared = a * a", "0", "sum_sq")
    x = _values((5, 3), np.float64, 12)
    total, squared = np.empty(3), np.empty(3)
    assert both(x, total, squared, axis=0) is total
    np.testing.assert_array_equal(total, x.sum(axis=0))
    np.testing.assert_array_equal(squared, x.sum(axis=0) ** 2)
    np.testing.assert_array_equal(both(x, axis=0), x.sum(axis=0))


@needs_compiler
def test_reduction_numbers_the_reduced_elements_with_J():
    index_sum = ReductionKernel("T x", "int64 y", "_J", "a + b", "y = a", "0", "index_sum")
    x = np.zeros((4, 6), np.float32)
    np.testing.assert_array_equal(index_sum(x, axis=1), [15] * 4)
    np.testing.assert_array_equal(index_sum(x, axis=0), [6] * 6)


@needs_compiler
def test_reduction_defines_the_raw_types_of_the_first_input_and_output():
    sizes = ReductionKernel("T x", "int64 y", "sizeof(type_in0_raw)", "a + b",
                            "y = a * 100 + sizeof(type_out0_raw)", "0", "raw_sizes")
    assert int(sizes(np.zeros(5, np.float16))) == 5 * 2 * 100 + 8


@needs_compiler
def test_reduction_of_empty_input_gives_the_identity():
    rprod = ReductionKernel("T x", "T y", "x", "a * b", "y = a", "1", "rprod")
    np.testing.assert_array_equal(rprod(np.zeros((0, 3)), axis=0), np.ones(3))
    x = _values((2, 3), np.float64, 21)
    np.testing.assert_array_equal(rprod(x, axis=0), x.prod(axis=0))


def test_reduction_of_empty_input_without_identity_raises():
    no_identity = ReductionKernel("T x", "T y", "x", "a + b", "y = a", None, "sum_no_identity")
    with pytest.raises(ValueError, match="zero-size array"):
        no_identity(np.zeros((0, 3)), axis=0)


def test_reduction_to_an_empty_output_returns_it_empty():
    assert rsum(np.zeros((0, 3)), axis=1).shape == (0,)


@pytest.mark.parametrize("axis", [2, -3, (0, 2)])
def test_reduction_rejects_axes_out_of_range(axis):
    with pytest.raises(np.exceptions.AxisError):
        rsum(np.zeros((2, 3)), axis=axis)


def test_reduction_rejects_duplicate_axes():
    with pytest.raises(ValueError, match="duplicate"):
        rsum(np.zeros((2, 3)), axis=(1, -1))


def test_reduction_rejects_out_of_the_wrong_shape_or_type():
    x = np.zeros((2, 3))
    with pytest.raises(ValueError, match="Out shape is mismatched"):
        rsum(x, out=np.zeros(2), axis=0)
    with pytest.raises(TypeError, match="Type is mismatched"):
        rsum(x, out=np.zeros(3, np.float32), axis=0)


def test_reduction_rejects_out_given_twice_or_for_several_outputs():
    x = np.zeros(3)
    with pytest.raises(ValueError, match="both"):
        rsum(x, np.zeros(()), out=np.zeros(()))
    both = ReductionKernel("T x", "T y, T z", "x", "a + b", "y = a, z = a", "0", "two_outputs")
    with pytest.raises(NotImplementedError):
        both(x, out=np.zeros(()))


def test_reduction_argument_count_must_be_inputs_or_inputs_and_outputs():
    with pytest.raises(TypeError, match="Wrong number of arguments"):
        rsum()


def test_reduction_with_raw_inputs_needs_the_reduced_axes_first():
    k = ReductionKernel("T x, raw T w", "T y", "x * w[_J]", "a + b", "y = a", "0", "raw_weighted")
    with pytest.raises(NotImplementedError, match="Illegal conditions"):
        k(np.zeros((2, 3)), np.zeros(3), axis=1)


@needs_compiler
def test_reduction_raw_inputs_are_indexed_by_the_reduced_element():
    k = ReductionKernel("T x, raw T w", "T y", "x * w[_J]", "a + b", "y = a", "0", "raw_weighted")
    x = _values((4, 3), np.float64, 13)
    w = _values((4,), np.float64, 14)
    np.testing.assert_array_equal(k(x, w, axis=0), w @ x)


# ---------------------------------------------------------------------------
# Sanitizer builds
# ---------------------------------------------------------------------------

# One AddressSanitizer build serves both tests: it reads x one element ahead of y.
shifted = ElementwiseKernel("raw T x", "T y", "y = x[i + 1]", "shifted", sanitize="address")


@needs_compiler
def test_address_sanitizer_build_runs_strided_views_clean():
    x = np.arange(18, dtype=np.float32)[::-2]  # 9 elements, walked backwards
    y = np.zeros(16, np.float32)[::2]
    shifted(x, y)
    np.testing.assert_array_equal(y, x[1:])


@needs_compiler
def test_address_sanitizer_reports_a_raw_index_past_the_end():
    with pytest.raises(hostcuda.SanitizerError, match="AddressSanitizer"):
        shifted(np.zeros(8, np.float32), np.zeros(8, np.float32))


@needs_compiler
def test_race_check_finds_no_race_in_a_reduction_and_one_in_a_shared_write():
    tsum = ReductionKernel("T x", "T y", "x", "a + b", "y = a", "0", "rsum", sanitize="race")
    x = _values((6, 5), np.float64, 19)
    np.testing.assert_array_equal(tsum(x, axis=0), x.sum(axis=0))
    last = ElementwiseKernel("T x", "raw T y", "y[0] = x", "last_wins", sanitize="race")
    with pytest.raises(hostcuda.SanitizerError, match="write-after-write race on global memory"):
        last(np.zeros(64, np.float32), np.zeros(1, np.float32))
