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
is an input and a flag of kernels of its own (``*_epilogue``), as it is of the
RawKernels' ``true`` variants; calls without one take the plain kernels.  Masked
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
#
# Each kernel with an epilogue comes twice.  CuPy's generated code loads every
# input that is not raw before the operation, so a kernel that merely took the
# epilogue's arrays (a stand-in when off) would read them for every element of
# every call: calls without an epilogue take the plain kernels (the expressions
# they had before the epilogue existed), calls with one the `*_EPILOGUE`
# kernels, which take `T y, int32 epilogue` (with RELU set dy is masked by y)
# or `T z, int32 epilogue` (the residual, with ADD_RESIDUAL; x stands in
# otherwise).
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
# The gradient summed: dy, or through the ReLU of y.
_MASKED_DY = "cupybn_through_relu(g, y, epilogue)"
_SUM = dict(
    in_params="T g", out_params="float64 s", map_expr="static_cast<double>(g)",
    reduce_expr="a + b", post_map_expr="s = a", identity="0", name="cupybn_sum",
)
_SUM_EPILOGUE = dict(
    _SUM, in_params="T g, T y, int32 epilogue", map_expr=f"static_cast<double>({_MASKED_DY})",
    name="cupybn_sum_epilogue", preamble=_EPILOGUE_FUNCTIONS,
)
_CENTRED = "(static_cast<double>(x) - static_cast<double>(c))"
_CENTRED_PRODUCT_SUM = dict(
    in_params="T g, T x, A c", out_params="float64 s", map_expr=f"static_cast<double>(g) * {_CENTRED}",
    reduce_expr="a + b", post_map_expr="s = a", identity="0", name="cupybn_centred_product_sum",
)
_CENTRED_PRODUCT_SUM_EPILOGUE = dict(
    _CENTRED_PRODUCT_SUM, in_params="T g, T x, A c, T y, int32 epilogue",
    map_expr=f"static_cast<double>({_MASKED_DY}) * {_CENTRED}", name="cupybn_centred_product_sum_epilogue",
    preamble=_EPILOGUE_FUNCTIONS,
)
_NORMALIZED = "fma(static_cast<A>(x) - c, s, o)"
_AFFINE = dict(
    in_params="T x, A c, A s, A o", out_params="T y", operation=f"y = static_cast<T>({_NORMALIZED})",
    name="cupybn_affine",
)
# z: the residual (with ADD_RESIDUAL), any strides; x stands in for it otherwise.
_AFFINE_EPILOGUE = dict(
    in_params="T x, A c, A s, A o, T z, int32 epilogue", out_params="T y",
    operation=f"y = static_cast<T>(cupybn_apply_epilogue({_NORMALIZED}, z, epilogue))",
    name="cupybn_affine_epilogue", preamble=_EPILOGUE_FUNCTIONS,
)


def _input_gradient(full: str, g: str) -> str:
    """dx = a g + b (x - c) + k where ``full`` holds (training; or the mask), a g elsewhere."""
    return (f"dx = static_cast<T>({full} ? fma(a, static_cast<A>({g}), fma(b, static_cast<A>(x) - c, k))"
            f" : a * static_cast<A>({g}))")


# The epilogue's dx: g through the ReLU of y, and dz (C-contiguous, written
# with WRITE_GRADIENT only: raw, indexed by i; dx stands in for it otherwise)
# gets that masked dy.
def _input_gradient_epilogue(full: str) -> str:
    return (f"const T masked = {_MASKED_DY};\n{_input_gradient(full, 'masked')};\n"
            f"if (epilogue & {WRITE_GRADIENT}) dz[i] = masked")


_BACKWARD = dict(
    in_params="T g, T x, A c, A a, A b, A k, int32 with_x", out_params="T dx",
    operation=_input_gradient("with_x", "g"), name="cupybn_backward",
)
_BACKWARD_EPILOGUE = dict(
    in_params="T g, T x, A c, A a, A b, A k, int32 with_x, T y, int32 epilogue", out_params="T dx, raw T dz",
    operation=_input_gradient_epilogue("with_x"), name="cupybn_backward_epilogue", preamble=_EPILOGUE_FUNCTIONS,
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
# where the mask is True; elsewhere a * g exactly (x there may be Inf).  With
# the epilogue as _BACKWARD_EPILOGUE (g through the ReLU of y, dz).
_MASKED_BACKWARD = dict(
    in_params="T g, T x, bool m, A c, A a, A b, A k", out_params="T dx",
    operation=_input_gradient("m", "g"), name="cupybn_masked_backward",
)
_MASKED_BACKWARD_EPILOGUE = dict(
    in_params="T g, T x, bool m, A c, A a, A b, A k, T y, int32 epilogue", out_params="T dx, raw T dz",
    operation=_input_gradient_epilogue("m"), name="cupybn_masked_backward_epilogue", preamble=_EPILOGUE_FUNCTIONS,
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

    # The same with the epilogue's inputs, for calls that have one.
    @functools.cached_property
    def sum_epilogue(self):
        return self._kernels.ReductionKernel(**_SUM_EPILOGUE)

    @functools.cached_property
    def centred_product_sum_epilogue(self):
        return self._kernels.ReductionKernel(**_CENTRED_PRODUCT_SUM_EPILOGUE)

    @functools.cached_property
    def affine_epilogue(self):
        return self._kernels.ElementwiseKernel(**_AFFINE_EPILOGUE)

    @functools.cached_property
    def backward_epilogue(self):
        return self._kernels.ElementwiseKernel(**_BACKWARD_EPILOGUE)

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
    def masked_backward_epilogue(self):
        return self._kernels.ElementwiseKernel(**_MASKED_BACKWARD_EPILOGUE)

    @functools.cached_property
    def relu_gradient(self):
        return self._kernels.ElementwiseKernel(**_RELU_GRADIENT)
