"""cupybn: exact, fast Batch Normalization for NumPy and CuPy arrays.

Public names: :func:`batch_norm`, :func:`batch_norm_backward`,
:class:`BatchNorm`, :class:`BatchNormSaved` and the :mod:`cupybn.backends`
objects.  Importing cupybn needs NumPy only.
"""
from . import backends
from .api import BatchNormSaved, batch_norm, batch_norm_backward
from .backends import NumpyBackend
from .layer import BatchNorm

__version__ = "0.1.0"

__all__ = ["BatchNorm", "BatchNormSaved", "NumpyBackend", "backends", "batch_norm", "batch_norm_backward"]
