"""Batch Normalization on the CPU: cupybn vs textbook NumPy vs PyTorch.

Run:  pytest benchmarks --benchmark-only --benchmark-json bench.json
      python benchmarks/report.py bench.json

Each group ``{case}-{op}`` times the three implementations on the same arrays;
``{case}-copy`` times one ``np.copyto`` of x, the unit of the memory floor.

How the comparison is kept fair:

* Same inputs and outputs: every implementation reads the same x (NCHW, or
  channels-last for the nhwc cases: cupybn and the textbook get the NHWC array
  with axis=-1, torch the same buffer as an NCHW tensor in
  ``torch.channels_last`` format, checked below), float32 gamma/beta, and
  returns y in x's dtype and layout, allocated afresh on every call.
* Same work: forward-train also updates running statistics in all three;
  inference uses the running statistics; backward is training-mode backward
  giving dx, dgamma and dbeta.
* Backward alone: the forward is run once outside the timed region.  For
  torch the autograd graph is built once and each round calls
  ``torch.autograd.grad(y, (x, w, b), dy, retain_graph=True)``, i.e. the
  native backward kernel plus autograd's small fixed overhead, as cupybn's
  timing includes its Python overhead.
* Memory: each library allocates its outputs its own default way, and the
  cost of that (page faults on fresh memory) is part of its time, as it is
  for users.  NumPy asks for transparent huge pages for large arrays; torch
  does only with THP_MEM_ALLOC_ENABLE=1 in the environment.  On machines with
  THP in "madvise" mode this costs torch up to 2x on the 67 MB cases; setting
  the variable recovers that but slowed the 17 MB cases (a 2-core VM).
* Threads: torch and cupybn both use ``cases.THREADS`` threads (the cores this
  process may use); textbook NumPy is single-threaded, as such code is.
* Medians over ``ROUNDS`` rounds after ``WARMUP`` untimed rounds (small
  cases call the function many times per round; see ``_iterations``) (thread pools
  and scratch buffers are set up in the warm-up).  Set CUPYBN_BENCH_ROUNDS to
  change the number of rounds.
"""
from __future__ import annotations

import os

import numpy as np
import pytest
import textbook
from cases import CASES, EPS, THREADS, Case, Data, data

import cupybn

OPS = ("forward-train", "inference", "backward")
IMPLS = ("cupybn", "textbook", "torch")
ROUNDS = int(os.environ.get("CUPYBN_BENCH_ROUNDS", "21"))
WARMUP = 2


def cupybn_target(op: str, d: Data, case: Case):
    if op == "forward-train":
        rm, rv = d.running_mean.copy(), d.running_var.copy()
        return lambda: cupybn.batch_norm(d.x, d.gamma, d.beta, running_mean=rm, running_var=rv,
                                         training=True, eps=EPS, axis=case.axis)
    if op == "inference":
        return lambda: cupybn.batch_norm(d.x, d.gamma, d.beta, running_mean=d.running_mean,
                                         running_var=d.running_var, training=False, eps=EPS, axis=case.axis)
    _, saved = cupybn.batch_norm(d.x, d.gamma, d.beta, eps=EPS, axis=case.axis)
    return lambda: cupybn.batch_norm_backward(d.dy, saved)


def textbook_target(op: str, d: Data, case: Case):
    if op == "forward-train":
        rm, rv = d.running_mean.copy(), d.running_var.copy()
        return lambda: textbook.forward_train(d.x, d.gamma, d.beta, eps=EPS, axis=case.axis,
                                              running_mean=rm, running_var=rv)
    if op == "inference":
        return lambda: textbook.forward_infer(d.x, d.gamma, d.beta, d.running_mean, d.running_var,
                                              eps=EPS, axis=case.axis)
    _, cache = textbook.forward_train(d.x, d.gamma, d.beta, eps=EPS, axis=case.axis)
    return lambda: textbook.backward(d.dy, cache)


def _as_torch(torch, a: np.ndarray, case: Case):
    """The buffer of ``a`` as an NCHW-shaped tensor (channels-last for nhwc)."""
    t = torch.from_numpy(a)
    if case.layout == "nhwc":
        t = t.permute(0, 3, 1, 2)
        assert t.is_contiguous(memory_format=torch.channels_last)
    else:
        assert t.is_contiguous()
    return t


def torch_target(op: str, d: Data, case: Case):
    torch = pytest.importorskip("torch", reason="torch is not installed: pip install -e '.[bench]'")
    torch.set_num_threads(THREADS)
    F = torch.nn.functional
    x, dy = _as_torch(torch, d.x, case), _as_torch(torch, d.dy, case)
    w, b = torch.from_numpy(d.gamma), torch.from_numpy(d.beta)
    if op == "forward-train":
        rm, rv = torch.from_numpy(d.running_mean.copy()), torch.from_numpy(d.running_var.copy())
        return lambda: F.batch_norm(x, rm, rv, w, b, training=True, momentum=0.1, eps=EPS)
    if op == "inference":
        rm, rv = torch.from_numpy(d.running_mean), torch.from_numpy(d.running_var)
        return lambda: F.batch_norm(x, rm, rv, w, b, training=False, eps=EPS)
    xg, wg, bg = (t.detach().requires_grad_() for t in (x, w, b))
    y = F.batch_norm(xg, None, None, wg, bg, training=True, eps=EPS)
    return lambda: torch.autograd.grad(y, (xg, wg, bg), dy, retain_graph=True)


TARGETS = {"cupybn": cupybn_target, "textbook": textbook_target, "torch": torch_target}


def _info(benchmark, case: str, op: str, impl: str) -> None:
    benchmark.extra_info.update(case=case, op=op, impl=impl, nbytes=data(case).nbytes,
                                threads=1 if impl in ("textbook", "copy") else THREADS)


@pytest.mark.parametrize(("case", "op", "impl"), [
    pytest.param(case, op, impl, id=f"{case}-{op}-{impl}", marks=pytest.mark.benchmark(group=f"{case}-{op}"))
    for case in CASES for op in OPS for impl in IMPLS
])
def test_batch_norm(benchmark, case, op, impl):
    target = TARGETS[impl](op, data(case), CASES[case])
    _info(benchmark, case, op, impl)
    benchmark.pedantic(target, rounds=ROUNDS, warmup_rounds=WARMUP, iterations=_iterations(case))


def _iterations(case: str) -> int:
    """Calls per round: small arrays are timed over about 2**20 values per round,
    so that a round is long against the clock's and the scheduler's jitter."""
    return max(1, (1 << 20) // data(case).x.size)


@pytest.mark.parametrize("case", [
    pytest.param(case, id=f"{case}-copy", marks=pytest.mark.benchmark(group=f"{case}-copy")) for case in CASES
])
def test_copy(benchmark, case):
    # one read and one write of x into a buffer allocated beforehand: the memory floor's unit
    x = data(case).x
    out = np.empty_like(x)
    _info(benchmark, case, "copy", "copy")
    benchmark.pedantic(np.copyto, args=(out, x), rounds=ROUNDS, warmup_rounds=WARMUP, iterations=_iterations(case))
