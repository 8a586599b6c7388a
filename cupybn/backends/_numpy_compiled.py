"""float32 arrays on the NumPy backend through its compiled kernels.

``cupybn._batch_norm_cpu`` (cupybn/kernels/batch_norm_cpu.c) is built at
install when a C compiler is at hand; without it, :data:`AVAILABLE` is False
and the backend keeps to its NumPy paths.  Each call here is one call into C:
statistics, y and the running-statistics update in the forward pass, both
per-channel sums and dx in the backward pass, with the blocked path's numerics
(float32 arithmetic, sums added up in float64; see the C source).

The functions take and return what the ``_numpy_tiny`` ones do.  An array
whose (outer, C, inner) view is neither NCHW-like nor rows of contiguous
values is copied to C order first.
"""
from __future__ import annotations

import numpy as np

try:
    from .. import _batch_norm_cpu as _c  # type: ignore[attr-defined]  # a C extension, no stubs
except ImportError:  # built without a C compiler
    _c = None

AVAILABLE = _c is not None
# Work items (blocks of rows) of about this many values: partial sums are combined
# in block order, so the block size, not the number of threads, fixes the bits.
BLOCK_VALUES = 1 << 15
# Arrays of at least this many values are shared out among the backend's threads.
# The kernels start their threads on each call, which costs 0.1-0.2 ms on the
# development VM: below about 4 Mi values two threads were slower than one there.
PARALLEL_VALUES = 1 << 22
_F32 = np.dtype(np.float32)
_F64 = np.dtype(np.float64)


def takes(x3, vectors, arrays=()) -> bool:
    """Whether the compiled kernels take these arrays: aligned native float32 data
    (x3 and the ``arrays`` shaped like it, None where absent), and per-channel
    vectors of native float32 or float64 (or None; the kernels read and write
    vectors whatever their alignment)."""
    if not AVAILABLE or x3.dtype != _F32 or not x3.flags.aligned:
        return False
    for v in vectors:  # a loop, not all(genexpr): this runs on every call
        if v is not None and v.dtype != _F32 and v.dtype != _F64:
            return False
    for a in arrays:
        if a is not None and (a.dtype != _F32 or not a.flags.aligned):
            return False
    return True


def _work(x3, threads):
    """The threads and block size of a call (read at each call, so tests can move them)."""
    return (threads if x3.size >= PARALLEL_VALUES else 1), BLOCK_VALUES


def _call(kernel, inputs, out, rest, late=()):
    """Run ``kernel(*inputs, out, *rest, *late)``; when it cannot walk an input's
    layout (it returns None, having written nothing), again on C-contiguous copies
    of the inputs and of the ``late`` inputs (None where absent).  Returns False
    when sums were not finite."""
    done = kernel(*inputs, out, *rest, *late)
    if done is None:
        done = kernel(*_contiguous(inputs), out, *rest, *_contiguous(late))
        if done is None:
            raise AssertionError("the compiled kernels refused C-contiguous arrays")
    return done


def _contiguous(arrays):
    return [None if a is None else np.ascontiguousarray(a) for a in arrays]


def forward_train(x3, gamma, beta, eps, running_mean, running_var, momentum, threads=1, empty=np.empty,
                  residual=None, relu=False):
    """As ``_numpy_tiny.forward_train``; ``threads`` share out large arrays, ``empty``
    allocates y (the backend's recycling allocator); ``residual`` and ``relu``: the
    fused epilogue.  None (nothing written) when the statistics are not finite: Inf
    or NaN in x, or values whose float32 squares overflow; the NumPy routes take those."""
    y3 = empty(x3.shape, _F32)
    stats = np.empty((4, x3.shape[1]), _F32)
    rest = (stats, gamma, beta, running_mean, running_var, eps, momentum, relu, *_work(x3, threads))
    if not _call(_c.forward_train, (x3, residual), y3, rest):
        return None
    return y3, stats[0], stats[1], stats[2], stats[3]


def forward_infer(x3, gamma, beta, running_mean, running_var, eps, threads=1, empty=np.empty, residual=None,
                  relu=False):
    y3 = empty(x3.shape, _F32)
    stats = np.empty((4, x3.shape[1]), _F32)
    _call(_c.forward_infer, (x3, residual), y3,
          (stats, gamma, beta, running_mean, running_var, eps, relu, *_work(x3, threads)))
    return y3, stats[0], stats[1], stats[2], stats[3]


def backward(dy3, x3, mean_hi, mean_lo, inv_std, gamma, training, threads=1, empty=np.empty, relu_y=None,
             want_dz=False):
    """``dx3``, float64 ``(dgamma, dbeta)`` and dz3 (the gradient through the ReLU
    whose output was ``relu_y``, when ``want_dz``; else None); None (nothing
    written) when the gradient sums are not finite, as for :func:`forward_train`."""
    dx3 = empty(x3.shape, _F32)
    dz3 = empty(x3.shape, _F32) if want_dz and relu_y is not None else None
    grads = np.empty((2, x3.shape[1]), _F64)
    rest = (grads, mean_hi, mean_lo, inv_std, gamma, training, *_work(x3, threads), dz3)
    if not _call(_c.backward, (dy3, x3), dx3, rest, (relu_y,)):
        return None
    return dx3, grads[0], grads[1], dz3


# ---- synchronised Batch Normalization's pieces (cupybn.distributed) ----------------
def moments(x3, threads=1):
    """float64 per-channel ``(mean, m2)`` of a non-empty x3 (m2: the sum of squared
    deviations from the mean); None when a sum is not finite."""
    out = np.empty((2, x3.shape[1]), _F64)
    if not _call(_c.moments, (x3,), out, _work(x3, threads)):
        return None
    return out[0], out[1]


def grad_sums(dy3, x3, mean_hi, threads=1):
    """float64 per-channel ``sum(dy)`` and ``sum(dy * (x - mean_hi))``; None when not finite."""
    out = np.empty((2, x3.shape[1]), _F64)
    if not _call(_c.grad_sums, (dy3, x3), out, (mean_hi, *_work(x3, threads))):
        return None
    return out[0], out[1]


def grad_apply(dy3, x3, mean_hi, mean_lo, inv_std, gamma, sum_dy, sum_dyc, count, threads=1, empty=np.empty):
    """Training-mode dx from per-channel sums over ``count`` values per channel."""
    dx3 = empty(x3.shape, _F32)
    sums = np.ascontiguousarray(np.stack([sum_dy, sum_dyc]), _F64)
    _call(_c.grad_apply, (dy3, x3), dx3, (mean_hi, mean_lo, inv_std, gamma, sums, float(count), *_work(x3, threads)))
    return dx3
