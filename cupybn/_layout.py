"""Any channel axis of any strided array -> one (outer, C, inner) view.

Batch Normalization reduces over every axis but the channel axis, so the order of
those axes does not matter to the maths.  We therefore order the axes by memory
stride (largest first) and merge everything in front of the channel axis into
``outer`` and everything behind it into ``inner``.  For any array that is a
transpose of a contiguous buffer (NCHW, channels-last, 2-D, ...) this is a free
view; other strided views are copied once into that order.

Two families result, and the kernels are written for exactly these two:
``inner > 1`` with contiguous rows of ``inner`` values (NCHW-like), and
``inner == 1`` with ``C`` contiguous values per row (channels-last, 2-D).
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass


@dataclass(frozen=True, eq=False)  # eq=False keeps it hashable by identity (and cached_property usable)
class Layout:
    """How an N-d array maps to its canonical (outer, C, inner) view."""

    shape: tuple[int, ...]
    axis: int                   # non-negative channel axis
    perm: tuple[int, ...]       # axis order, slowest-varying first
    outer: int
    channels: int
    inner: int

    @property
    def count(self) -> int:
        """Number of values per channel (the m of the paper)."""
        return self.outer * self.inner

    @functools.cached_property
    def shape3(self) -> tuple[int, int, int]:
        return (self.outer, self.channels, self.inner)

    def to3d(self, a):
        """View ``a`` (shaped like x) as (outer, C, inner); copies only if it must.
        Array methods: the same on NumPy and CuPy, and cheaper than module functions."""
        if self._in_order:
            return a.reshape(self.shape3)
        return a.transpose(self.perm).reshape(self.shape3)

    def mask3d(self, m):
        """A mask shaped like x but for a channel axis of length 1, as (outer, 1, inner)
        in the order of :meth:`to3d`'s view (a view where it can be, else a copy)."""
        if self._in_order:
            return m.reshape(self.outer, 1, self.inner)
        return m.transpose(self.perm).reshape(self.outer, 1, self.inner)

    def from3d(self, a3):
        """Inverse of :meth:`to3d` for a C-contiguous (outer, C, inner) result.

        The result has the same memory order as the input the layout was made
        from, so y and dx keep x's layout (channels-last stays channels-last).
        """
        if self._in_order:
            return a3.reshape(self.shape)
        return a3.reshape(self._permuted_shape).transpose(self._inverse)

    @functools.cached_property
    def _in_order(self) -> bool:
        """The axis order is the array's own (NCHW, 2-D): no transposes needed."""
        return self.perm == tuple(range(len(self.perm)))

    @functools.cached_property
    def _permuted_shape(self) -> tuple[int, ...]:
        return tuple(self.shape[p] for p in self.perm)

    @functools.cached_property
    def _inverse(self) -> tuple[int, ...]:
        return tuple(sorted(range(len(self.perm)), key=self.perm.__getitem__))


def canonical_axis(axis, ndim: int) -> int:
    """Validate ``axis`` for an ``ndim``-d array and make it non-negative."""
    if isinstance(axis, bool) or not isinstance(axis, int) and not hasattr(axis, "__index__"):
        raise TypeError(f"axis must be an int, got {type(axis).__name__}")
    axis = int(axis)
    if not -ndim <= axis < ndim:
        raise ValueError(f"axis must be in [{-ndim}, {ndim - 1}] for a {ndim}-d x, got {axis}")
    return axis % ndim


@functools.lru_cache(maxsize=1024)  # a training loop meets the same few shapes again and again
def make_layout(shape, strides, axis: int) -> Layout:
    """Choose the axis order for an array of ``shape``/``strides`` (in bytes).

    Axes of length 1 carry no data, so they go last and never split a run of
    contiguous memory; the channel axis keeps its place in the stride order.
    """
    ndim = len(shape)

    def key(i: int):
        if shape[i] == 1 and i != axis:
            return (1, 0, i)
        if shape[i] == 1:  # a single channel: put it first, everything is inner
            return (0, -math.inf, i)
        return (0, -abs(strides[i]), i)

    perm = tuple(sorted(range(ndim), key=key))
    p = perm.index(axis)
    outer = math.prod(shape[q] for q in perm[:p])
    inner = math.prod(shape[q] for q in perm[p + 1:])
    return Layout(tuple(shape), axis, perm, outer, shape[axis], inner)
