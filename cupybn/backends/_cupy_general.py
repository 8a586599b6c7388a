"""The CuPy backend's general path: strided (outer, C, inner) views, read in place.

The fast RawKernels need C-contiguous data.  A view that is not (a batch taken
with a step, say) would cost a full copy first; instead these CuPy
ReductionKernels and ElementwiseKernels index it through its strides.  They
are simpler and slower per pass than the RawKernels, and they carry their own
numerics: two-pass statistics (shifted sum, then squared deviations from the
mean) accumulated in double, which is as exact as the fast path.  The
per-channel finishing code is the fast path's (``bn_*_channelwise`` kernels,
one thread per channel), so the coefficients are computed the same way.  The
fused epilogue (residual add and ReLU forward, the ReLU's mask and dz backward)
is an input and a flag of these kernels, as it is of the RawKernels.  Masked
calls (any layout) take their statistics and dx from the masked kernels here,
the mask a broadcast input (docs/cupy-backend.md, "Masks").
"""
from __future__ import annotations

import functools

from ..kernels import ADD_RESIDUAL, RELU, WRITE_GRADIENT

# The fused epilogue and the ReLU's gradient, as the fast kernels have them
# (batch_norm.cu: apply_epilogue, through_relu), for the kernels below; the
# bits of `epilogue` are cupybn.kernels' (a flag, the same for every element).
_EPILOGUE_FUNCTIONS = f"""
template <typename Acc, typename V>
__device__ Acc cupybn_apply_epilogue(Acc p, const V& z, int epilogue) {{
  if (epilogue & {ADD_RESIDUAL}) p += static_cast<Acc>(z);
  if (epilogue & {RELU}) p = p <= Acc(0) ? Acc(0) : p;  // NaN stays NaN; -0 and negatives give +0
  return p;
}}
// dy through the ReLU whose output was y: 0 where y <= 0 (y == 0 too), dy elsewhere (NaN y too)
template <typename V>
__device__ V cupybn_through_relu(const V& dy, const V& y, int epilogue) {{
  return (epilogue & {RELU}) && static_cast<double>(y) <= 0.0 ? static_cast<V>(0.0f) : dy;
}}
"""

# Per-channel arrays are (1, C, 1) so that they broadcast over the view.  `A` is
# the arithmetic type (float32, or float64 for float64 data), `T` the data's.
# The gradient kernels take `T y, int32 epilogue`: with RELU set, dy is masked
# by y; otherwise y is a stand-in (dy itself) that the mask does not look at.
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
    in_params="T g, T y, int32 epilogue", out_params="float64 s",
    map_expr="static_cast<double>(cupybn_through_relu(g, y, epilogue))",
    reduce_expr="a + b", post_map_expr="s = a", identity="0", name="cupybn_sum", preamble=_EPILOGUE_FUNCTIONS,
)
_CENTRED_PRODUCT_SUM = dict(
    in_params="T g, T x, A c, T y, int32 epilogue", out_params="float64 s",
    map_expr=("static_cast<double>(cupybn_through_relu(g, y, epilogue))"
              " * (static_cast<double>(x) - static_cast<double>(c))"),
    reduce_expr="a + b", post_map_expr="s = a", identity="0", name="cupybn_centred_product_sum",
    preamble=_EPILOGUE_FUNCTIONS,
)
# z: the residual (with ADD_RESIDUAL), any strides; x stands in for it otherwise.
_AFFINE = dict(
    in_params="T x, A c, A s, A o, T z, int32 epilogue", out_params="T y",
    operation="y = static_cast<T>(cupybn_apply_epilogue(fma(static_cast<A>(x) - c, s, o), z, epilogue))",
    name="cupybn_affine", preamble=_EPILOGUE_FUNCTIONS,
)
# dz (C-contiguous, written with WRITE_GRADIENT only: raw, indexed by i) gets
# the masked dy; dx stands in for it otherwise.
_BACKWARD = dict(
    in_params="T g, T x, A c, A a, A b, A k, int32 with_x, T y, int32 epilogue", out_params="T dx, raw T dz",
    operation=("const T masked = cupybn_through_relu(g, y, epilogue);\n"
               "dx = static_cast<T>(with_x ? fma(a, static_cast<A>(masked), fma(b, static_cast<A>(x) - c, k))"
               " : a * static_cast<A>(masked));\n"
               f"if (epilogue & {WRITE_GRADIENT}) dz[i] = masked"),
    name="cupybn_backward", preamble=_EPILOGUE_FUNCTIONS,
)
# Masks: `bool m` is the (outer, 1, inner) mask, broadcast over the channels
# (no copy).  A position outside it is left out with a conditional, never
# multiplied by 0, so a NaN or Inf there reaches nothing.  `n` is the number of
# selected positions per channel (a scalar), `k` a shift per channel (or 0.0).
_MASKED_SHIFTED_MEAN = dict(
    in_params="T x, bool m, float64 k, float64 n", out_params="float64 mean",
    map_expr="m ? static_cast<double>(x) - k : 0.0",
    reduce_expr="a + b", post_map_expr="mean = a / n", identity="0", name="cupybn_masked_shifted_mean",
)
# About the centre k + d (the first mean and its correction), as in the unmasked path.
_MASKED_SQUARED_DEVIATIONS = dict(
    in_params="T x, bool m, float64 k, float64 d", out_params="float64 q",
    map_expr="m ? (static_cast<double>(x) - (k + d)) * (static_cast<double>(x) - (k + d)) : 0.0",
    reduce_expr="a + b", post_map_expr="q = a", identity="0", name="cupybn_masked_squared_deviations",
)
# Training dx of a masked call: the terms through the statistics (b, k) only
# where the mask is True; elsewhere a * g exactly (x there may be Inf).  As
# _BACKWARD otherwise (g through the ReLU of y with RELU, dz with WRITE_GRADIENT).
_MASKED_BACKWARD = dict(
    in_params="T g, T x, bool m, A c, A a, A b, A k, T y, int32 epilogue", out_params="T dx, raw T dz",
    operation=("const T masked = cupybn_through_relu(g, y, epilogue);\n"
               "dx = static_cast<T>(m ? fma(a, static_cast<A>(masked), fma(b, static_cast<A>(x) - c, k))"
               " : a * static_cast<A>(masked));\n"
               f"if (epilogue & {WRITE_GRADIENT}) dz[i] = masked"),
    name="cupybn_masked_backward", preamble=_EPILOGUE_FUNCTIONS,
)
_RELU_GRADIENT = dict(
    in_params="T dy, T y", out_params="T g", operation=f"g = cupybn_through_relu(dy, y, {RELU})",
    name="cupybn_relu_gradient", preamble=_EPILOGUE_FUNCTIONS,
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

    @functools.cached_property
    def masked_shifted_mean(self):
        return self._kernels.ReductionKernel(**_MASKED_SHIFTED_MEAN)

    @functools.cached_property
    def masked_squared_deviations(self):
        return self._kernels.ReductionKernel(**_MASKED_SQUARED_DEVIATIONS)

    @functools.cached_property
    def masked_backward(self):
        return self._kernels.ElementwiseKernel(**_MASKED_BACKWARD)

    @functools.cached_property
    def relu_gradient(self):
        return self._kernels.ElementwiseKernel(**_RELU_GRADIENT)
