"""Synchronised Batch Normalization across processes and GPUs.

Pass a communicator as ``comm`` to :func:`cupybn.batch_norm` or
:class:`cupybn.BatchNorm`, and every rank's call takes its statistics over the
whole batch (the concatenation of every rank's x), with one exchange in the
forward pass and one in the backward pass.  Engines:

* :class:`MPI` (``cupybn.distributed.mpi``): mpi4py, for NumPy and CuPy arrays;
* :class:`NCCL` (``cupybn.distributed.nccl``): NCCL through CuPy, for CuPy arrays;
* :class:`ThreadWorld` (``cupybn.distributed.threads``): ranks as threads of one
  process, for tests and examples.

docs/distributed.md says what is exchanged, what is guaranteed and what a
program must do when only some ranks fail.
"""
from .mpi import MPI
from .nccl import NCCL
from .threads import ThreadComm, ThreadWorld

__all__ = ["MPI", "NCCL", "ThreadComm", "ThreadWorld"]
