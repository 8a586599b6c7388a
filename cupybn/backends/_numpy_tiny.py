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

_F32 = np.dtype(np.float32)
_F64 = np.dtype(np.float64)
_AXES = (0, 2)


def takes(x3, limit: int) -> bool:
    """Whether this path computes ``x3``: float16/bfloat16/float32 data of at most ``limit`` values."""
    return x3.size <= limit and x3.dtype != _F64


def _column(v):
    return v[:, None]


def _rounded(a, dtype):
    """float64 ``a`` rounded once to ``dtype``, as a new array."""
    out = np.empty(a.shape, dtype)
    np.copyto(out, a, casting="unsafe")
    return out


def _outputs(y3, mean, var, inv_std):
    mean_hi = mean.astype(_F32)
    return y3, mean_hi, (mean - mean_hi).astype(_F32), var.astype(_F32), inv_std.astype(_F32)


def _affine(d, inv_std, gamma, beta, dtype):
    """``d * (inv_std * gamma) + beta`` rounded to ``dtype``; overwrites ``d``."""
    d *= _column(inv_std if gamma is None else inv_std * gamma)
    if beta is not None:
        d += _column(beta.astype(_F64))
    return _rounded(d, dtype)


def forward_train(x3, gamma, beta, eps, running_mean, running_var, momentum):
    count = x3.shape[0] * x3.shape[2]
    d = x3.astype(_F64)
    mean = np.add.reduce(d, axis=_AXES) / count
    d -= _column(mean)
    var = np.einsum("ijk,ijk->j", d, d) / count
    inv_std = 1.0 / np.sqrt(var + eps)
    y3 = _affine(d, inv_std, gamma, beta, x3.dtype)
    if running_mean is not None:
        # new = (1 - momentum) * old + momentum * batch, the unbiased variance, rounded once
        keep = 1.0 - momentum
        running_mean[...] = keep * running_mean.astype(_F64) + momentum * mean
        running_var[...] = keep * running_var.astype(_F64) + (momentum * count / (count - 1)) * var
    return _outputs(y3, mean, var, inv_std)


def forward_infer(x3, gamma, beta, running_mean, running_var, eps):
    mean = running_mean.astype(_F64)
    var = running_var.astype(_F64)
    inv_std = 1.0 / np.sqrt(var + eps)
    d = x3.astype(_F64)
    d -= _column(mean)
    return _outputs(_affine(d, inv_std, gamma, beta, x3.dtype), mean, var, inv_std)


def backward(dy3, x3, mean_hi, mean_lo, inv_std, gamma, training):
    """``dx3`` and float64 ``(dgamma, dbeta)``: ``dx = a*dy + b*(x - mean) + c`` per channel."""
    count = x3.shape[0] * x3.shape[2]
    inv = inv_std.astype(_F64)
    d = x3.astype(_F64)
    d -= _column(mean_hi.astype(_F64) + mean_lo)
    g = dy3.astype(_F64)
    dbeta = np.add.reduce(g, axis=_AXES)
    dgamma = np.einsum("ijk,ijk->j", g, d) * inv
    a = inv if gamma is None else inv * gamma
    g *= _column(a)
    if training:
        d *= _column(a * inv * dgamma / -count)
        g += d
        g += _column(a * dbeta / -count)
    return _rounded(g, dy3.dtype), dgamma, dbeta
