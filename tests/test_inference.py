"""Inference mode is a fixed per-channel affine map y = a_c * x + b_c.

With a_c = gamma / sqrt(running_var + eps) and b_c = beta - a_c * running_mean:
y matches the float64 reference built from the running statistics, each value
depends only on its own input (any sub-batch gives the same numbers, a batch of
one is fine), and shifting x by d shifts y by a_c * d.
"""
import numpy as np
from hypothesis import given
from hypothesis import strategies as st

import cupybn
from cupybn.testing import max_rel_error, reference_forward, tolerance
from cupybn.testing.reference import per_channel
from cupybn.testing.strategies import FLOAT_DTYPES, batch_norm_inputs


def running_stats_near_the_data(inputs, dtype=None):
    """Running statistics like those a model converges to: near the batch's own."""
    x64 = np.moveaxis(inputs.x.astype(np.float64), inputs.axis, 0).reshape(inputs.channels, -1)
    rng = inputs.rng(4)
    mean = x64.mean(axis=1) + rng.normal(0, 1, inputs.channels) * inputs.scale
    var = inputs.scale**2 * rng.uniform(0.2, 5, inputs.channels)
    dtype = inputs.param_dtype if dtype is None else dtype
    return mean.astype(dtype), var.astype(dtype)


def infer(inputs, x, stats, backend):
    y, _ = cupybn.batch_norm(x, inputs.gamma, inputs.beta, running_mean=stats[0], running_var=stats[1],
                             training=False, axis=inputs.axis, eps=inputs.eps, backend=backend)
    return y


@given(batch_norm_inputs(dtype_names=FLOAT_DTYPES, params=("both", "gamma", "beta", "none"), min_count=1),
       st.sampled_from(["parameter dtype", "float64"]))
def test_inference_matches_reference(backend, inputs, stats_dtype):
    # float64 running statistics hold a mean that the float32 compute dtype cannot:
    # its low part must still be used
    stats = running_stats_near_the_data(inputs, np.float64 if stats_dtype == "float64" else None)
    y = infer(inputs, inputs.x, stats, backend)
    ref = reference_forward(inputs.x, inputs.gamma, inputs.beta, axis=inputs.axis, eps=inputs.eps,
                            training=False, running_mean=stats[0], running_var=stats[1])
    assert y.dtype == inputs.x.dtype
    assert max_rel_error(y, ref.y) <= tolerance(inputs.x.dtype).y


@given(batch_norm_inputs(dtype_names=FLOAT_DTYPES, min_count=1), st.data())
def test_each_output_depends_only_on_its_own_input(backend, inputs, data):
    x, axis = inputs.x, inputs.axis % inputs.x.ndim
    stats = running_stats_near_the_data(inputs)
    y = infer(inputs, x, stats, backend)
    along = data.draw(st.sampled_from([a for a in range(x.ndim) if a != axis]), label="axis")
    start = data.draw(st.integers(0, x.shape[along] - 1), label="start")
    stop = data.draw(st.integers(start + 1, x.shape[along]), label="stop")
    part = tuple(slice(start, stop) if a == along else slice(None) for a in range(x.ndim))
    y_part = infer(inputs, x[part], stats, backend)
    assert max_rel_error(y_part, y[part]) <= 2 * tolerance(x.dtype).y


@given(batch_norm_inputs(dtype_names=("float32", "float64"), max_offset=1e3), st.integers(-6, 6))
def test_shifting_x_shifts_y_by_the_slope(backend, inputs, k):
    x, axis = inputs.x, inputs.axis
    stats = running_stats_near_the_data(inputs)
    # shift by a power of two times the std; the slope applies to the shift as stored
    x2 = x + x.dtype.type(2.0 ** np.round(np.log2(inputs.scale)) * 2.0**k)
    y, y2 = infer(inputs, x, stats, backend), infer(inputs, x2, stats, backend)
    slope = inputs.gamma.astype(np.float64) / np.sqrt(stats[1].astype(np.float64) + inputs.eps)
    want = per_channel(slope, x.ndim, axis) * (x2.astype(np.float64) - x.astype(np.float64))
    diff = y2.astype(np.float64) - y.astype(np.float64)
    bar = 2 * tolerance(x.dtype).y * np.maximum(1.0, np.maximum(np.abs(y), np.abs(y2)))
    assert np.all(np.abs(diff - want) <= bar)
