"""Launches per call of the CuPy backend, array-module operations included.

On a GPU every launch costs host time (about 5-10 us through CuPy) whatever its
size, so a call must be few launches: training forward <= 3 (statistics, a
second statistics pass that leaves at once unless a channel needs it, the
normalisation), inference 1, backward 2, and no per-call arithmetic on the
array module.  Counted with cupybn.testing.counting's stand-ins (every NumPy
operation that would be a kernel on CuPy is counted) for every dtype, every
contiguous layout and with or without parameters and running statistics.
A masked training forward is 5 launches, its backward 2 (strided views: 5 and 4).
"""
from __future__ import annotations

import numpy as np
import pytest

import cupybn
from cupybn.kernels import EPILOGUE_TEMPLATES
from cupybn.testing.counting import CountingNumpy, counted, counting_array, counting_backend

LAYOUTS = {  # shape, channel axis
    "nchw": ((4, 6, 5, 5), 1),
    "nchw-packs": ((4, 6, 4, 4), 1),
    "channels-last": ((4, 5, 5, 6), -1),
    "2d": ((40, 6), 1),
    "one-channel": ((3, 1, 50), 1),
}
ALLOCATIONS = {"train": 4, "infer": 2, "backward": 5}  # outputs and workspace, one array each


@pytest.fixture(scope="module")
def stand_ins():
    return counting_backend()


def arrays(shape, axis, dtype, with_params):
    rng = np.random.default_rng(0)
    channels = shape[axis]
    x = counting_array(rng.standard_normal(shape).astype(dtype) + 3)
    params = [counting_array(rng.standard_normal(channels).astype(np.float32)) if with_params else None
              for _ in range(2)]
    running = (counting_array(np.zeros(channels, np.float32)), counting_array(np.ones(channels, np.float32)))
    return x, params, running


@pytest.mark.parametrize("with_params", [True, False], ids=["params", "no-params"])
@pytest.mark.parametrize("dtype", ["float16", "float32", "float64"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_each_mode_is_at_most_its_launch_budget_with_no_array_module_arithmetic(stand_ins, layout, dtype, with_params):
    be, counts = stand_ins
    shape, axis = LAYOUTS[layout]
    x, (gamma, beta), (rm, rv) = arrays(shape, axis, dtype, with_params)
    dy = counting_array(np.ones(shape, dtype))
    cupybn.batch_norm(x, gamma, beta, running_mean=rm, running_var=rv, axis=axis, backend=be)  # tickets, plans
    with counted(counts):
        _, saved = cupybn.batch_norm(x, gamma, beta, running_mean=rm, running_var=rv, axis=axis, backend=be)
    assert counts.operations == [] and len(counts.kernels) == 3, counts
    assert [k.split("<")[0] for k in counts.kernels] == ["bn_stats_" + ("rows" if x.ndim == 2 or axis == -1
                                                                       else "planar")] * 2 + ["bn_normalize"]
    assert counts.allocations <= ALLOCATIONS["train"], counts
    with counted(counts):
        cupybn.batch_norm_backward(dy, saved)
    assert counts.operations == [] and len(counts.kernels) == 2 and counts.allocations <= ALLOCATIONS["backward"]
    with counted(counts):
        _, saved = cupybn.batch_norm(x, gamma, beta, running_mean=rm, running_var=rv, training=False, axis=axis,
                                     backend=be)
    assert counts.operations == [] and len(counts.kernels) == 1 and counts.allocations <= ALLOCATIONS["infer"]
    with counted(counts):
        cupybn.batch_norm_backward(dy, saved)
    assert counts.operations == [] and len(counts.kernels) == 2, counts


EPILOGUES = {"residual": (True, False), "relu": (False, True), "residual-relu": (True, True)}


@pytest.mark.parametrize("epilogue", list(EPILOGUES))
@pytest.mark.parametrize("dtype", ["float16", "float32", "float64"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_the_fused_epilogue_keeps_each_mode_within_its_launch_budget(stand_ins, layout, dtype, epilogue):
    # Residual add and ReLU forward, the ReLU's mask and dz backward: runtime
    # arguments of the same launches, at the backend level (the (outer, C, inner)
    # view the API hands it).  Only dz, where a ReLU makes it a new array, is
    # one more allocation.
    be, counts = stand_ins
    shape, axis = LAYOUTS[layout]
    with_residual, relu = EPILOGUES[epilogue]
    x, (gamma, beta), (rm, rv) = arrays(shape, axis, dtype, True)
    channels = shape[axis]
    x3 = x.reshape(shape[0], channels, -1) if axis == 1 else x.reshape(-1, channels, 1)
    family = "bn_stats_" + ("rows" if x3.shape[2] == 1 else "planar")
    residual = counting_array(np.full(x3.shape, -3, dtype)) if with_residual else None
    dy3 = counting_array(np.ones(x3.shape, dtype))
    epilogue_args = {"residual": residual, "relu": relu}
    be.forward_train(x3, gamma, beta, 1e-5, rm, rv, 0.1, **epilogue_args)  # tickets, plans
    with counted(counts):
        y3, *saved = be.forward_train(x3, gamma, beta, 1e-5, rm, rv, 0.1, **epilogue_args)
    assert counts.operations == [] and [k.split("<")[0] for k in counts.kernels] == [family] * 2 + ["bn_normalize"]
    assert counts.allocations <= ALLOCATIONS["train"], counts
    relu_y = y3 if relu else None
    for want_dz in (False, True):
        with counted(counts):
            grads = be.backward(dy3, x3, *saved, gamma, beta, True, relu_y=relu_y, want_dz=want_dz)
        assert len(grads) == 3 + want_dz and (not want_dz or relu or grads[3] is dy3)
        assert counts.operations == [] and len(counts.kernels) == 2, counts
        assert counts.allocations <= ALLOCATIONS["backward"] + (want_dz and relu), counts
    with counted(counts):
        y3, *saved = be.forward_infer(x3, gamma, beta, rm, rv, 1e-5, **epilogue_args)
    assert counts.operations == [] and [k.split("<")[0] for k in counts.kernels] == ["bn_normalize_running"]
    assert counts.allocations <= ALLOCATIONS["infer"], counts
    with counted(counts):
        be.backward(dy3, x3, *saved, gamma, beta, False, relu_y=y3 if relu else None, want_dz=True)
    assert counts.operations == [] and len(counts.kernels) == 2, counts
    assert counts.allocations <= ALLOCATIONS["backward"] + relu, counts


MASKED_FORWARD = ["cupybn_masked_shifted_mean", "cupybn_masked_shifted_mean", "cupybn_masked_squared_deviations",
                  "bn_stats_channelwise"]


@pytest.mark.parametrize("strided", [False, True], ids=["contiguous", "strided"])
@pytest.mark.parametrize("epilogue", [False, True], ids=["plain", "residual-relu"])
@pytest.mark.parametrize("dtype", ["float16", "float32", "float64"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_masked_calls_launch_the_masked_reductions_and_keep_the_fast_gradient_sums(stand_ins, layout, dtype,
                                                                                   epilogue, strided):
    # A masked forward takes its statistics from three double reductions over
    # the selected positions (a first mean, its correction, the squared
    # deviations), finishes them per channel and normalises with the call's
    # usual elementwise kernel: 5 launches.  Backward keeps the gradient sums
    # over every position (the fast reduction) and forms dx with the mask: 2.
    # Strided views take the general path's kernels: 5 and 4.  No array-module
    # arithmetic either way (api.py counts the mask; the backend takes the count).
    be, counts = stand_ins
    shape, axis = LAYOUTS[layout]
    x, (gamma, beta), (rm, rv) = arrays(shape, axis, dtype, True)
    channels = shape[axis]
    x3 = x.reshape(shape[0], channels, -1) if axis == 1 else x.reshape(-1, channels, 1)
    if strided:
        x3 = counting_array(np.repeat(np.asarray(x3), 2, axis=0))[::2]
    family = "rows" if x3.shape[2] == 1 else "planar"
    mask = np.random.default_rng(1).random((x3.shape[0], 1, x3.shape[2])) < 0.6
    mask.reshape(-1)[:2] = True
    mask, count = counting_array(mask), int(np.count_nonzero(mask))
    extra = {"residual": counting_array(np.full(x3.shape, -3, dtype)), "relu": True} if epilogue else {}
    dy3 = counting_array(np.ones(x3.shape, dtype))
    be.forward_train(x3, gamma, beta, 1e-5, rm, rv, 0.1, **extra, mask=mask, count=count)  # tickets, plans
    with counted(counts):
        y3, *saved = be.forward_train(x3, gamma, beta, 1e-5, rm, rv, 0.1, **extra, mask=mask, count=count)
    suffix = "_epilogue" if epilogue else ""  # the general path's kernels with the epilogue's inputs
    normalize = "cupybn_affine" + suffix if strided else "bn_normalize"
    assert counts.operations == [] and [k.split("<")[0] for k in counts.kernels] == MASKED_FORWARD + [normalize]
    assert counts.allocations <= ALLOCATIONS["train"], counts
    backward_args = dict(relu_y=y3 if epilogue else None, want_dz=epilogue, mask=mask, count=count)
    be.backward(dy3, x3, *saved, gamma, beta, True, **backward_args)  # tickets, plans
    with counted(counts):
        grads = be.backward(dy3, x3, *saved, gamma, beta, True, **backward_args)
    assert len(grads) == 3 + epilogue
    sums = ([f"cupybn_sum{suffix}", f"cupybn_centred_product_sum{suffix}", "bn_grad_channelwise"] if strided
            else [f"bn_grad_{family}"])
    assert counts.operations == [] and [k.split("<")[0] for k in counts.kernels] == sums + [
        f"cupybn_masked_backward{suffix}"]
    assert counts.allocations <= ALLOCATIONS["backward"] + epilogue, counts


def test_the_counts_see_array_module_operations_and_method_calls(stand_ins):
    # The stand-ins would catch a per-channel cast or a host-side mean creeping back.
    _, counts = stand_ins
    xp = CountingNumpy(counts)
    a = counting_array(np.ones(4, np.float32))
    with counted(counts):
        xp.asarray(a, np.float64)
        a.astype(np.float64)
        a * 2
        xp.empty(3)
        xp.reshape(a, (2, 2))  # a view: free
    assert counts.operations == ["xp.asarray", "ndarray.astype", "ufunc multiply"] and counts.allocations == 1


def test_the_counted_calls_compute_what_plain_calls_do(stand_ins):
    be, _ = stand_ins
    x, (gamma, beta), (rm, rv) = arrays((6, 3, 4, 4), 1, "float32", True)
    rm2, rv2 = np.array(rm), np.array(rv)
    y, saved = cupybn.batch_norm(x, gamma, beta, running_mean=rm, running_var=rv, backend=be)
    y2, saved2 = cupybn.batch_norm(np.array(x), np.array(gamma), np.array(beta), running_mean=rm2, running_var=rv2)
    np.testing.assert_allclose(y, y2, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(rm, rm2, rtol=1e-6)
    np.testing.assert_allclose(rv, rv2, rtol=1e-6)


def test_calls_without_an_epilogue_launch_the_false_variants_and_compile_no_epilogue_module():
    # The epilogue kernels are instantiated twice (kEpilogue): a call without an
    # epilogue must launch the `false` variants (the registers of the kernels
    # before the epilogue), a call with one the `true` variants, from a module of
    # their own that only such a call compiles.  Plans are per epilogue, so the
    # two kinds of call alternate freely.
    be, counts = counting_backend()
    shape, axis = LAYOUTS["nchw-packs"]
    x, (gamma, beta), (rm, rv) = arrays(shape, axis, "float32", True)
    x3 = x.reshape(shape[0], shape[1], -1)
    dy3 = counting_array(np.ones(x3.shape, np.float32))
    z3 = counting_array(np.full(x3.shape, -3, np.float32))

    def fused_kernels(**epilogue):
        with counted(counts):
            y3, *saved = be.forward_train(x3, gamma, beta, 1e-5, rm, rv, 0.1, **epilogue)
            relu_y = y3 if epilogue.get("relu") else None
            be.backward(dy3, x3, *saved, gamma, beta, True, relu_y=relu_y, want_dz=True)
            y3, *saved = be.forward_infer(x3, gamma, beta, rm, rv, 1e-5, **epilogue)
            be.backward(dy3, x3, *saved, gamma, beta, False, relu_y=y3 if relu_y is not None else None)
        return [(k.split("<")[0], k.rsplit(", ", 1)[1]) for k in counts.kernels
                if k.split("<")[0] in EPILOGUE_TEMPLATES]

    plain = ["bn_normalize", "bn_grad_planar", "bn_backward_elementwise", "bn_normalize_running", "bn_grad_planar",
             "bn_backward_elementwise"]
    assert fused_kernels() == [(k, "false>") for k in plain]
    assert set(be._modules) == {("float32", False)}  # the epilogue variants were not compiled
    assert fused_kernels(residual=z3, relu=True) == [(k, "true>") for k in plain]
    assert set(be._modules) == {("float32", False), ("float32", True)}
    # a residual alone: the forward kernels' true variants, a backward without a ReLU the false ones
    assert [flag for _, flag in fused_kernels(residual=z3)] == ["true>", "false>", "false>"] * 2
    assert fused_kernels() == [(k, "false>") for k in plain]


@pytest.mark.parametrize("epilogue", [False, True], ids=["plain", "residual-relu"])
def test_the_general_path_reads_the_epilogue_inputs_only_in_calls_with_an_epilogue(stand_ins, epilogue):
    # CuPy's ElementwiseKernels load every input that is not raw: calls without
    # an epilogue take kernels that have no residual or ReLU output at all.
    be, counts = stand_ins
    x, (gamma, beta), _ = arrays((8, 3, 4, 4), 1, "float32", True)
    x3 = counting_array(np.asarray(x).reshape(8, 3, 16))[::2]  # strided: the general path
    dy3 = counting_array(np.ones((8, 3, 16), np.float32))[::2]
    extra = {"residual": counting_array(np.ones((8, 3, 16), np.float32))[::2], "relu": True} if epilogue else {}
    with counted(counts):
        y3, *saved = be.forward_train(x3, gamma, beta, 1e-5, **extra)
        be.backward(dy3, x3, *saved, gamma, beta, True, relu_y=y3 if epilogue else None, want_dz=epilogue)
    suffix = "_epilogue" if epilogue else ""
    assert counts.kernels == ["cupybn_shifted_sum", "cupybn_squared_deviations", "bn_stats_channelwise<float>",
                              f"cupybn_affine{suffix}", f"cupybn_sum{suffix}", f"cupybn_centred_product_sum{suffix}",
                              "bn_grad_channelwise<float>", f"cupybn_backward{suffix}"]
