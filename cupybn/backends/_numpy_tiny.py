"""Tiny arrays on the NumPy backend: a few NumPy calls in float64.

For a few thousand values a call's cost is its number of NumPy calls (about a
microsecond each), so this path makes as few as it can: x (and dy) widened to
float64 once, a two-pass mean and variance, y and dx rounded once to their
dtype.  float64 arithmetic on float16/bfloat16/float32 data needs no shift:
its sums are exact far below the results' rounding at any offset (an offset of
1e6 standard deviations costs about 1e-10 of one in the mean), so there is no
sample, no retry and no hi/lo pair to carry.  float64 data take the blocked
path, whose double-double mean this path does not reproduce.
"""
from __future__ import annotations

import numpy as np

from ._dots import ones, vecdot
from ._numpy_small import shape_of
from ._running import update_running

_F32 = np.dtype(np.float32)
_F64 = np.dtype(np.float64)
# x3 and dy3 may be strided views: their float64 copies are made C-contiguous, so
# that the 2-D views of shape_of() are views, and work done through them sticks.


def _sum(a):
    """Per-channel sum of a float64 (outer, C, inner) array, by BLAS matrix-vector products
    (a reduction down the columns of a short 2-D array costs a NumPy loop per row)."""
    outer, _, inner = a.shape
    rows = a.reshape(outer, -1) if inner == 1 else np.matmul(a, ones(inner, _F64))
    return np.matmul(ones(outer, _F64), rows)


def _dot(a, b):
    """Per-channel ``sum(a * b)`` of float64 (outer, C, inner) arrays."""
    outer, _, inner = a.shape
    if inner == 1:
        return vecdot(a.reshape(outer, -1).T, b.reshape(outer, -1).T)
    return np.matmul(ones(outer, _F64), vecdot(a, b))


def _rounded(a, dtype):
    """float64 ``a`` rounded once to ``dtype``, as a new array."""
    return a.astype(dtype)


def _outputs(y3, mean, var, inv_std):
    mean_hi = mean.astype(_F32)
    return y3, mean_hi, (mean - mean_hi).astype(_F32), var.astype(_F32), inv_std.astype(_F32)


def _affine(g, d, inv_std, gamma, beta, dtype):
    """``d * (inv_std * gamma) + beta`` rounded to ``dtype``; overwrites ``d``."""
    dv = g.view(d)
    dv *= g.lay(inv_std if gamma is None else inv_std * gamma, _F64)
    if beta is not None:
        dv += g.lay(beta, _F64)
    return _rounded(d, dtype)


def forward_train(x3, gamma, beta, eps, running_mean, running_var, momentum, y_dtype=None):
    """``y_dtype``: what y is rounded to (x3's dtype by default; float32 where an
    epilogue follows)."""
    g = shape_of(x3)
    count = g.count
    d = x3.astype(_F64, order="C")
    mean = _sum(d) / count
    dv = g.view(d)
    dv -= g.lay(mean, _F64)
    var = _dot(d, d) / count
    inv_std = 1.0 / np.sqrt(var + eps)
    y3 = _affine(g, d, inv_std, gamma, beta, x3.dtype if y_dtype is None else y_dtype)
    if running_mean is not None:
        update_running(np, running_mean, running_var, mean, 0.0, var, momentum, count)
    return _outputs(y3, mean, var, inv_std)


def forward_infer(x3, gamma, beta, running_mean, running_var, eps, y_dtype=None):
    mean = running_mean.astype(_F64)
    var = running_var.astype(_F64)
    inv_std = 1.0 / np.sqrt(var + eps)
    g = shape_of(x3)
    d = x3.astype(_F64, order="C")
    dv = g.view(d)
    dv -= g.lay(mean, _F64)
    return _outputs(_affine(g, d, inv_std, gamma, beta, x3.dtype if y_dtype is None else y_dtype), mean, var,
                    inv_std)


def backward(dy3, x3, mean_hi, mean_lo, inv_std, gamma, training):
    """``dx3`` and float64 ``(dgamma, dbeta)``: ``dx = a*dy + b*(x - mean) + c`` per channel."""
    geo = shape_of(x3)
    count = geo.count
    inv = inv_std.astype(_F64)
    d = x3.astype(_F64, order="C")
    dv = geo.view(d)
    dv -= geo.lay(mean_hi.astype(_F64) + mean_lo, _F64)
    g = dy3.astype(_F64, order="C")
    dbeta = _sum(g)
    dgamma = _dot(g, d) * inv
    a = inv if gamma is None else inv * gamma
    gv = geo.view(g)
    gv *= geo.lay(a, _F64)
    if training:
        # dx = a*dy + b*(x - mean) + c
        dv *= geo.lay(a * inv * dgamma / -count, _F64)
        dv += geo.lay(a * dbeta / -count, _F64)
        gv += dv
    return _rounded(g, dy3.dtype), dgamma, dbeta
