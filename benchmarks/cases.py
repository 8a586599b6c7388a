"""The benchmark cases and their data.

Arrays are built on first use and cached, so collecting the benchmarks costs
nothing and every implementation of a case times the very same arrays.  All
data is seeded.
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import Any

import numpy as np

SEED = 20240601
EPS = 1e-5
# Every multi-threaded implementation gets the cores this process may use
# (cupybn's NumPy backend defaults to the same count); textbook NumPy code is
# single-threaded by nature and np.copyto is too.
THREADS = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
NCHW = (256, 64, 32, 32)
ROWS = (4096, 1024)


@dataclass(frozen=True)
class Case:
    name: str
    layout: str      # "nchw", "nhwc" (channels-last, axis=-1) or "2d"
    dtype: str
    offset: float = 0.0
    shape: tuple[int, ...] | None = None  # NCHW (or 2-D) shape; None: NCHW or ROWS

    @property
    def axis(self) -> int:
        return -1 if self.layout == "nhwc" else 1

    @property
    def base_shape(self) -> tuple[int, ...]:
        """The shape in NCHW (or 2-D) order; nhwc cases store the same values channels-last."""
        return self.shape or (ROWS if self.layout == "2d" else NCHW)

    @property
    def channels(self) -> int:
        return self.base_shape[1]


CASES = {c.name: c for c in [
    Case("nchw-f32", "nchw", "float32"),
    Case("nhwc-f32", "nhwc", "float32"),
    Case("2d-f32", "2d", "float32"),
    Case("nchw-f16", "nchw", "float16"),
    Case("nhwc-f16", "nhwc", "float16"),
    Case("2d-f16", "2d", "float16"),
    # x = 1e4 + N(0, 1): data far from zero, where cheap statistics lose digits
    Case("nchw-f32-offset", "nchw", "float32", offset=1e4),
    # small calls, where a call's fixed cost matters: an MLP's layers, a small CNN's
    Case("2d-60x100-f32", "2d", "float32", shape=(60, 100)),
    Case("2d-256x512-f32", "2d", "float32", shape=(256, 512)),
    Case("nchw-32x64x8x8-f32", "nchw", "float32", shape=(32, 64, 8, 8)),
    Case("nhwc-32x8x8x64-f32", "nhwc", "float32", shape=(32, 64, 8, 8)),
]}


@dataclass(frozen=True)
class Data:
    x: np.ndarray             # what cupybn and the textbook get (NHWC-shaped for "nhwc")
    dy: np.ndarray            # upstream gradient, same shape and layout as x
    gamma: np.ndarray         # float32 parameters, as cupybn.BatchNorm holds them
    beta: np.ndarray
    running_mean: np.ndarray  # statistics for inference: close to the batch's, not equal
    running_var: np.ndarray

    @property
    def nbytes(self) -> int:
        return self.x.nbytes


@functools.cache
def _base(shape: tuple[int, ...]) -> tuple[Any, Any]:
    """float32 standard-normal x and dy in NCHW (or 2-D) order."""
    rng = np.random.default_rng(SEED)
    return rng.standard_normal(shape, dtype=np.float32), rng.standard_normal(shape, dtype=np.float32)


@functools.cache
def data(name: str) -> Data:
    case = CASES[name]
    x, dy = _base(case.base_shape)
    if case.offset:
        x = x + np.float32(case.offset)
    if case.layout == "nhwc":
        # the same values, stored channels-last
        x = np.ascontiguousarray(x.transpose(0, 2, 3, 1))
        dy = np.ascontiguousarray(dy.transpose(0, 2, 3, 1))
    x = x.astype(case.dtype, copy=False)
    dy = dy.astype(case.dtype, copy=False)
    rng = np.random.default_rng(SEED + 1)
    c = case.channels
    return Data(
        x=x, dy=dy,
        gamma=(1 + 0.1 * rng.standard_normal(c)).astype(np.float32),
        beta=(0.1 * rng.standard_normal(c)).astype(np.float32),
        running_mean=(case.offset + 0.1 * rng.standard_normal(c)).astype(np.float32),
        running_var=(1 + 0.1 * rng.random(c)).astype(np.float32),
    )


@functools.cache
def residual(name: str) -> np.ndarray:
    """A residual for the fused-epilogue benchmarks: N(0, 1), shaped and laid out like x."""
    x = data(name).x
    return np.random.default_rng(SEED + 2).standard_normal(x.shape, dtype=np.float32).astype(x.dtype)
