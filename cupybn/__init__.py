"""cupybn: exact, fast Batch Normalization for NumPy and CuPy arrays.

Public names: :func:`batch_norm`, :func:`batch_norm_backward`,
:class:`BatchNorm`, :class:`BatchNormSaved`, :func:`fold_batch_norm`,
:func:`keras_state_dict` and the :mod:`cupybn.backends` objects;
:mod:`cupybn.distributed` holds the communicators for synchronised BN.  Importing cupybn needs NumPy only.
"""
from . import backends
from ._state import keras_state_dict
from .api import BatchNormSaved, batch_norm, batch_norm_backward
from .backends import NumpyBackend
from .folding import fold_batch_norm
from .layer import BatchNorm

__version__ = "0.1.0"

__all__ = ["BatchNorm", "BatchNormSaved", "NumpyBackend", "backends", "batch_norm", "batch_norm_backward",
           "fold_batch_norm", "keras_state_dict"]
