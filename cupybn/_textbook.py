"""Textbook Batch Normalization in plain NumPy: the baseline people write.

This is the formula of Ioffe & Szegedy (2015) transcribed directly: a mean and
a two-pass variance over every axis but the channel axis (``keepdims`` so the
per-channel values broadcast), arithmetic in the dtype NumPy picks for the
inputs, and every intermediate a full-size temporary.  It is the baseline of
``python -m cupybn compare`` and of ``benchmarks/``; run in float64 it is also
the reference those compare against.  The same functions run on CuPy arrays
(the GPU baseline of ``benchmarks/bench_gpu.py``, which ``python -m cupybn
gpu-check`` runs): NumPy's ufuncs dispatch to CuPy's, and everything else is
an array method.

Not part of the public API.
"""
from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np


class Cache(NamedTuple):
    """What :func:`backward` needs from :func:`forward_train`."""

    x: Any
    mean: Any
    var: Any
    gamma: Any
    eps: float
    axis: int


def _reduce_axes(x, axis: int) -> tuple[int, ...]:
    axis %= x.ndim
    return tuple(i for i in range(x.ndim) if i != axis)


def _per_channel(v, x, axis: int):
    """Reshape a (C,) vector to broadcast along ``axis`` of ``x``."""
    shape = [1] * x.ndim
    shape[axis] = -1
    return v.reshape(shape)


def forward_train(x, gamma, beta, *, eps=1e-5, axis=1, running_mean=None, running_var=None, momentum=0.1):
    """Training-mode forward: ``(y, cache)``; updates running stats in place if given."""
    axes = _reduce_axes(x, axis)
    mean = x.mean(axis=axes, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=axes, keepdims=True)
    xhat = (x - mean) / np.sqrt(var + eps)
    y = xhat * _per_channel(gamma, x, axis) + _per_channel(beta, x, axis)
    if running_mean is not None:
        m = x.size // x.shape[axis]
        running_mean[...] = (1 - momentum) * running_mean + momentum * mean.ravel()
        running_var[...] = (1 - momentum) * running_var + momentum * var.ravel() * (m / (m - 1))
    # float16 data times float32 gamma promotes; hand back x's dtype like the others do
    return y.astype(x.dtype, copy=False), Cache(x, mean, var, gamma, eps, axis)


def forward_infer(x, gamma, beta, running_mean, running_var, *, eps=1e-5, axis=1):
    """Inference-mode forward with the running statistics."""
    mean = _per_channel(running_mean, x, axis)
    var = _per_channel(running_var, x, axis)
    y = (x - mean) / np.sqrt(var + eps) * _per_channel(gamma, x, axis) + _per_channel(beta, x, axis)
    return y.astype(x.dtype, copy=False)


def backward(dy, cache: Cache):
    """Training-mode gradients ``(dx, dgamma, dbeta)``: the paper's chain rule, step by step."""
    x, mean, var, gamma, eps, axis = cache
    axes = _reduce_axes(x, axis)
    m = x.size // x.shape[axis]
    inv_std = 1.0 / np.sqrt(var + eps)
    xmu = x - mean
    dxhat = dy * _per_channel(gamma, x, axis)
    dvar = (dxhat * xmu).sum(axis=axes, keepdims=True) * -0.5 * inv_std**3
    dmean = (-dxhat * inv_std).sum(axis=axes, keepdims=True) + dvar * (-2.0 * xmu).mean(axis=axes, keepdims=True)
    dx = dxhat * inv_std + dvar * 2.0 * xmu / m + dmean / m
    dgamma = (dy * xmu * inv_std).sum(axis=axes)
    dbeta = dy.sum(axis=axes)
    return dx.astype(x.dtype, copy=False), dgamma, dbeta
