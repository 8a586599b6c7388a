"""A float64 reference for Batch Normalization, and the error measures the tests use.

The reference is the textbook formula computed in float64 from the inputs exactly as
given (a float32 or float16 x is widened first, so it sees the same quantised values
the library sees).  It is meant to be obviously right, not fast:

* the mean is kept as a pair ``mean0 + corr``: ``mean0`` is the float64 mean and
  ``corr`` the mean of ``x - mean0``.  ``x - mean0`` is exact when x lies far from
  zero relative to its spread (Sterbenz), so centring loses nothing to an offset of
  1e6 standard deviations even in float64 data, where a single rounded mean would
  already be off by ``ulp(offset)``;
* the variance is the two-pass ``mean((x - mean)**2)``, never ``E[x^2] - E[x]^2``;
* the backward pass is the chain rule written out per channel.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np


class ReferenceForward(NamedTuple):
    """Float64 results of the reference forward pass (per-channel arrays have shape (C,))."""

    y: np.ndarray
    x_hat: np.ndarray
    mean: np.ndarray        # the mean actually used (batch mean, or running mean in inference)
    var: np.ndarray         # biased batch variance (training) or running variance (inference)
    inv_std: np.ndarray
    m: int                  # values per channel (that the statistics came from)
    mask: np.ndarray | None = None  # with a mask: x's shape but 1 on the channel axis, True where counted


def reduce_axes(ndim: int, axis: int) -> tuple[int, ...]:
    """Every axis except the channel axis."""
    axis %= ndim
    return tuple(a for a in range(ndim) if a != axis)


def per_channel(v, ndim: int, axis: int) -> np.ndarray:
    """A (C,) vector reshaped to broadcast along ``axis`` of an ``ndim``-d array."""
    shape = [1] * ndim
    shape[axis % ndim] = -1
    return np.asarray(v, np.float64).reshape(shape)


def _f64(a) -> np.ndarray:
    return np.asarray(a).astype(np.float64)


def _centred(x64: np.ndarray, axes) -> tuple[np.ndarray, np.ndarray]:
    """``(x - mean, mean)`` with ``x - mean`` free of the rounding of a large mean."""
    with np.errstate(all="ignore"):
        mean0 = x64.mean(axis=axes, keepdims=True)
        d = x64 - mean0
        corr = d.mean(axis=axes, keepdims=True)
        return d - corr, mean0 + corr


def full_mask(mask, shape, axis) -> np.ndarray:
    """A mask broadcastable to ``shape`` without axis ``axis``, as booleans of ``shape``
    with 1 on that axis."""
    axis %= len(shape)
    positions = tuple(shape[:axis]) + tuple(shape[axis + 1:])
    return np.expand_dims(np.broadcast_to(np.asarray(mask, bool), positions), axis)


def _masked_centred(x64, axes, kept) -> tuple[np.ndarray, np.ndarray, int]:
    """As :func:`_centred`, the mean taken over the positions ``kept`` selects (values
    elsewhere, NaN included, are never read), and their count."""
    count = int(np.count_nonzero(kept))
    with np.errstate(all="ignore"):
        mean0 = np.where(kept, x64, 0.0).sum(axis=axes, keepdims=True) / count
        d = x64 - mean0
        corr = np.where(kept, d, 0.0).sum(axis=axes, keepdims=True) / count
        return d - corr, mean0 + corr, count


def reference_forward(x, gamma=None, beta=None, *, axis=1, eps=1e-5, training=True,
                      running_mean=None, running_var=None, mask=None) -> ReferenceForward:
    """Batch Normalization of ``x`` in float64 (training: batch statistics; else running).

    ``mask`` (broadcastable to x's shape without the channel axis): the batch
    statistics are those of the positions it selects; every position is normalised."""
    x64 = _f64(x)
    ndim = x64.ndim
    axes = reduce_axes(ndim, axis)
    count = x64.size // x64.shape[axis]
    kept = None if mask is None or not training else full_mask(mask, x64.shape, axis)
    with np.errstate(all="ignore"):  # NaN/Inf inputs give NaN/Inf references
        if kept is not None:
            d, mean, count = _masked_centred(x64, axes, kept)
            var = np.where(kept, d * d, 0.0).sum(axis=axes, keepdims=True) / count
        elif training:
            d, mean = _centred(x64, axes)
            var = (d * d).mean(axis=axes, keepdims=True)
        else:
            mean = per_channel(running_mean, ndim, axis)
            var = per_channel(running_var, ndim, axis)
            d = x64 - mean
        inv_std = 1.0 / np.sqrt(var + eps)
        x_hat = d * inv_std
        y = x_hat
        if gamma is not None:
            y = y * per_channel(gamma, ndim, axis)
        if beta is not None:
            y = y + per_channel(beta, ndim, axis)
    return ReferenceForward(y, x_hat, mean.ravel(), var.ravel(), inv_std.ravel(), count, kept)


def reference_backward(dy, ref: ReferenceForward, gamma=None, *, axis=1, training=True):
    """``(dx, dgamma, dbeta)`` in float64 for the forward pass ``ref``.

    Training mode differentiates through the batch mean and variance:
    ``dx = gamma * inv_std * (dy - mean(dy) - x_hat * mean(dy * x_hat))``;
    inference mode treats the statistics as constants: ``dx = dy * gamma * inv_std``.
    After a masked forward pass (``ref.mask``) the sums are still over every
    position (every y depends on the statistics) but the terms through the
    statistics reach only the positions they came from, over their count m:
    ``dx = gamma * inv_std * (dy - mask * (sum(dy) + x_hat * sum(dy * x_hat)) / m)``.
    """
    dy64 = _f64(dy)
    ndim = dy64.ndim
    axes = reduce_axes(ndim, axis)
    g = per_channel(np.ones(dy64.shape[axis]) if gamma is None else gamma, ndim, axis)
    inv = per_channel(ref.inv_std, ndim, axis)
    dbeta = dy64.sum(axis=axes)
    dgamma = (dy64 * ref.x_hat).sum(axis=axes)
    if training:
        m = ref.m
        through_statistics = per_channel(dbeta, ndim, axis) / m + ref.x_hat * per_channel(dgamma, ndim, axis) / m
        if ref.mask is not None:
            through_statistics = np.where(ref.mask, through_statistics, 0.0)
        dx = g * inv * (dy64 - through_statistics)
    else:
        dx = g * inv * dy64
    return dx, dgamma, dbeta


def probe_dy(ref: ReferenceForward, axis: int, dtype, rng) -> np.ndarray:
    """A random upstream gradient for exactness tests: N(0, 1) noise plus
    ``u_c + v_c * x_hat / rms_c(x_hat)``.

    Gradient bars are norm-wise relative, so the exact gradients must not be tiny
    by accident.  The per-channel terms (|u_c|, |v_c| in [1, 2]) keep
    dbeta = sum(dy) and dgamma = sum(dy * x_hat) away from zero (about m times
    their noise, which is sqrt(m)), so their relative errors measure the code and
    not how close a random sum came to 0; x_hat is taken relative to its rms so
    that this holds when eps >> var shrinks x_hat.  dx projects both terms out and
    sees only the noise.  (dx itself needs a dozen or more values per channel to
    be safely non-zero: it lives in an (m - 2)-dimensional space, and with m = 2
    it is ~0.)
    """
    ndim = ref.x_hat.ndim
    channels = ref.x_hat.shape[axis]
    u, v = (rng.uniform(1, 2, channels) * rng.choice([-1, 1], channels) for _ in range(2))
    rms = np.sqrt((ref.x_hat**2).mean(axis=reduce_axes(ndim, axis)))
    unit_x_hat = ref.x_hat / per_channel(np.where(rms > 0, rms, 1.0), ndim, axis)
    dy = rng.standard_normal(ref.x_hat.shape) + per_channel(u, ndim, axis) + per_channel(v, ndim, axis) * unit_x_hat
    return dy.astype(dtype)


def gradient_magnitudes(dy, ref: ReferenceForward, gamma=None, *, axis=1):
    """``(|dx|, |dgamma|, |dbeta|)`` with every term of the training-mode formulas
    taken in absolute value.

    These are the scales of the rounding errors of the gradients (a sum's error is
    bounded by its terms, not by its value, which may be ~0), and so the right
    yardstick when two *computed* gradients are compared with each other.
    """
    ady = np.abs(_f64(dy))
    ndim = ady.ndim
    axes = reduce_axes(ndim, axis)
    g = np.ones(ady.shape[axis]) if gamma is None else np.abs(_f64(gamma))
    abs_x_hat = np.abs(ref.x_hat)
    abs_dbeta = ady.sum(axis=axes)
    abs_dgamma = (ady * abs_x_hat).sum(axis=axes)
    abs_dx = per_channel(g * ref.inv_std, ndim, axis) * (
        ady + per_channel(abs_dbeta, ndim, axis) / ref.m
        + abs_x_hat * per_channel(abs_dgamma, ndim, axis) / ref.m)
    return abs_dx, abs_dgamma, abs_dbeta


def gradients_close(grads, other, magnitudes, tol, factor=2.0) -> bool:
    """Whether two computed ``(dx, dgamma, dbeta)`` agree element-wise within
    ``factor * bar * magnitude`` (bars from ``tol``; None entries are skipped)."""
    bars = (tol.dx, tol.dparams, tol.dparams)
    for a, b, mag, bar in zip(grads, other, magnitudes, bars, strict=True):
        if a is None and b is None:
            continue
        if not np.all(np.abs(_f64(a) - _f64(b)) <= factor * bar * mag):
            return False
    return True


def running_stats_update(running_mean, running_var, ref: ReferenceForward, momentum: float):
    """The new running statistics after a training step, in float64."""
    m = ref.m
    new_mean = (1.0 - momentum) * _f64(running_mean) + momentum * ref.mean
    new_var = (1.0 - momentum) * _f64(running_var) + momentum * ref.var * (m / (m - 1))
    return new_mean, new_var


# ---- error measures ---------------------------------------------------------
def max_rel_error(a, ref) -> float:
    """``max |a - ref| / max(1, |ref|)``: relative for large values, absolute near zero.

    NaN anywhere in ``a`` where ``ref`` is finite gives NaN, which fails any ``<=`` bar.
    """
    a64, ref = _f64(a), _f64(ref)
    if a64.shape != ref.shape:
        raise ValueError(f"shapes differ: {a64.shape} vs {ref.shape}")
    return float(np.max(np.abs(a64 - ref) / np.maximum(1.0, np.abs(ref))))


def rel_error(a, ref) -> float:
    """Element-wise ``max |a - ref| / |ref|`` (0 where both are 0): for variances."""
    a64, ref = _f64(a), _f64(ref)
    diff = np.abs(a64 - ref)
    with np.errstate(divide="ignore", invalid="ignore"):
        err = np.where(diff == 0, 0.0, diff / np.abs(ref))
    return float(np.max(err))


def normwise_rel_error(a, ref) -> float:
    """``||a - ref|| / ||ref||`` (2-norms over all elements); 0 if both are 0."""
    a64, ref = _f64(a).ravel(), _f64(ref).ravel()
    if a64.shape != ref.shape:
        raise ValueError(f"shapes differ: {a64.shape} vs {ref.shape}")
    num, den = np.linalg.norm(a64 - ref), np.linalg.norm(ref)
    if num == 0:
        return 0.0
    return float(num / den) if den > 0 else float("inf")


def batch_norm_errors(y, var, grads, ref: ReferenceForward, ref_grads) -> dict[str, float]:
    """All error measures of one forward (+ backward) call at once.

    ``var`` may be None (inference); ``grads``/``ref_grads`` are ``(dx, dgamma,
    dbeta)`` or None, and a None gradient (no gamma/beta) is skipped.
    Keys: y, var, dx, dgamma, dbeta, matching :class:`~cupybn.testing.Tolerance`.
    """
    errors = {"y": max_rel_error(y, ref.y)}
    if var is not None:
        errors["var"] = rel_error(var, ref.var)
    if grads is not None:
        for name, got, want in zip(("dx", "dgamma", "dbeta"), grads, ref_grads, strict=True):
            if got is not None:
                errors[name] = normwise_rel_error(got, want)
    return errors


def exceeded(errors: dict[str, float], tol) -> dict[str, float]:
    """The entries of ``errors`` above their bar in ``tol`` (NaN counts as above)."""
    bars = {"y": tol.y, "var": tol.var, "dx": tol.dx, "dgamma": tol.dparams, "dbeta": tol.dparams}
    return {k: v for k, v in errors.items() if not v <= bars[k]}
