"""The accuracy cupybn promises, per dtype: the one place the tests take their bars from.

Every bar compares a result with :mod:`cupybn.testing.reference`, a float64
computation on the *same* (already rounded) inputs, so input quantisation costs
nothing and the bars measure the library alone:

* ``y``: ``max |y - y_ref| / max(1, |y_ref|)`` (relative for large outputs,
  absolute near zero, where a relative bar would be meaningless);
* ``var``: largest relative error of the per-channel batch variance;
* ``dx``: norm-wise relative error ``||dx - dx_ref|| / ||dx_ref||``;
* ``dparams``: the same for dgamma and dbeta.

Why these numbers
-----------------
float32 (unit roundoff u = 2**-24 ~ 6e-8): y within 1e-6, i.e. a handful of
final roundings, whatever the offset of x (up to 1e6 standard deviations);
variance to 1e-6; gradients, which are sums of many products, to 1e-5.

float16 (u = 2**-11): y, dx and dy are float16 but everything in between is
float32 (statistics and parameters are float32), so the best possible result is
the float32-accurate value rounded *once* to float16.  Rounding to nearest moves
a normal value v by at most half an ulp, and ulp(v) <= 2**-10 * |v|, so by at
most 2**-11 * |v|; below the normal range (|v| < 2**-14) the absolute error is
at most 2**-25.  With v itself within d = 1e-6 * max(1, |y_ref|) of y_ref,

    |y - y_ref| <= 2**-11 * (|y_ref| + d) + d <= (2**-11 + 2e-6) * max(1, |y_ref|).

That is the float16 bar for y; dx gets the same single rounding on top of the
float32 gradient bar.  The statistics and dgamma/dbeta are float32 results and
keep the float32 bars.  bfloat16 (8 significant bits) is the same argument with
2**-8.

float64 (u = 2**-53 ~ 1.1e-16): y and the variance within 1e-12 (some 10**4
roundings of slack, for sums over thousands of values), gradients 1e-11.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Tolerance:
    """Bars for one data dtype (see the module docstring for the error measures)."""

    y: float
    var: float
    dx: float
    dparams: float


FLOAT32_Y = 1e-6
FLOAT32_VAR = 1e-6
FLOAT32_GRAD = 1e-5

# one rounding to the storage format on top of a float32-accurate value
HALF_ROUNDING = 2.0**-11        # float16: 11 significant bits
BFLOAT16_ROUNDING = 2.0**-8     # bfloat16: 8 significant bits

TOLERANCES = {
    "float64": Tolerance(y=1e-12, var=1e-12, dx=1e-11, dparams=1e-11),
    "float32": Tolerance(y=FLOAT32_Y, var=FLOAT32_VAR, dx=FLOAT32_GRAD, dparams=FLOAT32_GRAD),
    "float16": Tolerance(y=HALF_ROUNDING + 2 * FLOAT32_Y, var=FLOAT32_VAR,
                         dx=HALF_ROUNDING + FLOAT32_GRAD, dparams=FLOAT32_GRAD),
    "bfloat16": Tolerance(y=BFLOAT16_ROUNDING + 2 * FLOAT32_Y, var=FLOAT32_VAR,
                          dx=BFLOAT16_ROUNDING + FLOAT32_GRAD, dparams=FLOAT32_GRAD),
}


def tolerance(dtype) -> Tolerance:
    """The bars for data of ``dtype`` (a NumPy dtype, type or name)."""
    name = dtype if isinstance(dtype, str) else np.dtype(dtype).name
    try:
        return TOLERANCES[name]
    except KeyError:
        raise ValueError(f"no tolerances for dtype {name}") from None


def finfo(dtype):
    """``np.finfo`` that also knows bfloat16 (through ml_dtypes)."""
    dtype = np.dtype(dtype)
    if dtype.name == "bfloat16":
        import ml_dtypes  # noqa: PLC0415

        return ml_dtypes.finfo(dtype)
    return np.finfo(dtype)
