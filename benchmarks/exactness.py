"""Exactness of cupybn (and PyTorch, when importable) against float64.

For float32 x = offset + N(0, 1), gamma ~ N(1, 0.5), beta ~ N(0, 1), random dy:
max |y - y_ref| / max(1, |y_ref|), the relative error of the batch variance, and
the norm-wise relative errors of dx, dgamma and dbeta, where the references are
computed in float64 from the same float32 inputs.

    python benchmarks/exactness.py [--shape 64 16 64 64] [--json PATH]
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform

import numpy as np

import cupybn
from cupybn.testing import batch_norm_errors, reference_backward, reference_forward

OFFSETS = (0.0, 1e2, 1e4, 1e6)


def errors(y, var, dx, dgamma, dbeta, x, gamma, beta, dy, axis, eps):
    ref = reference_forward(x, gamma, beta, axis=axis, eps=eps)
    ref_grads = reference_backward(dy, ref, gamma, axis=axis)
    return batch_norm_errors(y, var, (dx, dgamma, dbeta), ref, ref_grads)


def run_cupybn(x, gamma, beta, dy, axis, eps):
    y, saved = cupybn.batch_norm(x, gamma, beta, axis=axis, eps=eps)
    dx, dgamma, dbeta = cupybn.batch_norm_backward(dy, saved)
    return y, saved.var, dx, dgamma, dbeta


def run_torch(torch, x, gamma, beta, dy, axis, eps):
    """torch sees NCHW shapes; channels-last data go in as a channels_last tensor."""
    if axis == x.ndim - 1 and x.ndim == 4:
        xt = torch.from_numpy(x).permute(0, 3, 1, 2)  # NCHW view of NHWC memory
        dyt = torch.from_numpy(dy).permute(0, 3, 1, 2)
    else:
        xt, dyt = torch.from_numpy(x), torch.from_numpy(dy)
    xt = xt.detach().requires_grad_()
    gt = torch.from_numpy(gamma).requires_grad_()
    bt = torch.from_numpy(beta).requires_grad_()
    yt = torch.nn.functional.batch_norm(xt, None, None, gt, bt, training=True, eps=eps)
    yt.backward(dyt)
    y, dx = yt.detach().numpy(), xt.grad.numpy()
    if axis == x.ndim - 1 and x.ndim == 4:
        y, dx = y.transpose(0, 2, 3, 1), dx.transpose(0, 2, 3, 1)
    return y, None, dx, gt.grad.numpy(), bt.grad.numpy()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", type=int, nargs=4, default=(64, 16, 64, 64), metavar=("N", "C", "H", "W"))
    parser.add_argument("--json", help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    try:
        import torch
    except ImportError:
        torch = None
    rng = np.random.default_rng(0)
    n, c, h, w = args.shape
    eps = 1e-5
    rows = []
    for layout in ("NCHW", "NHWC", "2-D"):
        for offset in OFFSETS:
            if layout == "2-D":
                shape, axis = (n * h * w // 4, c * 4), 1
            else:
                shape, axis = ((n, c, h, w), 1) if layout == "NCHW" else ((n, h, w, c), 3)
            channels = shape[axis]
            x = (offset + rng.standard_normal(shape)).astype(np.float32)
            dy = rng.standard_normal(shape).astype(np.float32)
            gamma = rng.normal(1.0, 0.5, channels).astype(np.float32)
            beta = rng.normal(0.0, 1.0, channels).astype(np.float32)
            inputs = (x, gamma, beta, dy, axis, eps)
            rows.append({"impl": "cupybn", "layout": layout, "offset": offset,
                         **errors(*run_cupybn(*inputs), *inputs)})
            if torch is not None and layout != "2-D":
                rows.append({"impl": f"torch {torch.__version__}", "layout": layout, "offset": offset,
                             **errors(*run_torch(torch, *inputs), *inputs)})
    print(f"shape {tuple(args.shape)} float32, errors against float64 on the same inputs")
    print("| impl | layout | offset | y | var | dx | dgamma | dbeta |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        var = f"{r['var']:.1e}" if "var" in r else "-"
        print(f"| {r['impl']} | {r['layout']} | {r['offset']:.0e} | {r['y']:.1e} | {var} | {r['dx']:.1e} "
              f"| {r['dgamma']:.1e} | {r['dbeta']:.1e} |")
    if args.json:
        meta = {"date": datetime.date.today().isoformat(), "machine": platform.platform(),
                "processor": platform.processor(), "numpy": np.__version__,
                "torch": None if torch is None else torch.__version__, "shape": list(args.shape)}
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
