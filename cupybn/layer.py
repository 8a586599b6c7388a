"""``BatchNorm``: a layer that owns its parameters and running statistics."""
from __future__ import annotations

import numbers

import numpy as np

from . import _state
from .api import _check_activation, _check_real, _is_float_dtype, batch_norm, batch_norm_backward, param_dtype_name
from .distributed._sync import GRADIENTS, STATISTICS, announce_failure, check_comm
from .folding import fold_batch_norm


class BatchNorm:
    """Batch Normalization layer over channel axis ``axis``.

    Holds ``gamma`` (ones) and ``beta`` (zeros) when ``affine``, and
    ``running_mean`` (zeros), ``running_var`` (ones) and
    ``num_batches_tracked`` when ``track_running_stats``.  Parameters and
    statistics are float32 for float16/bfloat16/float32 data and float64 for
    float64 data.  ``momentum=None`` makes the running statistics a cumulative
    average over all batches seen.

    ``dtype`` is the dtype of the data the layer takes (x and dy); another
    dtype is refused rather than silently mixed with the parameters' precision.

    Calling the layer returns y; :meth:`backward` returns dx and sets
    ``grad_gamma``/``grad_beta`` to that call's gradients (they replace, not
    add to, the previous ones; :meth:`zero_grad` clears them).  In eval mode
    without running statistics the batch statistics are used, as in PyTorch.

    ``activation="relu"`` fuses a ReLU after BN, and ``layer(x, residual=z)``
    adds z before it: ``y = relu(BN(x) + z)`` in one pass (see
    :func:`cupybn.batch_norm`); :meth:`backward` then returns ``(dx, dz)``
    for a call that had a residual.  ``layer(x, mask=m)`` takes the batch
    statistics (and updates the running ones) over the positions m selects
    (see :func:`cupybn.batch_norm`).

    Checkpoints: the layer pickles and deep-copies with its settings,
    parameters, statistics and gradients, but without the last forward pass
    (it holds that call's input): after restoring, call the layer again before
    :meth:`backward`.  :meth:`state_dict` and :meth:`load_state_dict` use
    PyTorch's names (``weight``, ``bias``, ``running_mean``, ``running_var``,
    ``num_batches_tracked``); ``cupybn.keras_state_dict`` converts Keras's
    weights.  :meth:`to` moves the layer between NumPy and CuPy.

    ``comm`` (a :mod:`cupybn.distributed` communicator) synchronises the
    layer: every rank of ``comm`` calls it (and :meth:`backward`) with its
    shard of the batch, in both modes, and the statistics are the whole
    batch's (docs/distributed.md).  Set ``layer.comm = None`` to run it on
    one rank alone (evaluation on rank 0, say).  The communicator is not
    part of a checkpoint: a restored layer is local until ``comm`` is set.
    """

    activation = None  # the class's default, for layers pickled before the setting existed

    def __init__(self, num_features, *, axis=1, eps=1e-5, momentum=0.1, affine=True,
                 track_running_stats=True, dtype=np.float32, xp=np, backend=None, comm=None, activation=None):
        if isinstance(num_features, (bool, np.bool_)) or not isinstance(num_features, numbers.Integral):
            raise TypeError(f"num_features must be a positive int, got {type(num_features).__name__}")
        if num_features < 1:
            raise ValueError(f"num_features must be a positive int, got {num_features!r}")
        if isinstance(axis, (bool, np.bool_)) or not isinstance(axis, numbers.Integral):
            raise TypeError(f"axis must be an int (the channel axis, e.g. 1 or -1), got {type(axis).__name__}")
        if momentum is not None:
            _check_real("momentum", momentum, lambda v: 0 <= v <= 1, "in [0, 1] or None")
        _check_real("eps", eps, lambda v: v > 0, "a finite number > 0")
        if np.dtype(dtype).name not in ("float16", "bfloat16", "float32", "float64"):
            raise TypeError(f"dtype must be float16, bfloat16, float32 or float64, got {np.dtype(dtype)}")
        _check_activation(activation)
        self.num_features = int(num_features)
        self.axis = int(axis)
        self.eps = eps
        self.momentum = momentum
        self.dtype = np.dtype(dtype)
        self.backend = backend
        self.comm = None if comm is None else check_comm(comm)
        self.activation = activation
        self.training = True
        pdt = param_dtype_name(self.dtype)
        self.gamma = xp.ones(num_features, pdt) if affine else None
        self.beta = xp.zeros(num_features, pdt) if affine else None
        if track_running_stats:
            self.running_mean = xp.zeros(num_features, pdt)
            self.running_var = xp.ones(num_features, pdt)
            self.num_batches_tracked = 0
        else:
            self.running_mean = self.running_var = self.num_batches_tracked = None
        self.grad_gamma = self.grad_beta = None
        self._saved = None

    @property
    def affine(self) -> bool:
        return self.gamma is not None

    @property
    def track_running_stats(self) -> bool:
        return self.running_mean is not None

    def train(self, mode: bool = True) -> BatchNorm:
        self.training = bool(mode)
        return self

    def eval(self) -> BatchNorm:
        return self.train(False)

    def __call__(self, x, residual=None, mask=None):
        self._checked(STATISTICS, self._check_input, x)
        use_batch_stats = self.training or not self.track_running_stats
        update = self.training and self.track_running_stats
        momentum = self.momentum
        if update and momentum is None:
            momentum = 1.0 / (self.num_batches_tracked + 1)
        y, saved = batch_norm(
            x, self.gamma, self.beta,
            running_mean=self.running_mean if (update or not use_batch_stats) else None,
            running_var=self.running_var if (update or not use_batch_stats) else None,
            training=use_batch_stats, momentum=momentum if momentum is not None else 0.1,
            eps=self.eps, axis=self.axis, residual=residual, activation=self.activation, mask=mask,
            backend=self.backend, comm=self.comm)
        if update:
            self.num_batches_tracked += 1
        self._saved = saved
        return y

    def _check_input(self, x):
        if not hasattr(x, "shape") or not hasattr(x, "dtype"):
            raise TypeError(f"x must be a NumPy or CuPy array, got {type(x).__name__}")
        channels = x.shape[self.axis] if x.ndim >= 2 and -x.ndim <= self.axis < x.ndim else None
        if channels is not None and channels != self.num_features:
            raise ValueError(f"x has {channels} channels on axis {self.axis}, the layer was built for "
                             f"num_features={self.num_features}")
        if _is_float_dtype(x.dtype) and x.dtype != self.dtype:
            raise TypeError(f"x has dtype {x.dtype}, the layer takes {self.dtype.name} data (dtype={self.dtype.name}): "
                            f"cast x, or build the layer with dtype={x.dtype}")

    def _checked(self, phase, check, *args):
        """Run the layer's own check; a synchronised layer that fails it still takes
        part in the exchange the call would have made (with the error), so that the
        other ranks raise too.  Backward exchanges only after batch statistics."""
        try:
            check(*args)
        except Exception as error:  # whatever it is, the other ranks must hear of it
            if self.comm is not None and (phase == STATISTICS or self.training or not self.track_running_stats):
                announce_failure(self.comm, phase, error)
            raise

    def backward(self, dy):
        """dx, or ``(dx, dz)`` after a call with a residual; sets grad_gamma and grad_beta."""
        self._checked(GRADIENTS, self._check_forward_done)
        dx, self.grad_gamma, self.grad_beta, *dz = batch_norm_backward(dy, self._saved, backend=self.backend)
        return (dx, dz[0]) if dz else dx

    def _check_forward_done(self):
        if self._saved is None:
            raise RuntimeError("backward() needs a forward call first")

    # ---- checkpoints ---------------------------------------------------------------------

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_saved"] = None  # the last forward's input and statistics: not part of the layer
        state["comm"] = None  # a connection of this process, not part of the layer
        return state

    def state_dict(self) -> dict:
        """Copies of the parameters and running statistics, and the batch count, under PyTorch's names."""
        return _state.state_dict(self)

    def load_state_dict(self, state, strict: bool = True):
        """Copy ``state`` (PyTorch's names; NumPy or CuPy arrays, torch tensors, ...) into the layer.

        Every entry is checked (names, shapes, floating-point dtypes) before
        anything changes; values are cast to the layer's parameter dtype.
        Returns (missing, unexpected) names; ``strict`` raises KeyError on either.
        """
        return _state.load_state_dict(self, state, strict=strict)

    def to(self, xp, backend=None) -> BatchNorm:
        """Move the parameters, statistics and gradients to array module ``xp``
        (``numpy`` or ``cupy``); ``backend`` replaces the layer's (None: chosen
        from the arrays of each call).  Drops the last forward pass."""
        moved = {attr: _state.to_module(getattr(self, attr), xp, attr)
                 for attr in ("gamma", "beta", "running_mean", "running_var", "grad_gamma", "grad_beta")
                 if getattr(self, attr) is not None}
        for attr, value in moved.items():
            setattr(self, attr, value)
        self.backend = backend
        self._saved = None
        return self

    def fold(self, weight, bias=None, *, axis=0):
        """``(weight', bias')``: the linear or convolution layer ``weight``/``bias``
        before this layer, with this layer's inference-mode BN folded in (see
        :func:`cupybn.fold_batch_norm`; ``axis`` is the weight's output-channel axis)."""
        if not self.track_running_stats:
            raise ValueError("fold needs running statistics: this layer was built with track_running_stats=False")
        if self.activation is not None:
            raise ValueError(f"this layer applies activation={self.activation!r} after BN, which no weight can "
                             f"hold: fold BN alone with cupybn.fold_batch_norm(weight, bias, running_mean=..., "
                             f"running_var=..., gamma=..., beta=..., eps=...) and apply the activation (and any "
                             f"residual) after the folded layer")
        return fold_batch_norm(weight, bias, running_mean=self.running_mean, running_var=self.running_var,
                               gamma=self.gamma, beta=self.beta, eps=self.eps, axis=axis)

    # ---- what a training loop reaches for ---------------------------------------------------

    def parameters(self) -> dict:
        """The learnable arrays by name ({} without ``affine``)."""
        return {} if self.gamma is None else {"gamma": self.gamma, "beta": self.beta}

    def gradients(self) -> dict:
        """The last backward call's gradients by name (None before any, or after :meth:`zero_grad`)."""
        return {} if self.gamma is None else {"gamma": self.grad_gamma, "beta": self.grad_beta}

    def zero_grad(self) -> None:
        self.grad_gamma = self.grad_beta = None

    def reset_running_stats(self) -> None:
        """Running mean 0, running variance 1, batch count 0 (in place)."""
        if self.track_running_stats:
            self.running_mean[...] = 0
            self.running_var[...] = 1
            self.num_batches_tracked = 0

    def reset_parameters(self) -> None:
        """Running statistics reset, gamma 1 and beta 0 (in place)."""
        self.reset_running_stats()
        if self.affine:
            self.gamma[...] = 1
            self.beta[...] = 0

    def __repr__(self) -> str:
        activation = "" if self.activation is None else f", activation={self.activation!r}"
        return (f"BatchNorm({self.num_features}, axis={self.axis}, eps={self.eps}, momentum={self.momentum}, "
                f"affine={self.affine}, track_running_stats={self.track_running_stats}, dtype={self.dtype.name}"
                f"{activation})")
