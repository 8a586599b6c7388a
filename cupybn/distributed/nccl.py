"""The NCCL engine: synchronised Batch Normalization over NCCL, for CuPy arrays.

``NCCL(comm)`` wraps a ``cupy.cuda.nccl.NcclCommunicator`` (``NCCL.over_mpi()``
makes one per process, the unique id sent by MPI; ``NCCL.single()`` is the world
of one rank on the current GPU).  Each exchange is one ``ncclAllGather`` on the
current stream.  NCCL needs the same count from every rank, so each rank's vector
travels in a slot of fixed width, ``1 + 12 + 3 * max_channels`` float64 values:
its length, then the vector, then padding.  A vector that does not fit (more
than ``max_channels`` channels) is replaced by a failure report, so every rank
raises instead of some waiting.  Every rank must make its ``NCCL`` with the same
``max_channels`` (NCCL cannot tell a rank that sends another count: it waits).

The exchange's result is read on the host (a copy of ``size`` slots), because
the checks that make every rank raise together (ranks that disagree, a rank that
failed) and the merge run there: one host synchronisation per call, after the
all-gather was queued behind the work before it.

CuPy is imported when an ``NCCL`` is made (or ``xp`` is given), never by
``import cupybn``.
"""
from __future__ import annotations

import numpy as np

from . import _merge

DEFAULT_MAX_CHANNELS = 4096
_NCCL_FLOAT64 = 8  # ncclDataType_t: ncclFloat64 (= ncclDouble)


class NCCL:
    """A communicator for ``batch_norm(..., comm=NCCL(...))`` on CuPy arrays.

    ``xp`` and ``nccl`` default to ``cupy`` and ``cupy.cuda.nccl``; tests pass
    stand-ins that run on the host.
    """

    name = "nccl"

    def __init__(self, comm, *, max_channels: int = DEFAULT_MAX_CHANNELS, xp=None):
        if isinstance(max_channels, bool) or not isinstance(max_channels, int) or max_channels < 1:
            raise ValueError(f"max_channels must be a positive int, got {max_channels!r}")
        if xp is None:
            import cupy  # noqa: PLC0415 - an optional dependency

            xp = cupy
        self.comm = comm
        self.xp = xp
        self.rank = comm.rank_id()
        self.size = comm.size()
        self.max_channels = max_channels
        self.width = 1 + len(_merge.HEADER) + 3 * max_channels
        self.collectives = 0
        self.bytes_sent = 0
        self._send = xp.zeros(self.width, np.float64)
        self._recv = xp.zeros(self.size * self.width, np.float64)

    @classmethod
    def single(cls, **kwargs) -> NCCL:
        """A world of one rank on the current GPU (what gpu-check runs)."""
        from cupy.cuda import nccl  # noqa: PLC0415

        return cls(nccl.NcclCommunicator(1, nccl.get_unique_id(), 0), **kwargs)

    @classmethod
    def over_mpi(cls, mpi_comm=None, *, choose_device: bool = True, **kwargs) -> NCCL:
        """One rank per MPI process; rank 0's NCCL unique id reaches the others
        through MPI.  ``choose_device`` makes each process use GPU ``local rank %
        GPUs`` (its rank among the processes of its node), as NCCL needs one GPU per
        rank; False keeps each process's current device.  Every rank must give the
        same ``max_channels``: NCCL needs the same count from all."""
        import cupy  # noqa: PLC0415
        from cupy.cuda import nccl  # noqa: PLC0415
        from mpi4py import MPI as _mpi  # noqa: PLC0415

        mpi_comm = _mpi.COMM_WORLD if mpi_comm is None else mpi_comm
        if choose_device:
            local = mpi_comm.Split_type(_mpi.COMM_TYPE_SHARED)
            cupy.cuda.Device(local.Get_rank() % cupy.cuda.runtime.getDeviceCount()).use()
            local.Free()
        uid = mpi_comm.bcast(nccl.get_unique_id() if mpi_comm.Get_rank() == 0 else None, root=0)
        return cls(nccl.NcclCommunicator(mpi_comm.Get_size(), uid, mpi_comm.Get_rank()), **kwargs)

    def __repr__(self) -> str:
        return f"NCCL(rank={self.rank}, size={self.size}, max_channels={self.max_channels})"

    def allgather(self, vector) -> list[np.ndarray]:
        """Every rank's ``vector`` (1-D float64, lengths may differ), in rank order."""
        data = np.asarray(vector, np.float64).ravel()
        too_wide = None
        if data.size > self.width - 1:  # sent as a failure report that fits; raised here in full
            too_wide = ValueError(f"{(data.size - len(_merge.HEADER)) // 3}-channel statistics do not fit this NCCL "
                                  f"communicator (max_channels={self.max_channels}): make it with a larger "
                                  f"max_channels")
            phase = float(data[1]) if data.size > 1 else _merge.STATISTICS
            data = _merge.pack_failure(phase, too_wide, max_bytes=self.width - 1 - len(_merge.HEADER))
        slot = np.zeros(self.width, np.float64)
        slot[0] = data.size
        slot[1:1 + data.size] = data
        xp = self.xp
        self._send[...] = xp.asarray(slot)
        self.comm.allGather(_pointer(self._send), _pointer(self._recv), self.width, _NCCL_FLOAT64,
                            _current_stream(xp))
        self.collectives += 1
        self.bytes_sent += self._send.nbytes
        slots = np.asarray(self._recv.get() if hasattr(self._recv, "get") else self._recv).reshape(self.size,
                                                                                                    self.width)
        if too_wide is not None:
            raise too_wide
        return [s[1:1 + int(s[0])].copy() for s in slots]


def _pointer(a) -> int:
    """The address of an array's data: CuPy (device) or NumPy (host stand-ins)."""
    ptr = getattr(getattr(a, "data", None), "ptr", None)
    return a.ctypes.data if ptr is None else ptr


def _current_stream(xp) -> int:
    cuda = getattr(xp, "cuda", None)
    return cuda.get_current_stream().ptr if cuda is not None else 0
