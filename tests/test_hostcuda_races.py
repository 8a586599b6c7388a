"""The race check (sanitize="race") orders memory as CUDA does, and no other way.

Each kernel of tests/cuda/planted_races.cu has a race a GPU would have and a
clean twin (the same kernel with `correct` set, which adds the one barrier,
__syncwarp or fence that the race needs).  The race must be reported on every
run, between the two source lines marked ``// race: ...`` and with the right
reason; the twin must run clean and compute the right values.  The harness's
own synchronisation (one lock for every wait in a block, shuffles included)
must not hide any of them: that is what a plain ThreadSanitizer run missed.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from cuda_kernels import CUDA_DIR, module

from cupybn.testing import hostcuda
from cupybn.testing.hostcuda import _build as hostcuda_build

SOURCE = "planted_races.cu"
RUNS = 3  # a planted race must be found on each of them


def marked_line(marker: str) -> str:
    """``planted_races.cu:N`` of the line that carries ``// race: marker``."""
    lines = (CUDA_DIR / SOURCE).read_text().splitlines()
    found = [i + 1 for i, line in enumerate(lines) if line.rstrip().endswith(f"// race: {marker}")]
    assert len(found) == 1, marker
    return f"{SOURCE}:{found[0]}"


@dataclasses.dataclass
class Planted:
    kernel: str
    grid: tuple[int, ...]
    block: tuple[int, ...]
    arguments: Callable[[], tuple]     # fresh arrays, without the trailing `correct` flag
    check: Callable[[tuple], None]     # the twin's results are right
    memory: str
    why: str
    lines: tuple[str, str]             # markers of the two racing accesses
    shared_mem: int = 0
    more: tuple[tuple[str, str], ...] = ()  # other pairs of markers that race too


RNG = np.random.default_rng(2026)
X = RNG.standard_normal(1000).astype(np.float32)


def moments_are_right(args):
    x, out, n = args
    np.testing.assert_allclose(out, [x[:n].mean(), x[:n].var()], rtol=1e-5, atol=1e-6)


def rotation_is_right(args):
    x, y = args
    np.testing.assert_array_equal(y, np.roll(x, -1))


def two_phase_is_right(args):
    a, b, out = args
    np.testing.assert_allclose(out[0], (b * a.sum()).sum(), rtol=1e-4)


def merge_is_right(args):
    x, partial, ticket, total = args
    np.testing.assert_allclose(partial, x.reshape(4, 64).sum(axis=1), rtol=1e-5)
    np.testing.assert_allclose(total[0], x.sum(), rtol=1e-4)
    assert ticket[0] == 0  # atomicInc wrapped round


def rows_are_right(args):
    x, y, z = args
    np.testing.assert_array_equal(y, 2 * x)
    np.testing.assert_array_equal(z, (2 * x).reshape(3, 32)[:, ::-1].ravel())


PLANTED = [
    Planted("moments_static_shared", (1,), (128,), lambda: (X, np.zeros(2, np.float32), np.int32(X.size)),
            moments_are_right, "shared", "warps", ("partial written", "partial read")),
    Planted("moments_dynamic_shared", (1,), (128,), lambda: (X, np.zeros(2, np.float32), np.int32(X.size)),
            moments_are_right, "shared", "warps", ("partial written", "partial read"), shared_mem=4 * 12),
    Planted("rotate_in_warp", (1,), (32,), lambda: (np.arange(32, dtype=np.int32) * 3, np.zeros(32, np.int32)),
            rotation_is_right, "shared", "lanes", ("slot written", "neighbour's slot read")),
    Planted("two_phase_sums", (1,), (64,), lambda: (X[:64].copy(), X[64:128].copy(), np.zeros(1, np.float32)),
            two_phase_is_right, "shared", "lanes", ("first result read", "buffer reused")),
    Planted("last_block_merge", (4,), (64,),
            lambda: (X[:256].copy(), np.zeros(4, np.float32), np.zeros(1, np.uint32), np.zeros(1, np.float32)),
            merge_is_right, "global", "blocks", ("block partial written", "partials merged")),
    Planted("neighbour_block_read", (3,), (32,),
            lambda: (X[:96].copy(), np.zeros(96, np.float32), np.zeros(96, np.float32)),
            rows_are_right, "global", "blocks", ("row written", "row read")),
]


def count_is_right(args):
    assert args[0][0] == 4 * 32


def merge_by_ticket_is_right(args):
    x, partial, ticket, total = args
    np.testing.assert_array_equal(partial, x)
    np.testing.assert_allclose(total[0], x.sum(), rtol=1e-6)


def staged_sums_are_right(args):
    x, staging, ticket, out = args
    np.testing.assert_array_equal(staging, x)
    np.testing.assert_allclose(out, x.reshape(3, 32).sum(axis=0), rtol=1e-6)


def copied_rows_are_right(args):
    x, rows, out = args
    np.testing.assert_array_equal(out, np.tile(x[:32], 2))


# Races the review of the first version of the check found it missing (or
# reporting on correct code): atomics after a plain store, a merge chosen by
# block index, fences passed on by a barrier, block-scoped atomics, memcpy.
PLANTED += [
    Planted("zero_then_count", (4,), (32,), lambda: (np.zeros(1, np.uint32),), count_is_right,
            "global", "lanes", ("counter zeroed", "counter counted")),
    Planted("highest_block_merges", (4,), (32,),
            lambda: (X[:4].copy(), np.zeros(4, np.float32), np.zeros(1, np.uint32), np.zeros(1, np.float32)),
            merge_by_ticket_is_right, "global", "blocks", ("partial stored", "partials summed")),
    Planted("staged_block_sums", (3,), (32,),
            lambda: (X[:96].copy(), np.zeros(96, np.float32), np.zeros(1, np.uint32), np.zeros(32, np.float32)),
            staged_sums_are_right, "global", "blocks", ("staged", "stages summed")),
    Planted("count_in_blocks", (4,), (32,), lambda: (np.zeros(1, np.uint32),), count_is_right,
            "global", "block-scoped", ("counted in blocks", "counted in blocks")),
    Planted("row_by_memcpy", (2,), (64,),
            lambda: (X[:32].copy(), np.full(128, 7, np.float32), np.zeros(64, np.float32)),
            copied_rows_are_right, "global", "warps", ("row copied", "copied row read"),
            more=(("row cleared", "copied row read"),)),
    Planted("warp_staged_sums", (3,), (32,),
            lambda: (X[:96].copy(), np.zeros(96, np.float32), np.zeros(1, np.uint32), np.zeros(32, np.float32)),
            staged_sums_are_right, "global", "blocks", ("lane staged", "lanes summed")),
]
IDS = [p.kernel for p in PLANTED]


def launch(p: Planted, correct: int) -> tuple:
    args = p.arguments()
    module(SOURCE, "race").get_function(p.kernel)(p.grid, p.block, (*args, np.int32(correct)),
                                                   shared_mem=p.shared_mem)
    return args


@pytest.mark.parametrize("p", PLANTED, ids=IDS)
def test_planted_race_is_reported_on_every_run_between_its_two_lines(p):
    expected = {frozenset(marked_line(m) for m in pair) for pair in (p.lines, *p.more)}
    for _ in range(RUNS):
        with pytest.raises(hostcuda.SanitizerError) as info:
            launch(p, correct=0)
        races = info.value.races
        assert info.value.sanitizer == "race" and races, info.value.report
        # Every race reported is a planted one, with the right memory and reason.
        assert {(r.memory, r.why) for r in races} == {(p.memory, p.why)}, info.value.report
        assert {r.lines for r in races} == expected, info.value.report


@pytest.mark.parametrize("p", PLANTED, ids=IDS)
def test_clean_twin_runs_clean_and_computes_the_right_values(p):
    p.check(launch(p, correct=1))


def test_report_names_the_kernel_the_variable_the_threads_and_the_lines():
    with pytest.raises(hostcuda.SanitizerError) as info:
        launch(PLANTED[0], correct=0)
    race = info.value.races[0]
    assert race.variable == "__shared__ partials in moments_static_shared"
    writer = race.first if race.first.op == "write" else race.second
    reader = race.second if writer is race.first else race.first
    # Lane 0 of a warp other than 0 writes; a lane of warp 0 reads its partial.
    assert (writer.warp, writer.lane) != (0, 0) and writer.lane == 0 and writer.thread == (32 * writer.warp, 0, 0)
    assert reader.warp == 0 and reader.lane == writer.warp and reader.block == writer.block == (0, 0, 0)
    assert writer.location == marked_line("partial written") and reader.location == marked_line("partial read")
    text = info.value.report
    for piece in ("'moments_static_shared'", "race on shared memory", "__shared__ partials in moments_static_shared",
                  f"thread {writer.thread} of block (0, 0, 0) (warp {writer.warp}, lane 0)",
                  "block_moments", marked_line("partial read"), "no __syncthreads()"):
        assert piece in text, piece


def test_global_memory_is_named_by_kernel_argument():
    with pytest.raises(hostcuda.SanitizerError) as info:
        launch(next(p for p in PLANTED if p.kernel == "neighbour_block_read"), correct=0)
    assert {r.variable for r in info.value.races} == {"argument 1 (float32 array)"}
    assert all(0 <= r.offset < 96 * 4 and r.first.block != r.second.block for r in info.value.races)


def test_atomics_on_one_address_do_not_race_but_a_plain_read_of_them_does():
    src = r'''
    extern "C" __global__ void count(int* counter, int* seen, int plain) {
      atomicAdd(counter, 1);
      if (plain) seen[blockIdx.x * blockDim.x + threadIdx.x] = *counter;
    }'''
    k = hostcuda.RawModule(code=src, sanitize="race").get_function("count")
    counter, seen = np.zeros(1, np.int32), np.zeros(128, np.int32)
    k((2,), (64,), (counter, seen, np.int32(0)))
    assert counter[0] == 128
    with pytest.raises(hostcuda.SanitizerError) as info:
        k((2,), (64,), (np.zeros(1, np.int32), seen, np.int32(1)))
    assert {(r.first.atomic, r.second.atomic) for r in info.value.races} <= {(True, False), (False, True)}
    assert {r.variable for r in info.value.races} == {"argument 0 (int32 array)"}


def test_block_scoped_fence_does_not_hand_off_between_blocks():
    src = r'''
    extern "C" __global__ void hand_off(float* partial, unsigned* ticket, float* total, int device_scope) {
      if (threadIdx.x != 0) return;
      partial[blockIdx.x] = blockIdx.x + 1.0f;
      if (device_scope) __threadfence(); else __threadfence_block();
      if (atomicInc(ticket, gridDim.x - 1) == gridDim.x - 1) {
        float s = 0.0f;
        for (unsigned b = 0; b < gridDim.x; ++b) s += partial[b];
        *total = s;
      }
    }'''
    k = hostcuda.RawModule(code=src, sanitize="race").get_function("hand_off")
    args = lambda: (np.zeros(3, np.float32), np.zeros(1, np.uint32), np.zeros(1, np.float32))  # noqa: E731
    total = args()
    k((3,), (32,), (*total, np.int32(1)))
    assert total[2][0] == 6
    with pytest.raises(hostcuda.SanitizerError, match="different blocks"):
        k((3,), (32,), (*args(), np.int32(0)))


def test_static_shared_memory_is_new_memory_in_every_block():
    # Each block writes its shared slot in one thread and reads it in another
    # after a barrier: no race, although the blocks reuse the same host storage.
    src = r'''
    extern "C" __global__ void relay(int* out) {
      __shared__ int slot;
      if (threadIdx.x == 0) slot = blockIdx.x;
      __syncthreads();
      if (threadIdx.x == 1) out[blockIdx.x] = slot;
    }'''
    out = np.zeros(4, np.int32)
    hostcuda.RawModule(code=src, sanitize="race").get_function("relay")((4,), (64,), (out,))
    np.testing.assert_array_equal(out, np.arange(4))


def test_planted_sources_compile_for_the_gate():
    # planted_races.cu is in the manifest, so the NVRTC gate compiles it as real CUDA.
    from cuda_kernels import manifest
    assert any(Path(s.path).name == SOURCE for s in manifest().SOURCES)


def test_race_builds_name_no_checkout_so_one_cache_serves_every_checkout(tmp_path, monkeypatch):
    # The cache key holds no path, so a build made from one checkout is used
    # from others: its debug information must name the harness's headers by
    # the fixed prefix, or a report from another checkout would locate an
    # atomic in the harness instead of the kernel's line.
    monkeypatch.setenv("CUPYBN_HOSTCUDA_CACHE", str(tmp_path))
    kernel = module.__wrapped__(SOURCE, "race").get_function("zero_then_count")  # built afresh, into tmp_path
    with pytest.raises(hostcuda.SanitizerError) as info:
        kernel((4,), (32,), (np.zeros(1, np.uint32), np.int32(0)))
    assert {r.lines for r in info.value.races} == {
        frozenset({marked_line("counter zeroed"), marked_line("counter counted")})}
    (exe,) = tmp_path.glob("*.race.exe")
    include = str(hostcuda_build.INCLUDE_DIR).encode()
    for built in (exe, *tmp_path.glob("*.racecheck.o")):
        assert built.read_bytes().count(include) == 0, f"{built.name} names {hostcuda_build.INCLUDE_DIR}"
