"""Sanitizer builds of the host harness catch races and out-of-bounds accesses.

(The race check's own planted races, one per kind of ordering CUDA has, are in
tests/test_hostcuda_races.py.)

The kernels in tests/cuda/planted_bugs.cu each carry one deliberate bug.  These
tests fail if a sanitizer stays silent about it, and also if it reports a
problem in the correct control kernels (a false alarm would make every report
worthless).  Each sanitizer run is a child process working on copies of the
arrays, so results must come back as if the kernel had run in-process.
"""
from __future__ import annotations

import numpy as np
import pytest
from cuda_kernels import module

from cupybn.testing import hostcuda

BUGS = "planted_bugs.cu"


def run(name: str, sanitize: str, grid, block, args, shared_mem: int = 0, source: str = BUGS):
    module(source, sanitize).get_function(name)(grid, block, args, shared_mem=shared_mem)


def sum_args(n=128):
    x = np.arange(n, dtype=np.float32)
    return x, np.zeros(1, np.float32), np.int32(n)


def test_race_check_reports_a_reduction_missing_one_barrier():
    with pytest.raises(hostcuda.SanitizerError, match="race on shared memory") as info:
        run("sum_missing_barrier", "race", (1,), (128,), sum_args())
    # The report points at the kernel source line of the racing access.
    assert "planted_bugs.cu:" in info.value.report and info.value.sanitizer == "race"


def test_race_check_reports_lanes_sharing_memory_without_syncwarp():
    x = np.arange(32, dtype=np.int32)
    with pytest.raises(hostcuda.SanitizerError, match="race on shared memory") as info:
        run("rotate_without_syncwarp", "race", (1,), (32,), (x, np.zeros(32, np.int32)), source="warp_collectives.cu")
    assert {race.why for race in info.value.races} == {"lanes"}


@pytest.mark.parametrize("sanitize", ["race", "address"])
def test_correct_kernels_run_clean_and_return_their_results(sanitize):
    x, out, n = sum_args()
    run("sum_with_barriers", sanitize, (1,), (128,), (x, out, n))
    assert out[0] == x.sum()
    y = np.zeros(32, np.int32)
    run("rotate_through_shared", sanitize, (1,), (32,), (np.arange(32, dtype=np.int32), y),
        source="warp_collectives.cu")
    np.testing.assert_array_equal(y, np.roll(np.arange(32), -1))


def test_address_sanitizer_reports_a_write_one_past_the_end():
    x = np.arange(128, dtype=np.float32)
    with pytest.raises(hostcuda.SanitizerError, match="AddressSanitizer: heap-buffer-overflow") as info:
        run("copy_one_past_end", "address", (2,), (128,), (x, np.zeros(128, np.float32), np.int32(128)))
    assert "WRITE of size 4" in info.value.report


def test_address_sanitizer_reports_a_read_before_the_start():
    x = np.arange(128, dtype=np.float32)
    with pytest.raises(hostcuda.SanitizerError, match="heap-buffer-overflow") as info:
        run("read_before_start", "address", (1,), (128,), (x, np.zeros(128, np.float32), np.int32(128)))
    assert "READ of size 4" in info.value.report


def test_address_sanitizer_reports_dynamic_shared_memory_overrun():
    with pytest.raises(hostcuda.SanitizerError, match="AddressSanitizer") as info:
        run("dynamic_shared_overrun", "address", (1,), (32,), (np.zeros(32, np.float32),), shared_mem=4 * 32)
    assert "use-after-poison" in info.value.report  # the part of the buffer beyond shared_mem


def test_address_sanitizer_reports_a_static_shared_array_overrun():
    with pytest.raises(hostcuda.SanitizerError, match="AddressSanitizer: use-after-poison"):
        run("static_shared_overrun", "address", (1,), (8,), (np.zeros(8, np.int32),))
    out = np.zeros(4, np.int32)
    run("static_shared_overrun", "address", (2,), (4,), (out,))  # in bounds: clean
    np.testing.assert_array_equal(out, np.arange(4))


def test_undefined_behaviour_sanitizer_reports_signed_overflow():
    x = np.full(4, 2**30, np.int32)
    with pytest.raises(hostcuda.SanitizerError, match="signed integer overflow"):
        run("overflowing_index", "address", (1,), (4,), (x, np.zeros(4, np.int32), np.int32(4)))


@pytest.mark.parametrize("sanitize", [None, "race", "address"])
def test_arguments_that_alias_one_array_still_alias_in_a_sanitizer_run(sanitize):
    # a and b overlap: what the kernel writes through a, it must read back through b.
    buf = np.full(80, -1, np.float32)
    a, b, out = buf[8:72], buf[8:72][::-1][::-1], np.zeros(64, np.float32)
    kernel = module("execution_model.cu", sanitize).get_function("write_then_read")
    kernel((1,), (64,), (a, b, out))
    np.testing.assert_array_equal(out, np.arange(64, dtype=np.float32))
    # Memory next to the arrays, copied into the child process, comes back untouched.
    assert (buf[:8] == -1).all() and (buf[72:] == -1).all()


def test_kernel_errors_surface_from_sanitizer_runs_too():
    y = np.zeros(64, np.float32)
    with pytest.raises(hostcuda.KernelError, match="reached by 40 of 64 threads"):
        module("execution_model.cu", "race").get_function("divergent_barrier")((1,), (64,), (y, np.int32(40)))
