"""Shared test configuration: Hypothesis profiles and the backends every property runs on.

Hypothesis profiles (pick one with HYPOTHESIS_PROFILE; ``ci`` is the default when
the CI environment variable is set, ``dev`` otherwise):

  dev       50 examples, random each run: quick feedback while editing
  ci        100 examples, derandomised (the same examples on every run, so CI is
            not flaky), no deadline (shared runners are slow), failing examples
            printed as a reproduction blob
  thorough  2000 examples, no deadline: before a release or after touching numerics
"""
from __future__ import annotations

import contextlib
import os
from datetime import timedelta

import pytest
from hypothesis import settings

import cupybn
from cupybn.backends import numpy_backend

settings.register_profile("dev", max_examples=50, deadline=timedelta(seconds=2))
settings.register_profile("ci", max_examples=100, derandomize=True, deadline=None, print_blob=True)
settings.register_profile("thorough", max_examples=2000, deadline=None, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev"))


# Each entry builds one backend.  Results must not depend on the thread count, so
# the NumPy backend runs with one thread and with two.  A host-CuPy backend (CuPy
# kernels fed from NumPy arrays) goes here when it exists, e.g.
#   pytest.param(_cupy_host, id="cupy-host",
#                marks=pytest.mark.skipif(not _has_cuda(), reason="needs CuPy and a GPU")),
BACKENDS = [
    pytest.param(lambda: cupybn.NumpyBackend(threads=1), id="numpy-threads1"),
    pytest.param(lambda: cupybn.NumpyBackend(threads=2), id="numpy-threads2"),
]


@pytest.fixture(scope="session", params=BACKENDS)
def backend(request):
    """A backend object to pass as ``backend=`` (session-scoped so Hypothesis tests can use it)."""
    return request.param()


@contextlib.contextmanager
def _tiny_blocks_context():
    """Make the NumPy backend cut even a small array into many blocks.

    Hypothesis examples are far smaller than one block (2**18 values), so without
    this the block-combination and threading code would only see the few large
    fixed-size tests.  The knobs are module constants of the backend; if they are
    renamed this fails loudly rather than silently testing one block.
    """
    knobs = {"BLOCK_VALUES": 4, "MAX_BLOCK_INNER": 16}
    missing = [k for k in knobs if not hasattr(numpy_backend, k)]
    if missing:
        pytest.fail(f"numpy_backend no longer has {missing}: update tests/conftest.py::tiny_blocks")
    saved = {k: getattr(numpy_backend, k) for k in knobs}
    for k, v in knobs.items():
        setattr(numpy_backend, k, v)
    _clear_plan_caches()
    try:
        yield
    finally:
        for k, v in saved.items():
            setattr(numpy_backend, k, v)
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
