"""Per-channel float64 sums of float32 (or float64) products, the way both
NumPy paths take them.

float32 products are summed over short runs by BLAS (a dot per run of RUN
values of a row, or a matrix-vector product per GROUP rows of a column),
and the runs' sums are added up in float64.  Longer float32 runs lose up to
1e-6 relative on quantised data (large offsets).
"""
from __future__ import annotations

import functools

import numpy as np

RUN = 256
GROUP = 64


def row_dots(a, b):
    """float64 per-channel ``sum(a * b)`` of (ko, kc, ki) blocks, over rows.

    ``b=None`` sums ``a``.  float32 products are summed over runs of RUN values
    (BLAS dot), the runs in float64.
    """
    ko, kc, ki = a.shape
    full = ki - ki % RUN
    total = np.zeros(kc)
    for lo, hi, run in ((0, full, RUN), (full, ki, ki - full)):
        if hi == lo:
            continue
        ar = a[..., lo:hi].reshape(ko, kc, -1, run)
        br = _ones(run, a.dtype) if b is None else b[..., lo:hi].reshape(ko, kc, -1, run)
        total += _vecdot(ar, br).sum(axis=(0, 2), dtype=np.float64)
    return total


def _matmul_vecdot(a, b):
    """``np.vecdot`` for NumPy 1.x: the same BLAS dot per row, so the same bits."""
    return np.matmul(a[..., None, :], b[..., :, None])[..., 0, 0]


_vecdot = getattr(np, "vecdot", _matmul_vecdot)


def column_dots(a, b, products):
    """float64 per-channel ``sum(a * b)`` of (ko, kc, inner) blocks, down columns.

    ``b=None`` sums ``a``; otherwise the products go to the scratch array
    ``products`` first.  Each GROUP rows are summed by a BLAS matrix-vector
    product with a vector of ones (several float32 accumulators per column:
    faster and closer than a row-by-row sum), the groups in float64.
    """
    ko, kc, inner = a.shape
    a2 = a.reshape(ko, kc * inner)
    if b is not None:
        a2 = np.multiply(a2, b.reshape(a2.shape), out=products.reshape(a2.shape))
    full = ko - ko % GROUP
    if full:
        total = np.matmul(_ones(GROUP, a2.dtype), a2[:full].reshape(-1, GROUP, a2.shape[1])).sum(
            axis=0, dtype=np.float64)
        if full < ko:
            total += np.matmul(_ones(ko - full, a2.dtype), a2[full:])
    else:
        total = np.matmul(_ones(ko, a2.dtype), a2).astype(np.float64)
    return total if inner == 1 else total.reshape(kc, inner).sum(axis=1)


@functools.lru_cache(maxsize=256)
def _ones(n: int, dtype) -> np.ndarray:
    ones = np.ones(n, dtype)
    ones.flags.writeable = False
    return ones
