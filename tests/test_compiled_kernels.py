"""The NumPy backend's compiled kernels (cupybn/kernels/batch_norm_cpu.c): float32
calls are one call into C each, layouts C cannot walk are copied first and give
the bits of a contiguous copy, and no input the API accepts makes the kernels read or write
outside their arrays (AddressSanitizer and UndefinedBehaviorSanitizer build).

Their numerics are checked by every property test, on the ``numpy-threads1``
backend (tests/conftest.py), and their thread-count independence by
tests/test_determinism.py.
"""
import os
import shutil
import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path

import numpy as np
import pytest

import cupybn
from cupybn.backends import _numpy_compiled

REQUIRED = os.environ.get("CUPYBN_REQUIRE_COMPILED") == "1"
needs_compiled = pytest.mark.skipif(not _numpy_compiled.AVAILABLE and not REQUIRED,
                                    reason="cupybn._batch_norm_cpu was not built (no C compiler at install)")
SOURCE = Path(cupybn.__file__).parent / "kernels" / "batch_norm_cpu.c"


class _Counting:
    """Stands in for the C module and counts the calls made into it."""

    def __init__(self, module):
        self.module, self.calls = module, []

    def __getattr__(self, name):
        fn = getattr(self.module, name)

        def call(*args):
            self.calls.append(name)
            return fn(*args)

        return call


@needs_compiled
@pytest.mark.parametrize("shape, axis", [((60, 100), 1), ((32, 64, 8, 8), 1), ((32, 8, 8, 64), -1)])
def test_a_float32_forward_or_backward_is_one_call_into_c(monkeypatch, shape, axis):
    counting = _Counting(_numpy_compiled._c)
    monkeypatch.setattr(_numpy_compiled, "_c", counting)
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    c = x.shape[axis]
    rm, rv = np.zeros(c, np.float32), np.ones(c, np.float32)
    _, saved = cupybn.batch_norm(x, np.ones(c, np.float32), np.zeros(c, np.float32), running_mean=rm,
                                 running_var=rv, axis=axis)
    cupybn.batch_norm_backward(x, saved)
    cupybn.batch_norm(x, running_mean=rm, running_var=rv, training=False, axis=axis)
    assert counting.calls == ["forward_train", "backward", "forward_infer"]


@needs_compiled
@pytest.mark.parametrize("shape, axis", [((60, 100), 1), ((32, 64, 8, 8), 1), ((32, 8, 8, 64), -1)])
def test_a_synchronised_float32_forward_or_backward_is_two_calls_into_c(monkeypatch, shape, axis):
    from cupybn.distributed import ThreadWorld

    counting = _Counting(_numpy_compiled._c)
    monkeypatch.setattr(_numpy_compiled, "_c", counting)
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    _, saved = cupybn.batch_norm(x, axis=axis, comm=ThreadWorld(1).comm(0))
    cupybn.batch_norm_backward(x, saved)
    # each side of the exchange: the shard's sums, then the elementwise pass
    assert counting.calls == ["moments", "forward_infer", "grad_sums", "grad_apply"]


@needs_compiled
@pytest.mark.parametrize("view", ["every other channel", "reversed batch", "every other column",
                                  "2-d reversed batch", "2-d every other row", "channels-last reversed batch"])
def test_a_strided_view_gives_the_bits_of_its_contiguous_copy(view):
    # Views C cannot walk (every other column) are copied first; the others are walked as
    # they are, in the order of their contiguous copies in the same axis order (the rows family groups rows by
    # their logical position, whether or not they are adjacent in memory).
    rng = np.random.default_rng(1)
    base = rng.standard_normal((6, 10, 5, 7)).astype(np.float32) + np.float32(100)
    flat = rng.standard_normal((300, 7)).astype(np.float32) + np.float32(100)
    x = {"every other channel": base[:, ::2], "reversed batch": base[::-1],
         "every other column": base[..., ::2], "2-d reversed batch": flat[::-1], "2-d every other row": flat[::2],
         "channels-last reversed batch": np.ascontiguousarray(base.transpose(0, 2, 3, 1))[::-1].transpose(0, 3, 1, 2),
         }[view]
    dy = rng.standard_normal(x.shape).astype(np.float32)
    results = []
    # the copy keeps the view's axis order (order="K"): channels-last stays channels-last
    for a, g in ((x, dy), (x.copy(order="K"), dy.copy(order="K"))):
        y, saved = cupybn.batch_norm(a, backend=cupybn.NumpyBackend(threads=1))
        dx, _, _ = cupybn.batch_norm_backward(g, saved)
        results.append((y, dx, saved.mean, saved.var))
    for got, want in zip(*results, strict=True):
        np.testing.assert_array_equal(got, want)


@needs_compiled
def test_sums_that_are_not_finite_go_to_the_numpy_route_and_agree_with_it():
    # Inf at a position the mean guess samples (row 0), and values whose float32 squares
    # overflow (|x - mean| > 2**64): the kernels write nothing and the NumPy route answers.
    rng = np.random.default_rng(2)
    with_inf = rng.standard_normal((64, 3)).astype(np.float32)
    with_inf[0, 1] = np.inf
    huge = (rng.standard_normal((50, 4)) * 1e19).astype(np.float32)
    for x in (with_inf, huge):
        c = x.shape[1]
        dy = rng.standard_normal(x.shape).astype(np.float32)
        results = []
        for backend in (cupybn.NumpyBackend(threads=1), cupybn.NumpyBackend(threads=1, compiled_values=0)):
            rm, rv = np.zeros(c, np.float32), np.ones(c, np.float32)
            y, saved = cupybn.batch_norm(x, running_mean=rm, running_var=rv, backend=backend)
            results.append((y, saved.mean, rm, rv, cupybn.batch_norm_backward(dy, saved)[0]))
        for got, want in zip(results[0][:4], results[1][:4], strict=True):  # the forward pass: the same route
            np.testing.assert_array_equal(got, want)
        # the backward sums are finite for the huge values (dy is small): compiled, to rounding
        dx, dx_numpy = results[0][4], results[1][4]
        np.testing.assert_allclose(dx, dx_numpy, rtol=0, atol=1e-6 * np.nanmax(np.abs(dx_numpy)))
    reference = (huge - huge.astype(np.float64).mean(0)) / np.sqrt(huge.astype(np.float64).var(0) + 1e-5)
    np.testing.assert_allclose(cupybn.batch_norm(huge)[0], reference, atol=1e-6)


@needs_compiled
def test_inference_backward_keeps_the_sign_of_zero():
    x = np.random.default_rng(3).standard_normal((8, 3)).astype(np.float32)
    _, saved = cupybn.batch_norm(x, running_mean=np.zeros(3, np.float32), running_var=np.ones(3, np.float32),
                                 training=False)
    dx, _, _ = cupybn.batch_norm_backward(np.full_like(x, -0.0), saved)
    assert np.signbit(dx).all()


@needs_compiled
def test_the_kernels_refuse_empty_arrays_rather_than_divide_by_zero():
    # the API refuses empty x first; the backend methods are public too
    from cupybn.backends import NUMPY

    for shape in ((0, 4, 1), (3, 0, 2), (3, 4, 0)):
        with pytest.raises(ValueError, match="must not be empty"):
            NUMPY.forward_train(np.empty(shape, np.float32), None, None, 1e-5)


# Run in a child process: the sanitizer runtimes must be loaded before Python.
_SWEEP = """
import importlib.util, sys
import numpy as np
spec = importlib.util.spec_from_file_location("cupybn._batch_norm_cpu", sys.argv[1])
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
sys.modules["cupybn._batch_norm_cpu"] = module
import cupybn
from cupybn.backends import _numpy_compiled as nc
from cupybn.distributed import ThreadWorld
assert nc._c is module
world = ThreadWorld(1)
rng = np.random.default_rng(0)
calls = 0
shapes = [((5, 3), 1), ((2, 1), 1), ((1, 7, 3), 1), ((4, 3, 40), 1), ((3, 5, 7, 2), -1), ((33, 4, 5), 1),
          ((2, 70), 1), ((100, 3, 33), 1), ((7, 2, 1, 1), 1), ((3, 1, 65), 1)]
for shape, axis in shapes:
    for view in ("plain", "strided", "reversed"):
        for threads, block in ((1, 1 << 15), (3, 4), (2, 1)):
            nc.PARALLEL_VALUES, nc.BLOCK_VALUES = 0, block
            x = rng.standard_normal(shape).astype(np.float32)
            if view == "strided":
                x = np.repeat(x, 2, axis=0)[::2]
            elif view == "reversed":
                x = x[..., ::-1]
            c = x.shape[axis]
            gamma, beta = rng.standard_normal(c).astype(np.float32), rng.standard_normal(c)
            rm, rv = np.zeros(c, np.float32), np.ones(c)
            backend = cupybn.NumpyBackend(threads=threads)
            dy = rng.standard_normal(x.shape).astype(np.float32)
            if x.size // c >= 2:
                y, saved = cupybn.batch_norm(x, gamma, beta, running_mean=rm, running_var=rv, axis=axis,
                                             backend=backend)
                cupybn.batch_norm_backward(dy, saved)
                # the synchronised pieces (moments, grad_sums, grad_apply), a world of one rank
                y, saved = cupybn.batch_norm(x, gamma, beta, axis=axis, backend=backend, comm=world.comm(0))
                cupybn.batch_norm_backward(dy, saved)
            y, saved = cupybn.batch_norm(x, gamma, None, running_mean=rm, running_var=rv, axis=axis,
                                         training=False, backend=backend)
            cupybn.batch_norm_backward(dy[..., ::-1], saved)
            # the fused epilogue: a residual in another layout than x's, ReLU, dz
            z = np.asfortranarray(rng.standard_normal(x.shape).astype(np.float32))
            for training in ((True, False) if x.size // c >= 2 else (False,)):
                y, saved = cupybn.batch_norm(x, gamma, beta, running_mean=rm, running_var=rv, axis=axis,
                                             training=training, residual=z, activation="relu", backend=backend)
                cupybn.batch_norm_backward(dy, saved)
                y, saved = cupybn.batch_norm(x, gamma, beta, running_mean=rm, running_var=rv, axis=axis,
                                             training=training, activation="relu", backend=backend)
                cupybn.batch_norm_backward(dy[..., ::-1], saved)
            calls += 1
print("calls", calls)
"""


def _runtime(name: str) -> str | None:
    found = subprocess.run(["gcc", f"-print-file-name={name}"], capture_output=True, text=True).stdout.strip()
    return found if os.path.isabs(found) else None


@pytest.mark.skipif(shutil.which("gcc") is None and not REQUIRED, reason="needs gcc")
def test_the_kernels_stay_inside_their_arrays_under_address_and_ub_sanitizers(tmp_path):
    runtimes = [_runtime("libasan.so"), _runtime("libubsan.so")]
    assert all(runtimes), f"gcc has no sanitizer runtimes: {runtimes}"
    module = tmp_path / "_batch_norm_cpu.so"
    subprocess.run(["gcc", "-O1", "-g", "-fsanitize=address,undefined", "-fno-sanitize-recover=all",
                    "-fno-omit-frame-pointer", "-ffp-contract=off", "-fPIC", "-shared", "-Wno-psabi",
                    f"-I{sysconfig.get_paths()['include']}", str(SOURCE), "-o", str(module)],
                   check=True, capture_output=True, text=True)
    script = tmp_path / "sweep.py"
    script.write_text(textwrap.dedent(_SWEEP))
    env = dict(os.environ, LD_PRELOAD=":".join(runtimes), ASAN_OPTIONS="detect_leaks=0",
               UBSAN_OPTIONS="print_stacktrace=1")
    run = subprocess.run([sys.executable, str(script), str(module)], capture_output=True, text=True, env=env,
                         cwd=tmp_path, timeout=600)
    assert run.returncode == 0, run.stderr[-4000:]
    assert run.stdout.split() == ["calls", "90"]
