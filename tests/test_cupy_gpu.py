"""The CuPy backend on a real GPU, with CuPy arrays through the public API.

These run only where CuPy can use an NVIDIA GPU (``python -m cupybn gpu-check``
runs them with CUPYBN_REQUIRE_GPU=1, which turns a missing GPU into an error).
Everywhere else the same kernels run on the host harness: every property test
takes the ``cupy-host`` backend, and the ``cupy-gpu`` entry of that fixture runs
them on the GPU too.
"""
from __future__ import annotations

import numpy as np
import pytest
from conftest import needs_gpu

import cupybn

pytestmark = needs_gpu

LAYOUTS = {
    "nchw": (lambda a: a, 1),
    "channels-last": (lambda a: a.transpose(0, 2, 3, 1).copy().transpose(0, 3, 1, 2), 1),
    "nhwc-axis-last": (lambda a: a.transpose(0, 2, 3, 1).copy(), -1),
    # strided views, which take the general path (CuPy's Reduction and Elementwise kernels)
    "batch-step": (lambda a: np.concatenate([a, a[:, :, ::-1]])[::2], 1),
    "nhwc-view-of-nchw-every-second": (lambda a: np.concatenate([a, a]).transpose(0, 2, 3, 1)[::2], -1),
    "unaligned-slice": (lambda a: np.concatenate([a.ravel()[:1], a.ravel()])[1:].reshape(a.shape), 1),
}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("dtype", ["float16", "float32", "float64"])
def test_cupy_arrays_match_the_numpy_backend_through_the_public_api(layout, dtype):
    import cupy as cp

    arrange, axis = LAYOUTS[layout]
    rng = np.random.default_rng(0)
    x = arrange((rng.standard_normal((8, 6, 7, 5)) * 2 + 50).astype(dtype))
    pdt = np.float64 if dtype == "float64" else np.float32
    gamma, beta = rng.normal(1, 0.5, 6).astype(pdt), rng.normal(0, 1, 6).astype(pdt)
    rm, rv = np.zeros(6, pdt), np.ones(6, pdt)
    y, saved = cupybn.batch_norm(x, gamma, beta, running_mean=rm, running_var=rv, axis=axis)
    dy = rng.standard_normal(x.shape).astype(dtype)
    dx, dg, db = cupybn.batch_norm_backward(dy, saved)

    xg, rmg, rvg = _same_strides(cp, x), cp.asarray(np.zeros(6, pdt)), cp.asarray(np.ones(6, pdt))
    yg, savedg = cupybn.batch_norm(xg, cp.asarray(gamma), cp.asarray(beta), running_mean=rmg, running_var=rvg,
                                   axis=axis)
    assert isinstance(yg, cp.ndarray) and xg.strides == x.strides
    dxg, dgg, dbg = cupybn.batch_norm_backward(_same_strides(cp, dy), savedg)
    tol = {"float16": 2e-3, "float32": 2e-5, "float64": 1e-12}[dtype]
    for got, want in ((yg, y), (dxg, dx), (dgg, dg), (dbg, db), (rmg, rm), (rvg, rv), (savedg.var, saved.var)):
        np.testing.assert_allclose(cp.asnumpy(got).astype(np.float64), np.asarray(want, np.float64),
                                   rtol=tol, atol=tol)
    y_eval, _ = cupybn.batch_norm(xg, cp.asarray(gamma), cp.asarray(beta), running_mean=rmg, running_var=rvg,
                                  training=False, axis=axis)
    y_eval0, _ = cupybn.batch_norm(x, gamma, beta, running_mean=rm, running_var=rv, training=False, axis=axis)
    np.testing.assert_allclose(cp.asnumpy(y_eval).astype(np.float64), y_eval0.astype(np.float64), rtol=tol,
                               atol=tol)


def _same_strides(cp, a):
    """A CuPy array with a's strides and offset within a buffer (a view where a is one)."""
    if a.base is None:
        return cp.asarray(a)
    base = a.base
    while base.base is not None:
        base = base.base
    offset = a.__array_interface__["data"][0] - base.__array_interface__["data"][0]
    buffer = cp.asarray(base.reshape(-1).view(np.uint8))
    return cp.ndarray(a.shape, a.dtype, buffer.data + offset, a.strides)


def test_gpu_results_are_identical_bits_run_to_run():
    import cupy as cp

    x = cp.asarray(np.random.default_rng(1).standard_normal((64, 32, 28, 28)).astype(np.float32))
    runs = [cupybn.batch_norm(x) for _ in range(3)]
    grads = [cupybn.batch_norm_backward(x, saved) for _, saved in runs]
    for (y, saved), (dx, _, _) in zip(runs[1:], grads[1:], strict=True):
        assert bool((y == runs[0][0]).all()) and bool((saved.var == runs[0][1].var).all())
        assert bool((dx == grads[0][0]).all())


def test_more_than_2_to_the_31_elements():
    import cupy as cp

    # Two channels of 2**30 + 3 values each: 2**31 + 6 elements (float16, 4 GiB).
    inner = 2**30 + 3
    pattern = cp.arange(inner, dtype=cp.int64) % 7  # values 0..6, mean 3 to within 1/inner
    x = cp.empty((1, 2, inner), cp.float16)
    x[0, 0] = pattern.astype(cp.float16)
    x[0, 1] = (pattern * 2 + 100).astype(cp.float16)
    del pattern
    y, saved = cupybn.batch_norm(x)
    counts = np.bincount(np.arange(inner, dtype=np.int64) % 7, minlength=7)
    values = np.arange(7.0)
    mean = (counts * values).sum() / inner
    var = (counts * (values - mean) ** 2).sum() / inner
    np.testing.assert_allclose(cp.asnumpy(saved.var), [var, 4 * var], rtol=1e-6)
    # the last element of the second channel is normalised too (64-bit indexing)
    last = float(y[0, 1, -1])
    expected = ((inner - 1) % 7 * 2 + 100 - (2 * mean + 100)) / np.sqrt(4 * var + 1e-5)
    assert abs(last - expected) < 2e-2


def test_the_demo_trains_on_cupy_arrays_like_the_numpy_backend():
    pytest.importorskip("sklearn", reason="the demo's bundled data set comes with scikit-learn")
    import cupy as cp

    from cupybn.backends.cupy_backend import default_cupy_backend
    from cupybn.experiments import data as experiment_data
    from cupybn.experiments import figure1 as experiment

    data = experiment_data.load_digits(0)
    net = experiment.Network.initial(data.x_train.shape[1], np.random.default_rng(0), with_bn=True,
                                     backend=default_cupy_backend())
    assert all(isinstance(a, cp.ndarray) for a in (*net.weights, *net.biases, net.norms[0].gamma))
    on_gpu = experiment.run(data, steps=30, backend=default_cupy_backend())
    on_cpu = experiment.run(data, steps=30)
    # cuBLAS and NumPy round the matrix products differently: close, not identical
    for name in ("plain", "bn"):
        np.testing.assert_allclose(on_gpu.accuracy[name], on_cpu.accuracy[name], atol=0.02)
        np.testing.assert_allclose(on_gpu.percentiles[name], on_cpu.percentiles[name], atol=0.02)


def test_demo_backend_auto_and_cupy_run_on_the_gpu(tmp_path, capsys):
    pytest.importorskip("sklearn", reason="the demo's bundled data set comes with scikit-learn")
    from cupybn.__main__ import main

    for choice in ("auto", "cupy"):
        assert main(["demo", "--backend", choice, "--steps", "5", "--out", str(tmp_path / choice)]) == 0
        assert "CuPy backend" in capsys.readouterr().out
        assert (tmp_path / choice / "curves.json").is_file()
