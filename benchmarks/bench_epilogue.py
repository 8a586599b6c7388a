"""The fused epilogue against the same work as separate calls, on the CPU.

Run:  pytest benchmarks/bench_epilogue.py --benchmark-only --benchmark-json epi.json
      python benchmarks/report.py epi.json --epilogue

Each group ``{case}-epilogue-{op}`` times, on the same arrays:

* ``fused``: one cupybn call, ``batch_norm(x, ..., residual=z, activation="relu")``
  (forward) or ``batch_norm_backward(dy, saved)`` returning dx, dgamma, dbeta and dz;
* ``unfused``: what a careful user writes without the option, in NumPy's fastest
  idioms: cupybn's batch_norm, then ``s = y + z`` and ``np.maximum(s, 0, out=s)``
  (forward); ``g = dy * (y > 0)`` then cupybn's batch_norm_backward, dz being g
  (backward).  (``np.where(y > 0, dy, 0)``, which keeps NaN and Inf in dy as they
  are, took 10x longer than the product on the development VM, NumPy 2.4);
* ``torch``: ``relu(batch_norm(x) + z)`` and its autograd backward (PyTorch has no
  fused CPU kernel for it), with the threads and conventions of bench_batch_norm.py.

Outputs are allocated afresh on every call by all three.
"""
from __future__ import annotations

import numpy as np
import pytest
from bench_batch_norm import ROUNDS, WARMUP, _as_torch, _iterations
from cases import CASES, EPS, THREADS, Case, Data, data, residual

import cupybn

EPILOGUE_CASES = ("nchw-f32", "nhwc-f32", "2d-f32", "nchw-f16", "nchw-32x64x8x8-f32")
OPS = ("forward-train", "inference", "backward")
IMPLS = ("fused", "unfused", "torch")


def _forward_kwargs(op: str, d: Data, case: Case) -> dict:
    if op == "inference":
        return dict(running_mean=d.running_mean, running_var=d.running_var, training=False)
    return dict(running_mean=d.running_mean.copy(), running_var=d.running_var.copy())


def fused_target(op: str, d: Data, case: Case, z):
    if op == "backward":
        _, saved = cupybn.batch_norm(d.x, d.gamma, d.beta, eps=EPS, axis=case.axis, residual=z, activation="relu")
        return lambda: cupybn.batch_norm_backward(d.dy, saved)
    kwargs = _forward_kwargs(op, d, case)
    return lambda: cupybn.batch_norm(d.x, d.gamma, d.beta, eps=EPS, axis=case.axis, residual=z, activation="relu",
                                     **kwargs)


def unfused_target(op: str, d: Data, case: Case, z):
    if op == "backward":
        y_bn, saved = cupybn.batch_norm(d.x, d.gamma, d.beta, eps=EPS, axis=case.axis)
        y = np.maximum(y_bn + z, 0)

        def backward():
            g = d.dy * (y > 0)
            return (*cupybn.batch_norm_backward(g, saved), g)

        return backward
    kwargs = _forward_kwargs(op, d, case)

    def forward():
        y, saved = cupybn.batch_norm(d.x, d.gamma, d.beta, eps=EPS, axis=case.axis, **kwargs)
        s = y + z
        return np.maximum(s, 0, out=s), saved

    return forward


def torch_target(op: str, d: Data, case: Case, z):
    torch = pytest.importorskip("torch", reason="torch is not installed: pip install -e '.[bench]'")
    torch.set_num_threads(THREADS)
    F = torch.nn.functional
    x, dy, zt = (_as_torch(torch, a, case) for a in (d.x, d.dy, z))
    w, b = torch.from_numpy(d.gamma), torch.from_numpy(d.beta)
    if op == "backward":
        xg, wg, bg, zg = (t.detach().requires_grad_() for t in (x, w, b, zt))
        y = F.relu(F.batch_norm(xg, None, None, wg, bg, training=True, eps=EPS) + zg)
        return lambda: torch.autograd.grad(y, (xg, wg, bg, zg), dy, retain_graph=True)
    rm, rv = torch.from_numpy(d.running_mean.copy()), torch.from_numpy(d.running_var.copy())
    training = op == "forward-train"
    return lambda: F.relu(F.batch_norm(x, rm, rv, w, b, training=training, momentum=0.1, eps=EPS) + zt)


TARGETS = {"fused": fused_target, "unfused": unfused_target, "torch": torch_target}


@pytest.mark.parametrize(("case", "op", "impl"), [
    pytest.param(case, op, impl, id=f"{case}-epilogue-{op}-{impl}",
                 marks=pytest.mark.benchmark(group=f"{case}-epilogue-{op}"))
    for case in EPILOGUE_CASES for op in OPS for impl in IMPLS
])
def test_epilogue(benchmark, case, op, impl):
    if impl == "torch" and data(case).x.dtype == np.float16:
        pytest.skip("PyTorch's CPU batch_norm takes no float16 input with float32 parameters")
    target = TARGETS[impl](op, data(case), CASES[case], residual(case))
    benchmark.extra_info.update(suite="epilogue", case=case, op=op, impl=impl, nbytes=data(case).nbytes,
                                threads=THREADS)
    benchmark.pedantic(target, rounds=ROUNDS, warmup_rounds=WARMUP, iterations=_iterations(case))
