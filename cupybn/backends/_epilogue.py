"""The fused epilogue on NumPy arrays: ``act(BN(x) + residual)`` and its gradient.

One definition, used by every NumPy route (blocked, whole-array; the compiled
kernels and the CUDA kernels implement the same one):

* the residual is added to BN's value in the arithmetic dtype (float32, or
  float64 for float64 data), before y is rounded to x's dtype;
* ReLU maps every value <= 0, -0.0 included, to +0.0 and keeps NaN;
* its gradient is read from the stored y: ``dy`` where ``y > 0`` or y is NaN,
  zero where ``y <= 0`` (PyTorch's convention at y == 0).
"""
from __future__ import annotations

import numpy as np


def relu_in_place(a) -> None:
    """``a = a <= 0 ? +0 : a`` elementwise (NaN stays NaN)."""
    np.copyto(a, 0, where=a <= 0)


def add_epilogue(res, residual, relu) -> None:
    """``res = act(res + residual)`` in place, ``res`` in the arithmetic dtype and
    ``residual`` (None, or widened already) shaped like it."""
    if residual is not None:
        np.add(res, residual, out=res)
    if relu:
        relu_in_place(res)


def gate_in_place(g, y) -> None:
    """``g = y <= 0 ? 0 : g`` elementwise: the ReLU's gradient from its output y."""
    np.copyto(g, 0, where=y <= 0)
