"""Small arrays on the NumPy backend: the whole array as one block.

Below a few hundred thousand values a call costs its number of NumPy calls,
not its bytes, and the blocked path's machinery (plans, coefficient tiles,
closures over blocks, the thread pool) costs more than the arithmetic.  Here
each step is one NumPy call over the whole (outer, C, inner) array, seen as a
2-D (outer, C*inner) array with per-channel coefficients repeated along a
row, or, when rows are long, as it is with coefficients broadcast.

The numerics are the blocked path's (see ``numpy_backend``): shifted sums with
float32 products summed in short runs and float64 beyond, the mean as a
float32 hi/lo pair, the centred form where an offset would cost bits.  One
step is cheaper: ``y`` and ``dx`` are formed from ``x - shift`` (or from x
when there is no shift) with the shift's distance to the mean folded into
the constant term; the shift is within one standard deviation of the mean
(the statistics are taken again if not), so that term costs nothing.
float64 data take the blocked path.
"""
from __future__ import annotations

import functools

import numpy as np

from ._dots import column_dots, row_dots
from ._running import update_running

_F32 = np.dtype(np.float32)
_F64 = np.dtype(np.float64)
# Rows of C*inner values up to this long are one row of a 2-D view, with
# repeated coefficients; longer ones keep (outer, C, inner) and broadcast.
MAX_REPEATED = 1 << 16
# A NumPy loop pays about 0.1 us per row of a broadcast operand: coefficients
# are tiled over whole rows of x until a row holds about this many values.
MIN_ROW = 1 << 13
# The sample that guesses the mean takes about this many indices along outer
# and along inner: at most 256 values per channel.
SAMPLE_AXIS = 16


class _Shape:
    """How the (outer, C, inner) arrays of one shape are seen, and per-channel
    vectors laid over them."""

    def __init__(self, shape3, min_planar_inner):
        outer, channels, self.inner = shape3
        self.count = outer * self.inner
        # sums along rows (BLAS dots) or down columns (BLAS matrix-vector), as the blocked path
        self.planar = self.inner >= min_planar_inner
        self.repeated = channels * self.inner <= MAX_REPEATED
        # whole (C, inner) rows of x per row of the 2-D view: a power of two dividing outer
        self.tiles = 1
        if self.repeated:
            while 2 * self.tiles * channels * self.inner <= MIN_ROW and outer % (2 * self.tiles) == 0:
                self.tiles *= 2
        width = self.tiles * channels * self.inner
        self.view_shape = (outer // self.tiles, width) if self.repeated else shape3
        self.sample_step = (-(-outer // SAMPLE_AXIS), -(-self.inner // SAMPLE_AXIS))

    def view(self, a3):
        return a3.reshape(self.view_shape)

    def lay(self, v, dtype=_F32):
        """A per-channel vector as an operand of ``dtype`` for :meth:`view` arrays."""
        if not self.repeated:
            return v.astype(dtype)[:, None]
        if self.tiles == 1 and self.inner == 1:
            return v.astype(dtype)
        out = np.empty(self.view_shape[1], dtype)
        out.reshape(self.tiles, -1, self.inner)[...] = v[:, None]
        return out

    def sample_moments(self, x3):
        """float64 mean and variance of every few rows of x: a guess of the mean, to shift by."""
        sample = x3[::self.sample_step[0], :, ::self.sample_step[1]]
        k = sample.shape[0] * sample.shape[2]
        mean = np.add.reduce(sample, axis=(0, 2)) / np.float32(k)  # float32 is plenty for a guess
        dev = sample - mean[:, None]
        return mean.astype(_F64), np.einsum("ijk,ijk->j", dev, dev).astype(_F64) / k


@functools.lru_cache(maxsize=64)
def _shape(shape3, min_planar_inner) -> _Shape:
    return _Shape(shape3, min_planar_inner)


def shape_of(x3) -> _Shape:
    """The 2-D view and coefficient layout for whole-array elementwise work on ``x3``."""
    return _shape(x3.shape, 0)


class Small:
    """The three operations on whole arrays.

    ``backend`` is the NumPy backend whose per-thread scratch buffers, float16
    and bfloat16 widening and rounding back (``_scratch``, ``_widen``,
    ``_store``) this path shares.
    """

    def __init__(self, backend, min_planar_inner: int):
        self._scratch = backend._scratch
        self._widen = backend._widen
        self._store = backend._store
        self._min_planar_inner = min_planar_inner

    # ---- plumbing ---------------------------------------------------------
    def _widened(self, slot, a3):
        """float32 values of a float16/bfloat16/float32 array (the array itself if float32)."""
        return self._widen(slot, a3, _F32)

    def _output(self, shape3):
        """A new float32 array to compute an output in (narrowed to its dtype by :meth:`_narrowed`)."""
        return np.empty(shape3, _F32)

    def _narrowed(self, res, dtype):
        """float32 ``res`` rounded once to ``dtype`` (``res`` itself if float32)."""
        if dtype == _F32:
            return res
        out = np.empty(res.shape, dtype)
        self._store(out, res)
        return out

    def _dots(self, g, a, b=None):
        """float64 per-channel ``sum(a * b)`` (``sum(a)`` without b)."""
        if g.planar:
            return row_dots(a, b)
        return column_dots(a, b, None if b is None else self._scratch(4, a.shape, _F32))

    def _centred(self, g, xw, shift):
        """``xw - shift`` in scratch (``xw`` itself when the shift is zero)."""
        if not shift.any():
            return xw
        d = self._scratch(1, xw.shape, _F32)
        np.subtract(g.view(xw), g.lay(shift), out=g.view(d))
        return d

    @staticmethod
    def _affine_into(out, g, d, scale, shift):
        """``out = d * scale + shift`` per channel."""
        ov = g.view(out)
        np.multiply(g.view(d), g.lay(scale), out=ov)
        np.add(ov, g.lay(shift), out=ov)
        return out

    # ---- the three operations -------------------------------------------
    def forward_train(self, x3, gamma, beta, eps, running_mean, running_var, momentum, offset_is_small,
                      y_dtype=None):
        """``y_dtype``: what y is rounded to (x3's dtype by default; float32 where an
        epilogue follows)."""
        g = _shape(x3.shape, self._min_planar_inner)
        xw = self._widened(0, x3)
        guess, spread = g.sample_moments(xw)
        # shift by the sample mean unless the data are near zero; on x's own grid
        # (as the blocked path), so that x - shift is exact near the mean
        shift = np.where(guess * guess <= spread, 0.0, guess).astype(x3.dtype).astype(_F64)
        for attempt in range(2):
            d = self._centred(g, xw, shift)
            offset = self._dots(g, d) / g.count
            var = np.maximum(self._dots(g, d, d) / g.count - offset * offset, 0.0)
            mean_hi = (shift + offset).astype(_F32)
            new_shift = mean_hi.astype(x3.dtype).astype(_F64)
            # a shift farther than one standard deviation from the mean cancels
            # digits in var: take the sums again, centred on the mean
            if attempt or not ((offset * offset > var) & (new_shift != shift)).any():
                break
            shift = new_shift
        mean_lo = (shift - mean_hi) + offset
        inv_std = 1.0 / np.sqrt(var + eps)
        scale = inv_std if gamma is None else inv_std * gamma.astype(_F64)
        # y = (x - mean) * scale + beta = d * scale + (beta - offset * scale); if
        # offset * scale is not small, centre on mean_hi first
        if not offset_is_small(offset, scale):
            d = self._centred(g, xw, mean_hi.astype(_F64))
            offset = mean_lo
        y3 = self._affine_into(self._output(x3.shape), g, d, scale, _constant(beta, offset, scale))
        if running_mean is not None:
            update_running(np, running_mean, running_var, mean_hi, mean_lo, var, momentum, g.count)
        return (self._narrowed(y3, x3.dtype if y_dtype is None else y_dtype), mean_hi, mean_lo.astype(_F32),
                var.astype(_F32), inv_std.astype(_F32))

    def forward_infer(self, x3, gamma, beta, running_mean, running_var, eps, offset_is_small, y_dtype=None):
        g = _shape(x3.shape, self._min_planar_inner)
        mean = running_mean.astype(_F64)
        mean_hi = mean.astype(_F32)
        var = running_var.astype(_F64)
        inv_std = 1.0 / np.sqrt(var + eps)
        scale = inv_std if gamma is None else inv_std * gamma.astype(_F64)
        # x * scale may be formed first where |mean * scale| is small; else centre on mean_hi
        centre = np.zeros(len(mean)) if offset_is_small(mean, scale) else mean_hi.astype(_F64)
        d = self._centred(g, self._widened(0, x3), centre)
        y3 = self._affine_into(self._output(x3.shape), g, d, scale, _constant(beta, mean - centre, scale))
        return (self._narrowed(y3, x3.dtype if y_dtype is None else y_dtype), mean_hi, (mean - mean_hi).astype(_F32),
                var.astype(_F32), inv_std.astype(_F32))

    def backward(self, dy3, x3, mean_hi, mean_lo, var, inv_std, gamma, training):
        """``dx3`` and float64 ``(dgamma, dbeta)``: ``dx = a*dy + b*(x - centre) + c`` per channel."""
        g = _shape(x3.shape, self._min_planar_inner)
        hi = mean_hi.astype(_F64)
        mean = hi + mean_lo.astype(_F64)
        inv = inv_std.astype(_F64)
        # sum(dy * x) - mean * sum(dy) cancels by |mean| / std: centre x on mean_hi
        # unless mean^2 <= var (training); in inference the spread is unknown, so always
        near_zero = training and bool(np.all(mean * mean <= var.astype(_F64)))
        centre = np.zeros(len(hi)) if near_zero else hi
        dyw = self._widened(3, dy3)
        d = self._centred(g, self._widened(0, x3), centre)
        dbeta = self._dots(g, dyw)
        dgamma = inv * (self._dots(g, dyw, d) - (mean - centre) * dbeta)
        a = inv if gamma is None else inv * gamma.astype(_F64)
        out = self._output(x3.shape)
        ov = g.view(out)
        np.multiply(g.view(dyw), g.lay(a), out=ov)
        if training:
            # dx = a * (dy - dbeta/m - x_hat * dgamma/m) = a*dy + b*d + c; |mean - centre|
            # is at most one standard deviation, so c costs no digits
            b = -a * inv * dgamma / g.count
            c = -a * dbeta / g.count - b * (mean - centre)
            t = self._affine_into(self._scratch(1, d.shape, _F32), g, d, b, c)
            np.add(ov, g.view(t), out=ov)
        return self._narrowed(out, dy3.dtype), dgamma, dbeta


def _constant(beta, offset, scale):
    """``beta - offset * scale``, the constant term of y (``beta`` may be None)."""
    return -offset * scale if beta is None else beta.astype(_F64) - offset * scale
