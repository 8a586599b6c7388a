"""Properties specific to the CuPy backend's kernels, run on the host harness.

Every general property (parity with the float64 reference, layouts, dtypes,
gradients, running statistics, determinism, special values) already runs on the
CuPy backend through the ``cupy-host`` entry of the ``backend`` fixture.  This
file covers what only this backend has: the launch geometry (channels split
over several blocks), the second statistics pass for channels whose sample
shift was far from the mean, both block sizes, and sanitizer runs of every
kernel.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import cupybn
from cupybn.backends._running import update_running
from cupybn.backends.cupy_backend import CupyBackend, planar_shares, planar_slots
from cupybn.kernels import ADD_RESIDUAL, RELU, WRITE_GRADIENT
from cupybn.testing import (
    batch_norm_errors,
    exceeded,
    gradient_magnitudes,
    gradients_close,
    probe_dy,
    reference_backward,
    reference_forward,
    tolerance,
)
from cupybn.testing.hostcuda import host_cupy_backend
from cupybn.testing.strategies import batch_norm_inputs, make_x


def meets_the_reference(x, backend, axis=1, gamma=None, beta=None, eps=1e-5, seed=0):
    """y and var within their bars; gradients element-wise within the bar times the
    magnitude of their terms (the float32 yardstick when they cancel)."""
    y, saved = cupybn.batch_norm(x, gamma, beta, axis=axis, eps=eps, backend=backend)
    ref = reference_forward(x, gamma, beta, axis=axis, eps=eps)
    dy = probe_dy(ref, axis, x.dtype, np.random.default_rng(seed))
    grads = cupybn.batch_norm_backward(dy, saved)
    tol = tolerance(x.dtype)
    forward = exceeded(batch_norm_errors(y, saved.var, None, ref, None), tol)
    magnitudes = gradient_magnitudes(dy, ref, gamma, axis=axis)
    # dgamma/dbeta are None without gamma/beta: compare only what was computed
    ref_grads = [r if g is not None else None for g, r in zip(grads, reference_backward(dy, ref, gamma, axis=axis),
                                                              strict=True)]
    backward = gradients_close(grads, ref_grads, magnitudes, tol)
    assert not forward and backward, (forward, backward)


@pytest.mark.parametrize("values_per_thread", [1, 3, 1000])
@pytest.mark.parametrize("threads", [64, 256])
@given(inputs=batch_norm_inputs(max_size=3000))
@settings(max_examples=15)
def test_any_split_of_channels_over_blocks_meets_the_reference(threads, values_per_thread, inputs):
    # values_per_thread=1 splits even tiny channels over many blocks; 1000 keeps one block per channel.
    backend = host_cupy_backend(threads=threads, sm_count=16, values_per_thread=values_per_thread)
    meets_the_reference(inputs.x, backend, inputs.axis, inputs.gamma, inputs.beta, inputs.eps)


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16])
@pytest.mark.parametrize("shape,axis", [((64, 3, 50), 1), ((3000, 3), 1)], ids=["planar", "rows"])
def test_a_far_first_sample_is_corrected_by_the_second_pass(dtype, shape, axis):
    # The shift is each channel's first value; here it is an outlier thousands of
    # standard deviations away, which costs the float32 accumulation its digits
    # unless the second pass (centred on the first mean) recomputes the channel.
    rng = np.random.default_rng(5)
    x = (100 + rng.standard_normal(shape)).astype(dtype)
    first = (0, slice(None), 0)[: x.ndim]
    x[first] = 100 + (3e4 if dtype == np.float16 else 1e6)
    y, saved = cupybn.batch_norm(x, axis=axis, backend=host_cupy_backend())
    ref = reference_forward(x, axis=axis)
    assert np.all(np.abs(saved.var - ref.var) <= tolerance(dtype).var * ref.var)
    meets_the_reference(x, host_cupy_backend(), axis)


@pytest.mark.parametrize("shape,axis", [((4000, 6), 1), ((40, 6, 100), 1)], ids=["rows", "planar"])
def test_only_shifts_more_than_4_std_from_the_mean_take_the_second_pass_and_all_meet_the_bars(shape, axis):
    # float32 at an offset of 1e6 standard deviations: x - shift is exact, and a
    # shift up to 4 std away costs the accumulation under 2 bits, which the bars
    # absorb; farther ones are flagged (far) and recomputed about the mean.
    rng = np.random.default_rng(16)
    x = rng.standard_normal(shape)
    x = (x - x.mean(axis=(0, 2) if x.ndim == 3 else 0, keepdims=True)) / x.std(axis=(0, 2) if x.ndim == 3 else 0,
                                                                               keepdims=True)
    distances = [0.0, 2.0, 3.5, 4.5, 10.0, 1000.0]
    first = (0, slice(None), 0)[: x.ndim]
    x[first] = distances
    x = (x + 1e6).astype(np.float32)
    backend = host_cupy_backend(sm_count=8, values_per_thread=4)
    x3 = x.reshape(x.shape[0], x.shape[1], -1)
    plan = backend._plan("train", x3)
    stats, far = np.empty((7, 6), np.float32), np.full(6, -1, np.int32)
    absent = backend._channel(None, stats)
    backend._statistics(x3, plan, stats, far, (*absent, *absent, np.float64(1e-5), *absent, *absent,
                                               np.float64(0.1), np.float64(1.0)), passes=(np.int32(0),))
    assert far.tolist() == [0, 0, 0, 1, 1, 1]
    meets_the_reference(x, backend, axis)


@pytest.mark.parametrize("shape,axis", [((40, 5, 33), 1), ((300, 37), 1), ((5, 4, 4, 40), -1)],
                         ids=["planar", "rows", "channels-last"])
def test_tickets_are_back_at_zero_after_every_call(shape, axis):
    # The last block of each channel (or tile) is chosen by an atomicInc ticket
    # that wraps to 0; the counters are reused by the next call on the stream,
    # so one left non-zero would let a later call finish a channel too early.
    backend = host_cupy_backend(sm_count=8, values_per_thread=1)  # several slices per channel
    x = make_x(shape, np.float32, 3.0, 1.0, np.random.default_rng(17))
    x[(0,) * x.ndim] += 1e3  # a far first value: the second statistics pass runs too
    C = shape[axis]
    rm, rv = np.zeros(C, np.float32), np.ones(C, np.float32)
    for training in (True, False):
        y, saved = cupybn.batch_norm(x, running_mean=rm, running_var=rv, training=training, axis=axis,
                                     backend=backend)
        cupybn.batch_norm_backward(np.ones_like(x), saved)
        (tickets,) = backend._tickets.values()
        assert tickets.size >= 32 and not tickets.any()
    plan = backend._plan("train", x.reshape(x.shape[0], C, -1) if axis == 1 else x.reshape(-1, C, 1))
    assert plan.reduction.slices > 1  # the tickets did count


def test_results_do_not_depend_on_the_run_but_on_the_geometry_only():
    x = np.random.default_rng(6).standard_normal((40, 5, 33)).astype(np.float32)
    a, b = host_cupy_backend(values_per_thread=1), host_cupy_backend(values_per_thread=1)
    ya, sa = cupybn.batch_norm(x, backend=a)
    yb, sb = cupybn.batch_norm(x, backend=b)
    assert ya.tobytes() == yb.tobytes() and sa.var.tobytes() == sb.var.tobytes()


def run_the_epilogue_paths(backend, x3, gamma, beta, running_mean, running_var):
    """The fused epilogue at the backend level, on x's (outer, C, inner) view:
    training and inference forwards with a residual and a ReLU, and the
    backward of each through that ReLU, writing dz.  Returns every output."""
    z3 = np.random.default_rng(9).standard_normal(x3.shape).astype(x3.dtype)
    dy3 = np.ones_like(x3)
    y3, *saved = backend.forward_train(x3, gamma, beta, 1e-5, residual=z3, relu=True)
    grads = backend.backward(dy3, x3, *saved, gamma, beta, True, relu_y=y3, want_dz=True)
    y3_eval, *saved_eval = backend.forward_infer(x3, gamma, beta, running_mean, running_var, 1e-5, residual=z3,
                                                 relu=True)
    grads_eval = backend.backward(dy3, x3, *saved_eval, gamma, beta, False, relu_y=y3_eval, want_dz=True)
    return [a for a in (y3, *grads, y3_eval, *grads_eval) if a is not None]


def view3(x, axis):
    """x's (outer, C, inner) view, as the API hands it to the backend (contiguous x, axis 1 or -1)."""
    return x.reshape(x.shape[0], x.shape[1], -1) if axis == 1 else x.reshape(-1, x.shape[-1], 1)


@pytest.mark.parametrize("shape,axis", [((2, 3, 4, 5), 1), ((3, 3, 7, 7), 1), ((40, 3), 1), ((2, 4, 5, 3), -1)],
                         ids=["planar", "planar-peeled", "rows", "channels-last"])
@pytest.mark.parametrize("sanitize,threads", [("race", 64), ("race", 256), ("address", 64)],
                         ids=["race-64", "race-256", "address-64"])
def test_every_kernel_runs_clean_under_the_sanitizers(sanitize, threads, shape, axis):
    # Each dtype is its own module: float32 here, float16 and float64 below.  The
    # race check runs both block sizes (256 is the GPU's default).
    backend = host_cupy_backend(sanitize, threads=threads)
    x = np.random.default_rng(7).standard_normal(shape).astype(np.float32)
    C = shape[axis]
    gamma, beta = np.linspace(0.5, 2, C, dtype=np.float32), np.linspace(-1, 1, C, dtype=np.float32)
    rm, rv = np.zeros(C, np.float32), np.ones(C, np.float32)
    y, saved = cupybn.batch_norm(x, gamma, beta, running_mean=rm, running_var=rv, axis=axis, backend=backend)
    dx, dgamma, dbeta = cupybn.batch_norm_backward(np.ones_like(x), saved)
    y_eval, saved_eval = cupybn.batch_norm(x, gamma, beta, running_mean=rm, running_var=rv, training=False,
                                           axis=axis, backend=backend)
    cupybn.batch_norm_backward(np.ones_like(x), saved_eval)
    # and the sanitized results are the real ones
    y0, _ = cupybn.batch_norm(x, gamma, beta, axis=axis)
    np.testing.assert_allclose(y, y0, rtol=1e-5, atol=1e-5)
    # the fused epilogue (residual, ReLU, the masked gradient and dz), bit for bit as unsanitized;
    # its module under the race check here, under AddressSanitizer for float16 below (EPILOGUE_SANITIZED)
    if (sanitize, np.dtype(np.float32)) in EPILOGUE_SANITIZED:
        fused = run_the_epilogue_paths(backend, view3(x, axis), gamma, beta, rm, rv)
        plain = run_the_epilogue_paths(host_cupy_backend(threads=threads), view3(x, axis), gamma, beta, rm, rv)
        for a, b in zip(fused, plain, strict=True):
            np.testing.assert_array_equal(a, b)


# A sanitized build of a module costs about a minute of compiling on 2 cores (CI's budget): the
# epilogue's own module (its `true` kernel variants, whose indexing does not depend on the dtype)
# is sanitized for two of the six dtype and tool pairs; the masked kernels likewise
# (test_cupy_mask_kernels.py).
EPILOGUE_SANITIZED = {("race", np.dtype(np.float32)), ("address", np.dtype(np.float16))}


@pytest.mark.parametrize("dtype", [np.float16, np.float64])
@pytest.mark.parametrize("sanitize,threads", [("race", 64), ("race", 256), ("address", 64)],
                         ids=["race-64", "race-256", "address-64"])
def test_half_and_double_kernels_run_clean_under_the_sanitizers(sanitize, threads, dtype):
    backend = host_cupy_backend(sanitize, threads=threads)
    pdt = np.float64 if dtype == np.float64 else np.float32
    for shape in ((2, 3, 9), (33, 3), (2, 3, 16), (3, 3, 35)):  # 16-byte packs: whole rows, peeled rows
        x = np.random.default_rng(8).standard_normal(shape).astype(dtype)
        rm, rv = np.zeros(3, pdt), np.ones(3, pdt)
        y, saved = cupybn.batch_norm(x, running_mean=rm, running_var=rv, backend=backend)
        cupybn.batch_norm_backward(np.ones_like(x), saved)
        y, saved = cupybn.batch_norm(x, running_mean=rm, running_var=rv, training=False, backend=backend)
        cupybn.batch_norm_backward(np.ones_like(x), saved)
        if (sanitize, np.dtype(dtype)) in EPILOGUE_SANITIZED:
            run_the_epilogue_paths(backend, view3(x, 1), None, None, rm, rv)
    # the general path (a strided view) too
    y, saved = cupybn.batch_norm(np.ones((4, 3, 5), dtype)[::2] * np.arange(3, dtype=dtype)[:, None], backend=backend)
    strided = np.random.default_rng(8).standard_normal((4, 3, 5)).astype(dtype)[::2]
    run_the_epilogue_paths(backend, strided, np.ones(3, pdt), np.zeros(3, pdt), np.zeros(3, pdt), np.ones(3, pdt))


@given(st.integers(1, 80), st.integers(2, 70))
@settings(max_examples=25)
def test_channels_beyond_one_tile_of_32_are_all_computed(channels, rows):
    # Rows-family blocks cover 32 channels: every channel of every tile must be
    # written (a grid rounded down would leave the last ones out).
    x = np.random.default_rng(channels).standard_normal((rows, channels)).astype(np.float32) * 3 + 7
    y, saved = cupybn.batch_norm(x, backend=host_cupy_backend())
    np.testing.assert_allclose(saved.var, x.var(axis=0), rtol=1e-5)
    np.testing.assert_allclose(y.mean(axis=0), 0, atol=1e-5)


@pytest.mark.parametrize("running_dtype", [np.float16, np.float32, np.float64])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_the_fused_running_statistics_update_is_the_generic_formula_rounded_once(dtype, running_dtype):
    # Channels of 8 values k * 2**e + offset: mean and variance are exact in any
    # dtype, so the in-kernel update must equal the generic formula bit for bit.
    C, momentum = 37, 0.3
    rng = np.random.default_rng(10)
    scales = 2.0 ** rng.integers(-3, 4, C)
    x = (np.arange(8)[:, None] * scales + rng.integers(-50, 50, C)).astype(dtype)
    rm, rv = rng.normal(0, 1, C).astype(running_dtype), rng.uniform(0.5, 2, C).astype(running_dtype)
    want_mean, want_var = rm.copy(), rv.copy()
    y, saved = cupybn.batch_norm(x, running_mean=rm, running_var=rv, momentum=momentum, backend=host_cupy_backend())
    update_running(np, want_mean, want_var, saved.mean, saved.mean_lo, saved.var, momentum, 8)
    np.testing.assert_array_equal(rm, want_mean)
    np.testing.assert_array_equal(rv, want_var)


def test_running_statistics_of_mixed_dtypes_are_each_updated_in_their_own_dtype():
    x = np.random.default_rng(11).standard_normal((20, 3)).astype(np.float32)
    rm, rv = np.zeros(3, np.float32), np.ones(6, np.float64)[::2]  # and a strided view, updated in place
    cupybn.batch_norm(x, running_mean=rm, running_var=rv, momentum=1.0, backend=host_cupy_backend())
    np.testing.assert_allclose(rm, x.mean(axis=0), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(rv, x.var(axis=0, ddof=1), rtol=1e-6)


@given(inputs=batch_norm_inputs(max_size=2000))
@settings(max_examples=30)
def test_16_byte_packs_in_the_elementwise_kernels_give_the_same_bits_as_single_values(inputs):
    # Same coefficients, both forms: y and dx must agree bit for bit, with the
    # epilogue (residual, ReLU, dz) and without.  (The reductions may add in
    # another order with packs, so whole calls may not.)
    x3 = np.ascontiguousarray(inputs.x).reshape(inputs.x.shape[0], inputs.x.shape[1], -1)  # any (outer, C, inner)
    rng = inputs.rng(1)
    channels, acc = x3.shape[1], (np.float64 if x3.dtype == np.float64 else np.float32)
    stats, coef = rng.standard_normal((7, channels)).astype(acc), rng.standard_normal((3, channels)).astype(acc)
    running = [rng.standard_normal(channels).astype(acc), rng.uniform(0.5, 2, channels).astype(acc)]
    dy3, z3, y3 = (rng.standard_normal(x3.shape).astype(x3.dtype) for _ in range(3))
    results = []
    # packs and single values; coefficients fetched when the channel changes
    # (moving) and kept per thread over a grid of whole planes (fixed)
    for backend, path in [(host_cupy_backend(), "plan"), (host_cupy_backend(vector_loads=False), "plan"),
                          (host_cupy_backend(), "moving"), (host_cupy_backend(), "fixed")]:
        def launch(template, *arrays, rest, epilogue, backend=backend, path=path, second_out=None):
            out = np.empty_like(x3)
            # the kernels' `true` variants with an epilogue, the `false` ones without
            plan = backend._elementwise(template, x3.shape, x3.dtype, aligned=True, epilogue=epilogue)
            grid, geometry = plan.grid, plan.geometry
            if path != "plan":
                vec = 16 // x3.dtype.itemsize if x3.size % (16 // x3.dtype.itemsize) == 0 else 1
                plane = x3.shape[1] * x3.shape[2]
                unit = plane // np.gcd(plane, backend.threads * vec)  # a grid of whole planes
                grid = grid if path == "moving" else (int(unit),)
                geometry = (*geometry[:-1], np.int32(path == "fixed"))
            plan.kernel(grid, plan.block, (*arrays, out, *geometry, *rest))
            return out.tobytes() + (b"" if second_out is None else second_out.tobytes())

        codes = [c for a in running + [None, None] for c in backend._channel(a, stats)]
        for forward, backward in [(np.int32(0), np.int32(0)),  # no epilogue: stand-ins, never read
                                  (np.int32(ADD_RESIDUAL | RELU), np.int32(RELU | WRITE_GRADIENT))]:
            residual, relu_y, dz3 = (x3, dy3, None) if not forward else (z3, y3, np.empty_like(x3))
            fused = bool(forward)
            results.append((
                launch("bn_normalize", x3, rest=(stats, residual, forward), epilogue=fused),
                launch("bn_normalize_running", x3, rest=(*codes, np.float64(1e-5), stats.copy(), residual, forward),
                       epilogue=fused),
                launch("bn_backward_elementwise", dy3, x3, second_out=dz3, epilogue=fused,
                       rest=(np.int32(1), stats[0], coef, relu_y, x3 if dz3 is None else dz3, backward))))
    assert results[0::2] == [results[0]] * 4 and results[1::2] == [results[1]] * 4


def test_elementwise_grids_stride_by_whole_planes_where_that_costs_little():
    # Fixed: each thread keeps its channels' coefficients for the whole call.
    gpu = CupyBackend(np, None, threads=256, sm_count=132)  # geometry only: nothing is compiled
    host = host_cupy_backend(threads=64, sm_count=8)
    for backend, shape, dtype, fixed in [(host, (100, 96, 1), np.float32, False),  # 1 pack per thread anyway
                                         (host, (1000, 64, 1), np.float32, True),
                                         (host, (4, 3, 49), np.float32, False),
                                         (host, (2, 7919, 1), np.float32, False),  # planes too large for a wave
                                         (gpu, (256, 256, 196), np.float16, True),  # ResNet-50, NCHW
                                         (gpu, (256 * 196, 256, 1), np.float16, True)]:  # and channels-last
        launch = backend._elementwise("bn_normalize", shape, np.dtype(dtype), aligned=True)
        vec = 16 // np.dtype(dtype).itemsize if np.prod(shape) % (16 // np.dtype(dtype).itemsize) == 0 else 1
        assert bool(launch.geometry[-1]) == fixed, shape
        if fixed:  # the grid's stride is a whole number of (C, inner) planes
            assert launch.grid[0] * backend.threads * vec % (shape[1] * shape[2]) == 0
            assert 3 * 8 * backend.sm_count() <= 4 * launch.grid[0] <= 4 * 8 * backend.sm_count()  # 3/4 to 1 wave


class _CompiledWith:
    """A kernel factory whose kernels report a register count and launch nothing."""

    def __init__(self, num_regs, shared_size_bytes=0):
        self.kernel = type("Kernel", (), {"num_regs": num_regs, "shared_size_bytes": shared_size_bytes})()

    def RawModule(self, **kwargs):  # noqa: N802
        return type("Module", (), {"get_function": lambda _, name: self.kernel})()


@pytest.mark.parametrize("num_regs,shared,blocks", [(40, 0, 6), (32, 0, 8), (64, 0, 4), (255, 0, 1),
                                                    (16, 0, 8), (32, 60 * 1024, 3)])
def test_grids_are_sized_from_the_compiled_kernels_occupancy(num_regs, shared, blocks):
    # sm_90: 2048 threads, 64 Ki registers and 228 KiB of shared memory per SM; blocks of 256.
    backend = CupyBackend(np, _CompiledWith(num_regs, shared), threads=256, sm_count=132)
    backend._sm_limits = lambda: (2048, 65536, 228 * 1024)
    launch = backend._elementwise("bn_normalize", (1, 1_000_003, 1), np.dtype(np.float32), aligned=False)  # prime C
    assert launch.grid == (blocks * 132,) and not launch.geometry[-1]
    reduction = backend._reduction("bn_stats", (10**6, 1, 1), np.dtype(np.float32), aligned=False)
    assert reduction.grid == (1, blocks * 132)  # one tile: slices fill the GPU


class _CompiledByVariant:
    """A kernel factory whose `true` variants (the fused epilogue's) report more registers than the others."""

    def RawModule(self, **kwargs):  # noqa: N802
        def get_function(_, name):
            return type("Kernel", (), {"num_regs": 64 if name.endswith(", true>") else 32, "shared_size_bytes": 0})()

        return type("Module", (), {"get_function": get_function})()


def test_grids_are_sized_from_the_occupancy_of_the_variant_launched():
    # 32 registers: 8 blocks of 256 per SM; 64 registers (the epilogue variant): 4.
    backend = CupyBackend(np, _CompiledByVariant(), threads=256, sm_count=132)
    backend._sm_limits = lambda: (2048, 65536, 228 * 1024)
    x3 = np.zeros((1, 1_000_003, 1), np.float32)  # a prime C: no fixed grid
    for epilogue, blocks in [(False, 8), (True, 4), (False, 8)]:
        plan = backend._plan("grad", x3, x3, epilogue=epilogue)
        assert plan.elementwise.kernel.name.endswith(f", {str(epilogue).lower()}>")
        assert plan.elementwise.grid == (blocks * 132,)
    rows = backend._plan("grad", np.zeros((10**6, 1, 1), np.float32), epilogue=True).reduction
    assert rows.kernel.name == "bn_grad_rows<float, float, 8, true>" and rows.grid == (1, 4 * 132)


def test_packs_are_used_only_for_aligned_arrays_of_whole_packs():
    backend = host_cupy_backend()
    base = np.zeros(4096 + 16, np.float32)
    start = (-base.ctypes.data % 16) // 4  # the first 16-byte aligned element
    aligned = base[start:start + 4096].reshape(8, 8, 64)
    misaligned = base[start + 1:start + 4097].reshape(8, 8, 64)

    def packs(mode, *arrays):
        plan = backend._plan(mode, *arrays)
        # the pack size: the last numeric template argument (the epilogue kernels end in `, false>`)
        return [[a for a in launch.kernel.name.rstrip(">").split(", ") if a.isdigit()][-1]
                for launch in (plan.reduction, plan.elementwise) if launch]

    assert packs("train", aligned) == ["4", "4"]
    assert packs("train", misaligned) == ["1", "1"]  # misaligned by 4 bytes
    assert packs("grad", aligned, misaligned) == ["1", "1"]
    assert packs("infer", base[start:start + 105].reshape(3, 7, 5)) == ["1"]  # not a whole number of packs
    assert backend._pack_size(np.float16, True, 64) == 8 and backend._pack_size(np.float16, True, 63) == 1
    assert host_cupy_backend(vector_loads=False)._pack_size(np.float32, True, 64) == 1


def _strided_views(dtype, rng):
    """(x, axis) views whose (outer, C, inner) form is strided, not C-contiguous."""
    base = make_x((10, 3, 4, 5), dtype, 50.0, 2.0, rng)
    yield base[::2], 1                                        # a step on the batch axis
    yield base.transpose(0, 2, 3, 1)[1::3], -1                 # channels-last, every third sample
    yield make_x((40, 6), dtype, -3.0, 0.5, rng)[::4, 1:4], 1  # 2-D rows and a channel window


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16])
def test_strided_views_are_read_in_place_and_meet_the_reference(dtype, monkeypatch):
    from cupybn.backends import cupy_backend

    backend = host_cupy_backend()
    calls = []
    general = backend._general
    for name in ("shifted_sum", "squared_deviations", "affine", "sum", "centred_product_sum", "backward"):
        kernel = getattr(general, name)
        setattr(general, name, lambda *a, _k=kernel, _n=name, **kw: calls.append(_n) or _k(*a, **kw))
    copies = []
    real = np.ascontiguousarray
    monkeypatch.setattr(cupy_backend.np, "ascontiguousarray", lambda a, *k, **kw: copies.append(a.shape) or real(a))
    rng = np.random.default_rng(12)
    for x, axis in _strided_views(dtype, rng):
        C = x.shape[axis]
        pdt = np.float64 if dtype == np.float64 else np.float32
        gamma, beta = rng.normal(1, 0.5, C).astype(pdt), rng.normal(0, 1, C).astype(pdt)
        meets_the_reference(x, backend, axis, gamma, beta)
        rm, rv = rng.normal(50, 1, C).astype(pdt), rng.uniform(1, 5, C).astype(pdt)
        y, _ = cupybn.batch_norm(x, gamma, beta, running_mean=rm, running_var=rv, training=False, axis=axis,
                                 backend=backend)
        ref = reference_forward(x, gamma, beta, training=False, running_mean=rm, running_var=rv, axis=axis)
        assert batch_norm_errors(y, None, None, ref, None)["y"] <= tolerance(dtype).y
    assert all(len(shape) <= 1 for shape in copies), copies  # only per-channel arrays were made contiguous
    # every view went through the general path: 3 training forwards, backwards, inferences
    assert calls.count("shifted_sum") == 3 and calls.count("backward") == 3 and calls.count("affine") == 6


@pytest.mark.parametrize("sanitize", ["race", "address"])
def test_the_general_path_runs_clean_under_the_sanitizers(sanitize):
    backend = host_cupy_backend(sanitize)
    x = make_x((6, 2, 3, 4), np.float32, 5.0, 1.0, np.random.default_rng(13))[::2]
    y, saved = cupybn.batch_norm(x, backend=backend)
    dx, _, _ = cupybn.batch_norm_backward(np.ones((6, 2, 3, 4), np.float32)[::2], saved)
    np.testing.assert_allclose(y, cupybn.batch_norm(x)[0], rtol=1e-5, atol=1e-5)
    # the epilogue's general kernels, and the synchronised path's normalize and ReLU gradient
    x3 = x.reshape(3, 2, 12)
    assert not x3.flags.c_contiguous
    params = (np.ones(2, np.float32), np.zeros(2, np.float32), np.zeros(2, np.float32), np.ones(2, np.float32))
    fused = run_the_epilogue_paths(backend, x3, *params)
    for a, b in zip(fused, run_the_epilogue_paths(host_cupy_backend(), x3, *params), strict=True):
        np.testing.assert_array_equal(a, b)
    z3 = np.ones((6, 2, 12), np.float32)[::2]
    y3 = backend.normalize(x3, np.full(2, 5.0), np.zeros(2), np.ones(2), None, None, 1e-5, residual=z3, relu=True)
    backend.relu_gradient(np.ones((6, 2, 12), np.float32)[::2], y3 - 1)


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16])
@pytest.mark.parametrize("values_per_thread", [1, 1000])
def test_planar_reductions_read_16_byte_packs_and_peel_rows_that_are_not_whole_packs(dtype, values_per_thread):
    backend = host_cupy_backend(values_per_thread=values_per_thread, sm_count=8)
    launched = []
    real = backend._function
    backend._function = lambda dt, template, *params, **kw: launched.append((template, params)) or real(
        dt, template, *params, **kw)
    rng = np.random.default_rng(14)
    vec = 16 // np.dtype(dtype).itemsize
    # rows of 64: whole packs; of 49 (7x7) and 75: every row starts at another
    # place within a pack, so heads and tails of every length are read alone
    for shape in ((6, 3, 8, 8), (6, 3, 7, 7), (5, 7, 3, 25)):
        launched.clear()
        meets_the_reference(make_x(shape, dtype, 20.0, 3.0, rng), backend)
        assert ("bn_stats_planar", (64, vec)) in launched and ("bn_grad_planar", (64, vec)) in launched
    launched.clear()
    meets_the_reference(make_x((6, 3, 1, 5), dtype, 20.0, 3.0, rng), backend)  # rows of 5: single values
    assert ("bn_stats_planar", (64, 1)) in launched and ("bn_grad_planar", (64, 1)) in launched


@pytest.mark.parametrize("vec", [2, 4, 8])
def test_every_planar_row_holds_the_packs_it_is_read_by(vec):
    # Row (n, c) starts at element (n C + c) inner of an aligned array: at every
    # multiple of gcd(inner, vec) within a pack.  Each row must hold `slots`
    # aligned packs after its head, and rows of whole packs have no singles.
    for inner in range(2, 12 * vec):
        slots, rest = planar_slots(inner, vec)
        assert slots * vec + rest == inner and rest < 2 * vec
        assert rest == 0 or inner % vec
        for start in range(0, vec, math.gcd(inner, vec)):
            head = -start % vec
            assert head + slots * vec <= inner


def test_planar_shares_cover_every_pack_and_single_with_no_empty_slice():
    for outer, slots, rest, vec, slices in [(256, 11, 5, 4, 7), (3, 1, 0, 4, 64), (1, 23, 12, 8, 1),
                                            (2 * 10**6, 11, 5, 4, 3)]:
        got, per_block, singles = planar_shares(outer, slots, rest, vec, slices)
        assert got * per_block >= outer * slots > (got - 1) * per_block  # the last slice has packs
        assert got * singles >= outer * rest
        assert vec * per_block + singles <= 2**24
    assert planar_shares(2 * 10**6, 11, 5, 4, 3)[0] == 6  # 98e6 values: 2^24 at most per block


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_the_general_path_keeps_the_mean_to_twice_the_precision_at_large_offsets(dtype):
    # At 1e4 standard deviations a float64 mean rounded once is off by ~1e-12 of
    # the spread; the general path carries it as a hi/lo pair, as the fast path does.
    rng = np.random.default_rng(15)
    base = make_x((8, 16), dtype, 1e4 if dtype == np.float64 else 1e3, 0.01, rng)
    x = base[::2]
    assert not x.flags.c_contiguous  # a strided view: the general path
    y, saved = cupybn.batch_norm(x, backend=host_cupy_backend())
    ref = reference_forward(x)
    assert batch_norm_errors(y, saved.var, None, ref, None)["y"] <= tolerance(dtype).y / 4
