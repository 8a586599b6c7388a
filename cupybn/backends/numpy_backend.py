"""The NumPy backend: exact Batch Normalization on any CPU.

Every function takes the canonical (outer, C, inner) view made by ``_layout``
and works through it in cache-sized blocks, on a small pool of threads (NumPy
releases the GIL inside its loops).  Each block reduces to float64 per-channel
partials; the partials are combined in block order, so results do not depend
on the number of threads.

Numerics, in one place:

* Statistics are shifted sums.  A per-channel shift ``K`` (the float32 mean of a
  small sample) is subtracted in the compute dtype, then ``sum(d)`` and
  ``sum(d*d)`` are taken in float32 over short runs and added up in float64.
  ``var = E[d^2] - E[d]^2`` is exact to a few float32 ulps while
  ``E[d]^2 <= var``; if a sample was unrepresentative the pass is repeated once
  with the mean as the shift.
* The mean is carried as a float32 pair ``mean_hi + mean_lo``.  Centring uses
  ``x - mean_hi`` (exact near the mean, Sterbenz) and folds ``mean_lo`` into
  the shift, so ``y = (x - mean_hi) * scale + shift`` loses nothing to the
  offset of x, whatever its size.
* float16/bfloat16 blocks are widened to float32 before any arithmetic;
  float64 input is computed in float64 throughout.
"""
from __future__ import annotations

import math
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np

# Blocks of about 256 Ki values keep a block of x, dy and a scratch buffer in a
# 1 MiB L2 cache while amortising Python's per-call overhead.
BLOCK_VALUES = 1 << 18
# Rows shorter than this are handled as columns of a 2-D (rows, C*inner) block.
MIN_PLANAR_INNER = 64
# Planar blocks span at most this many values of a row.
MAX_BLOCK_INNER = 4096
# float32 partial sums run over at most RUN values of a row (planar) or
# GROUP rows of a column (rows layout) before they are added up in float64.
# Longer float32 runs lose up to 1e-6 relative on quantised data (large offsets).
RUN = 256
GROUP = 16
SAMPLE_PER_AXIS = 64


def compute_dtype(dtype) -> np.dtype:
    """Arithmetic dtype for data of ``dtype``: float64 stays, the rest is float32."""
    return np.dtype(np.float64) if np.dtype(dtype) == np.float64 else np.dtype(np.float32)


def _blocks(shape3, planar: bool):
    """Cut (outer, C, inner) into blocks of slices (o, c, i), in a fixed order."""
    outer, channels, inner = shape3
    if planar:
        runs = -(-inner // MAX_BLOCK_INNER)
        ki = -(-inner // runs)
        kc = min(channels, max(1, BLOCK_VALUES // ki))
        ko = min(outer, max(1, BLOCK_VALUES // (ki * kc)))
    else:
        ki = inner
        kc = min(channels, max(1, BLOCK_VALUES // inner))
        ko = min(outer, max(GROUP, BLOCK_VALUES // (kc * inner) // GROUP * GROUP))
    return [
        (slice(o, min(o + ko, outer)), slice(c, min(c + kc, channels)), slice(i, min(i + ki, inner)))
        for c in range(0, channels, kc)
        for o in range(0, outer, ko)
        for i in range(0, inner, ki)
    ]


def _row_dots(a, b):
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
        br = np.ones(run, a.dtype) if b is None else b[..., lo:hi].reshape(ko, kc, -1, run)
        total += np.vecdot(ar, br).sum(axis=(0, 2), dtype=np.float64)
    return total


def _column_dots(a, b):
    """float64 per-channel ``sum(a * b)`` of (ko, kc, inner) blocks, down columns.

    ``b=None`` sums ``a``.  float32 sums run over GROUP rows, the groups in float64.
    """
    ko, kc, inner = a.shape
    a2 = a.reshape(ko, kc * inner)
    b2 = None if b is None else b.reshape(ko, kc * inner)
    full = ko - ko % GROUP
    total = np.zeros(kc * inner)
    for lo, hi in ((0, full), (full, ko)):
        if hi == lo:
            continue
        ag = a2[lo:hi].reshape(-1, min(GROUP, hi - lo), kc * inner)
        if b2 is None:
            part = ag.sum(axis=1)
        else:
            bg = b2[lo:hi].reshape(ag.shape)
            part = np.einsum("grc,grc->gc", ag, bg)
        total += part.sum(axis=0, dtype=np.float64)
    return total.reshape(kc, inner).sum(axis=1)


class NumpyBackend:
    """Batch Normalization on NumPy arrays.

    ``threads`` is the number of worker threads (default: the cores this
    process may use).  Results are bit-identical for any number of threads.
    """

    name = "numpy"
    xp = np

    def __init__(self, threads: int | None = None):
        if threads is None:
            threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        if not isinstance(threads, int) or threads < 1:
            raise ValueError(f"threads must be a positive int, got {threads!r}")
        self.threads = threads
        self._pool: ThreadPoolExecutor | None = None
        self._pool_lock = threading.Lock()
        self._local = threading.local()

    def __repr__(self) -> str:
        return f"NumpyBackend(threads={self.threads})"

    def owns(self, a) -> bool:
        return isinstance(a, (np.ndarray, np.generic))

    # ---- plumbing -------------------------------------------------------
    def _map(self, fn, blocks):
        """Run ``fn`` over ``blocks``; results come back in block order."""
        if self.threads == 1 or len(blocks) == 1:
            return [fn(b) for b in blocks]
        with self._pool_lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="cupybn")
        # One task per thread, each walking a contiguous range of blocks, keeps
        # scheduling overhead off the hot path.
        per = -(-len(blocks) // self.threads)
        ranges = [blocks[k:k + per] for k in range(0, len(blocks), per)]
        futures = [self._pool.submit(lambda r: [fn(b) for b in r], r) for r in ranges]
        return [res for f in futures for res in f.result()]

    def _scratch(self, slot: int, shape, dtype):
        """Per-thread reusable buffer (two slots), grown on demand."""
        cache = self._local.__dict__.setdefault("buffers", {})
        n = math.prod(shape)
        key = (slot, np.dtype(dtype))
        buf = cache.get(key)
        if buf is None or buf.size < n:
            buf = cache[key] = np.empty(max(n, BLOCK_VALUES), dtype)
        return buf[:n].reshape(shape)

    @staticmethod
    def _planar(x3) -> bool:
        return x3.shape[2] >= MIN_PLANAR_INNER

    def _widen(self, slot, a, cdt):
        """A block in the compute dtype (a scratch copy only for narrow types)."""
        if a.dtype == cdt:
            return a
        buf = self._scratch(slot, a.shape, cdt)
        np.copyto(buf, a, casting="unsafe")
        return buf

    # ---- channel sums -------------------------------------------------------
    def _shifted_sums(self, x3, shift, cdt, planar):
        """Per channel float64 ``sum(x - shift)`` and ``sum((x - shift)**2)``."""
        C = x3.shape[1]

        def block(b):
            o, c, i = b
            xb = x3[o, c, i]
            d = self._scratch(0, xb.shape, cdt)
            np.subtract(xb, shift[c, None], out=d, casting="unsafe")
            dots = _row_dots if planar else _column_dots
            return c, dots(d, None), dots(d, d)

        s1 = np.zeros(C)
        s2 = np.zeros(C)
        for c, p1, p2 in self._map(block, _blocks(x3.shape, planar)):
            s1[c] += p1
            s2[c] += p2
        return s1, s2

    @staticmethod
    def _sample_mean(x3):
        """float64 mean of an evenly spread sample of each channel."""
        outer, _, inner = x3.shape
        io = np.unique(np.linspace(0, outer - 1, min(outer, SAMPLE_PER_AXIS)).astype(np.intp))
        ii = np.unique(np.linspace(0, inner - 1, min(inner, SAMPLE_PER_AXIS)).astype(np.intp))
        sample = x3[np.ix_(io, np.arange(x3.shape[1]), ii)]
        return sample.mean(axis=(0, 2), dtype=np.float64)

    def batch_stats(self, x3):
        """Mean (as a hi/lo pair in the parameter dtype) and biased variance.

        Returns ``(mean_hi, mean_lo, var)``; mean_hi + mean_lo is the mean to
        about twice the parameter precision, var is float64.
        """
        cdt = compute_dtype(x3.dtype)
        planar = self._planar(x3)
        m = x3.shape[0] * x3.shape[2]
        shift = self._sample_mean(x3).astype(cdt)
        for attempt in range(2):
            s1, s2 = self._shifted_sums(x3, shift, cdt, planar)
            offset = s1 / m
            var = np.maximum(s2 / m - offset * offset, 0.0)
            mean = shift + offset
            new_shift = mean.astype(cdt)
            # E[d]^2 > var means the shift was far from the mean and the
            # difference above cancelled: repeat once, centred on the mean.
            retry = (offset * offset > var) & (new_shift != shift)
            if attempt or not retry.any():
                break
            shift = new_shift
        mean_hi = mean.astype(cdt)
        mean_lo = (mean - mean_hi).astype(cdt)
        return mean_hi, mean_lo, var

    # ---- elementwise ----------------------------------------------------------
    def affine(self, x3, centre, scale, shift, out_dtype):
        """``y = (x - centre) * scale + shift`` per channel, in the compute dtype."""
        cdt = compute_dtype(x3.dtype)
        planar = self._planar(x3)
        y3 = np.empty(x3.shape, out_dtype)
        centre, scale, shift = (np.asarray(v, cdt) for v in (centre, scale, shift))

        def block(b):
            o, c, i = b
            d = self._scratch(0, x3[o, c, i].shape, cdt)
            np.subtract(x3[o, c, i], centre[c, None], out=d, casting="unsafe")
            np.multiply(d, scale[c, None], out=d)
            np.add(d, shift[c, None], out=y3[o, c, i], casting="unsafe")

        self._map(block, _blocks(x3.shape, planar))
        return y3

    # ---- the three operations -------------------------------------------------
    def forward_train(self, x3, gamma, beta, eps):
        """Training forward pass.

        Returns ``y3, mean_hi, mean_lo, var, inv_std``: the per-channel arrays
        are in the parameter dtype except var (float64, biased).
        """
        mean_hi, mean_lo, var = self.batch_stats(x3)
        inv_std = 1.0 / np.sqrt(var + eps)
        scale = inv_std if gamma is None else inv_std * gamma
        shift = -mean_lo * scale if beta is None else beta - mean_lo * scale
        y3 = self.affine(x3, mean_hi, scale, shift, x3.dtype)
        return y3, mean_hi, mean_lo, var, inv_std.astype(mean_hi.dtype)

    def forward_infer(self, x3, gamma, beta, running_mean, running_var, eps):
        """Inference forward pass with the running statistics; returns ``y3, inv_std``."""
        cdt = compute_dtype(x3.dtype)
        inv_std = 1.0 / np.sqrt(np.asarray(running_var, np.float64) + eps)
        scale = inv_std if gamma is None else inv_std * gamma
        mean = np.asarray(running_mean, np.float64)
        centre = mean.astype(cdt)
        shift = -(mean - centre) * scale
        if beta is not None:
            shift = shift + beta
        y3 = self.affine(x3, centre, scale, shift, x3.dtype)
        return y3, inv_std.astype(cdt)

    def backward(self, dy3, x3, mean_hi, mean_lo, inv_std, gamma, training):
        """Gradients for the (outer, C, inner) view; returns ``dx3, dgamma, dbeta``.

        dgamma/dbeta are float64 ``sum(dy * x_hat)`` and ``sum(dy)``; in
        training mode dx also flows through the batch statistics.
        """
        cdt = compute_dtype(x3.dtype)
        planar = self._planar(x3)
        C = x3.shape[1]
        m = x3.shape[0] * x3.shape[2]
        mean_hi = np.asarray(mean_hi, cdt)

        def sums(b):
            o, c, i = b
            dyb = self._widen(1, dy3[o, c, i], cdt)
            d = self._scratch(0, dyb.shape, cdt)
            np.subtract(x3[o, c, i], mean_hi[c, None], out=d, casting="unsafe")
            dots = _row_dots if planar else _column_dots
            return c, dots(dyb, None), dots(dyb, d)

        blocks = _blocks(x3.shape, planar)
        dbeta = np.zeros(C)
        sdyd = np.zeros(C)
        for c, p1, p2 in self._map(sums, blocks):
            dbeta[c] += p1
            sdyd[c] += p2
        inv = np.asarray(inv_std, np.float64)
        # sum(dy * (x - mean)) with mean = mean_hi + mean_lo
        dgamma = inv * (sdyd - np.asarray(mean_lo, np.float64) * dbeta)
        a = inv if gamma is None else inv * np.asarray(gamma, np.float64)
        if training:
            # dx = a * (dy - dbeta/m - x_hat * dgamma/m), x_hat = (x - mean) * inv
            b = -a * inv * dgamma / m
            c0 = -a * dbeta / m - b * np.asarray(mean_lo, np.float64)
        else:
            b = np.zeros(C)
            c0 = np.zeros(C)
        a_, b_, c_ = (v.astype(cdt) for v in (a, b, c0))
        dx3 = np.empty(x3.shape, dy3.dtype)

        def elementwise(blk):
            o, c, i = blk
            dxb = dx3[o, c, i]
            if not training:
                np.multiply(dy3[o, c, i], a_[c, None], out=dxb, casting="unsafe")
                return
            d = self._scratch(0, dxb.shape, cdt)
            t = self._scratch(1, dxb.shape, cdt)
            np.subtract(x3[o, c, i], mean_hi[c, None], out=d, casting="unsafe")
            np.multiply(d, b_[c, None], out=d)
            np.multiply(dy3[o, c, i], a_[c, None], out=t, casting="unsafe")
            np.add(t, d, out=t)
            np.add(t, c_[c, None], out=dxb, casting="unsafe")

        self._map(elementwise, blocks)
        return dx3, dgamma, dbeta
