"""The CuPy backend's Python cost per call, with its launches replaced by no-ops.

Run:  pytest benchmarks/bench_host_overhead.py --benchmark-only

On a GPU a BN call costs at least its host time (argument checks, launch
geometry, allocations, launches), whatever the size of the tensor: small
calls are host-bound.  Here the public functions run with the CuPy backend on
NumPy arrays and a kernel factory whose launches do nothing
(``cupybn.testing.counting``), so what is timed is the Python side alone, in
CPU time (``time.process_time``).  Target (issue 10): at most 40 us per call in
every mode on the development machine.  CuPy's own launch cost (a few us per
kernel) comes on top on a GPU; ``python -m cupybn gpu-check`` measures that.
"""
from __future__ import annotations

import time

import numpy as np
import pytest

import cupybn
from cupybn.backends.cupy_backend import CupyBackend
from cupybn.testing.counting import CountingKernels, Counts

SHAPES = {  # ResNet-50's median BN layer at batch 32, both layouts, and a 2-D (batch, features) layer
    "nchw": ((32, 256, 14, 14), 1),
    "nhwc": ((32, 14, 14, 256), -1),
    "2d": ((32, 1024), 1),
}


@pytest.fixture(scope="module")
def backend():
    return CupyBackend(xp=np, kernels=CountingKernels(Counts(), run=False), threads=256, sm_count=132)


def _arrays(layout):
    shape, axis = SHAPES[layout]
    channels = shape[axis]
    x = np.ones(shape, np.float16)
    params = [np.ones(channels, np.float32) for _ in range(4)]
    return x, axis, params


@pytest.mark.benchmark(timer=time.process_time, group="host-overhead")
@pytest.mark.parametrize("layout", list(SHAPES))
@pytest.mark.parametrize("mode", ["train", "infer", "backward"])
def test_python_per_call(benchmark, backend, layout, mode):
    x, axis, (gamma, beta, rm, rv) = _arrays(layout)
    if mode == "backward":
        _, saved = cupybn.batch_norm(x, gamma, beta, running_mean=rm, running_var=rv, axis=axis, backend=backend)
        dy = np.ones_like(x)
        benchmark(cupybn.batch_norm_backward, dy, saved)
    else:
        benchmark(lambda: cupybn.batch_norm(x, gamma, beta, running_mean=rm, running_var=rv, axis=axis,
                                            training=mode == "train", backend=backend))
