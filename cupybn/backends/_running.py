"""The running-statistics update, for backends (and dtypes) without a fused one.

``new = (1 - momentum) * old + momentum * batch``, with the unbiased batch
variance ``var * count / (count - 1)``; in double, rounded once to the running
statistics' own dtype, in place.
"""
from __future__ import annotations

import numpy as np


def update_running(xp, running_mean, running_var, mean_hi, mean_lo, var, momentum: float, count: int) -> None:
    with np.errstate(all="ignore"):  # NaN and Inf are data here (NumPy arrays), not errors
        mean = xp.asarray(mean_hi, "float64") + xp.asarray(mean_lo, "float64")
        keep = 1.0 - momentum
        new_mean = keep * xp.asarray(running_mean, "float64") + momentum * mean
        unbiased = xp.asarray(var, "float64") * (count / (count - 1))
        new_var = keep * xp.asarray(running_var, "float64") + momentum * unbiased
        running_mean[...] = new_mean.astype(running_mean.dtype)
        running_var[...] = new_var.astype(running_var.dtype)
