"""What the experiments share: settings checks, the sigmoid, softmax cross-entropy,
the order of the minibatches, moving results to the host."""
from __future__ import annotations

import math
import numbers

import numpy as np

from .data import Dataset


def sigmoid(u, xp):
    return 0.5 * (xp.tanh(0.5 * u) + 1.0)  # no overflow for large |u|


def to_numpy(a) -> np.ndarray:
    return a.get() if hasattr(a, "get") else np.asarray(a)  # CuPy arrays: one copy to the host


def softmax_cross_entropy(logits, labels, xp):
    """Mean cross-entropy of softmax(logits) and its gradient with respect to the logits."""
    logits = logits - logits.max(axis=1, keepdims=True)
    p = xp.exp(logits)
    p /= p.sum(axis=1, keepdims=True)
    n = len(logits)
    rows = xp.arange(n)
    loss = float(-xp.log(p[rows, labels] + 1e-12).mean())
    g = p
    g[rows, labels] -= 1.0
    g /= n
    return loss, g


def shard_of(batch_size: int, comm) -> slice:
    """This rank's rows of a batch of ``batch_size`` split over ``comm``'s ranks as
    evenly as it goes (the first ``batch_size % size`` ranks take one row more)."""
    per, extra = divmod(batch_size, comm.size)
    start = comm.rank * per + min(comm.rank, extra)
    return slice(start, start + per + (comm.rank < extra))


def sum_over_ranks(comm, arrays, xp) -> list:
    """Each array summed over ``comm``'s ranks: one exchange, added in rank order in
    float64 (so every rank gets the same bits), rounded once to the arrays' dtype."""
    flat = np.concatenate([to_numpy(a).ravel().astype(np.float64) for a in arrays])
    total = np.zeros_like(flat)
    for part in comm.allgather(flat):
        total += part
    out, at = [], 0
    for a in arrays:
        out.append(xp.asarray(total[at:at + a.size].reshape(a.shape).astype(a.dtype)))
        at += a.size
    return out


class BatchOrder:
    """Minibatch indices from ``rng``: a fresh permutation of the training set each
    epoch, cut into batches of ``batch_size`` (a batch may span two epochs)."""

    def __init__(self, n: int, batch_size: int, rng):
        self.n, self.batch_size, self.rng = n, batch_size, rng
        self._order = np.empty(0, np.int64)

    def next(self) -> np.ndarray:
        if len(self._order) < self.batch_size:
            self._order = np.concatenate([self._order, self.rng.permutation(self.n)])
        idx, self._order = self._order[:self.batch_size], self._order[self.batch_size:]
        return idx


def check_settings(data: Dataset, *, steps, batch_size, lr, seed) -> None:
    """ValueError naming the first setting of :func:`run` that is out of its range."""
    def integer(v) -> bool:
        return isinstance(v, numbers.Integral) and not isinstance(v, (bool, np.bool_))

    n = len(data.x_train)
    if not (integer(steps) and steps >= 1):
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    if not (integer(batch_size) and 2 <= batch_size <= n):
        raise ValueError(f"batch_size must be an integer from 2 (Batch Normalization needs two values) to "
                         f"{n} (the training set's size), got {batch_size!r}")
    if not (isinstance(lr, numbers.Real) and math.isfinite(lr) and float(lr) > 0):
        raise ValueError(f"lr must be a finite number > 0, got {lr!r}")
    if not (integer(seed) and seed >= 0):
        raise ValueError(f"seed must be an integer >= 0, got {seed!r}")
