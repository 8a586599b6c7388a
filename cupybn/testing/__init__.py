"""Test support for cupybn (and for code built on it).

* :mod:`cupybn.testing.reference`: a float64 Batch Normalization to compare with,
  and the error measures;
* :mod:`cupybn.testing.tolerances`: the per-dtype accuracy bars;
* :mod:`cupybn.testing.strategies`: Hypothesis strategies for inputs (needs
  ``hypothesis``, so it is not imported here).
"""
from .reference import (
    ReferenceForward,
    batch_norm_errors,
    exceeded,
    gradient_magnitudes,
    gradients_close,
    max_rel_error,
    normwise_rel_error,
    probe_dy,
    reference_backward,
    reference_forward,
    rel_error,
    running_stats_update,
)
from .tolerances import TOLERANCES, Tolerance, tolerance

__all__ = [
    "TOLERANCES",
    "ReferenceForward",
    "Tolerance",
    "batch_norm_errors",
    "exceeded",
    "gradient_magnitudes",
    "gradients_close",
    "max_rel_error",
    "normwise_rel_error",
    "probe_dy",
    "reference_backward",
    "reference_forward",
    "rel_error",
    "running_stats_update",
    "tolerance",
]
