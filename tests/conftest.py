"""Shared test configuration: Hypothesis profiles and the backends every property runs on.

Hypothesis profiles (pick one with HYPOTHESIS_PROFILE; ``ci`` is the default when
the CI environment variable is set, ``dev`` otherwise):

  dev       50 examples, random each run: quick feedback while editing (no deadline:
            a first kernel call compiles its module)
  ci        100 examples (25 on the cupy-host backend, see HOST_HARNESS_SHARE),
            derandomised (the same examples on every run, so CI is not flaky), no
            deadline (shared runners are slow), failing examples printed as a
            reproduction blob
  thorough  2000 examples, no deadline: before a release or after touching numerics
"""
from __future__ import annotations

import contextlib
import os

import numpy as np
import pytest
from hypothesis import settings

import cupybn
from cupybn.backends import _numpy_compiled, numpy_backend
from cupybn.testing import strategies

# No deadline in any profile: the first call of a host-harness kernel compiles its
# module with g++ (seconds), which would otherwise fail whichever example ran it.
settings.register_profile("dev", max_examples=50, deadline=None)
settings.register_profile("ci", max_examples=100, derandomize=True, deadline=None, print_blob=True)
settings.register_profile("thorough", max_examples=2000, deadline=None, print_blob=True)
PROFILE = os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev")
settings.load_profile(PROFILE)

# The host harness runs every CUDA thread of a kernel as an OS thread, so one of its
# examples costs as much as dozens on the NumPy backend, and the cupy-host backend
# takes most of the suite's time.  Under the ci profile its property tests draw a
# quarter as many examples (still derandomised: the same ones on every run), which
# keeps the CI run well inside its 20 minutes on 2 cores; the dev and thorough
# profiles are unchanged.
HOST_HARNESS_SHARE = 4


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    test = getattr(item, "obj", None)
    base = getattr(test, "_hypothesis_internal_use_settings", None)  # Hypothesis reads it at each call
    callspec = getattr(item, "callspec", None)
    if (PROFILE == "ci" and base is not None and callspec is not None
            and "cupy-host" in callspec.id and getattr(test, "is_hypothesis_test", False)):
        test._hypothesis_internal_use_settings = settings(base, max_examples=max(10, base.max_examples
                                                                                // HOST_HARNESS_SHARE))
        try:
            yield
        finally:
            test._hypothesis_internal_use_settings = base
    else:
        yield


# Each entry builds one backend.  The NumPy backend sends float32 arrays to its
# compiled kernels (when they were built: CI requires them, see
# _require_compiled_kernels) and computes other tiny arrays whole in float64,
# small ones whole in float32 and large ones in blocks: "numpy-threads1" takes
# its default route (compiled for float32, tiny for the other dtypes of most
# arrays Hypothesis draws), "numpy-tiny-threads1" the float64 whole-array route
# for float32 too, "numpy-small-threads1" the float32 whole-array route,
# "numpy-blocked-threads2" the blocked route, on two threads.  "cupy-host" is the CuPy
# backend's kernels run on the CPU by the host harness (cupybn.testing.hostcuda):
# small blocks and a pretend 8-SM GPU, so that even small arrays are split over
# several blocks per channel.
def _cupy_host():
    from cupybn.testing.hostcuda import host_cupy_backend

    return host_cupy_backend(threads=64, sm_count=8, values_per_thread=2)


def gpu_available() -> bool:
    """Whether CuPy can run kernels here; with CUPYBN_REQUIRE_GPU=1 (python -m cupybn
    gpu-check sets it) a missing GPU is an error, so GPU tests cannot skip silently."""
    try:
        import cupy

        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception as e:
        if os.environ.get("CUPYBN_REQUIRE_GPU") == "1":
            raise RuntimeError(f"CUPYBN_REQUIRE_GPU=1 but CuPy cannot use a GPU: {e}") from e
        return False


def _require_compiled_kernels() -> None:
    """With CUPYBN_REQUIRE_COMPILED=1 (.ci/run sets it) the NumPy backend's compiled
    kernels must have been built: otherwise every float32 test would quietly run
    the NumPy paths instead."""
    if os.environ.get("CUPYBN_REQUIRE_COMPILED") == "1" and not _numpy_compiled.AVAILABLE:
        raise RuntimeError("CUPYBN_REQUIRE_COMPILED=1 but cupybn._batch_norm_cpu was not built "
                           "(pip install -e . builds it with the C compiler)")


_require_compiled_kernels()

needs_gpu = pytest.mark.skipif(not gpu_available(), reason="needs CuPy and an NVIDIA GPU")


class GpuThroughNumpy:
    """The CuPy backend on a real GPU, fed and read back through NumPy arrays, so
    that every property test (written with NumPy inputs) runs the GPU kernels."""

    name = "cupy-gpu"
    xp = np

    def __init__(self):
        import cupy

        from cupybn.backends.cupy_backend import CupyBackend

        self._cp = cupy
        self._gpu = CupyBackend()
        self.supported_dtypes = self._gpu.supported_dtypes

    def owns(self, a):
        return isinstance(a, np.ndarray)

    def _in(self, *arrays):
        return [None if a is None else self._cp.asarray(a) for a in arrays]

    def _out(self, *arrays):
        return tuple(self._cp.asnumpy(a) for a in arrays)

    def forward_train(self, x3, gamma, beta, eps, running_mean=None, running_var=None, momentum=0.1, residual=None,
                      relu=False, mask=None, count=None):
        running = self._in(running_mean, running_var)
        z3, mask3 = self._in(residual, mask)
        out = self._out(*self._gpu.forward_train(*self._in(x3, gamma, beta), eps, *running, momentum, z3, relu,
                                                 mask=mask3, count=count))
        for host, device in zip((running_mean, running_var), running, strict=True):
            if host is not None:
                host[...] = self._cp.asnumpy(device)
        return out

    def forward_infer(self, x3, gamma, beta, running_mean, running_var, eps, residual=None, relu=False):
        (z3,) = self._in(residual)
        return self._out(*self._gpu.forward_infer(*self._in(x3, gamma, beta, running_mean, running_var), eps, z3,
                                                  relu))

    def backward(self, dy3, x3, mean_hi, mean_lo, var, inv_std, gamma, beta, training, relu_y=None, want_dz=False,
                 mask=None, count=None):
        arrays = self._in(dy3, x3, mean_hi, mean_lo, var, inv_std, gamma, beta)
        y3, mask3 = self._in(relu_y, mask)
        return tuple(None if a is None else self._cp.asnumpy(a)
                     for a in self._gpu.backward(*arrays, training, y3, want_dz, mask=mask3, count=count))

    def relu_gradient(self, dy3, y3):
        return self._cp.asnumpy(self._gpu.relu_gradient(*self._in(dy3, y3)))

    # synchronised BN's pieces (cupybn.distributed)
    def shard_moments(self, x3, mask=None, count=None):
        x3, mask3 = self._in(x3, mask)
        return self._out(*self._gpu.shard_moments(x3, mask=mask3, count=count))

    def normalize(self, x3, mean, mean_lo, var, gamma, beta, eps, residual=None, relu=False):
        return self._cp.asnumpy(self._gpu.normalize(*self._in(x3, mean, mean_lo, var, gamma, beta), eps,
                                                    *self._in(residual), relu))

    def gradient_sums(self, dy3, x3, mean_hi, mean_lo, var):
        return self._out(*self._gpu.gradient_sums(*self._in(dy3, x3, mean_hi, mean_lo, var)))

    def input_gradient(self, dy3, x3, mean_hi, mean_lo, inv_std, gamma, sum_dy, sum_dyc, count, mask=None):
        arrays = self._in(dy3, x3, mean_hi, mean_lo, inv_std, gamma, sum_dy, sum_dyc)
        (mask3,) = self._in(mask)
        return self._cp.asnumpy(self._gpu.input_gradient(*arrays, count, mask=mask3))


BACKENDS = [
    pytest.param(lambda: cupybn.NumpyBackend(threads=1), id="numpy-threads1"),
    pytest.param(lambda: cupybn.NumpyBackend(threads=1, compiled_values=0), id="numpy-tiny-threads1"),
    pytest.param(lambda: cupybn.NumpyBackend(threads=1, compiled_values=0, tiny_values=0), id="numpy-small-threads1"),
    pytest.param(lambda: cupybn.NumpyBackend(threads=2, compiled_values=0, small_values=0, tiny_values=0),
                 id="numpy-blocked-threads2"),
    pytest.param(_cupy_host, id="cupy-host"),
    pytest.param(GpuThroughNumpy, id="cupy-gpu", marks=needs_gpu),
]


@pytest.fixture(scope="session", params=BACKENDS)
def backend(request):
    """A backend object to pass as ``backend=`` (session-scoped so Hypothesis tests can use it)."""
    return request.param()


@pytest.fixture(scope="session", params=[p for p in BACKENDS if p.id.startswith("numpy")])
def numpy_routes(request):
    """The NumPy backend's routes alone, for properties of the maths that cost hundreds of calls
    per example (finite differences): on the host harness that is minutes; the CuPy backend's
    gradients are held to the NumPy backend's by the properties that take ``backend``."""
    return request.param()


@pytest.fixture(autouse=True)
def _draw_only_dtypes_the_backend_supports(request):
    """Hypothesis draws in a test that takes ``backend`` use only that backend's dtypes."""
    if "backend" not in request.fixturenames:
        yield
        return
    with strategies.only_dtypes(request.getfixturevalue("backend").supported_dtypes):
        yield


@contextlib.contextmanager
def _tiny_blocks_context():
    """Make the NumPy backend cut even a small array into many blocks.

    Hypothesis examples are far smaller than one block (2**18 values), so without
    this the block-combination and threading code would only see the few large
    fixed-size tests.  The knobs are module constants of the backend; if they are
    renamed this fails loudly rather than silently testing one block.
    """
    knobs = {(numpy_backend, "BLOCK_VALUES"): 4, (numpy_backend, "MAX_BLOCK_INNER"): 16,
             (numpy_backend, "SMALL_VALUES"): 0, (numpy_backend, "TINY_VALUES"): 0,
             # compiled kernels: blocks of one row or a few values, every array shared among threads
             (_numpy_compiled, "BLOCK_VALUES"): 4, (_numpy_compiled, "PARALLEL_VALUES"): 0}
    missing = [f"{m.__name__}.{k}" for m, k in knobs if not hasattr(m, k)]
    if missing:
        pytest.fail(f"{missing} no longer exist: update tests/conftest.py::tiny_blocks")
    saved = {(m, k): getattr(m, k) for m, k in knobs}
    for (m, k), v in knobs.items():
        setattr(m, k, v)
    _clear_plan_caches()
    try:
        yield
    finally:
        for (m, k), v in saved.items():
            setattr(m, k, v)
        _clear_plan_caches()


def _clear_plan_caches():
    """Forget block plans cached under the other block size (functools caches)."""
    for obj in vars(numpy_backend).values():
        if callable(getattr(obj, "cache_clear", None)):
            obj.cache_clear()


@pytest.fixture(scope="session")
def tiny_blocks():
    """A context manager factory: ``with tiny_blocks(): ...`` runs with tiny blocks."""
    return _tiny_blocks_context
