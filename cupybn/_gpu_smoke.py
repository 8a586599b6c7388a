"""One small call of each mode on the GPU, for compute-sanitizer (``python -m cupybn gpu-check``).

Every kernel of the CuPy backend runs at least once: both reduction families
(NCHW and channels-last), both passes of the statistics, packs (rows of whole
packs, and rows with heads and tails) and single values, float16 and float32,
the general path (a strided view), inference and both backward modes, then the
same with the fused epilogue (a residual, ReLU, dz) and with a mask.  Exits 0
when every result is finite.
"""
from __future__ import annotations

import sys

import numpy as np


def main() -> int:
    import cupy as cp

    import cupybn

    rng = np.random.default_rng(0)
    finite = True
    for dtype in ("float32", "float16"):
        base = cp.asarray((rng.standard_normal((4, 6, 5, 5)) * 2 + 3).astype(dtype))
        views = [(base, 1), (base.transpose(0, 2, 3, 1).copy(), -1), (base[::2], 1),
                 (cp.asarray(rng.standard_normal((33, 4, 8)).astype(dtype)), 1),  # 8 values a row: packs
                 (cp.asarray(rng.standard_normal((3, 4, 7, 7)).astype(dtype)), 1)]  # 49: packs, heads, tails
        for x, axis in views:
            channels = x.shape[axis]
            gamma, beta = cp.ones(channels, cp.float32), cp.zeros(channels, cp.float32)
            rm, rv = cp.zeros(channels, cp.float32), cp.ones(channels, cp.float32)
            x[(0,) * x.ndim] += 100  # a far first value: the second statistics pass runs
            y, saved = cupybn.batch_norm(x, gamma, beta, running_mean=rm, running_var=rv, axis=axis)
            dx, dgamma, dbeta = cupybn.batch_norm_backward(cp.ones_like(x), saved)
            y_eval, saved_eval = cupybn.batch_norm(x, gamma, beta, running_mean=rm, running_var=rv,
                                                   training=False, axis=axis)
            dx_eval, _, _ = cupybn.batch_norm_backward(cp.ones_like(x), saved_eval)
            results = [y, dx, dgamma, dbeta, y_eval, dx_eval, rm, rv]
            z = cp.ones_like(x)
            for training in (True, False):  # the epilogue kernels, both modes
                y_fused, saved_fused = cupybn.batch_norm(x, gamma, beta, running_mean=rm, running_var=rv, axis=axis,
                                                         training=training, residual=z, activation="relu")
                results += [y_fused, *cupybn.batch_norm_backward(cp.ones_like(x), saved_fused)]
            positions = [n for i, n in enumerate(x.shape) if i != axis % x.ndim]
            mask = cp.asarray(rng.random(positions) < 0.7)
            mask[(0,) * mask.ndim] = True
            mask.ravel()[-1] = True
            y_masked, saved_masked = cupybn.batch_norm(x, gamma, beta, running_mean=rm, running_var=rv, axis=axis,
                                                       mask=mask, residual=z, activation="relu")
            results += [y_masked, *cupybn.batch_norm_backward(cp.ones_like(x), saved_masked)]
            for a in results:
                finite = finite and bool(cp.isfinite(a.astype(cp.float32)).all())
    cp.cuda.Device().synchronize()
    print("gpu smoke:", "every result finite" if finite else "NOT FINITE")
    return 0 if finite else 1


if __name__ == "__main__":
    sys.exit(main())
