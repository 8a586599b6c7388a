"""Warp-level collectives on the host harness behave as CUDA defines them.

Kernels are in tests/cuda/warp_collectives.cu.  Shuffles are checked against a
lane-by-lane model of CUDA's rules (source lane, width segments, out-of-range
lanes keeping their own value) for every type CUDA overloads them for.
"""
from __future__ import annotations

import numpy as np
import pytest
from cuda_kernels import manifest, module
from hypothesis import given
from hypothesis import strategies as st

from cupybn.testing import hostcuda

WARP = "warp_collectives.cu"
NP_TYPES = {"int": np.int32, "unsigned int": np.uint32, "long long": np.int64, "unsigned long long": np.uint64,
            "float": np.float32, "double": np.float64}


def kernel(name: str, sanitize: str | None = None) -> hostcuda.Function:
    return module(WARP, sanitize).get_function(name)


def expected_shuffles(v: np.ndarray, p: int, width: int) -> np.ndarray:
    """CUDA's four shuffles of v (one warp per 32 values), lane by lane."""
    out = np.empty((v.size, 4), v.dtype)
    for i in range(v.size):
        base, lane = i - i % 32, i % 32
        seg, pos = lane - lane % width, lane % width
        sources = [
            seg + p % width,                                      # __shfl_sync: srcLane modulo width
            lane - p if pos >= p else lane,                       # __shfl_up_sync
            lane + p if pos + p < width else lane,                # __shfl_down_sync
            (lane ^ p) if (lane ^ p) - (lane ^ p) % width <= seg else lane,  # xor: never a later segment
        ]
        out[i] = [v[base + s] for s in sources]
    return out


@pytest.mark.parametrize("ctype", sorted(NP_TYPES))
@given(p=st.integers(0, 31), width=st.sampled_from([1, 2, 4, 8, 16, 32]), seed=st.integers(0, 2**32 - 1))
def test_shuffles_follow_cudas_lane_rules(ctype, p, width, seed):
    assert f"shuffles<{ctype}>" in manifest().SOURCES[1].name_expressions
    dtype = NP_TYPES[ctype]
    rng = np.random.default_rng(seed)
    v = rng.integers(0, 1000, 64).astype(dtype) + (dtype(0.5) if np.dtype(dtype).kind == "f" else 0)
    out = np.zeros((64, 4), dtype)
    kernel(f"shuffles<{ctype}>")((2,), (32,), (v, out, np.int32(p), np.int32(width)))
    np.testing.assert_array_equal(out, expected_shuffles(v, p, width))


def test_butterfly_sum_gives_every_lane_the_warp_total():
    x = np.arange(96, dtype=np.float32)
    out = np.zeros(96, np.float32)
    kernel("warp_sums")((1,), (96,), (x, out))
    np.testing.assert_array_equal(out, np.repeat(x.reshape(3, 32).sum(axis=1), 32))


@given(st.lists(st.integers(0, 1), min_size=64, max_size=64))
def test_ballot_all_and_any_see_every_lane(bits):
    x = np.array(bits, np.int32)
    out = np.zeros((64, 3), np.uint32)
    kernel("warp_votes")((1,), (64,), (x, out))
    for w in range(2):
        lanes = x[32 * w:32 * (w + 1)]
        ballot = sum(1 << k for k in range(32) if lanes[k])
        np.testing.assert_array_equal(out[32 * w:32 * (w + 1)], [[ballot, lanes.all(), lanes.any()]] * 32)


def test_a_mask_of_even_lanes_synchronises_only_those_lanes():
    x = np.arange(64, dtype=np.int32)
    out = np.zeros(64, np.int32)
    kernel("even_lanes_sum")((1,), (64,), (x, out))
    # Lane 0 of each warp holds the sum over that warp's even lanes.
    assert out[0] == x[0:32:2].sum() and out[32] == x[32:64:2].sum()
    assert (out[1::2] == -1).all()


def test_syncwarp_orders_shared_memory_between_lanes():
    x = np.arange(32, dtype=np.int32) * 10
    out = np.zeros(32, np.int32)
    kernel("rotate_through_shared")((1,), (32,), (x, out))
    np.testing.assert_array_equal(out, np.roll(x, -1))


def test_a_lane_waiting_elsewhere_during_a_full_warp_shuffle_is_reported():
    x = np.ones(32, np.float32)
    with pytest.raises(hostcuda.KernelError, match=r"meet at different warp collectives|deadlock"):
        kernel("shuffle_and_syncwarp")((1,), (32,), (x, x.copy()))


def test_a_lane_that_returned_is_not_waited_for_but_cannot_be_read():
    x = np.arange(32, dtype=np.float32)
    out = np.full(32, -1, np.float32)
    kernel("shuffle_missing_lane")((1,), (32,), (x, out, np.int32(0)))  # shifting down never reads lane 0
    np.testing.assert_array_equal(out, np.concatenate([[-1], x[2:], [31]]))
    with pytest.raises(hostcuda.KernelError, match="reads lane 0, .* has exited"):
        kernel("shuffle_missing_lane")((1,), (32,), (x, out, np.int32(1)))


@pytest.mark.parametrize("sanitize", [None, "race"])
def test_collectives_wait_only_for_lanes_that_have_not_exited(sanitize):
    x = (np.arange(16, dtype=np.int32) - 5)
    out = np.zeros(48, np.int32)
    kernel("collectives_after_exit", sanitize)((1,), (32,), (x, out))
    neighbour = np.roll(x, -1)
    np.testing.assert_array_equal(out[:16], neighbour)
    assert (out[16:32].view(np.uint32) == sum(1 << i for i in range(16) if neighbour[i] > 0)).all()
    assert (out[32:] == 1).all()


def test_shuffle_from_a_lane_that_does_not_exist_is_reported():
    # A block of 48 threads: its second warp has lanes 0..15 only, and lane 15
    # shuffling down by one reads lane 16.
    v = np.arange(48, dtype=np.float32)
    out = np.zeros((48, 4), np.float32)
    with pytest.raises(hostcuda.KernelError, match="reads lane 16, which is not in mask 0xffffffff, does not exist"):
        kernel("shuffles<float>")((1,), (48,), (v, out, np.int32(1), np.int32(32)))
