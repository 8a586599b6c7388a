"""cupybn: exact, fast Batch Normalization for NumPy and CuPy arrays.

Public names: :func:`batch_norm`, :func:`batch_norm_backward`,
:class:`BatchNorm`, :class:`BatchNormSaved`, :func:`keras_state_dict` and the
:mod:`cupybn.backends` objects.  Importing cupybn needs NumPy only.
"""
from . import backends
from ._state import keras_state_dict
from .api import BatchNormSaved, batch_norm, batch_norm_backward
from .backends import NumpyBackend
from .layer import BatchNorm

__version__ = "0.1.0"

__all__ = ["BatchNorm", "BatchNormSaved", "NumpyBackend", "backends", "batch_norm", "batch_norm_backward",
           "keras_state_dict"]
