"""Recycled output memory is never shared with an array that is still alive."""
import gc

import numpy as np

import cupybn

SHAPE = (8, 4, 128, 64)  # 1 MiB of float32: large enough to be recycled


def _x(seed=0):
    return np.random.default_rng(seed).standard_normal(SHAPE).astype(np.float32)


def _address(a):
    return a.__array_interface__["data"][0]


def test_live_outputs_and_their_views_keep_their_memory():
    backend = cupybn.NumpyBackend(threads=1)
    x = _x()
    y1, _ = cupybn.batch_norm(x, backend=backend)
    view = y1[::2].transpose(3, 1, 2, 0)  # only a view survives
    expected = view.copy()
    del y1
    gc.collect()
    for seed in range(1, 4):
        y, saved = cupybn.batch_norm(_x(seed), backend=backend)
        dx, _, _ = cupybn.batch_norm_backward(y, saved)
        assert not np.shares_memory(view, y)
        assert not np.shares_memory(view, dx)
        assert not np.shares_memory(y, dx)
    assert np.array_equal(view, expected)


def test_dropped_outputs_are_reused():
    backend = cupybn.NumpyBackend(threads=1)
    x = _x()
    y, _ = cupybn.batch_norm(x, backend=backend)
    first = _address(y)
    del y
    gc.collect()
    y, _ = cupybn.batch_norm(x, backend=backend)
    assert _address(y) == first


def _idle_bytes_after_one_call(backend):
    y, _ = cupybn.batch_norm(_x(), backend=backend)
    del y
    gc.collect()
    backend._outputs._take_returned()  # what the finalizers handed back
    return backend._outputs._idle_bytes


def test_recycling_can_be_turned_off_and_cleared():
    assert _idle_bytes_after_one_call(cupybn.NumpyBackend(threads=1, output_cache_bytes=0)) == 0
    on = cupybn.NumpyBackend(threads=1)
    assert _idle_bytes_after_one_call(on) == np.prod(SHAPE) * 4
    on.clear_cache()
    assert on._outputs._idle_bytes == 0
