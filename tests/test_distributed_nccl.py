"""The NCCL engine (cupybn/distributed/nccl.py) behind the same interface as MPI.

Without a GPU its code path runs against a stand-in NCCL communicator whose
allGather copies host memory between ranks that are threads (and insists, as NCCL
does, on the same count from every rank): the fixed-width slots, the padding and
the failure report for statistics that do not fit.  On a GPU (gpu-check) a world
of one rank runs the real NCCL.
"""
import ctypes

import numpy as np
import pytest
from conftest import needs_gpu

import cupybn
from cupybn.distributed import NCCL, ThreadWorld
from cupybn.distributed.threads import ThreadComm


class StandInNccl:
    """The part of cupy.cuda.nccl.NcclCommunicator that the engine uses, on host memory."""

    def __init__(self, world: ThreadWorld, rank: int):
        self._comm = ThreadComm(world, rank)

    def rank_id(self):
        return self._comm.rank

    def size(self):
        return self._comm.size

    def allGather(self, send, recv, count, datatype, stream):  # noqa: N802 - NCCL's name
        assert datatype == 8 and stream == 0  # ncclFloat64; host stand-ins have no stream
        sent = np.ctypeslib.as_array((ctypes.c_double * count).from_address(send)).copy()
        gathered = self._comm.allgather(np.concatenate([[count], sent]))
        counts = {int(g[0]) for g in gathered}
        assert counts == {count}, f"NCCL needs one count on every rank, got {counts}"
        out = np.concatenate([g[1:] for g in gathered])
        ctypes.memmove(recv, out.ctypes.data, out.nbytes)


def nccl_world(size, **kwargs):
    world = ThreadWorld(size, timeout=30)
    return world, [NCCL(StandInNccl(world, r), xp=np, **kwargs) for r in range(size)]


def training_step(comm, x, dy):
    rm, rv = np.zeros(x.shape[1], np.float32), np.ones(x.shape[1], np.float32)
    y, saved = cupybn.batch_norm(x, np.full(x.shape[1], 1.5, np.float32), np.ones(x.shape[1], np.float32),
                                 running_mean=rm, running_var=rv, comm=comm)
    return (y, *cupybn.batch_norm_backward(dy, saved), rm, rv)


def test_nccl_gives_the_bits_of_the_other_engines():
    rng = np.random.default_rng(0)
    x = (300 + rng.standard_normal((9, 4, 5))).astype(np.float32)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    cuts = [0, 2, 2, 9]

    def step(comms):
        def rank(r):
            return training_step(comms[r], x[cuts[r]:cuts[r + 1]], dy[cuts[r]:cuts[r + 1]])
        return rank

    world, comms = nccl_world(3)
    with_nccl = world.run(lambda c: step(comms)(c.rank))
    threads = ThreadWorld(3)
    with_threads = threads.run(lambda c: training_step(c, x[cuts[c.rank]:cuts[c.rank + 1]],
                                                       dy[cuts[c.rank]:cuts[c.rank + 1]]))
    for a, b in zip(with_nccl, with_threads, strict=True):
        assert all(u.tobytes() == v.tobytes() for u, v in zip(a, b, strict=True))
    for comm in comms:  # one exchange each way, a fixed-width slot each time
        assert comm.collectives == 2 and comm.bytes_sent == 2 * 8 * comm.width


def test_statistics_wider_than_the_slot_make_every_rank_raise():
    world, comms = nccl_world(2, max_channels=3)
    x = np.ones((4, 3), np.float32)
    wide = np.ones((4, 5), np.float32)

    def rank(c):
        # rank 1 raises the whole story; rank 0 what fitted in the slot's report
        match = (r"5-channel statistics do not fit this NCCL communicator \(max_channels=3\)" if c.rank == 1
                 else r"1 of 2 ranks could not take part in the forward \(statistics\) exchange")
        with pytest.raises(ValueError, match=match):
            cupybn.batch_norm(wide if c.rank == 1 else x, comm=comms[c.rank])
        return True

    assert world.run(rank) == [True, True]


def test_max_channels_must_be_a_positive_int():
    world = ThreadWorld(1)
    with pytest.raises(ValueError, match="max_channels must be a positive int"):
        NCCL(StandInNccl(world, 0), xp=np, max_channels=0)


@needs_gpu
def test_nccl_world_of_one_on_the_gpu_matches_a_thread_world_cupy_gpu():
    cupy = pytest.importorskip("cupy")
    from cupy.cuda import nccl

    if not getattr(nccl, "available", True):
        pytest.fail("cupy.cuda.nccl is not available: install NCCL for CuPy (pip install nvidia-nccl-cu12 or -cu13)")
    rng = np.random.default_rng(1)
    x = (1e3 + rng.standard_normal((16, 8, 6, 6))).astype(np.float32)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    comm = NCCL.single()
    on_gpu = training_step(comm, cupy.asarray(x), cupy.asarray(dy))
    on_threads = ThreadWorld(1).run(lambda c: training_step(c, cupy.asarray(x), cupy.asarray(dy)))[0]
    for a, b in zip(on_gpu, on_threads, strict=True):
        assert cupy.asnumpy(a).tobytes() == cupy.asnumpy(b).tobytes()
    local = training_step(None, cupy.asarray(x), cupy.asarray(dy))
    np.testing.assert_allclose(cupy.asnumpy(on_gpu[0]), cupy.asnumpy(local[0]), rtol=1e-5, atol=1e-5)
    assert comm.collectives == 2
