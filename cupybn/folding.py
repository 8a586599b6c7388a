"""Folding inference-mode Batch Normalization into the linear or convolution layer before it.

In eval mode BN is a per-channel affine map, ``y = (u - mean) * s + beta`` with
``s = gamma / sqrt(var + eps)``; when ``u = W * x + b`` comes from a linear or
convolution layer, the pair is one layer with ``W' = W * s`` (each output
channel's weights scaled) and ``b' = (b - mean) * s + beta``.  Both are computed
in float64 and rounded once to the weight's dtype.

The usual mistakes are caught by the checks: the output-channel axis must hold
one value per BN channel (``axis=0`` for (out, in) linear and (out, in, k...)
convolution weights, ``axis=-1`` for channels-last (k..., in, out) ones), eps is
the BN layer's own (PyTorch's 1e-5, Keras's 1e-3), and ``running_var`` is a
variance, not a standard deviation (it must not be negative).
"""
from __future__ import annotations

import numpy as np

from ._layout import canonical_axis
from .api import _check_real, _check_vector, _is_float_dtype, _positive
from .backends import _is_cupy_array


def _module(a):
    if _is_cupy_array(a):
        import cupy  # noqa: PLC0415 - CuPy arrays were passed, so CuPy is there

        return cupy
    return np


def _check_weight(weight):
    if not hasattr(weight, "dtype") or not hasattr(weight, "shape"):
        raise TypeError(f"weight must be a NumPy or CuPy array, got {type(weight).__name__}")
    if not _is_float_dtype(weight.dtype):
        raise TypeError(f"weight must have a floating dtype, got {weight.dtype}")
    if weight.ndim < 2:
        raise ValueError(f"weight must have at least 2 dimensions (output and input channels), got shape "
                         f"{tuple(weight.shape)}")


def fold_batch_norm(weight, bias=None, *, running_mean, running_var, gamma=None, beta=None, eps=1e-5, axis=0):
    """``(weight', bias')``: the layer ``weight``/``bias`` followed by inference-mode BN
    with these statistics and parameters, as one layer.

    ``axis`` is the weight's output-channel axis (0 for PyTorch's linear and
    convolution weights, -1 for channels-last ones).  ``bias`` None means no
    bias; gamma/beta None mean 1 and 0.  The results have the weight's dtype
    and array module (NumPy or CuPy); the bias is always returned.
    """
    _check_weight(weight)
    ax = canonical_axis(axis, weight.ndim)
    channels = weight.shape[ax]
    xp = _module(weight)
    vectors = {"running_mean": running_mean, "running_var": running_var, "gamma": gamma, "beta": beta,
               "bias": bias}
    for name, v in vectors.items():
        if v is None and name.startswith("running"):
            raise TypeError(f"{name} must be an array of shape ({channels},), got None")
        _check_vector(name, v, channels)
        if v is not None and _module(v) is not xp:
            raise TypeError(f"{name} and weight must come from the same array library")
    eps = _check_real("eps", eps, _positive, "a finite number > 0")
    var = xp.asarray(running_var, np.float64)
    if bool(xp.any(var < 0)):
        raise ValueError("running_var must not be negative: it is a variance (a standard deviation squared)")
    scale = 1.0 / xp.sqrt(var + eps)
    if gamma is not None:
        scale = scale * xp.asarray(gamma, np.float64)
    shift = -xp.asarray(running_mean, np.float64) * scale
    if bias is not None:
        shift = shift + xp.asarray(bias, np.float64) * scale
    if beta is not None:
        shift = shift + xp.asarray(beta, np.float64)
    along = [1] * weight.ndim
    along[ax] = channels
    folded = (xp.asarray(weight, np.float64) * scale.reshape(along)).astype(weight.dtype)
    return folded, shift.astype(weight.dtype)
