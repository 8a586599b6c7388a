"""The CuPy backend (GPU kernels) is not written yet; see the project's issues."""
from __future__ import annotations


def default_cupy_backend():
    raise NotImplementedError(
        "cupybn's CuPy backend is not implemented yet; pass NumPy arrays "
        "(or cupy.asnumpy(x)) to use the NumPy backend"
    )
