"""``BatchNorm``: a layer that owns its parameters and running statistics."""
from __future__ import annotations

import numpy as np

from .api import _check_real, batch_norm, batch_norm_backward, param_dtype_name


class BatchNorm:
    """Batch Normalization layer over channel axis ``axis``.

    Holds ``gamma`` (ones) and ``beta`` (zeros) when ``affine``, and
    ``running_mean`` (zeros), ``running_var`` (ones) and
    ``num_batches_tracked`` when ``track_running_stats``.  Parameters and
    statistics are float32 for float16/bfloat16/float32 data and float64 for
    float64 data.  ``momentum=None`` makes the running statistics a cumulative
    average over all batches seen.

    Calling the layer returns y; :meth:`backward` returns dx and stores
    ``grad_gamma``/``grad_beta``.  In eval mode without running statistics the
    batch statistics are used, as in PyTorch.
    """

    def __init__(self, num_features, *, axis=1, eps=1e-5, momentum=0.1, affine=True,
                 track_running_stats=True, dtype=np.float32, xp=np, backend=None):
        if isinstance(num_features, bool) or not isinstance(num_features, int) or num_features < 1:
            raise ValueError(f"num_features must be a positive int, got {num_features!r}")
        if momentum is not None:
            _check_real("momentum", momentum, lambda v: 0 <= v <= 1, "in [0, 1] or None")
        _check_real("eps", eps, lambda v: v > 0, "a finite number > 0")
        if np.dtype(dtype).name not in ("float16", "bfloat16", "float32", "float64"):
            raise TypeError(f"dtype must be float16, bfloat16, float32 or float64, got {np.dtype(dtype)}")
        self.num_features = num_features
        self.axis = axis
        self.eps = eps
        self.momentum = momentum
        self.dtype = np.dtype(dtype)
        self.backend = backend
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

    def __call__(self, x):
        channels = x.shape[self.axis] if hasattr(x, "shape") and x.ndim >= 2 and -x.ndim <= self.axis < x.ndim else None
        if channels is not None and channels != self.num_features:
            raise ValueError(f"x has {channels} channels on axis {self.axis}, the layer was built for "
                             f"num_features={self.num_features}")
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
            eps=self.eps, axis=self.axis, backend=self.backend)
        if update:
            self.num_batches_tracked += 1
        self._saved = saved
        return y

    def backward(self, dy):
        if self._saved is None:
            raise RuntimeError("backward() needs a forward call first")
        dx, self.grad_gamma, self.grad_beta = batch_norm_backward(dy, self._saved, backend=self.backend)
        return dx

    def __repr__(self) -> str:
        return (f"BatchNorm({self.num_features}, axis={self.axis}, eps={self.eps}, momentum={self.momentum}, "
                f"affine={self.affine}, track_running_stats={self.track_running_stats}, dtype={self.dtype.name})")
