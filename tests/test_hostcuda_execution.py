"""The host harness runs CUDA kernels with CUDA's execution model and language.

Kernels are in tests/cuda/execution_model.cu.  Each test checks one property of
the model (indices, shared memory, barriers, templates, parameter passing) or
one error the harness must report instead of doing something else.
"""
from __future__ import annotations

import os
import signal

import numpy as np
import pytest
from cuda_kernels import module
from hypothesis import given
from hypothesis import strategies as st

from cupybn.testing import hostcuda

MODEL = "execution_model.cu"


def kernel(name: str, sanitize: str | None = None) -> hostcuda.Function:
    return module(MODEL, sanitize).get_function(name)


dims3 = st.tuples(st.integers(1, 3), st.integers(1, 3), st.integers(1, 2))


@given(grid=dims3, block=st.tuples(st.integers(1, 40), st.integers(1, 3), st.integers(1, 2)))
def test_every_thread_sees_its_own_3d_indices(grid, block):
    nblocks, nthreads = int(np.prod(grid)), int(np.prod(block))
    coords = np.full((nblocks * nthreads, 8), -1, np.int32)
    kernel("record_indices")(grid, block, (coords,))
    tz, ty, tx = np.unravel_index(np.arange(nthreads), block[::-1])
    bz, by, bx = np.unravel_index(np.arange(nblocks), grid[::-1])
    expected = np.column_stack([
        np.tile(tx, nblocks), np.tile(ty, nblocks), np.tile(tz, nblocks),
        np.repeat(bx, nthreads), np.repeat(by, nthreads), np.repeat(bz, nthreads),
        np.full(nblocks * nthreads, nthreads), np.full(nblocks * nthreads, nblocks),
    ])
    np.testing.assert_array_equal(coords, expected)


@pytest.mark.parametrize(
    ("expr", "dtype", "acc", "block"),
    [("block_sums<float, float, 128>", np.float32, np.float32, 128),
     ("block_sums<double, double, 64>", np.float64, np.float64, 64),
     ("block_sums<int, long long, 32>", np.int32, np.int64, 32)],
)
def test_template_block_reduction_over_static_shared_memory_sums_each_slice(expr, dtype, acc, block):
    n, grid = 1000, 3
    x = (np.arange(n) % 7 - 3).astype(dtype)  # small integers: any summation order is exact
    partial = np.zeros(grid, acc)
    kernel(expr)((grid,), (block,), (x, partial, np.int64(n)))
    owner = (np.arange(n) // block) % grid
    np.testing.assert_array_equal(partial, [x[owner == b].astype(acc).sum() for b in range(grid)])


@given(n=st.integers(1, 300), block=st.integers(1, 64))
def test_dynamic_shared_memory_is_sized_at_launch(n, block):
    x = np.arange(n, dtype=np.float32)
    y = np.zeros(n, np.float32)
    grid = -(-n // block)
    kernel("reverse_tiles")((grid,), (block,), (x, y, np.int32(n)), shared_mem=4 * block)
    expected = np.concatenate([x[i:i + block][::-1] for i in range(0, n, block)])
    np.testing.assert_array_equal(y, expected)


@pytest.mark.parametrize("name", ["read_uninitialised_shared", "read_uninitialised_static_shared"])
def test_shared_memory_starts_filled_not_zeroed_in_every_block(name):
    out = np.zeros(2 * 32, np.uint32)
    kernel(name)((2,), (32,), (out,), shared_mem=4 * 32)
    # Every block, the second included, starts from the fill pattern, not the previous block's values.
    np.testing.assert_array_equal(out, np.full(64, 0xFFFFFFFF, np.uint32))


def test_a_shared_declaration_the_harness_cannot_see_is_refused():
    # __shared__ in a macro (or an #included header) would escape the rewrite that gives it per-block storage.
    source = ('#define SHARED_INT __shared__ int\n'
              'extern "C" __global__ void k(int* y) { SHARED_INT s; s = 1; y[0] = s; }\n')
    with pytest.raises(hostcuda.CompileError, match="declare __shared__ variables in the .cu source"):
        hostcuda.RawModule(code=source).compile()


def test_more_than_48k_of_dynamic_shared_memory_needs_the_attribute_first():
    f = hostcuda.RawModule(code=module(MODEL).code).get_function("reverse_tiles")
    x = np.ones(32, np.float32)
    with pytest.raises(ValueError, match="max_dynamic_shared_size_bytes"):
        f((1,), (32,), (x, x.copy(), np.int32(32)), shared_mem=64 * 1024)
    f.max_dynamic_shared_size_bytes = 64 * 1024
    f((1,), (32,), (x, x.copy(), np.int32(32)), shared_mem=64 * 1024)


@given(st.lists(st.integers(-2, 2), min_size=64, max_size=64))
def test_barrier_votes_count_all_and_any(values):
    x = np.array(values, np.int32)
    out = np.zeros(6, np.int32)
    kernel("barrier_votes")((2,), (32,), (x, out))
    for b in range(2):
        p = x[32 * b:32 * (b + 1)] > 0
        assert list(out[3 * b:3 * b + 3]) == [p.sum(), p.all(), p.any()]


def test_barrier_in_divergent_code_is_reported():
    y = np.zeros(64, np.float32)
    with pytest.raises(hostcuda.KernelError, match=r"__syncthreads\(\).*reached by 40 of 64 threads"):
        kernel("divergent_barrier")((1,), (64,), (y, np.int32(40)))
    # When every thread takes the same path the kernel runs, and the module is still usable.
    kernel("divergent_barrier")((1,), (64,), (y, np.int32(64)))
    np.testing.assert_array_equal(y, np.full(64, 2.0, np.float32))


def test_device_assert_fails_the_launch_with_its_location():
    x = np.ones(64, np.float32)
    x[37] = -1
    with pytest.raises(hostcuda.KernelError, match=r"assertion failed: x\[threadIdx.x\] > 0.0f.*thread \(37,0,0\)"):
        kernel("assert_positive")((1,), (64,), (x,))
    kernel("assert_positive")((1,), (64,), (np.ones(64, np.float32),))


def test_scalar_parameters_arrive_with_their_values():
    out = np.zeros(9, np.float64)
    args = (np.int8(-7), np.int16(-300), np.int32(-70000), np.int64(-2**40), np.uint32(2**32 - 1),
            np.uint64(2**53), np.float32(1.5), np.float64(np.pi), np.bool_(True))
    kernel("echo_scalars")((1,), (1,), (out, *args))
    np.testing.assert_array_equal(out, [float(a) for a in args])


@pytest.mark.parametrize(
    ("bad", "match"),
    [(1.5, r"argument 7: the parameter is float but a float64 value"),  # CuPy would pass 8 bytes
     (np.float64(1.5), r"argument 7: the parameter is float but a float64"),
     (np.zeros(1, np.float32), r"argument 7: the parameter is float, not a pointer")],
)
def test_scalar_of_the_wrong_type_is_refused_before_launch(bad, match):
    out = np.zeros(9, np.float64)
    args = [np.int8(0), np.int16(0), np.int32(0), np.int64(0), np.uint32(0), np.uint64(0), bad,
            np.float64(0), np.bool_(False)]
    with pytest.raises(TypeError, match=match):
        kernel("echo_scalars")((1,), (1,), (out, *args))
    assert not out.any()


def test_pointer_parameters_check_count_kind_and_dtype():
    f = kernel("reverse_tiles")
    x = np.ones(4, np.float32)
    with pytest.raises(TypeError, match="takes 3 arguments, got 2"):
        f((1,), (4,), (x, x))
    with pytest.raises(TypeError, match=r"argument 1: the parameter is a pointer \(float\*\)"):
        f((1,), (4,), (x, np.float32(0), np.int32(4)))
    with pytest.raises(TypeError, match=r"argument 0: the parameter is float\* but the array's dtype is float64"):
        f((1,), (4,), (np.ones(4), x, np.int32(4)))


def test_vector_pointer_parameters_need_their_alignment():
    x = np.arange(17, dtype=np.float32)
    out = np.zeros(4, np.float32)
    aligned = x[:16] if x.ctypes.data % 16 == 0 else x[1:]
    kernel("sum_float4")((1,), (4,), (aligned, out, np.int32(4)))
    np.testing.assert_array_equal(out, aligned.reshape(4, 4).sum(axis=1))
    misaligned = x[1:] if x.ctypes.data % 16 == 0 else x[:16]
    with pytest.raises(ValueError, match="16-byte alignment"):
        kernel("sum_float4")((1,), (4,), (misaligned, out, np.int32(4)))


@pytest.mark.parametrize(
    ("grid", "block", "match"),
    [((1,), (2048,), "exceeds CUDA's limits"), ((1,), (32, 32, 2), "exceeds CUDA's limits"),
     ((1,), (1, 1, 65), "exceeds"), ((1, 65536), (1,), "grid .* exceeds"), ((0,), (1,), r"must be in \[1, 2\*\*32\)")],
)
def test_launch_configurations_beyond_cuda_limits_are_refused(grid, block, match):
    coords = np.zeros((1, 8), np.int32)
    with pytest.raises((hostcuda.KernelError, ValueError), match=match):
        kernel("record_indices")(grid, block, (coords,))


def test_kernels_are_looked_up_by_name_or_name_expression():
    mod = module(MODEL)
    with pytest.raises(KeyError, match="templates must be listed in name_expressions"):
        mod.get_function("block_sums<float, float, 256>")
    with pytest.raises(KeyError, match="no kernel 'nonexistent'"):
        mod.get_function("nonexistent")


@pytest.mark.parametrize(
    "construct",
    ["__match_any_sync(0xffffffffu, 1)",  # not supported by the header
     "cooperative_groups::this_grid().sync()",
     "__nv_bfloat16 b; (void)b"],
)
def test_constructs_the_header_does_not_support_fail_to_compile(construct):
    code = f'extern "C" __global__ void k(int* y) {{ {construct}; y[0] = 1; }}'
    with pytest.raises(hostcuda.CompileError, match="host compilation of kernel.cu failed"):
        hostcuda.RawModule(code=code).compile()


def test_modules_are_cached_by_source_options_and_sanitizer(tmp_path, monkeypatch):
    monkeypatch.setenv("CUPYBN_HOSTCUDA_CACHE", str(tmp_path))
    code = 'extern "C" __global__ void k(int* y) { y[threadIdx.x] = threadIdx.x; }'
    first = hostcuda.RawModule(code=code)._build()
    again = hostcuda.RawModule(code=code)._build()
    other = hostcuda.RawModule(code=code, options=("-DX=1",))._build()
    assert first.path == again.path != other.path
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([first.path.name, other.path.name])


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_forked_child_can_launch_kernels_after_its_parent_did():
    coords = np.zeros((64, 8), np.int32)
    kernel("record_indices")((1,), (64,), (coords,))  # the parent's worker threads now exist
    pid = os.fork()
    if pid == 0:  # the child has none of them: it must start its own
        signal.alarm(20)  # a hang (waiting for workers that do not exist) ends the child
        try:
            child = np.zeros((64, 8), np.int32)
            kernel("record_indices")((1,), (64,), (child,))
            os._exit(0 if (child == coords).all() else 1)
        except BaseException:
            os._exit(2)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


# ---- the API refuses what CuPy refuses ---------------------------------------------------

@pytest.mark.parametrize(
    ("grid", "block"),
    [(1, (64,)), ((1,), 64), ([1], (64,)), ((1,), [64]), (np.int32(1), (64,))],
    ids=["int-grid", "int-block", "list-grid", "list-block", "numpy-int-grid"],
)
def test_grid_and_block_must_be_tuples_as_in_cupy(grid, block):
    # cupy's Function.__call__ declares `tuple grid, tuple block`.
    coords = np.zeros((64, 8), np.int32)
    with pytest.raises(TypeError, match=r"expected tuple"):
        kernel("record_indices")(grid, block, (coords,))
    assert not coords.any()


def test_raw_module_takes_code_by_keyword_and_options_as_a_tuple():
    source = module(MODEL).code
    with pytest.raises(TypeError):
        hostcuda.RawModule(source)  # cupy.RawModule's arguments are keyword-only
    with pytest.raises(TypeError, match="options"):
        hostcuda.RawModule(code=source, options=["-DX=1"])
    with pytest.raises(TypeError, match="options"):
        hostcuda.RawKernel(source, "record_indices", ["-DX=1"])
    with pytest.raises(ValueError, match="cubin"):
        hostcuda.RawModule(path="kernel.cu")  # cupy loads compiled cubin/PTX from a path
    with pytest.raises(TypeError, match="unexpected keyword"):
        hostcuda.RawModule(code=source, nam_expressions=("x",))
    hostcuda.RawModule(code=source, options=("-DX=1",), backend="nvrtc", jitify=False)  # CuPy's own arguments


def test_negative_shared_memory_is_an_overflow_as_for_cupys_size_t():
    with pytest.raises(OverflowError):
        kernel("reverse_tiles")((1,), (4,), (np.ones(4, np.float32), np.ones(4, np.float32), np.int32(4)),
                                shared_mem=-1)


def test_noinline_device_functions_compile_beside_the_standard_library():
    # __noinline__ is CUDA's; libstdc++ uses GCC's __noinline__ attribute spelling,
    # so the harness rewrites the kernel source's token rather than defining a macro.
    src = r'''
    #include <cmath>
    #include <vector>
    __device__ __noinline__ float twice(float v) { return 2.0f * v; }
    extern "C" __global__ void apply(float* a) { a[threadIdx.x] = twice(a[threadIdx.x]) + std::fabs(-1.0f); }
    '''
    a = np.arange(4, dtype=np.float32)
    hostcuda.RawModule(code=src).get_function("apply")((1,), (4,), (a,))
    np.testing.assert_array_equal(a, 2 * np.arange(4) + 1)
