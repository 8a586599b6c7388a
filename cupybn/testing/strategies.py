"""Hypothesis strategies for Batch Normalization inputs, for cupybn's tests and anyone else's.

Shapes, channel axes, dtypes, offsets, scales and eps are drawn by Hypothesis; the
array *values* come from NumPy's generator seeded by a drawn integer.  Element-wise
drawing would be slow and would not give what the properties need (data that look
like activations: an offset plus Gaussian noise), while the seed keeps every
example reproducible.  Arrays are small (``MAX_SIZE`` values at most) so that
hundreds of examples run in seconds.

The main entry point is :func:`batch_norm_inputs`; the smaller strategies are
its parts, exported for tests that need only one of them.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import numpy as np
from hypothesis import strategies as st

MAX_SIZE = 2048
MAX_OFFSET = 1e6  # offsets are drawn in units of the standard deviation
FLOAT16_MIN_EPS = 1e-5

# How x is laid out in memory (the values are the same in every layout):
#   contiguous     C order of the logical shape (NCHW for a 4-d x with axis=1)
#   channels_last  the channel axis varies fastest (smallest stride)
#   permuted       a C-contiguous buffer in a random axis order, seen through a transpose
#   strided        a non-contiguous view: every axis sliced with step 1, 2, -1 or -2
#                  (at least one |step| of 2) out of a bigger, possibly permuted, buffer
LAYOUTS = ("contiguous", "channels_last", "permuted", "strided")


def _has_bfloat16() -> bool:
    try:
        import ml_dtypes  # noqa: F401, PLC0415
    except ImportError:
        return False
    return True


# float32 first: Hypothesis favours (and shrinks towards) the first entry of a list,
# and float32 is where most of the numerics live.
STANDARD_DTYPES = ("float32", "float64", "float16")
FLOAT_DTYPES = STANDARD_DTYPES + (("bfloat16",) if _has_bfloat16() else ())


def np_dtype(name: str) -> np.dtype:
    """A NumPy dtype from its name, bfloat16 included (through ml_dtypes)."""
    if name == "bfloat16":
        import ml_dtypes  # noqa: PLC0415

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def param_dtype(dtype) -> np.dtype:
    """dtype of gamma, beta and the statistics for data of ``dtype``."""
    return np.dtype(np.float64) if np.dtype(dtype) == np.float64 else np.dtype(np.float32)


# ---- small strategies -------------------------------------------------------------
# The dtypes draws may produce; None means any.  A test suite narrows it to what
# the backend under test supports (the CuPy backend has no bfloat16), see
# :func:`only_dtypes`.  Read when a value is drawn, not when a strategy is built.
_allowed_dtype_names: frozenset[str] | None = None


@contextlib.contextmanager
def only_dtypes(names):
    """Within the block, :func:`dtypes` (and so :func:`batch_norm_inputs`) draws only ``names``."""
    global _allowed_dtype_names
    saved, _allowed_dtype_names = _allowed_dtype_names, frozenset(names)
    try:
        yield
    finally:
        _allowed_dtype_names = saved


def dtypes(names=STANDARD_DTYPES) -> st.SearchStrategy[np.dtype]:
    """Floating dtypes, from their names (``FLOAT_DTYPES`` for all available)."""
    allowed = st.sampled_from(tuple(names)).filter(lambda n: _allowed_dtype_names is None or n in _allowed_dtype_names)
    return allowed.map(np_dtype)


@st.composite
def shapes_and_axes(draw, *, min_rank=2, max_rank=5, max_size=MAX_SIZE, max_channels=8,
                    min_count=2, max_side=96):
    """``(shape, axis)``: rank in [min_rank, max_rank], axis any (possibly negative)
    channel axis, at most about ``max_size`` values and at least ``min_count``
    values per channel."""
    rank = draw(st.integers(min_rank, max_rank))
    axis = draw(st.integers(0, rank - 1))
    channels = draw(st.integers(1, max_channels))
    budget = max(1, max_size // channels)  # values per channel still allowed
    others = []
    for _ in range(rank - 1):
        side = draw(st.integers(1, max(1, min(budget, max_side if rank > 2 else budget))))
        others.append(side)
        budget = max(1, budget // side)
    # too few values per channel: grow the first (batch) axis
    rest = math.prod(others[1:])
    if others[0] * rest < min_count:
        others[0] = -(-min_count // rest)
    shape = tuple(others[:axis]) + (channels,) + tuple(others[axis:])
    if draw(st.booleans()):
        axis -= rank
    return shape, axis


def offsets(max_offset=MAX_OFFSET) -> st.SearchStrategy[float]:
    """An offset in standard deviations: 0 or ``±10**k``, k log-uniform in [0, log10(max_offset)].

    A quarter of the exponent range stands for "no offset", so centred data stay
    common without crowding out the large offsets where the numerics are hard.
    """
    if max_offset < 1:
        return st.just(0.0)
    # Tenths of a decade, sampled: Hypothesis draws from a list evenly, while its
    # integers and floats crowd at "simple" values such as 0 (an offset of exactly 1).
    top = int(10 * math.log10(max_offset))
    exponent = st.sampled_from([k / 10 for k in range(-(top // 3), top + 1)])  # negative: no offset
    sign = st.sampled_from([1.0, -1.0])
    return st.tuples(sign, exponent).map(lambda t: 0.0 if t[1] < 0 else min(t[0] * 10.0**t[1], max_offset))


def _log_uniform(low, high, per_decade=10) -> st.SearchStrategy[float]:
    """``10**k`` for k in steps of 1/per_decade over [log10(low), log10(high)], evenly sampled."""
    lo, hi = round(per_decade * math.log10(low)), round(per_decade * math.log10(high))
    return st.sampled_from([10.0 ** (k / per_decade) for k in range(lo, hi + 1)])


def scales(low=1e-2, high=1e2) -> st.SearchStrategy[float]:
    """A standard deviation, log-uniform in [low, high]."""
    return _log_uniform(low, high)


def eps_values(low=1e-8, high=1.0) -> st.SearchStrategy[float]:
    """eps: the usual 1e-5 and 1e-3, or anything log-uniform in [low, high]."""
    return st.one_of(st.sampled_from([1e-5, 1e-3]), _log_uniform(low, high, per_decade=4))


def seeds() -> st.SearchStrategy[int]:
    return st.integers(0, 2**32 - 1)


@st.composite
def memory_layouts(draw, rank: int, axis: int, layouts=LAYOUTS):
    """``(name, order, steps)`` for :func:`arrange`."""
    name = draw(st.sampled_from(layouts))
    axis %= rank
    order = tuple(range(rank))
    steps = (1,) * rank
    if name == "channels_last":
        order = tuple(a for a in range(rank) if a != axis) + (axis,)
    elif name == "permuted":
        order = tuple(draw(st.permutations(range(rank))))
    elif name == "strided":
        if draw(st.booleans()):
            order = tuple(draw(st.permutations(range(rank))))
        drawn = draw(st.lists(st.sampled_from([1, 2, -1, -2]), min_size=rank, max_size=rank))
        if all(abs(s) == 1 for s in drawn):
            drawn[draw(st.integers(0, rank - 1))] = 2
        steps = tuple(drawn)
    return name, order, steps


def arrange(values: np.ndarray, order=None, steps=None) -> np.ndarray:
    """``values`` (same shape, dtype and numbers) laid out in memory in axis
    ``order`` (slowest first) and seen through slices of ``steps``."""
    rank = values.ndim
    order = tuple(range(rank)) if order is None else tuple(order)
    steps = (1,) * rank if steps is None else tuple(steps)
    inverse = tuple(np.argsort(order))
    big_shape = tuple(values.shape[a] * abs(steps[a]) for a in order)
    buffer = np.zeros(big_shape, values.dtype).transpose(inverse)  # memory in `order`
    view = buffer[tuple(slice(None, None, s) for s in steps)]
    view[...] = values
    return view


def channels_last(values: np.ndarray, axis: int) -> np.ndarray:
    """``values`` with the channel axis varying fastest in memory."""
    axis %= values.ndim
    return arrange(values, tuple(a for a in range(values.ndim) if a != axis) + (axis,))


# ---- the inputs of one call -------------------------------------------------------
@dataclass
class BatchNormInputs:
    """One drawn example: x in its layout, its channel axis, parameters and eps.

    x = offset * scale + scale * N(0, 1), rounded once to ``x.dtype``; gamma ~
    N(1, 0.5), beta ~ N(0, 1) in the parameter dtype (or None).  ``rng(k)`` gives
    further reproducible random streams (for dy, loss weights, ...).
    """

    x: np.ndarray
    axis: int
    gamma: np.ndarray | None
    beta: np.ndarray | None
    eps: float
    layout: str
    offset: float
    scale: float
    seed: int
    order: tuple = ()  # memory layout, as for arrange()
    steps: tuple = ()

    @property
    def channels(self) -> int:
        return self.x.shape[self.axis]

    @property
    def count(self) -> int:
        """Values per channel."""
        return self.x.size // self.channels

    @property
    def param_dtype(self) -> np.dtype:
        return param_dtype(self.x.dtype)

    def __repr__(self) -> str:
        # the arrays follow from the seed; their shape and memory layout are what a reader needs
        x = self.x
        params = ", ".join(f"{n}={'None' if a is None else 'given'}" for n, a in
                           (("gamma", self.gamma), ("beta", self.beta)))
        return (f"BatchNormInputs(x: {x.dtype} {x.shape} strides={x.strides}, axis={self.axis}, "
                f"layout={self.layout!r} order={self.order} steps={self.steps}, offset={self.offset:g} std, "
                f"scale={self.scale:g}, eps={self.eps:g}, {params}, seed={self.seed})")

    def _repr_pretty_(self, printer, cycle):  # what Hypothesis prints for a failing example
        printer.text(repr(self))

    def rng(self, stream: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, stream])

    def relayout(self, a: np.ndarray) -> np.ndarray:
        """``a`` (shaped like x) in x's memory layout."""
        return arrange(a, self.order, self.steps)


def make_x(shape, dtype, offset, scale, rng) -> np.ndarray:
    """``offset * scale + scale * N(0, 1)`` in float64, rounded once to ``dtype`` (C order)."""
    return (offset * scale + scale * rng.standard_normal(shape)).astype(dtype)


def make_params(channels, dtype, rng, which="both"):
    """``(gamma, beta)``: gamma ~ N(1, 0.5), beta ~ N(0, 1), in ``dtype``; either may be None."""
    gamma = rng.normal(1.0, 0.5, channels).astype(dtype)
    beta = rng.normal(0.0, 1.0, channels).astype(dtype)
    return (gamma if which in ("both", "gamma") else None,
            beta if which in ("both", "beta") else None)


@st.composite
def batch_norm_inputs(draw, *, dtype_names=STANDARD_DTYPES, layouts=LAYOUTS,
                      max_offset=MAX_OFFSET, scale_range=(1e-2, 1e2), eps=None, params=("both",),
                      min_rank=2, max_rank=5, max_size=MAX_SIZE, max_channels=8,
                      min_count=2) -> BatchNormInputs:
    """Everything one ``batch_norm`` call needs, see :class:`BatchNormInputs`.

    ``params`` lists which of gamma/beta are given: "both", "gamma", "beta", "none";
    ``eps`` is a strategy (default :func:`eps_values`).  Offsets are capped so that
    x stays finite (float16 tops out at 65504).
    """
    shape, axis = draw(shapes_and_axes(min_rank=min_rank, max_rank=max_rank, max_size=max_size,
                                       max_channels=max_channels, min_count=min_count))
    dtype = draw(dtypes(dtype_names))
    scale = draw(scales(*scale_range))
    limit = max_offset
    if dtype == np.float16:
        limit = min(limit, float(np.finfo(np.float16).max) / 4 / scale)
    offset = draw(offsets(limit)) if limit >= 1 else 0.0
    offset = math.copysign(min(abs(offset), limit), offset)
    epsilon = draw(eps_values() if eps is None else eps)
    if dtype == np.float16:
        # a constant channel (common at large offsets, where float16 is coarse) has
        # inv_std = 1/sqrt(eps); 1e-5 keeps dx = gamma * inv_std * dy within 65504
        epsilon = max(epsilon, FLOAT16_MIN_EPS)
    which = draw(st.sampled_from(params))
    seed = draw(seeds())
    name, order, steps = draw(memory_layouts(len(shape), axis, layouts))
    rng = np.random.default_rng(seed)
    x = arrange(make_x(shape, dtype, offset, scale, rng), order, steps)
    gamma, beta = make_params(shape[axis], param_dtype(dtype), rng, which)
    return BatchNormInputs(x=x, axis=axis, gamma=gamma, beta=beta, eps=epsilon, layout=name,
                           offset=offset, scale=scale, seed=seed, order=order, steps=steps)
