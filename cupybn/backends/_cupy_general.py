"""The CuPy backend's general path: strided (outer, C, inner) views, read in place.

The fast RawKernels need C-contiguous data.  A view that is not (a batch taken
with a step, say) would cost a full copy first; instead these CuPy
ReductionKernels and ElementwiseKernels index it through its strides.  They
are simpler and slower per pass than the RawKernels, and they carry their own
numerics: two-pass statistics (shifted sum, then squared deviations from the
mean) accumulated in double, which is as exact as the fast path.  The
per-channel finishing code is the fast path's (``bn_*_channelwise`` kernels,
one thread per channel), so the coefficients are computed the same way.
"""
from __future__ import annotations

import functools

# Per-channel arrays are (1, C, 1) so that they broadcast over the view.  `A` is
# the arithmetic type (float32, or float64 for float64 data), `T` the data's.
_SHIFTED_SUM = dict(
    in_params="T x, A k", out_params="float64 s",
    map_expr="static_cast<double>(x) - static_cast<double>(k)",
    reduce_expr="a + b", post_map_expr="s = a", identity="0", name="cupybn_shifted_sum",
)
_SQUARED_DEVIATIONS = dict(
    in_params="T x, float64 mu", out_params="float64 q",
    map_expr="(static_cast<double>(x) - mu) * (static_cast<double>(x) - mu)",
    reduce_expr="a + b", post_map_expr="q = a", identity="0", name="cupybn_squared_deviations",
)
_SUM = dict(
    in_params="T g", out_params="float64 s", map_expr="static_cast<double>(g)",
    reduce_expr="a + b", post_map_expr="s = a", identity="0", name="cupybn_sum",
)
_CENTRED_PRODUCT_SUM = dict(
    in_params="T g, T x, A c", out_params="float64 s",
    map_expr="static_cast<double>(g) * (static_cast<double>(x) - static_cast<double>(c))",
    reduce_expr="a + b", post_map_expr="s = a", identity="0", name="cupybn_centred_product_sum",
)
_AFFINE = dict(
    in_params="T x, A c, A s, A o", out_params="T y",
    operation="y = static_cast<T>(fma(static_cast<A>(x) - c, s, o))", name="cupybn_affine",
)
_BACKWARD = dict(
    in_params="T g, T x, A c, A a, A b, A k, int32 with_x", out_params="T dx",
    operation=("dx = static_cast<T>(with_x ? fma(a, static_cast<A>(g), fma(b, static_cast<A>(x) - c, k))"
               " : a * static_cast<A>(g))"),
    name="cupybn_backward",
)


class GeneralPath:
    """The kernels of the general path, built once per backend from its kernel factory."""

    def __init__(self, kernels):
        self._kernels = kernels

    @functools.cached_property
    def shifted_sum(self):
        return self._kernels.ReductionKernel(**_SHIFTED_SUM)

    @functools.cached_property
    def squared_deviations(self):
        return self._kernels.ReductionKernel(**_SQUARED_DEVIATIONS)

    @functools.cached_property
    def sum(self):
        return self._kernels.ReductionKernel(**_SUM)

    @functools.cached_property
    def centred_product_sum(self):
        return self._kernels.ReductionKernel(**_CENTRED_PRODUCT_SUM)

    @functools.cached_property
    def affine(self):
        return self._kernels.ElementwiseKernel(**_AFFINE)

    @functools.cached_property
    def backward(self):
        return self._kernels.ElementwiseKernel(**_BACKWARD)
