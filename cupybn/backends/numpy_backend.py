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

import collections
import ctypes
import functools
import math
import os
import threading
import weakref
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from . import _numpy_compiled as _compiled
from . import _numpy_small as _small
from . import _numpy_tiny as _tiny
from ._dots import GROUP, column_dots, row_dots
from ._epilogue import add_epilogue, gate_in_place
from ._float16 import narrow_to_half, widen_half
from ._running import update_running

# Blocks of about 256 Ki values keep a block of x, dy and a scratch buffer in a
# 1 MiB L2 cache while amortising Python's per-call overhead.
BLOCK_VALUES = 1 << 18
# Rows shorter than this are handled as columns of a 2-D (rows, C*inner) block.
MIN_PLANAR_INNER = 64
# Planar blocks span at most this many values of a row (sums still run over RUN).
MAX_BLOCK_INNER = BLOCK_VALUES
# Elementwise work meets per-channel coefficients tiled to at least about this
# many values where it can: NumPy loops that broadcast a short operand over
# many rows are up to 3x slower than loops over long rows.
MIN_LOOP = 1 << 15
SAMPLE_PER_AXIS = 32
# Memory-bound loops stop scaling after a few cores.
MAX_DEFAULT_THREADS = 8
# Narrow arrays of at most this many values are computed whole, in float64
# (_numpy_small): below it a call costs its NumPy calls, not its bytes.
SMALL_VALUES = 1 << 17
# ... and of at most this many in float64 arithmetic, with the fewest NumPy calls (_numpy_tiny).
TINY_VALUES = 1 << 14
# float32 arrays of at most this many values take the compiled kernels, when they were built.
COMPILED_VALUES = 1 << 62
# |mean * scale| up to which x is scaled before it is centred (see _offset_is_small).
FUSE_LIMIT = 1.0


def compute_dtype(dtype) -> np.dtype:
    """Arithmetic dtype for data of ``dtype``: float64 stays, the rest is float32."""
    return np.dtype(np.float64) if np.dtype(dtype) == np.float64 else np.dtype(np.float32)


def split_mean(mean, mean_lo, cdt):
    """A float64 pair ``mean + mean_lo`` (NumPy or CuPy arrays; ``mean_lo`` may be a
    scalar) as a pair in the compute dtype ``cdt``: the leading part, and the rest
    rounded once."""
    hi = mean.astype(cdt)
    return hi, ((mean - hi) + mean_lo).astype(cdt)


def quiet(method):
    """NaN and Inf in the data propagate to the results without warnings or
    FloatingPointError, whatever the caller's ``np.seterr`` (NumPy arithmetic
    only: CuPy never raises on them)."""

    @functools.wraps(method)
    def wrapper(*args, **kwargs):
        with np.errstate(all="ignore"):
            return method(*args, **kwargs)

    return wrapper


class _Plan:
    """How an (outer, C, inner) array is cut into blocks, in a fixed order, and
    how per-channel coefficients are laid over a block.

    NumPy's loops run fastest when every operand has long contiguous rows, so
    coefficients are expanded once per call to tiles that match whole blocks
    row for row.
    """

    def __init__(self, shape3):
        outer, channels, inner = shape3
        self.channels, self.inner = channels, inner
        self.planar = inner >= MIN_PLANAR_INNER
        if self.planar:
            runs = -(-inner // MAX_BLOCK_INNER)
            ki = -(-inner // runs)
            kc = min(channels, max(1, BLOCK_VALUES // ki))
            ko = min(outer, max(1, BLOCK_VALUES // (ki * kc)))
        else:
            ki = inner
            kc = min(channels, max(1, BLOCK_VALUES // inner))
            ko = min(outer, max(GROUP, BLOCK_VALUES // (kc * inner) // GROUP * GROUP))
        # Blocks of whole (C, inner) rows are contiguous: they are cut into
        # rows of `fuse` outer indices (a power of two dividing the block),
        # long enough for NumPy's inner loop, and meet coefficient tiles of
        # that length.
        self.fuse = 0
        if kc == channels and ki == inner:
            self.fuse = 1
            while 2 * self.fuse * channels * inner <= MIN_LOOP and ko % (2 * self.fuse) == 0:
                self.fuse *= 2
        self.blocks = [
            (slice(o, min(o + ko, outer)), slice(c, min(c + kc, channels)), slice(i, min(i + ki, inner)))
            for c in range(0, channels, kc)
            for o in range(0, outer, ko)
            for i in range(0, inner, ki)
        ]

    def expand(self, vectors, dtype):
        """Per-channel vectors, laid out for :meth:`operands`: each as a pair
        (tile for whole-row blocks, per-channel form for the others)."""
        out = []
        for v in vectors:
            v = np.asarray(v, dtype)
            tile = np.tile(np.repeat(v, self.inner), self.fuse) if self.fuse else None
            out.append((tile, v[:, None] if self.planar else np.repeat(v, self.inner)))
        return out

    def operands(self, blk, views, coefficients):
        """Block views (x3[blk] and arrays shaped like it) and the matching
        coefficient operands, reshaped alike for elementwise work."""
        _, c, _ = blk
        ko = views[0].shape[0]
        if self.fuse and ko % self.fuse == 0 and all(v.flags.c_contiguous for v in views):
            return [v.reshape(ko // self.fuse, -1) for v in views], [tile for tile, _ in coefficients]
        if self.planar:
            return views, [k[c] for _, k in coefficients]
        cols = slice(c.start * self.inner, c.stop * self.inner)
        return [v.reshape(ko, -1) for v in views], [k[cols] for _, k in coefficients]

    def dots(self, a, b=None, products=None):
        """float64 per-channel ``sum(a * b)`` (``sum(a)`` if b is None) of a block;
        the rows family needs a scratch array ``products`` shaped like ``a``."""
        return row_dots(a, b) if self.planar else column_dots(a, b, products)


@functools.lru_cache(maxsize=64)
def _plan(shape3) -> _Plan:
    """Plans are pure functions of the shape; training loops repeat shapes."""
    return _Plan(shape3)


class _OutputCache:
    """Recycles the memory of large outputs (y, dx) once the caller drops them.

    A fresh 64 MB array costs about as much again as writing it: the kernel
    zeroes every page on first touch and may stall to assemble huge pages.
    Training loops allocate outputs of the same sizes on every step, so the
    buffer behind each output comes back here when the last array using it
    is garbage collected; at most ``limit`` idle bytes are kept.
    """

    min_bytes = 1 << 20

    def __init__(self, limit: int):
        self.limit = limit
        self._idle: dict[int, list[np.ndarray]] = {}
        self._idle_bytes = 0
        self._returned: collections.deque = collections.deque()  # appended by finalizers, lock-free
        self._lock = threading.Lock()

    def empty(self, shape, dtype) -> np.ndarray:
        dtype = np.dtype(dtype)
        nbytes = math.prod(shape) * dtype.itemsize
        if nbytes < self.min_bytes or self.limit <= 0:
            return np.empty(shape, dtype)
        with self._lock:
            self._take_returned()
            stack = self._idle.get(nbytes)
            raw = stack.pop() if stack else None
            if raw is not None:
                self._idle_bytes -= nbytes
        if raw is None:
            raw = np.empty(nbytes, np.uint8)
        # NumPy collapses chains of array views, so the object whose lifetime
        # marks "no array uses this memory any more" must not be an ndarray.
        owner = (ctypes.c_char * nbytes).from_buffer(raw)
        weakref.finalize(owner, self._returned.append, raw).atexit = False
        return np.frombuffer(owner, dtype).reshape(shape)

    def _take_returned(self) -> None:
        while self._returned:
            raw = self._returned.popleft()
            if self._idle_bytes + raw.nbytes <= self.limit:
                self._idle.setdefault(raw.nbytes, []).append(raw)
                self._idle_bytes += raw.nbytes

    def clear(self) -> None:
        with self._lock:
            self._returned.clear()
            self._idle.clear()
            self._idle_bytes = 0


# A forked child inherits each backend's pool object but not its threads.
_LIVE_BACKENDS: weakref.WeakSet = weakref.WeakSet()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=lambda: [b._forget_pool() for b in list(_LIVE_BACKENDS)])


def _default_backend():
    from . import NUMPY  # noqa: PLC0415 - the package imports this module first

    return NUMPY


def _restore_numpy_backend(threads: int, output_cache_bytes: int, default: bool,
                           small_values: int | None = None, tiny_values: int | None = None,
                           compiled_values: int | None = None) -> NumpyBackend:
    if default:
        return _default_backend()
    return NumpyBackend(threads, output_cache_bytes, small_values, tiny_values, compiled_values)


class NumpyBackend:
    """Batch Normalization on NumPy arrays.

    ``threads`` is the number of worker threads (default: the cores this
    process may use, at most 8).  Results are bit-identical for any number of
    threads.  ``output_cache_bytes`` bounds the idle memory kept to recycle
    large outputs (see :class:`_OutputCache`); 0 turns recycling off, and
    :meth:`clear_cache` releases what is kept.  float16, bfloat16 and float32
    arrays of at most ``small_values`` values (default ``SMALL_VALUES``) are
    computed whole in float64 (see ``_numpy_small``); 0 sends every array
    through the blocked path.
    """

    name = "numpy"
    xp = np
    supported_dtypes = frozenset({"float16", "bfloat16", "float32", "float64"})

    def __init__(self, threads: int | None = None, output_cache_bytes: int = 1 << 30,
                 small_values: int | None = None, tiny_values: int | None = None,
                 compiled_values: int | None = None):
        if threads is None:
            cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
            threads = min(cores, MAX_DEFAULT_THREADS)
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
            raise ValueError(f"threads must be a positive int, got {threads!r}")
        for name, limit in (("small_values", small_values), ("tiny_values", tiny_values),
                            ("compiled_values", compiled_values)):
            if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 0):
                raise ValueError(f"{name} must be an int >= 0 or None, got {limit!r}")
        self.threads = threads
        self.small_values = small_values
        self.tiny_values = tiny_values
        self.compiled_values = compiled_values
        self._pool: ThreadPoolExecutor | None = None
        self._pool_lock = threading.Lock()
        self._local = threading.local()
        self._outputs = _OutputCache(output_cache_bytes)
        self._whole = _small.Small(self, MIN_PLANAR_INNER)
        _LIVE_BACKENDS.add(self)

    def _forget_pool(self) -> None:
        self._pool = None
        self._pool_lock = threading.Lock()

    def __repr__(self) -> str:
        limits = "".join(f", {name}={value}" for name, value in (("small_values", self.small_values),
                                                                  ("tiny_values", self.tiny_values),
                                                                  ("compiled_values", self.compiled_values))
                         if value is not None)
        return f"NumpyBackend(threads={self.threads}, output_cache_bytes={self._outputs.limit}{limits})"

    def _compiled_takes(self, x3, vectors, *arrays) -> bool:
        """Whether the compiled kernels take x3, the per-channel ``vectors`` and
        the other arrays shaped like x3 (None where absent)."""
        limit = COMPILED_VALUES if self.compiled_values is None else self.compiled_values
        return x3.size <= limit and _compiled.takes(x3, vectors, arrays)

    def _route(self, x3):
        """The module that computes ``x3`` whole (_numpy_tiny or _numpy_small), or None for
        the blocked path.  The module's limits are read at each call, so that tests can move them."""
        if x3.dtype == np.float64:  # the whole-array paths carry no double-double mean
            return None
        if x3.size <= (TINY_VALUES if self.tiny_values is None else self.tiny_values):
            return _tiny
        if x3.size <= (SMALL_VALUES if self.small_values is None else self.small_values):
            return _small
        return None


    # A backend is its settings; its thread pool and recycled buffers are made
    # again on first use.  Copies share it (it holds no data of its own), and
    # the process default unpickles as the process default.
    def __reduce__(self):
        return _restore_numpy_backend, (self.threads, self._outputs.limit, self is _default_backend(),
                                        self.small_values, self.tiny_values, self.compiled_values)

    def __copy__(self) -> NumpyBackend:
        return self

    def __deepcopy__(self, memo) -> NumpyBackend:
        return self

    def clear_cache(self) -> None:
        """Release the idle output buffers kept for recycling."""
        self._outputs.clear()

    def owns(self, a) -> bool:
        return isinstance(a, (np.ndarray, np.generic))

    # ---- plumbing -------------------------------------------------------
    def _map(self, fn, blocks):
        """Run ``fn`` over ``blocks``; results come back in block order."""

        def run(chunk):
            # NumPy's error state is per thread: NaN/Inf propagate silently here too.
            with np.errstate(all="ignore"):
                return [fn(b) for b in chunk]

        if self.threads == 1 or len(blocks) == 1:
            return run(blocks)
        with self._pool_lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="cupybn")
        # One task per thread, each walking a contiguous range of blocks, keeps
        # scheduling overhead off the hot path.
        per = -(-len(blocks) // self.threads)
        ranges = [blocks[k:k + per] for k in range(0, len(blocks), per)]
        futures = [self._pool.submit(run, r) for r in ranges]
        return [res for f in futures for res in f.result()]

    def _scratch(self, slot: int, shape, dtype):
        """Per-thread reusable buffer, one per (slot, dtype), grown on demand."""
        cache = self._local.__dict__.setdefault("buffers", {})
        n = math.prod(shape)
        key = (slot, np.dtype(dtype))
        buf = cache.get(key)
        if buf is None or buf.size < n:
            buf = cache[key] = np.empty(max(n, BLOCK_VALUES), dtype)
        return buf[:n].reshape(shape)

    def _widen(self, slot, a, cdt):
        """A block in the compute dtype: ``a`` itself, or a widened scratch copy.

        NumPy's own float16 -> float32 cast is slow and mixed-dtype ufuncs
        slower still, so narrow blocks are widened once, by table look-up
        (float16) or a bit shift (bfloat16), and all arithmetic is float32.
        """
        if a.dtype == cdt:
            return a
        buf = self._scratch(slot, a.shape, cdt)
        if a.dtype == np.float16:
            widen_half(a, buf)
        elif a.dtype.name == "bfloat16":
            np.left_shift(a.view(np.uint16), 16, out=buf.view(np.uint32), dtype=np.uint32)
        else:
            np.copyto(buf, a, casting="unsafe")
        return buf

    def _result(self, slot, out, cdt):
        """Where to compute a block of ``out``: ``out`` itself if it has the
        compute dtype, else a scratch buffer for :meth:`_store`."""
        return out if out.dtype == cdt else self._scratch(slot, out.shape, cdt)

    def _store(self, out, res):
        """Write a block computed by :meth:`_result` into ``out``."""
        if res is out:
            return
        if out.dtype == np.float16:
            narrow_to_half(res, out, self._scratch(5, res.shape, np.uint32), self._scratch(6, res.shape, np.uint32))
        else:
            np.copyto(out, res, casting="unsafe")

    def _channel_sums(self, plan, fn, C):
        """Run ``fn(block) -> (s1, s2)`` over the blocks; add up per channel in block order."""
        s1, s2 = np.zeros(C), np.zeros(C)
        for (_, c, _), (p1, p2) in zip(plan.blocks, self._map(fn, plan.blocks), strict=True):
            s1[c] += p1
            s2[c] += p2
        return s1, s2

    def _centred(self, plan, b, xw, kcentre, cdt):
        """``xw - centre`` for a widened block, as a scratch array shaped like xw."""
        (xv,), (kb,) = plan.operands(b, [xw], [kcentre])
        d = self._scratch(1, xv.shape, cdt)
        np.subtract(xv, kb, out=d)
        return d.reshape(xw.shape)

    # ---- statistics -------------------------------------------------------------
    def _shifted_sums(self, x3, plan, shift, cdt, mask=None):
        """Per channel float64 ``sum(x - shift)`` and ``sum((x - shift)**2)``, over the
        positions ``mask`` (booleans, (outer, 1, inner)) selects where there is one."""
        (k,) = plan.expand([shift], cdt)
        unshifted = not shift.any()

        def block(b):
            xw = self._widen(0, x3[b], cdt)
            d = xw if unshifted else self._centred(plan, b, xw, k, cdt)
            if mask is not None:  # zeros where the mask is False, whatever x holds there (Inf, NaN)
                kept = self._scratch(10, d.shape, cdt)
                kept[...] = 0
                np.copyto(kept, d, where=mask[b[0], :, b[2]])
                d = kept
            return plan.dots(d), plan.dots(d, d, self._scratch(2, d.shape, cdt))

        return self._channel_sums(plan, block, x3.shape[1])

    @staticmethod
    def _sample_moments(x3, mask=None):
        """Mean and variance of an evenly strided sample of each channel (of the
        positions ``mask`` selects, where there is one; zeros if it selects none
        of the sample).

        Only a guess for the shift, so float32 is plenty; the copy makes the
        sample contiguous, which is faster than reducing the strided view.
        """
        outer, _, inner = x3.shape
        every = (slice(None, None, -(-outer // SAMPLE_PER_AXIS)), slice(None),
                 slice(None, None, -(-inner // SAMPLE_PER_AXIS)))
        sample = np.ascontiguousarray(x3[every].transpose(1, 0, 2), dtype=np.float32).reshape(x3.shape[1], -1)
        if mask is None:
            mean = sample.mean(axis=1, dtype=np.float64)
            var = np.square(sample - mean[:, None].astype(np.float32)).mean(axis=1, dtype=np.float64)
            return mean, var
        kept = mask[every].reshape(1, -1)
        taken = max(int(np.count_nonzero(kept)), 1)
        sample = np.where(kept, sample, np.float32(0))
        mean = sample.sum(axis=1, dtype=np.float64) / taken
        var = np.where(kept, np.square(sample - mean[:, None].astype(np.float32)), 0).sum(axis=1, dtype=np.float64)
        return mean, var / taken

    def batch_stats(self, x3, mask=None, count=None):
        """Mean (as a hi/lo pair in the compute dtype) and biased variance, over
        the ``count`` positions ``mask`` selects where there is one.

        Returns ``(mean_hi, mean_lo, var)``; mean_hi + mean_lo is the mean to
        about twice the compute precision, var is float64.
        """
        cdt = compute_dtype(x3.dtype)
        plan = _plan(x3.shape)
        m = x3.shape[0] * x3.shape[2] if mask is None else count
        guess, spread = self._sample_moments(x3, mask)

        def on_grid(v):
            # A shift that is a value of x's own dtype keeps x - shift exact and
            # as short as the data: coarse data (float16 far from zero) then
            # have exactly representable squares and exact float32 sums.
            return np.asarray(v).astype(x3.dtype).astype(cdt)

        # Shift by the sample mean unless the data are already near zero, where
        # the shift would cost a pass and change nothing.
        shift = on_grid(np.where(guess * guess <= spread, 0.0, guess))
        for attempt in range(2):
            s1, s2 = self._shifted_sums(x3, plan, shift, cdt, mask)
            offset = s1 / m
            var = np.maximum(s2 / m - offset * offset, 0.0)
            # the mean is shift + offset; its leading part in the compute dtype
            mean_hi = (shift + offset).astype(cdt)
            # E[d]^2 > var means the shift was far from the mean and the
            # difference above cancelled: repeat once, centred on the mean.
            new_shift = on_grid(mean_hi)
            retry = (offset * offset > var) & (new_shift != shift)
            if attempt or not retry.any():
                break
            shift = new_shift
        # shift - mean_hi is exact (Sterbenz) when they are close, so mean_lo
        # carries what mean_hi misses, for float64 data as for float32.
        mean_lo = ((shift.astype(np.float64) - mean_hi) + offset).astype(cdt)
        return mean_hi, mean_lo, var

    # ---- elementwise ----------------------------------------------------------
    def affine(self, x3, centre, scale, shift, out_dtype, residual=None, relu=False):
        """``y = (x - centre) * scale + shift`` per channel (``x * scale + shift``
        when centre is None), computed in the compute dtype, then the epilogue:
        ``residual`` added and ReLU applied (see ``_epilogue``)."""
        cdt = compute_dtype(x3.dtype)
        plan = _plan(x3.shape)
        y3 = self._outputs.empty(x3.shape, out_dtype)
        ks = plan.expand([scale, shift] + ([] if centre is None else [centre]), cdt)

        def block(b):
            xw = self._widen(0, x3[b], cdt)
            res = self._result(2, y3[b], cdt)
            views = [xw, res] if residual is None else [xw, res, self._widen(7, residual[b], cdt)]
            (xv, rv, *zv), (kscale, kshift, *kcentre) = plan.operands(b, views, ks)
            d = _scaled(xv, kscale, kcentre[0] if kcentre else None, self._scratch(1, xv.shape, cdt))
            np.add(d, kshift, out=rv)
            add_epilogue(rv, zv[0] if zv else None, relu)
            self._store(y3[b], res)

        self._map(block, plan.blocks)
        return y3

    def _normalize(self, x3, mean_hi, mean_lo, inv_std, gamma, beta, may_fuse=True, residual=None, relu=False):
        """``y = (x - mean) * inv_std * gamma + beta`` without losing the offset
        (then the epilogue).

        ``may_fuse=False`` keeps the centred form, which makes ``y == beta``
        exactly for a constant channel.
        """
        mean = np.asarray(mean_hi, np.float64) + np.asarray(mean_lo, np.float64)
        scale = inv_std if gamma is None else inv_std * np.asarray(gamma, np.float64)
        shift = np.zeros_like(scale) if beta is None else np.asarray(beta, np.float64)
        if may_fuse and _offset_is_small(mean, scale):
            return self.affine(x3, None, scale, shift - mean * scale, x3.dtype, residual, relu)
        return self.affine(x3, mean_hi, scale, shift - np.asarray(mean_lo, np.float64) * scale, x3.dtype, residual,
                           relu)

    def _whole_epilogue(self, y3, residual, relu, dtype):
        """The epilogue over a whole-array route's y (new, in the compute dtype),
        then y rounded once to ``dtype``."""
        add_epilogue(y3, None if residual is None else self._widen(7, residual, y3.dtype), relu)
        if y3.dtype == dtype:
            return y3
        out = self._outputs.empty(y3.shape, dtype)
        self._store(out, y3)
        return out

    # ---- the three operations -------------------------------------------------
    # Each goes to the compiled kernels when they take the arrays (C raises no
    # floating-point warnings, so no np.errstate is needed), else to the NumPy paths.
    def forward_train(self, x3, gamma, beta, eps, running_mean=None, running_var=None, momentum=0.1,
                      residual=None, relu=False, mask=None, count=None):
        """Training forward pass; updates the running statistics (if given) in place.

        Returns ``y3, mean_hi, mean_lo, var, inv_std`` (var biased), the
        per-channel arrays in the compute dtype.  ``residual`` (shaped like x3)
        and ``relu``: the epilogue, ``y = act(BN(x) + residual)`` (``_epilogue``).
        ``mask`` ((outer, 1, inner) booleans) and ``count`` (its True positions):
        the statistics are those of the positions it selects; the blocked path
        takes masked calls.
        """
        if mask is not None:
            return quiet(self._blocked_forward_train)(x3, gamma, beta, eps, running_mean, running_var, momentum,
                                                      residual, relu, mask, count)
        if self._compiled_takes(x3, (gamma, beta, running_mean, running_var), residual):
            done = _compiled.forward_train(x3, gamma, beta, eps, running_mean, running_var, momentum, self.threads,
                                           self._outputs.empty, residual, relu)
            if done is not None:  # None: statistics not finite, for the NumPy route
                return done
        return self._numpy_forward_train(x3, gamma, beta, eps, running_mean, running_var, momentum, residual, relu)

    @quiet
    def _numpy_forward_train(self, x3, gamma, beta, eps, running_mean, running_var, momentum, residual=None,
                             relu=False):
        route = self._route(x3)
        if route is not None:
            epilogue = residual is not None or relu
            y_dtype = compute_dtype(x3.dtype) if epilogue else x3.dtype
            if route is _tiny:
                y3, *stats = _tiny.forward_train(x3, gamma, beta, eps, running_mean, running_var, momentum, y_dtype)
            else:
                y3, *stats = self._whole.forward_train(x3, gamma, beta, eps, running_mean, running_var, momentum,
                                                       _offset_is_small, y_dtype)
            return (self._whole_epilogue(y3, residual, relu, x3.dtype) if epilogue else y3, *stats)
        return self._blocked_forward_train(x3, gamma, beta, eps, running_mean, running_var, momentum, residual, relu)

    def _blocked_forward_train(self, x3, gamma, beta, eps, running_mean, running_var, momentum, residual, relu,
                               mask=None, count=None):
        mean_hi, mean_lo, var = self.batch_stats(x3, mask, count)
        inv_std = 1.0 / np.sqrt(var + eps)
        y3 = self._normalize(x3, mean_hi, mean_lo, inv_std, gamma, beta, bool(np.all(var > 0)), residual, relu)
        if running_mean is not None:
            update_running(np, running_mean, running_var, mean_hi, mean_lo, var, momentum,
                           x3.shape[0] * x3.shape[2] if mask is None else count)
        cdt = mean_hi.dtype
        return y3, mean_hi, mean_lo, var.astype(cdt), inv_std.astype(cdt)

    def forward_infer(self, x3, gamma, beta, running_mean, running_var, eps, residual=None, relu=False):
        """Inference forward pass with the running statistics (and the epilogue).

        Returns ``y3, mean_hi, mean_lo, var, inv_std``: the running mean as a
        hi/lo pair, the running variance, in the compute dtype.
        """
        if self._compiled_takes(x3, (gamma, beta, running_mean, running_var), residual):
            return _compiled.forward_infer(x3, gamma, beta, running_mean, running_var, eps, self.threads,
                                           self._outputs.empty, residual, relu)
        return self._numpy_forward_infer(x3, gamma, beta, running_mean, running_var, eps, residual, relu)

    @quiet
    def _numpy_forward_infer(self, x3, gamma, beta, running_mean, running_var, eps, residual=None, relu=False):
        route = self._route(x3)
        if route is not None:
            epilogue = residual is not None or relu
            y_dtype = compute_dtype(x3.dtype) if epilogue else x3.dtype
            if route is _tiny:
                y3, *stats = _tiny.forward_infer(x3, gamma, beta, running_mean, running_var, eps, y_dtype)
            else:
                y3, *stats = self._whole.forward_infer(x3, gamma, beta, running_mean, running_var, eps,
                                                       _offset_is_small, y_dtype)
            return (self._whole_epilogue(y3, residual, relu, x3.dtype) if epilogue else y3, *stats)
        cdt = compute_dtype(x3.dtype)
        var = np.asarray(running_var, np.float64)
        inv_std = 1.0 / np.sqrt(var + eps)
        mean = np.asarray(running_mean, np.float64)
        mean_hi = mean.astype(cdt)
        mean_lo = mean - mean_hi
        y3 = self._normalize(x3, mean_hi, mean_lo, inv_std, gamma, beta, True, residual, relu)
        return y3, mean_hi, mean_lo.astype(cdt), var.astype(cdt), inv_std.astype(cdt)

    def backward(self, dy3, x3, mean_hi, mean_lo, var, inv_std, gamma, beta, training, relu_y=None, want_dz=False,
                 mask=None, count=None):
        """Gradients for the (outer, C, inner) view; returns ``dx3, dgamma, dbeta``
        (and ``dz3`` after them when ``want_dz``).

        dgamma/dbeta are ``sum(dy * x_hat)`` and ``sum(dy)`` (in double, rounded
        to gamma's and beta's dtypes; None where those are None); in
        training mode dx also flows through the batch statistics:
        ``dx = a*dy + b*(x - mean) + c`` per channel.  ``relu_y``: the forward
        pass's y3 after a ReLU, whose gradient ``g = y <= 0 ? 0 : dy`` then
        replaces dy throughout; dz3 is g (dy3 itself without relu_y).  ``mask`` and
        ``count``: those of a masked forward call (training; the blocked path).
        """
        if mask is not None:
            return quiet(self._blocked_backward)(dy3, x3, mean_hi, mean_lo, var, inv_std, gamma, beta, training,
                                                 relu_y, want_dz, mask, count)
        if (dy3.dtype == x3.dtype and dy3.flags.aligned
                and self._compiled_takes(x3, (mean_hi, mean_lo, inv_std, gamma), relu_y)):
            done = _compiled.backward(dy3, x3, mean_hi, mean_lo, inv_std, gamma, training, self.threads,
                                      self._outputs.empty, relu_y, want_dz)
            if done is not None:  # None: gradient sums not finite, for the NumPy route
                dx3, dgamma, dbeta, dz3 = done
                return _gradients(dx3, _in_dtype_of(dgamma, gamma), _in_dtype_of(dbeta, beta), want_dz,
                                  dy3 if dz3 is None else dz3)
        return self._numpy_backward(dy3, x3, mean_hi, mean_lo, var, inv_std, gamma, beta, training, relu_y, want_dz)

    @quiet
    def _numpy_backward(self, dy3, x3, mean_hi, mean_lo, var, inv_std, gamma, beta, training, relu_y=None,
                        want_dz=False):
        route = self._route(x3)
        if route is not None:  # small arrays: the ReLU's gradient formed whole, first
            g3 = dy3 if relu_y is None else self.relu_gradient(dy3, relu_y)
            if route is _tiny:
                dx3, dgamma, dbeta = _tiny.backward(g3, x3, mean_hi, mean_lo, inv_std, gamma, training)
            else:
                dx3, dgamma, dbeta = self._whole.backward(g3, x3, mean_hi, mean_lo, var, inv_std, gamma, training)
            return _gradients(dx3, _in_dtype_of(dgamma, gamma), _in_dtype_of(dbeta, beta), want_dz, g3)
        return self._blocked_backward(dy3, x3, mean_hi, mean_lo, var, inv_std, gamma, beta, training, relu_y, want_dz)

    def _blocked_backward(self, dy3, x3, mean_hi, mean_lo, var, inv_std, gamma, beta, training, relu_y, want_dz,
                          mask=None, count=None):
        inv = np.asarray(inv_std, np.float64)
        lo = np.asarray(mean_lo, np.float64)
        dz3 = self._outputs.empty(x3.shape, dy3.dtype) if want_dz and relu_y is not None else None
        sum_dy, sum_dyc = self._gradient_sums(dy3, x3, mean_hi, mean_lo, var, training, relu_y, dz3)
        if dz3 is not None:  # the sums wrote the gated dy there: dx reads it rather than dy and y again
            dy3, relu_y = dz3, None
        dgamma = inv * (sum_dyc - lo * sum_dy)
        if training:
            dx3 = self._input_gradient(dy3, x3, mean_hi, mean_lo, inv_std, gamma, sum_dy, sum_dyc,
                                       x3.shape[0] * x3.shape[2] if mask is None else count, relu_y, None, mask)
        else:
            dx3 = self._scaled_gradient(dy3, x3, inv if gamma is None else inv * np.asarray(gamma, np.float64),
                                        relu_y)
        return _gradients(dx3, _in_dtype_of(dgamma, gamma), _in_dtype_of(sum_dy, beta), want_dz, dy3)

    def relu_gradient(self, dy3, y3):
        """A new array ``g = y <= 0 ? 0 : dy``: the gradient through a ReLU whose output was y."""
        g3 = self._outputs.empty(dy3.shape, dy3.dtype)
        np.copyto(g3, dy3)
        gate_in_place(g3, y3)
        return g3

    def _gradient_block(self, dy3, relu_y, b, cdt):
        """A block of dy in the compute dtype, through the ReLU's gate where there is one."""
        dyw = self._widen(3, dy3[b], cdt)
        if relu_y is None:
            return dyw
        g = self._scratch(8, dyw.shape, cdt)
        np.copyto(g, dyw)
        gate_in_place(g, relu_y[b])
        return g

    def _gradient_sums(self, dy3, x3, mean_hi, mean_lo, var, training, relu_y=None, dz3=None):
        """float64 per channel ``sum(g)`` and ``sum(g * (x - mean_hi))``, g = dy
        through the ReLU's gate (``relu_y``) where there is one, and written to
        ``dz3`` where given."""
        cdt = compute_dtype(x3.dtype)
        plan = _plan(x3.shape)
        hi, lo = np.asarray(mean_hi, np.float64), np.asarray(mean_lo, np.float64)
        # sum(dy * x) - mean * sum(dy) cancels by |mean| / std (not
        # |mean| * inv_std, which eps bounds): centre x unless mean^2 <= var
        # in training; in inference the data's spread is unknown, so always.
        unshifted = not hi.any() or (training and bool(np.all((hi + lo) ** 2 <= np.asarray(var, np.float64))))
        (kcentre,) = plan.expand([hi], cdt)

        def sums(b):
            dyw = self._gradient_block(dy3, relu_y, b, cdt)
            if dz3 is not None:
                self._store(dz3[b], dyw)
            xw = self._widen(0, x3[b], cdt)
            d = xw if unshifted else self._centred(plan, b, xw, kcentre, cdt)
            return plan.dots(dyw), plan.dots(dyw, d, self._scratch(2, d.shape, cdt))

        sum_dy, sum_dyx = self._channel_sums(plan, sums, x3.shape[1])
        return sum_dy, sum_dyx - hi * sum_dy if unshifted else sum_dyx

    def _scaled_gradient(self, dy3, x3, a, relu_y=None, dz3=None):
        """Inference-mode ``dx = a * g`` per channel (g: dy through the ReLU's gate,
        written to dz3 when given)."""
        cdt = compute_dtype(x3.dtype)
        plan = _plan(x3.shape)
        dx3 = self._outputs.empty(x3.shape, dy3.dtype)
        (ka,) = plan.expand([a], cdt)

        def scale_only(b):
            dyw = self._gradient_block(dy3, relu_y, b, cdt)
            if dz3 is not None:
                self._store(dz3[b], dyw)
            res = self._result(2, dx3[b], cdt)
            (dyv, rv), (kab,) = plan.operands(b, [dyw, res], [ka])
            np.multiply(dyv, kab, out=rv)
            self._store(dx3[b], res)

        self._map(scale_only, plan.blocks)
        return dx3

    def _input_gradient(self, dy3, x3, mean_hi, mean_lo, inv_std, gamma, sum_dy, sum_dyc, count, relu_y=None,
                        dz3=None, mask=None):
        """Training-mode dx from the per-channel sums of ``count`` values per channel
        (this array's, or a whole distributed batch's): ``sum_dy`` and ``sum_dyc`` =
        ``sum(dy * (x - mean_hi))``; dy through the ReLU's gate (``relu_y``) where
        there is one, written to dz3 when given.  With a ``mask`` the terms through
        the statistics reach only the positions it selects (those the statistics
        came from): ``dx = a*dy + mask * (b*(x - mean) + c)``."""
        cdt = compute_dtype(x3.dtype)
        plan = _plan(x3.shape)
        inv = np.asarray(inv_std, np.float64)
        hi, lo = np.asarray(mean_hi, np.float64), np.asarray(mean_lo, np.float64)
        dgamma = inv * (sum_dyc - lo * sum_dy)
        a = inv if gamma is None else inv * np.asarray(gamma, np.float64)
        dx3 = self._outputs.empty(x3.shape, dy3.dtype)
        # dx = a * (dy - dbeta/m - x_hat * dgamma/m), x_hat = (x - mean) * inv
        b = -a * inv * dgamma / count
        # Centre x before multiplying by b only where the offset would cost bits.
        centred = not _offset_is_small(hi + lo, inv)
        c0 = -a * sum_dy / count - b * (lo if centred else hi + lo)
        ks = plan.expand([a, b, c0] + ([hi] if centred else []), cdt)

        def elementwise(blk):
            xw = self._widen(0, x3[blk], cdt)
            dyw = self._gradient_block(dy3, relu_y, blk, cdt)
            if dz3 is not None:
                self._store(dz3[blk], dyw)
            res = self._result(2, dx3[blk], cdt)
            views = [xw, dyw, res]
            if mask is not None:  # where the mask is False, as a block shaped like x's
                dropped = self._scratch(11, xw.shape, np.bool_)
                np.logical_not(mask[blk[0], :, blk[2]], out=dropped)
                views.append(dropped)
            (xv, dyv, rv, *dropv), (ka, kb, kc, *kcen) = plan.operands(blk, views, ks)
            d = _scaled(xv, kb, kcen[0] if kcen else None, self._scratch(1, xv.shape, cdt))
            t = self._scratch(4, xv.shape, cdt)
            np.multiply(dyv, ka, out=t)
            if dropv:  # the statistics' terms, zero where they do not reach (x may be Inf or NaN there)
                np.add(d, kc, out=d)
                np.copyto(d, 0, where=dropv[0])
                np.add(t, d, out=rv)
            else:
                np.add(t, d, out=t)
                np.add(t, kc, out=rv)
            self._store(dx3[blk], res)

        self._map(elementwise, plan.blocks)
        return dx3

    # ---- synchronised statistics (cupybn.distributed) -----------------------------------
    # A shard's moments, y from statistics merged over ranks, a shard's gradient sums
    # and dx from sums added over ranks: the compiled kernels for float32 (where they
    # take the arrays and the sums are finite), else the blocked path, for any size.
    def shard_moments(self, x3, mask=None, count=None):
        """Per-channel ``(mean_hi, mean_lo, m2)`` of a non-empty x3 (of the ``count`` > 0
        positions ``mask`` selects, where there is one): the mean as a hi/lo pair in
        the compute dtype, m2 the float64 sum of squared deviations from it."""
        if mask is not None:
            return self._numpy_shard_moments(x3, mask, count)
        if self._compiled_takes(x3, ()):
            done = _compiled.moments(x3, self.threads)
            if done is not None:
                mean, m2 = done
                return (*split_mean(mean, 0.0, np.float32), m2)
        return self._numpy_shard_moments(x3)

    @quiet
    def _numpy_shard_moments(self, x3, mask=None, count=None):
        mean_hi, mean_lo, var = self.batch_stats(x3, mask, count)
        return mean_hi, mean_lo, var * (x3.shape[0] * x3.shape[2] if mask is None else count)

    def normalize(self, x3, mean, mean_lo, var, gamma, beta, eps, residual=None, relu=False):
        """Training-mode y3 for float64 statistics computed elsewhere (the mean as a
        pair ``mean + mean_lo``, ``var`` biased), with the epilogue."""
        mean, mean_lo, var = (np.asarray(a, np.float64) for a in (mean, mean_lo, var))
        if self._compiled_takes(x3, (gamma, beta), residual):  # float64 carries a float32 pair's 48 bits
            return _compiled.forward_infer(x3, gamma, beta, mean + mean_lo, var, eps, self.threads,
                                           self._outputs.empty, residual, relu)[0]
        return self._numpy_normalize(x3, mean, mean_lo, var, gamma, beta, eps, residual, relu)

    @quiet
    def _numpy_normalize(self, x3, mean, mean_lo, var, gamma, beta, eps, residual, relu):
        mean_hi, mean_lo = split_mean(mean, mean_lo, compute_dtype(x3.dtype))
        inv_std = 1.0 / np.sqrt(var + eps)
        return self._normalize(x3, mean_hi, mean_lo, inv_std, gamma, beta, bool(np.all(var > 0)), residual, relu)

    def gradient_sums(self, dy3, x3, mean_hi, mean_lo, var):
        """float64 per channel ``sum(dy)`` and ``sum(dy * (x - mean_hi))`` (training mode)."""
        if dy3.dtype == x3.dtype and dy3.flags.aligned and self._compiled_takes(x3, (mean_hi,)):
            done = _compiled.grad_sums(dy3, x3, mean_hi, self.threads)
            if done is not None:
                return done
        return quiet(self._gradient_sums)(dy3, x3, mean_hi, mean_lo, var, True)

    def input_gradient(self, dy3, x3, mean_hi, mean_lo, inv_std, gamma, sum_dy, sum_dyc, count, mask=None):
        """Training-mode dx from per-channel sums over ``count`` values per channel
        (with a ``mask``: the terms through the statistics only where it is True)."""
        sum_dy, sum_dyc = np.asarray(sum_dy, np.float64), np.asarray(sum_dyc, np.float64)
        if mask is not None:
            return quiet(self._input_gradient)(dy3, x3, mean_hi, mean_lo, inv_std, gamma, sum_dy, sum_dyc, count,
                                               mask=mask)
        if dy3.dtype == x3.dtype and dy3.flags.aligned and self._compiled_takes(x3, (mean_hi, mean_lo, inv_std,
                                                                                      gamma)):
            return _compiled.grad_apply(dy3, x3, mean_hi, mean_lo, inv_std, gamma, sum_dy, sum_dyc, count,
                                        self.threads, self._outputs.empty)
        return quiet(self._input_gradient)(dy3, x3, mean_hi, mean_lo, inv_std, gamma, sum_dy, sum_dyc, count)


def _in_dtype_of(result, param):
    return None if param is None else result.astype(param.dtype)


def _gradients(dx3, dgamma, dbeta, want_dz, dz3):
    """A backward call's results: ``dz3`` after the others when it was asked for."""
    return (dx3, dgamma, dbeta, dz3) if want_dz else (dx3, dgamma, dbeta)


def _scaled(x, scale, centre, out):
    """``out = (x - centre) * scale``, or ``x * scale`` when centre is None."""
    if centre is None:
        return np.multiply(x, scale, out=out)
    np.subtract(x, centre, out=out)
    return np.multiply(out, scale, out=out)


def _offset_is_small(mean, scale) -> bool:
    """Whether ``x * scale`` may be formed before centring.

    ``x*scale + (shift - mean*scale)`` rounds ``x*scale`` once, an error of
    about 2**-24 * |mean*scale|; below FUSE_LIMIT that stays under the
    rounding of y itself and saves one pass over the block.
    """
    return bool(np.all(np.abs(mean * scale) <= FUSE_LIMIT))
