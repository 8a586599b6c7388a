"""Batch Normalization on the GPU: cupybn vs PyTorch vs textbook CuPy on ResNet-50's BN shapes.

Run on a machine with CuPy and an NVIDIA GPU (elsewhere this module skips):

    pytest benchmarks/bench_gpu.py --benchmark-only [--benchmark-json out.json]

``python -m cupybn gpu-check`` runs exactly this and reads the results as they come.  The cases,
their data, the implementations and the settings (CUPYBN_GPU_BENCH_* environment variables) are
in ``gpu_cases.py``.

``test_copy`` comes first: a device-to-device copy, timed as ``cupy.copyto`` and as
``cudaMemcpyAsync``; the faster is the roofline.  Then ``test_gpu_batch_norm`` times every case x
mode x implementation, one case after another (group ``gpu-{case}-{mode}``), so that only one
case's data need be on the device; then ``test_gpu_epilogue`` times the fused epilogue
``relu(BN(x) + z)`` against the same work unfused and against torch on a few of the cases
(``gpu_cases.epilogue_cases``; group ``gpu-epilogue-{case}-{mode}``, ``kind`` "epilogue").
``extra_info`` holds what gpu-check reports: the case, mode and implementation, the bytes of x,
how many inputs are rotated, the error of the main output against float64 (computed before
timing), the clock and the calls per round.

Timing: ``benchmark.pedantic`` with ``iterations=CALLS_PER_ROUND``: a round queues that many calls,
each on the next of several distinct inputs (together a few times the L2 cache), without waiting,
and pytest-benchmark's timer is ``gpu_cases.EventClock``: CUDA events at the round's start and end,
a short delay kernel before the start so the host's cost of the first call is not timed.  A
round's time / CALLS_PER_ROUND is then the GPU's time per call with its queue full, as in a
training loop; where the host cannot keep up (small inputs), the gaps count.
"""
from __future__ import annotations

import itertools
import os

import gpu_cases
import pytest

SETTINGS = gpu_cases.Settings.from_env(os.environ)
try:
    DEVICE = gpu_cases.open_device(SETTINGS)
except gpu_cases.DeviceUnavailable as e:
    pytest.skip(f"{e} (CUPYBN_GPU_BENCH_DEVICE=host runs these benchmarks on NumPy)", allow_module_level=True)
CASES = gpu_cases.selected_cases(SETTINGS)


class Slot:
    """One value at a time: asking for another key drops the held value (and its dependents')
    and hands the memory back to the device before building the new one."""

    def __init__(self, *dependents: Slot):
        self.dependents = dependents
        self.key: object = None
        self.value: object = None

    def get(self, key, build):
        if key != self.key:
            self.clear()
            self.value, self.key = build(), key
        return self.value

    def clear(self) -> None:
        for slot in self.dependents:
            slot.clear()
        self.key = self.value = None
        DEVICE.release()


REFERENCE = Slot()          # the float64 output of the current case and mode
RESIDUALS = Slot()          # the current epilogue case's residuals
DATA = Slot(REFERENCE, RESIDUALS)  # the current case's inputs, or the copy's buffers


@pytest.fixture(autouse=True)
def _release_after_each_benchmark():
    yield
    DEVICE.release()  # what one library's allocator caches is then free for the other's next benchmark


def _marks(group: str):
    # no garbage collection inside a round: a pause there would leave the GPU's queue empty
    return pytest.mark.benchmark(group=group, timer=DEVICE.clock, disable_gc=True)


def _time(benchmark, call) -> None:
    DEVICE.before_timing()
    benchmark.extra_info.update(clock=DEVICE.clock_name, calls_per_round=gpu_cases.CALLS_PER_ROUND,
                                device=DEVICE.kind)
    benchmark.pedantic(call, rounds=SETTINGS.repeat, warmup_rounds=SETTINGS.warmup,
                       iterations=gpu_cases.CALLS_PER_ROUND)


def _rotating(fn, inputs):
    """``fn`` on the next input at each call."""
    turn = itertools.cycle(inputs)
    return lambda: fn(next(turn))


@pytest.mark.parametrize("method", [pytest.param(m, marks=_marks("gpu-copy")) for m in DEVICE.copies])
def test_copy(benchmark, method):
    nbytes = SETTINGS.copy_mib * gpu_cases.MIB
    benchmark.extra_info.update(kind="copy", method=method, nbytes=nbytes)
    src, dst = DATA.get(("copy", nbytes), lambda: gpu_cases.make_copy_buffers(DEVICE.xp, nbytes))
    copy = DEVICE.copies[method]
    _time(benchmark, lambda: copy(dst, src))


def _reference(build):
    try:
        return build()
    except Exception:  # it needs ~10x x's memory in float64: without it the error is unknown, not fatal
        return None


def _benchmark_case(benchmark, kind, case, mode, impl, passes, make_target, make_reference):
    """Time ``impl`` on ``case`` in ``mode``: ``make_target(data, inputs)`` gives its Target and
    ``make_reference(data, inputs)`` the float64 main output its first call is checked against."""
    inputs = gpu_cases.rotation_count(case.nbytes, DEVICE.l2_bytes)
    # recorded first: a benchmark that fails below is still reported with its case
    benchmark.extra_info.update(kind=kind, case=case.name, shape=list(case.shape), layout=case.layout,
                                dtype=case.dtype, mode=mode, impl=impl, nbytes=case.nbytes, inputs=inputs,
                                passes=passes, max_err=None)
    if impl == "torch" and DEVICE.torch is None:
        pytest.skip(DEVICE.torch_unavailable)
    data = DATA.get(case.name, lambda: gpu_cases.make_case_data(DEVICE.xp, case, inputs))
    reference = REFERENCE.get((case.name, mode), lambda: _reference(lambda: make_reference(data, inputs)))
    target = make_target(data, inputs)
    first = target.output(target.fn(target.inputs[0]))  # also the first warm-up call
    if reference is not None:
        benchmark.extra_info["max_err"] = gpu_cases.max_rel_err(DEVICE.xp, first, reference)
    del first
    _time(benchmark, _rotating(target.fn, target.inputs))


@pytest.mark.parametrize(("case", "mode", "impl"), [
    pytest.param(case, mode, impl, id=f"{case.name}-{mode}-{impl}", marks=_marks(f"gpu-{case.name}-{mode}"))
    for case in CASES for mode in gpu_cases.MODES for impl in gpu_cases.IMPLEMENTATIONS
])
def test_gpu_batch_norm(benchmark, case, mode, impl):
    _benchmark_case(benchmark, "batch-norm", case, mode, impl, gpu_cases.PASSES[mode],
                    lambda data, _: DEVICE.target(impl, mode, data),
                    lambda data, _: gpu_cases.reference_output(DEVICE.xp, mode, data))


# ---- the fused epilogue: relu(BN(x) + z) ----------------------------------------------------------
EPILOGUE_CASES = gpu_cases.epilogue_cases(CASES) if SETTINGS.epilogue else []


@pytest.mark.parametrize(("case", "mode", "impl"), [
    pytest.param(case, mode, impl, id=f"{case.name}-{mode}-{impl}", marks=_marks(f"gpu-epilogue-{case.name}-{mode}"))
    for case in EPILOGUE_CASES for mode in gpu_cases.EPILOGUE_MODES for impl in gpu_cases.EPILOGUE_IMPLEMENTATIONS
])
def test_gpu_epilogue(benchmark, case, mode, impl):
    def residuals(inputs):
        return RESIDUALS.get(case.name, lambda: gpu_cases.make_residuals(DEVICE.xp, case, inputs))

    _benchmark_case(benchmark, "epilogue", case, mode, impl, gpu_cases.EPILOGUE_PASSES[mode],
                    lambda data, inputs: gpu_cases.epilogue_target(DEVICE.torch, DEVICE.xp, impl, mode, data,
                                                                   residuals(inputs)),
                    lambda data, inputs: gpu_cases.reference_epilogue_output(DEVICE.xp, mode, data,
                                                                             residuals(inputs)[0]))
