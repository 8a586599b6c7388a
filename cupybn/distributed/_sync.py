"""Synchronised forward and backward passes: a shard's reductions, one exchange,
then the elementwise work with what every rank merged.

The backends provide the pieces (``shard_moments``, ``normalize``,
``gradient_sums``, ``input_gradient``); this module runs them around the
communicator's one all-gather per call (see ``_merge`` for what is sent).
Per-channel vectors cross the exchange in host memory: for CuPy arrays that is a
copy of a few C values each way.
"""
from __future__ import annotations

import numpy as np

from ..backends._running import update_running
from ..backends.numpy_backend import compute_dtype, split_mean
from . import _merge

STATISTICS, GRADIENTS = _merge.STATISTICS, _merge.GRADIENTS


def check_comm(comm):
    """``comm`` if it is a communicator (``rank``, ``size``, ``allgather``), else TypeError."""
    if not callable(getattr(comm, "allgather", None)) or not hasattr(comm, "rank") or not hasattr(comm, "size"):
        raise TypeError(f"comm must be a cupybn.distributed communicator (MPI(...), a ThreadWorld's comm(rank), or "
                        f"an object with rank, size and allgather(vector)), got {type(comm).__name__}")
    return comm


def announce_failure(comm, phase: float, error: BaseException) -> None:
    """Take part in the exchange with ``error`` instead of data, so that the other
    ranks raise too rather than wait; the caller then raises ``error`` itself."""
    try:
        comm.allgather(_merge.pack_failure(phase, error))
    except Exception as exchange_error:  # the exchange itself failed: report both
        raise error from exchange_error


def _host(a) -> np.ndarray:
    """A per-channel array in host memory, float64 (CuPy arrays have .get())."""
    return np.asarray(a if isinstance(a, np.ndarray) else a.get(), np.float64)


def saved_statistics(xp, mean, mean_lo, var, eps, dtype):
    """``(mean_hi, mean_lo, var, inv_std)`` in the compute dtype of data of ``dtype``,
    as a forward pass saves them, from float64 statistics (arrays of ``xp``)."""
    cdt = compute_dtype(dtype)
    hi, lo = split_mean(mean, mean_lo, cdt)
    return hi, lo, var.astype(cdt), (1.0 / xp.sqrt(var + eps)).astype(cdt)


def _guarded(comm, phase, work, *args):
    """``work(*args)``, the local work before an exchange: if it raises (out of
    memory, say), this rank still takes part in the exchange, with its error."""
    try:
        return work(*args)
    except Exception as error:
        announce_failure(comm, phase, error)
        raise


def forward(be, x3, gamma, beta, eps, running_mean, running_var, momentum, training, comm, epilogue, masked, *,
            axis):
    """The synchronised forward pass; returns ``(y3, mean_hi, mean_lo, var, inv_std, count)``
    with the merged statistics and the whole batch's count per channel, or None in
    inference, where the exchange only checks that the ranks agree and the caller
    runs the local inference pass.  ``epilogue``: the backend's epilogue arguments
    (residual, relu), fused into y's pass; ``masked``: its mask arguments (mask,
    count: the positions this rank's statistics take)."""
    xp = be.xp
    channels = x3.shape[1]
    count = masked.get("count", x3.shape[0] * x3.shape[2])
    header = dict(channels=channels, dtype=x3.dtype.name, axis=axis, training=training, eps=eps,
                  momentum=momentum if training else 0.0, gamma=gamma is not None, beta=beta is not None,
                  running=running_mean is not None)
    if not training:
        _merge.check_agreement(comm.allgather(_merge.pack(_merge.STATISTICS, count, (), **header)))
        return None

    def shard():
        body = [_host(a) for a in be.shard_moments(x3, **masked)] if count else [np.zeros(channels)] * 3
        return _merge.pack(_merge.STATISTICS, count, body, **header)

    merged = _merge.merge(comm.allgather(_guarded(comm, _merge.STATISTICS, shard)))
    mean, mean_lo, var = xp.asarray(merged.mean), xp.asarray(merged.mean_lo), xp.asarray(merged.var)
    y3 = be.normalize(x3, mean, mean_lo, var, gamma, beta, eps, **epilogue) if x3.size else xp.empty(x3.shape,
                                                                                                     x3.dtype)
    # What backward uses, the same bits on every rank whatever route its y took.
    saved = [xp.asarray(a) for a in saved_statistics(np, merged.mean, merged.mean_lo, merged.var, eps, x3.dtype)]
    if running_mean is not None:
        update_running(xp, running_mean, running_var, mean, mean_lo, var, momentum, merged.count)
    return (y3, *saved, merged.count)


def backward(be, dy3, x3, saved, comm, relu_y3=None):
    """The synchronised training backward pass; returns ``(dx3, dgamma, dbeta)`` with
    this rank's own dgamma and dbeta (see docs/distributed.md), and dz3 after when
    the forward call had a residual.  After a ReLU (``relu_y3``, the saved y) the
    gradient that reaches BN is formed once, before the sums (not fused here)."""
    xp = be.xp
    channels = x3.shape[1]
    count = x3.shape[0] * x3.shape[2]
    if relu_y3 is not None and count:
        dy3 = _guarded(comm, _merge.GRADIENTS, be.relu_gradient, dy3, relu_y3)

    def shard():
        if count:
            sums = tuple(_host(a) for a in be.gradient_sums(dy3, x3, saved.mean, saved.mean_lo, saved.var))
        else:
            sums = (np.zeros(channels), np.zeros(channels))
        return sums, _merge.pack(_merge.GRADIENTS, count, sums, channels=channels, dtype=x3.dtype.name,
                                 axis=saved.axis, training=True, eps=saved.eps, gamma=saved.gamma is not None,
                                 beta=saved.beta is not None)

    (sum_dy, sum_dyc), vector = _guarded(comm, _merge.GRADIENTS, shard)
    total_dy, total_dyc = _merge.add_gradient_sums(comm.allgather(vector))
    if count:
        masked = {} if saved.mask is None else {"mask": saved.mask}
        dx3 = be.input_gradient(dy3, x3, saved.mean, saved.mean_lo, saved.inv_std, saved.gamma,
                                xp.asarray(total_dy), xp.asarray(total_dyc), saved.total_count, **masked)
    else:
        dx3 = xp.empty(x3.shape, dy3.dtype)
    dgamma = _host(saved.inv_std) * (sum_dyc - _host(saved.mean_lo) * sum_dy)
    return (dx3, _as_param(xp, dgamma, saved.gamma), _as_param(xp, sum_dy, saved.beta)) + (
        (dy3,) if saved.residual else ())


def _as_param(xp, result, param):
    if param is None:
        return None
    with np.errstate(all="ignore"):  # beyond float16's range: Inf, as without comm
        return xp.asarray(result.astype(param.dtype))
