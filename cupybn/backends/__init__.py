"""Backends: objects with identical methods, one per array library.

The backend is chosen from the arrays of a call, in the manner of
array-api-compat: CuPy arrays are recognised through ``sys.modules`` so that
cupybn never imports CuPy itself unless CuPy arrays are passed.
"""
from __future__ import annotations

import sys

import numpy as np

from .numpy_backend import NumpyBackend

_ndarray = np.ndarray

NUMPY = NumpyBackend()  # the default for NumPy arrays


def _is_cupy_array(a) -> bool:
    cupy = sys.modules.get("cupy")
    return cupy is not None and isinstance(a, cupy.ndarray)


def backend_for(named_arrays, backend=None):
    """The backend for ``{name: array}`` (entries that are None are ignored).

    ``backend`` forces one.  Arrays from two libraries raise TypeError naming
    them; objects that are not arrays at all raise TypeError too.
    """
    if backend is not None and backend_accepts(backend, named_arrays):
        return backend  # the common case, decided without classifying every array
    if backend is None:
        for a in named_arrays.values():  # plain NumPy arrays, the commonest call: no classifying either
            if a is not None and type(a) is not _ndarray:
                break
        else:
            return NUMPY
    kinds: dict[str, list[str]] = {}
    for name, a in named_arrays.items():
        if a is None:
            continue
        if _is_cupy_array(a):
            kind = "cupy"
        elif hasattr(a, "__array_namespace__") or hasattr(a, "__array__") and hasattr(a, "dtype"):
            kind = "numpy" if type(a).__module__.split(".")[0] == "numpy" else type(a).__module__.split(".")[0]
        else:
            raise TypeError(f"{name} must be a NumPy or CuPy array, got {type(a).__name__}")
        kinds.setdefault(kind, []).append(name)
    if len(kinds) > 1:
        desc = "; ".join(f"{k}: {', '.join(v)}" for k, v in kinds.items())
        raise TypeError(f"arrays from different libraries in one call ({desc})")
    if backend is not None:
        if not backend_accepts(backend, named_arrays):
            lib = next(iter(kinds), "?")
            raise TypeError(f"backend {backend!r} cannot take {lib} arrays ({', '.join(kinds.get(lib, []))})")
        return backend
    kind = next(iter(kinds), "numpy")
    if kind == "numpy":
        return NUMPY
    if kind == "cupy":
        from .cupy_backend import default_cupy_backend  # noqa: PLC0415 - only when CuPy arrays appear

        return default_cupy_backend()
    names = ", ".join(kinds[kind])
    raise TypeError(f"{names} must be NumPy or CuPy arrays, got arrays from {kind}")


def backend_accepts(backend, named_arrays) -> bool:
    owns = getattr(backend, "owns", None)
    if owns is None:
        raise TypeError(f"backend must be a cupybn backend (cupybn.NumpyBackend(), the CuPy backend) or None, got "
                        f"{type(backend).__name__}")
    for a in named_arrays.values():  # a loop, not all(genexpr): this runs on every call
        if a is not None and not owns(a):
            return False
    return True


__all__ = ["NUMPY", "NumpyBackend", "backend_for"]
