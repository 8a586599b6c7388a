"""Ranks as threads of one process: a communicator for tests, examples and notebooks.

``ThreadWorld(size)`` is a world of ``size`` ranks that exchange through memory;
``world.comm(rank)`` is rank ``rank``'s communicator, to be used from its own
thread (``world.run(fn)`` starts them).  It has the MPI engine's interface and
semantics, so code written against it runs unchanged under MPI, and it lets
property tests draw many splits of a batch without starting processes.  A rank
that does not arrive within ``timeout`` seconds breaks the exchange for every
rank (``threading.BrokenBarrierError``) instead of leaving them waiting.
"""
from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np


class ThreadWorld:
    def __init__(self, size: int, *, timeout: float = 60.0):
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"size must be a positive int, got {size!r}")
        self.size = size
        self._barrier = threading.Barrier(size, timeout=timeout)
        self._slots: list = [None] * size

    def comm(self, rank: int) -> ThreadComm:
        if not 0 <= rank < self.size:
            raise ValueError(f"rank must be in [0, {self.size - 1}], got {rank}")
        return ThreadComm(self, rank)

    def run(self, fn):
        """``[fn(comm) for each rank]``, each rank on its own thread; the first
        exception of any rank (lowest rank first) is raised after all have ended."""
        with ThreadPoolExecutor(self.size, thread_name_prefix="cupybn-rank") as pool:
            futures = [pool.submit(fn, self.comm(rank)) for rank in range(self.size)]
            outcomes = [(f.exception(), None if f.exception() else f.result()) for f in futures]
        for error, _ in outcomes:
            if error is not None:
                raise error
        return [result for _, result in outcomes]


class ThreadComm:
    """One rank of a :class:`ThreadWorld`; counts its collectives and bytes sent."""

    name = "threads"

    def __init__(self, world: ThreadWorld, rank: int):
        self._world = world
        self.rank = rank
        self.size = world.size
        self.collectives = 0
        self.bytes_sent = 0

    def allgather(self, vector) -> list[np.ndarray]:
        """Every rank's ``vector`` (1-D float64, lengths may differ), in rank order."""
        data = np.array(vector, np.float64).ravel()  # a copy: the sender may reuse its buffer
        self.collectives += 1
        self.bytes_sent += data.nbytes
        world = self._world
        world._slots[self.rank] = data
        world._barrier.wait()  # everyone has written
        gathered = list(world._slots)
        world._barrier.wait()  # everyone has read: the slots may be reused
        return gathered
