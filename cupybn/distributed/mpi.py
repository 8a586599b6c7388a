"""The MPI engine: synchronised Batch Normalization over an mpi4py communicator.

``MPI()`` wraps ``mpi4py.MPI.COMM_WORLD`` (or the communicator given).  Each
exchange is one ``allgather`` of every rank's float64 vector, sent as bytes
(mpi4py sends the byte counts and then the bytes: two MPI calls, one exchange),
so ranks whose vectors differ in length, as after a mismatch, still complete it
and raise together.  NumPy and CuPy arrays alike: the vectors hold per-channel
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
        data = np.ascontiguousarray(vector, np.float64).ravel().tobytes()
        self.collectives += 1
        self.bytes_sent += len(data)
        return [np.frombuffer(b, np.float64) for b in self.comm.allgather(data)]
