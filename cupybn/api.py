"""The public functions: validate, pick the backend, call it.

This is the only module that checks arguments and chooses a backend.  Every
check runs before any computation, and running statistics are written only
after the whole forward pass has succeeded, so a call that raises changes
nothing.
"""
from __future__ import annotations

import functools
import math
import numbers
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import backends as _backends
from ._layout import Layout, canonical_axis, make_layout
from .distributed import _sync as _distributed

SUPPORTED_DTYPES = ("float16", "bfloat16", "float32", "float64")


def _is_float_dtype(dtype) -> bool:
    try:
        return _is_float_dtype_cached(dtype)  # five arrays per call, and dtypes repeat
    except TypeError:  # not hashable: not a dtype we take, but say so below
        return _float_kind(dtype)


@functools.lru_cache(maxsize=64)
def _is_float_dtype_cached(dtype) -> bool:
    return _float_kind(dtype)


def _float_kind(dtype) -> bool:
    kind = getattr(dtype, "kind", None)
    if kind == "f":  # float16/32/64, not longdouble
        return dtype.itemsize <= 8
    return kind == "V" and dtype.name == "bfloat16"  # ml_dtypes registers bfloat16 as kind "V"


def param_dtype_name(x_dtype) -> str:
    """dtype of statistics and parameters for data of ``x_dtype``."""
    return "float64" if getattr(x_dtype, "name", "") == "float64" else "float32"


@dataclass(frozen=True, eq=False)
class BatchNormSaved:
    """What :func:`batch_norm_backward` needs from the forward pass.

    Fields:
      x         the forward input itself (a reference, never a copy)
      mean      per-channel mean used to centre x (batch mean in training,
                running mean in inference), in the parameter dtype
      mean_lo   the rounding residual of ``mean``: the mean is ``mean + mean_lo``
                to twice the parameter precision (zeros when exact)
      var       biased batch variance (training) or running variance (inference)
      inv_std   ``1 / sqrt(var + eps)`` per channel
      gamma     the scale array passed to the forward call, or None
      beta      the shift array passed to the forward call, or None
      training  True if batch statistics were used
      axis      the non-negative channel axis
      eps       the epsilon used
      layout    the (outer, C, inner) mapping of x
      backend   the backend object that ran the forward pass
      x_sample  the bytes of a fixed sample of x (NumPy arrays), so that
                backward can tell that x was changed in place; None for CuPy
      comm      the communicator of a synchronised call, else None
      total_count  values per channel the statistics came from: x's own, or
                the whole batch's over every rank of a synchronised call
      residual  True if a residual was added (backward then also returns dz)
      activation  the activation of the call's epilogue: None or "relu"
      y         the call's output (a reference) when activation is "relu":
                the ReLU's gradient is read from it
      y_sample  as x_sample, for y
      mask      the forward call's mask as the backend took it ((outer, 1,
                inner) booleans), or None (no mask, or one that was all True)

    The parameter dtype is float32 for float16/bfloat16/float32 data and
    float64 for float64 data.
    """

    x: Any
    mean: Any
    mean_lo: Any
    var: Any
    inv_std: Any
    gamma: Any
    beta: Any
    training: bool
    axis: int
    eps: float
    layout: Layout
    backend: Any
    x_sample: bytes | None = None
    comm: Any = None
    total_count: int = 0
    residual: bool = False
    activation: str | None = None
    y: Any = None
    y_sample: bytes | None = None
    mask: Any = None

    @property
    def shape(self):
        return self.x.shape

    @property
    def dtype(self):
        return self.x.dtype


def _new_saved(**fields) -> BatchNormSaved:
    """A BatchNormSaved of these fields (all of them), made without the frozen
    dataclass's __init__, which sets each field through object.__setattr__ (a few
    microseconds a call)."""
    saved = object.__new__(BatchNormSaved)
    saved.__dict__.update(fields)
    return saved


# ---- argument checks -------------------------------------------------------
def _check_plain(name, a):
    """np.matrix and masked arrays look like arrays but do not behave like them here."""
    if isinstance(a, np.ndarray) and type(a) is not np.ndarray:
        if isinstance(a, np.matrix):
            raise TypeError(f"{name} must be an ndarray, not np.matrix (np.asarray({name}) gives one)")
        if isinstance(a, np.ma.MaskedArray):
            raise TypeError(f"{name} must be an ndarray, not a masked array: fill or drop the masked values "
                            f"first ({name}.filled(...) or {name}.compressed())")


# dtypes of plain NumPy arrays that need no further checking (the fast path of the checks)
_NUMPY_FLOATS = frozenset(np.dtype(d) for d in ("float16", "float32", "float64"))


def _check_x(x, may_be_empty=False):
    if type(x) is np.ndarray and x.dtype in _NUMPY_FLOATS and x.ndim >= 2 and x.size:
        return
    dtype = getattr(x, "dtype", None)
    if dtype is None or not hasattr(x, "shape"):
        raise TypeError(f"x must be a NumPy or CuPy array, got {type(x).__name__}")
    _check_plain("x", x)
    if not _is_float_dtype(dtype):
        raise TypeError(f"x must have a floating dtype ({', '.join(SUPPORTED_DTYPES)}), got {dtype}")
    if x.ndim < 2:
        raise ValueError(f"x must have at least 2 dimensions (batch and channel), got shape {tuple(x.shape)}")
    if x.size == 0 and not may_be_empty:
        raise ValueError(f"x must not be empty, got shape {tuple(x.shape)} (only a synchronised call, with comm, "
                         f"takes an empty shard)")


@functools.lru_cache(maxsize=64)
def _dtype_name(dtype) -> str:
    return dtype.name  # computed by NumPy on every access: cached, as calls repeat


def _check_backend_dtype(be, dtype):
    supported = getattr(be, "supported_dtypes", SUPPORTED_DTYPES)
    if _dtype_name(dtype) not in supported:
        raise TypeError(f"x has dtype {dtype.name}, which the {getattr(be, 'name', 'chosen')} backend does not "
                        f"support (it takes {', '.join(d for d in SUPPORTED_DTYPES if d in supported)})")


def _check_vector(name, a, channels):
    if a is None or type(a) is np.ndarray and a.dtype in _NUMPY_FLOATS and a.shape == (channels,):
        return
    dtype = getattr(a, "dtype", None)
    if dtype is None or not hasattr(a, "shape"):
        raise TypeError(f"{name} must be an array of shape ({channels},), got {type(a).__name__}")
    if not _is_float_dtype(dtype):
        raise TypeError(f"{name} must have a floating dtype, got {dtype}")
    _check_plain(name, a)
    if a.shape != (channels,):
        raise ValueError(f"{name} must have shape ({channels},) (one value per channel), got {tuple(a.shape)}")


def _check_real(name, value, ok, expected):
    if type(value) is not float and (isinstance(value, bool) or not isinstance(value, numbers.Real)):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if not (math.isfinite(value) and ok(value)):
        raise ValueError(f"{name} must be {expected}, got {value}")
    return value


def _positive(v: float) -> bool:
    return v > 0


def _fraction(v: float) -> bool:
    return 0 <= v <= 1


def _check_writable(name, a):
    flags = getattr(a, "flags", None)
    if flags is not None and not getattr(flags, "writeable", True):
        raise ValueError(f"{name} must be writeable: it is updated in place in training mode")


# ---- x changed between forward and backward -------------------------------------
SAMPLE_VALUES = 64


@functools.lru_cache(maxsize=256)
def _sample_positions(shape) -> tuple:
    """SAMPLE_VALUES positions spread evenly over an array of ``shape``: as flat
    (C-order) indices and as index arrays."""
    size = math.prod(shape)
    flat = np.unique(np.linspace(0, size - 1, min(size, SAMPLE_VALUES)).astype(np.intp))
    return flat, np.unravel_index(flat, shape)


def _x_sample(x) -> bytes | None:
    """The bytes of a fixed sample of a NumPy x; None for other arrays (on a GPU the
    comparison would cost a device-to-host copy in every backward call)."""
    if type(x) is not np.ndarray:
        return None
    flat, index = _sample_positions(x.shape)
    # take() is the cheaper gather, but copies a non-contiguous array first
    return (x.take(flat) if x.flags.c_contiguous else x[index]).tobytes()


def _check_x_unchanged(saved) -> None:
    if saved.x_sample is not None and _x_sample(saved.x) != saved.x_sample:
        raise RuntimeError("x was changed in place after the forward call (its values differ from those the "
                           "forward pass saw): the gradients would be wrong; keep x unchanged until "
                           "batch_norm_backward, or pass a copy to batch_norm")
    if saved.y_sample is not None and _x_sample(saved.y) != saved.y_sample:
        raise RuntimeError("y was changed in place after the forward call: with activation='relu' the backward "
                           "pass reads the ReLU's gradient from y; keep y unchanged until batch_norm_backward")


# ---- public functions ------------------------------------------------------
def batch_norm(x, gamma=None, beta=None, *, running_mean=None, running_var=None,
               training=True, momentum=0.1, eps=1e-5, axis=1, residual=None, activation=None, mask=None,
               backend=None, comm=None):
    """Batch Normalization of ``x`` over every axis except ``axis``.

    Returns ``(y, saved)``; ``y`` has x's shape, dtype and memory layout, and
    ``saved`` (a :class:`BatchNormSaved`) is the input of
    :func:`batch_norm_backward`.

    training=True normalises with the batch mean and biased variance and, if
    running_mean/running_var are given, updates them in place:
    ``new = (1 - momentum) * old + momentum * batch`` with the unbiased batch
    variance ``var * m / (m - 1)``.  training=False normalises with the running
    statistics, which are then required.

    The epilogue ``y = activation(BN(x) + residual)`` is fused into the same
    passes: ``residual`` (None, or an array of x's shape and dtype, any
    layout) is added and ``activation`` (None or ``"relu"``) applied before y
    is rounded to x's dtype.  ReLU maps every value <= 0 (-0.0 included) to
    +0.0 and keeps NaN; its gradient is taken from y, zero where y == 0
    (docs/epilogue.md).

    ``mask`` (booleans broadcastable to x's shape without the channel axis,
    e.g. (N, T) for an (N, C, T) x; True where a position counts) restricts
    the batch statistics and the running-statistics update to the positions
    it selects, in training; every position is normalised, and the backward
    pass is the exact gradient of that (docs/masks.md).

    ``comm`` (a :mod:`cupybn.distributed` communicator) makes the call
    collective: every rank of ``comm`` calls it with its shard of the batch,
    and the statistics are those of the whole batch (x may then have an empty
    batch); see docs/distributed.md.
    """
    if comm is not None:
        return _synchronised_forward(x, gamma, beta, running_mean, running_var, training, momentum, eps, axis,
                                     residual, activation, mask, backend, _distributed.check_comm(comm))
    call = _ForwardCall(x, gamma, beta, running_mean, running_var, training, momentum, eps, axis, residual,
                        activation, mask, backend)
    be, layout, x3 = call.backend, call.layout, call.layout.to3d(x)
    z3 = None if residual is None else layout.to3d(residual)
    # The per-channel results come back in the parameter dtype; the backend
    # updates the running statistics itself (in training), after its work is done.
    if call.training:
        y3, mean_hi, mean_lo, var, inv_std = be.forward_train(x3, gamma, beta, call.eps, running_mean, running_var,
                                                              call.momentum, **call.epilogue(z3), **call.masked())
    else:
        y3, mean_hi, mean_lo, var, inv_std = be.forward_infer(x3, gamma, beta, running_mean, running_var, call.eps,
                                                              **call.epilogue(z3))
    y = layout.from3d(y3)
    saved = _new_saved(x=x, mean=mean_hi, mean_lo=mean_lo, var=var, inv_std=inv_std, gamma=gamma, beta=beta,
                       training=call.training, axis=call.axis, eps=call.eps, layout=layout, backend=be,
                       x_sample=_x_sample(x), comm=None, total_count=call.count, **call.saved_epilogue(y),
                       mask=call.mask3)
    return y, saved


class _ForwardCall:
    """The checked arguments of a forward call (every check runs here, before any work)."""

    __slots__ = ("backend", "axis", "layout", "training", "eps", "momentum", "residual", "relu", "mask3", "count")

    def __init__(self, x, gamma, beta, running_mean, running_var, training, momentum, eps, axis, residual,
                 activation, mask, backend, synchronised=False):
        named = {"x": x, "gamma": gamma, "beta": beta, "running_mean": running_mean, "running_var": running_var,
                 "residual": residual, "mask": mask}
        be = self.backend = _backends.backend_for(named, backend)
        _check_x(x, may_be_empty=synchronised)
        _check_backend_dtype(be, x.dtype)
        self.relu = _check_activation(activation)
        self.residual = residual is not None
        if residual is not None:
            _check_residual(residual, x)
        ax = self.axis = canonical_axis(axis, x.ndim)
        channels = x.shape[ax]
        if channels == 0:
            raise ValueError(f"x must have at least one channel, got shape {tuple(x.shape)} (axis={ax})")
        for name in ("gamma", "beta", "running_mean", "running_var"):
            _check_vector(name, named[name], channels)
        if not isinstance(training, bool):
            if not isinstance(training, np.bool_):
                raise TypeError(f"training must be a bool, got {type(training).__name__}")
            training = bool(training)
        self.training = training
        self.eps = _check_real("eps", eps, _positive, "a finite number > 0")
        self.momentum = _check_real("momentum", momentum, _fraction, "in [0, 1]")
        if (running_mean is None) != (running_var is None):
            raise ValueError("running_mean and running_var must be given together")
        layout = self.layout = make_layout(x.shape, x.strides, ax)
        # the mask matters to the statistics only: an inference call checks it and drops it
        if mask is not None:
            _check_mask(mask, x, ax)
        self.mask3, self.count = _mask3(mask, x, ax, layout, be) if training else (None, layout.count)
        if training:
            # a synchronised call counts the values of every rank, after the exchange
            if layout.count < 2 and not synchronised:
                raise ValueError(
                    f"training needs at least 2 values per channel to estimate a variance; x of shape "
                    f"{tuple(x.shape)} has {layout.count} per channel (axis={ax}); use training=False")
            if self.count < 2 and not synchronised:
                raise ValueError(f"training needs at least 2 values per channel to estimate a variance; the mask "
                                 f"selects {self.count} per channel; use training=False")
            if running_mean is not None:
                _check_writable("running_mean", running_mean)
                _check_writable("running_var", running_var)
        elif running_mean is None:
            raise ValueError("training=False needs running_mean and running_var")

    def masked(self) -> dict:
        """The backend's mask arguments (none without a mask)."""
        return {} if self.mask3 is None else {"mask": self.mask3, "count": self.count}

    def epilogue(self, z3) -> dict:
        """The backend's epilogue arguments (none without an epilogue, so that
        backends and calls without one stay as they were)."""
        return {"residual": z3, "relu": True} if self.relu else {"residual": z3} if self.residual else {}

    def saved_epilogue(self, y) -> dict:
        """The BatchNormSaved fields of the epilogue, for the output ``y``."""
        if not self.relu:
            return {"residual": self.residual, "activation": None, "y": None, "y_sample": None}
        return {"residual": self.residual, "activation": "relu", "y": y, "y_sample": _x_sample(y)}


def _check_activation(activation) -> bool:
    """Whether ``activation`` is ReLU (it must be None or "relu")."""
    if activation is None:
        return False
    if not isinstance(activation, str):
        raise TypeError(f"activation must be None or 'relu' (a string), got {type(activation).__name__}")
    if activation == "relu":
        return True
    raise ValueError(f"activation must be None or 'relu', got {activation!r}")


def _positions(x, axis) -> tuple:
    """x's shape without the channel axis: what a mask broadcasts to."""
    return tuple(x.shape[:axis]) + tuple(x.shape[axis + 1:])


def _check_mask(mask, x, axis):
    if not hasattr(mask, "shape") or not hasattr(mask, "dtype"):
        raise TypeError(f"mask must be a NumPy or CuPy array of booleans, got {type(mask).__name__}")
    _check_plain("mask", mask)
    if mask.dtype != np.bool_:
        raise TypeError(f"mask must have dtype bool (True where a position counts), got {mask.dtype}")
    positions = _positions(x, axis)
    try:
        fits = np.broadcast_shapes(tuple(mask.shape), positions) == positions
    except ValueError:
        fits = False
    if not fits:
        raise ValueError(f"mask must be broadcastable to x's shape without the channel axis, {positions} "
                         f"(x {tuple(x.shape)}, axis={axis}), got {tuple(mask.shape)}")


def _mask3(mask, x, axis, layout, be):
    """``(mask3, count)``: a checked mask as (outer, 1, inner) booleans of the backend's
    array module, and the positions it selects per channel; ``(None, all of them)``
    without a mask or for one that selects every position (the same function as
    none).  Counting reads one number back from a GPU."""
    if mask is None:
        return None, layout.count
    xp = be.xp
    full = xp.expand_dims(xp.broadcast_to(mask, _positions(x, axis)), axis)
    count = int(xp.count_nonzero(full))
    if count == layout.count:
        return None, count
    return xp.ascontiguousarray(layout.mask3d(full)), count


def _check_residual(residual, x):
    if not hasattr(residual, "shape") or not hasattr(residual, "dtype"):
        raise TypeError(f"residual must be a NumPy or CuPy array shaped like x, got {type(residual).__name__}")
    _check_plain("residual", residual)
    if tuple(residual.shape) != tuple(x.shape):
        raise ValueError(f"residual must have the shape of x, {tuple(x.shape)}, got {tuple(residual.shape)}")
    if residual.dtype != x.dtype:
        raise TypeError(f"residual must have the dtype of x, {x.dtype}, got {residual.dtype}")


def _synchronised_forward(x, gamma, beta, running_mean, running_var, training, momentum, eps, axis, residual,
                          activation, mask, backend, comm):
    """batch_norm with ``comm``: a rank whose arguments fail the checks still takes
    part in the exchange (with its error), so that every rank raises."""
    try:
        call = _ForwardCall(x, gamma, beta, running_mean, running_var, training, momentum, eps, axis, residual,
                            activation, mask, backend, synchronised=True)
    except Exception as error:  # whatever it is, the other ranks must hear of it
        _distributed.announce_failure(comm, _distributed.STATISTICS, error)
        raise
    be, layout, x3 = call.backend, call.layout, call.layout.to3d(x)
    epilogue = call.epilogue(None if residual is None else layout.to3d(residual))
    done = _distributed.forward(be, x3, gamma, beta, call.eps, running_mean, running_var, call.momentum,
                                call.training, comm, epilogue, call.masked(), axis=call.axis)
    if done is None:  # inference: the ranks agreed, and the statistics are the running ones
        y3, mean_hi, mean_lo, var, inv_std = (
            be.forward_infer(x3, gamma, beta, running_mean, running_var, call.eps, **epilogue) if x.size
            else _empty_inference(be, x3, running_mean, running_var, call.eps))
        total_count = layout.count
    else:
        y3, mean_hi, mean_lo, var, inv_std, total_count = done
    y = layout.from3d(y3)
    saved = _new_saved(x=x, mean=mean_hi, mean_lo=mean_lo, var=var, inv_std=inv_std, gamma=gamma, beta=beta,
                       training=call.training, axis=call.axis, eps=call.eps, layout=layout, backend=be,
                       x_sample=_x_sample(x), comm=comm, total_count=total_count, **call.saved_epilogue(y),
                       mask=call.mask3)
    return y, saved


def _empty_inference(be, x3, running_mean, running_var, eps):
    """forward_infer's results for an empty shard, without calling the backend on it."""
    xp = be.xp
    return (xp.empty(x3.shape, x3.dtype), *_distributed.saved_statistics(
        xp, xp.asarray(running_mean, np.float64), 0.0, xp.asarray(running_var, np.float64), eps, x3.dtype))


def batch_norm_backward(dy, saved, *, backend=None):
    """Gradients of Batch Normalization: returns ``(dx, dgamma, dbeta)``, and
    ``(dx, dgamma, dbeta, dz)`` when the forward call had a ``residual``.

    In training mode dx includes the paths through the batch mean and
    variance (the paper's formulas); in inference mode the statistics are
    constants and ``dx = dy * gamma * inv_std``.  dgamma/dbeta are None when
    gamma/beta were None in the forward call.  After ``activation="relu"``
    the gradient reaching BN (and the residual) is ``dy`` where y > 0 and
    zero where y == 0, read from the saved y; dz is that gradient (``dy``
    itself, not a copy, without an activation).

    After a synchronised training call (``comm``), every rank calls this too:
    dx flows through the whole batch's statistics, and dgamma/dbeta are this
    rank's own sums, to be averaged over ranks like every other parameter's
    gradient (docs/distributed.md).
    """
    if not isinstance(saved, BatchNormSaved):
        raise TypeError(f"saved must be the BatchNormSaved returned by batch_norm, got {type(saved).__name__}")
    if saved.comm is None or not saved.training:
        be = _check_backward(dy, saved, backend)
        if saved.x.size == 0:  # a synchronised inference call's empty shard: nothing to compute
            return _empty_gradients(be, dy, saved)
        layout = saved.layout
        relu_y3 = None if saved.y is None else layout.to3d(saved.y)
        # dgamma and dbeta come back in gamma's and beta's dtypes (None where absent).
        done = be.backward(layout.to3d(dy), layout.to3d(saved.x), saved.mean, saved.mean_lo, saved.var,
                           saved.inv_std, saved.gamma, saved.beta, saved.training,
                           **_backward_epilogue(relu_y3, saved.residual), **_backward_mask(saved))
    else:
        try:
            be = _check_backward(dy, saved, backend)
        except Exception as error:
            _distributed.announce_failure(saved.comm, _distributed.GRADIENTS, error)
            raise
        layout = saved.layout
        done = _distributed.backward(be, layout.to3d(dy), layout.to3d(saved.x), saved, saved.comm,
                                     None if saved.y is None else layout.to3d(saved.y))
    dx = layout.from3d(done[0])
    if not saved.residual:
        return dx, done[1], done[2]
    # without an activation the residual's gradient is dy itself
    return dx, done[1], done[2], dy if saved.y is None else layout.from3d(done[3])


def _backward_mask(saved) -> dict:
    """The backend's mask arguments of a backward call (none without a mask)."""
    return {} if saved.mask is None else {"mask": saved.mask, "count": saved.total_count}


def _backward_epilogue(relu_y3, residual) -> dict:
    """The backend's backward epilogue arguments (none without a ReLU, so that
    backends and calls without one stay as they were)."""
    return {} if relu_y3 is None else {"relu_y": relu_y3, "want_dz": residual}


def _empty_gradients(be, dy, saved):
    zeros = [None if p is None else be.xp.zeros(p.shape, p.dtype) for p in (saved.gamma, saved.beta)]
    empty = be.xp.empty(dy.shape, dy.dtype)
    return (empty, zeros[0], zeros[1]) + ((dy,) if saved.residual else ())


def _check_backward(dy, saved, backend):
    """The backend for a backward call, once dy and x (unchanged) have been checked."""
    be = backend if backend is not None else saved.backend
    if not hasattr(dy, "shape") or not hasattr(dy, "dtype"):
        raise TypeError(f"dy must be a NumPy or CuPy array, got {type(dy).__name__}")
    _backends.backend_for({"dy": dy, "x (saved)": saved.x}, be)
    if tuple(dy.shape) != tuple(saved.x.shape):
        raise ValueError(f"dy must have the shape of x, {tuple(saved.x.shape)}, got {tuple(dy.shape)}")
    _check_plain("dy", dy)
    if dy.dtype != saved.x.dtype:
        raise TypeError(f"dy must have the dtype of x, {saved.x.dtype}, got {dy.dtype}")
    _check_x_unchanged(saved)
    return be
