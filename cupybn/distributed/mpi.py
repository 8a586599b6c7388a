"""The MPI engine: synchronised Batch Normalization over an mpi4py communicator.

``MPI()`` wraps ``mpi4py.MPI.COMM_WORLD`` (or the communicator given).  Each
exchange gathers every rank's float64 vector to every rank in two MPI calls on
buffers: ``Allgather`` of the lengths, then ``Allgatherv`` of the values.  The
lengths go first so that ranks whose vectors differ, as after a mismatch, still
complete the exchange and raise together.  (mpi4py's pickling ``allgather``
does the same in one call, but costs 10x as long for a small vector and 30x
for a large one on the development machine.)  NumPy and CuPy arrays alike: the vectors hold per-channel
statistics in host memory, a few kilobytes at most.

mpi4py is imported when an ``MPI`` is made, never by ``import cupybn``.
"""
from __future__ import annotations

import numpy as np


class MPI:
    """A communicator for ``batch_norm(..., comm=MPI())`` and ``BatchNorm(..., comm=MPI())``."""

    name = "mpi"

    def __init__(self, comm=None):
        if comm is None:
            try:
                from mpi4py import MPI as _mpi  # noqa: PLC0415 - an optional dependency
            except ImportError as error:
                raise ImportError("cupybn.distributed.MPI needs mpi4py and an MPI library: pip install mpi4py "
                                  "mpich (or use your cluster's MPI)") from error
            comm = _mpi.COMM_WORLD
        self.comm = comm
        self.rank = comm.Get_rank()
        self.size = comm.Get_size()
        self.collectives = 0
        self.bytes_sent = 0

    def __repr__(self) -> str:
        return f"MPI(rank={self.rank}, size={self.size})"

    def allgather(self, vector) -> list[np.ndarray]:
        """Every rank's ``vector`` (1-D float64, lengths may differ), in rank order."""
        data = np.ascontiguousarray(vector, np.float64).ravel()
        counts = np.empty(self.size, np.int64)
        self.comm.Allgather(np.array([data.size], np.int64), counts)
        received = np.empty(int(counts.sum()), np.float64)
        self.comm.Allgatherv(data, [received, counts])
        self.collectives += 1
        self.bytes_sent += data.nbytes
        return np.split(received, np.cumsum(counts)[:-1])
