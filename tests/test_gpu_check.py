"""``python -m cupybn gpu-check`` and the GPU benchmarks it drives, without a GPU.

The benchmarks (``benchmarks/bench_gpu.py``, their cases in ``benchmarks/gpu_cases.py``,
imported here by path) run on NumPy arrays with a wall-clock timer when
CUPYBN_GPU_BENCH_DEVICE=host, so the whole command runs here end to end: the case
list, the implementations against float64, the records each benchmark appends, the
roofline arithmetic, the targets, the tables and the JSON report.  The CUDA-event
clock is checked with fake events.  Only the real events, the delay kernel and
``probe_gpu`` need the GPU.
"""
from __future__ import annotations

import functools
import importlib.util
import io
import json
import math
import os
import subprocess
import sys
import time
import types

import numpy as np
import pytest

from cupybn import _gpu_check as gc
from cupybn import _textbook as textbook

gcases = gc.load_gpu_cases()  # benchmarks/gpu_cases.py of this checkout
ROOT = gc.benchmarks_dir().parent

# What torchvision's ResNet-50 feeds its BatchNorm layers at batch 256 and 224x224
# (written out by hand from the architecture: stem, then the four stages).
RESNET50_SHAPES = [
    (256, 64, 112, 112),
    (256, 64, 56, 56), (256, 256, 56, 56),
    (256, 128, 56, 56), (256, 128, 28, 28), (256, 512, 28, 28),
    (256, 256, 28, 28), (256, 256, 14, 14), (256, 1024, 14, 14),
    (256, 512, 14, 14), (256, 512, 7, 7), (256, 2048, 7, 7),
]
HOST = {"CUPYBN_GPU_BENCH_DEVICE": "host", "CUPYBN_GPU_BENCH_SCALE": "2,16"}
TINY_CASES = ["2x64x8x8-nchw-f32", "2x256x4x4-nhwc-f16"]  # at HOST's scale


@pytest.fixture(autouse=True)
def _no_benchmark_settings_from_outside(monkeypatch):
    for name in list(os.environ):
        if name.startswith("CUPYBN_GPU_BENCH_"):
            monkeypatch.delenv(name)


def settings(**env):
    return gcases.Settings.from_env({f"CUPYBN_GPU_BENCH_{k.upper()}": v for k, v in env.items()})


SMALL_CASES = [gcases.Case((6, 3, 4, 5), "nchw", "float32"), gcases.Case((6, 3, 4, 5), "nhwc", "float16"),
               gcases.Case((40, 7), "2d", "float32")]


def measurement(case="c", mode="forward-train", impl="cupybn", nbytes=100 * gc.MIB, median=1.0, share=0.5,
                error=None):
    return gc.Measurement(case, (1, 1), "nchw", "float32", mode, impl, nbytes, 2,
                          median_us=None if error else median, roofline_share=None if error else share,
                          error=error)


def record(kind="batch-norm", outcome="passed", median=10.0, **info):
    """A line as benchmarks/conftest.py writes it."""
    base = ({"method": "copyto", "nbytes": 10**9} if kind == "copy" else
            {"case": "c", "shape": [1000, 250], "layout": "2d", "dtype": "float32", "mode": "inference",
             "impl": "cupybn", "nbytes": 10**6, "inputs": 4, "passes": 2, "max_err": 1e-7})
    r = {"test": "t", "outcome": outcome, "extra_info": {"kind": kind, **base, **info}}
    if outcome == "passed":
        r.update(median_us=median, min_us=median / 2, iqr_us=1.0, rounds=3, iterations=10)
    return r


# ---- cases ---------------------------------------------------------------------------
def test_resnet50_bn_shapes_are_the_twelve_of_the_network():
    assert gcases.resnet50_bn_shapes() == RESNET50_SHAPES


def test_resnet50_bn_shapes_match_torchvision():
    torch = pytest.importorskip("torch")
    models = pytest.importorskip("torchvision.models")
    seen = []
    with torch.device("meta"):  # shapes only: no memory, no arithmetic
        net = models.resnet50()
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.register_forward_pre_hook(lambda _, args: seen.append(tuple(args[0].shape)))
        net(torch.empty(256, 3, 224, 224))
    assert gcases.resnet50_bn_shapes() == list(dict.fromkeys(seen))


def test_case_list_has_every_resnet50_shape_in_both_layouts_and_dtypes_and_the_rows_case():
    cases = gcases.all_cases()
    have = {(c.shape, c.layout, c.dtype) for c in cases}
    for shape in RESNET50_SHAPES:
        for layout in ("nchw", "nhwc"):
            for dtype in ("float16", "float32"):
                assert (shape, layout, dtype) in have
    assert ((8192, 4096), "2d", "float16") in have and ((8192, 4096), "2d", "float32") in have
    assert len(cases) == len(have) == 12 * 4 + 2
    assert len({c.name for c in cases}) == len(cases)
    assert gcases.selected_cases(settings()) == cases


def test_case_names_and_sizes():
    case = gcases.Case((256, 64, 56, 56), "nhwc", "float16")
    assert case.name == "256x64x56x56-nhwc-f16"
    assert case.nbytes == 256 * 64 * 56 * 56 * 2
    assert case.channels == 64
    assert gcases.Case((8192, 4096), "2d", "float32").nbytes == 8192 * 4096 * 4


def test_quick_is_three_float32_nchw_shapes_of_the_full_list():
    quick = gcases.quick_cases()
    assert [c.shape for c in quick] == [(256, 64, 112, 112), (256, 1024, 14, 14), (256, 2048, 7, 7)]
    assert all(c.dtype == "float32" and c.layout == "nchw" for c in quick)
    assert set(quick) <= set(gcases.all_cases())
    assert gcases.selected_cases(settings(set="quick")) == quick


def test_cases_filter_by_substring():
    cases = gcases.all_cases()
    assert gcases.select_cases(cases, ()) == cases
    picked = gcases.select_cases(cases, ["7x7-nhwc", "2d-f16"])
    assert {c.name for c in picked} == {"256x512x7x7-nhwc-f32", "256x512x7x7-nhwc-f16", "256x2048x7x7-nhwc-f32",
                                        "256x2048x7x7-nhwc-f16", "8192x4096-2d-f16"}
    assert gcases.select_cases(cases, ["no-such-case"]) == []
    assert gcases.selected_cases(settings(cases="7x7-nhwc, 2d-f16")) == picked


def test_the_scale_shrinks_every_case_and_the_names_follow_the_shapes():
    small = gcases.selected_cases(settings(scale="2,16"))
    assert all(c.shape[0] == 2 for c in small[:-2])
    assert small[0].name == "2x64x8x8-nchw-f32"
    assert [c.shape for c in small[-2:]] == [(64, 292), (64, 292)]  # 8192 * 2/256 rows, 4096 * 16/224 features
    assert set(TINY_CASES) <= {c.name for c in small}
    assert gcases.rows_shape() == (8192, 4096)


def test_settings_from_the_environment():
    s = settings()
    assert (s.case_set, s.patterns, s.device, s.batch, s.image) == ("full", (), "cuda", 256, 224)
    assert (s.repeat, s.warmup, s.copy_mib) == (gcases.DEFAULT_REPEAT, gcases.DEFAULT_WARMUP, 1024)
    assert settings(set="quick").repeat == gcases.QUICK_REPEAT
    host = settings(device="host", repeat="3", warmup="0")
    assert (host.device, host.repeat, host.warmup, host.copy_mib) == ("host", 3, 0, gcases.HOST_COPY_MIB)
    assert settings(copy_mib="64").copy_mib == 64
    assert s.epilogue and not settings(epilogue="0").epilogue
    for bad in ({"set": "most"}, {"device": "tpu"}, {"repeat": "0"}, {"warmup": "-1"}, {"repeat": "many"},
                {"scale": "2"}, {"scale": "0,16"}, {"copy_mib": "0"}, {"epilogue": "yes"}):
        name = "CUPYBN_GPU_BENCH_" + next(iter(bad)).upper()
        with pytest.raises(ValueError, match=name):
            settings(**bad)


def test_the_epilogue_is_timed_on_the_largest_case_of_each_layout_and_dtype():
    cases = gcases.all_cases()
    chosen = gcases.epilogue_cases(cases)
    assert len(chosen) == len({(c.layout, c.dtype) for c in cases}) == 6
    for c in chosen:
        assert c.nbytes == max(o.nbytes for o in cases if (o.layout, o.dtype) == (c.layout, c.dtype))
    assert gcases.epilogue_cases(gcases.quick_cases()) == [gcases.quick_cases()[0]]


def test_rotated_inputs_cover_the_l2_cache_several_times():
    l2 = 50 * gcases.MIB
    for case in gcases.all_cases():
        n = gcases.rotation_count(case.nbytes, l2)
        assert n >= 2
        assert n * case.nbytes >= gcases.ROTATION_COVER * l2 or n == gcases.MAX_ROTATION
    assert gcases.rotation_count(12_845_056, l2) == math.ceil(3 * l2 / 12_845_056)  # the smallest f16 case
    assert gcases.rotation_count(10**9, l2) == 2
    assert gcases.rotation_count(1000, 0) == 2  # the host: no cache to beat


# ---- roofline arithmetic -------------------------------------------------------------
def test_passes_per_mode_and_the_targets_cover_every_mode():
    assert gcases.PASSES == {"forward-train": 3, "inference": 2, "backward": 5}
    assert gc.MODES == gcases.MODES == tuple(gcases.PASSES)


def test_copy_bandwidth_counts_read_and_write():
    assert gc.copy_gbps(10**9, 1000.0) == pytest.approx(2000.0)  # 1 GB copied in 1 ms: 2 TB/s


def test_effective_bandwidth_and_roofline_share():
    nbytes, copy_us = 10**9, 1000.0
    roof = gc.copy_gbps(nbytes, copy_us)
    for mode, passes in gcases.PASSES.items():
        # a mode that moves exactly its passes at the copy's speed sits on the roofline
        at_roof = passes / 2 * copy_us
        assert gc.effective_gbps(passes, nbytes, at_roof) == pytest.approx(roof)
        for time_us, share in ((at_roof, 1.0), (2 * at_roof, 0.5)):
            r = record(mode=mode, passes=passes, nbytes=nbytes, median=time_us)
            assert gc.measurement_from_record(r, roof).roofline_share == pytest.approx(share)
    assert gc.effective_gbps(5, 10**9, 5000.0) == pytest.approx(1000.0)


def test_a_record_becomes_a_measurement():
    m = gc.measurement_from_record(record(median=2.0), 1000.0)  # 1 MB, inference: 2 passes
    assert (m.case, m.shape, m.mode, m.implementation, m.inputs) == ("c", (1000, 250), "inference", "cupybn", 4)
    assert (m.median_us, m.min_us, m.iqr_us, m.max_err) == (2.0, 1.0, 1.0, 1e-7)
    assert m.gbps == pytest.approx(2 * 10**6 / 2.0 / 1e3)
    assert m.roofline_share == pytest.approx(1.0)
    assert m.ok
    bad = gc.measurement_from_record({**record(outcome="failed"), "error": "RuntimeError: out of memory"}, 1000.0)
    assert not bad.ok and bad.error == "RuntimeError: out of memory" and bad.median_us is None
    assert gc.measurement_from_record(record(), None).roofline_share is None  # no copy timed


def test_the_roofline_is_the_fastest_copy_and_skipped_implementations_are_unavailable():
    results = gc.BenchmarkResults([record("copy", median=1000.0), record("copy", method="memcpy", median=800.0),
                                   record(), {**record(impl="torch", outcome="skipped"), "skipped": "no torch"}])
    assert results.copy["method"] == "memcpy" and results.copy["gbps"] == pytest.approx(2500.0)
    assert results.copy["methods"]["copyto"]["gbps"] == pytest.approx(2000.0)
    assert [m.implementation for m in results.measurements] == ["cupybn"]
    assert results.measurements[0].roofline_share == pytest.approx(200.0 / 2500.0)
    assert results.unavailable == {"torch": "no torch"}
    assert gc.BenchmarkResults([record("copy", outcome="failed")]).copy is None


def test_records_are_read_as_they_land(tmp_path):
    path = tmp_path / "records.jsonl"
    source = gc.RecordFile(path)
    assert source.new_records() == []  # nothing written yet
    path.write_text(json.dumps(record()) + "\n" + '{"test": "half a li')
    assert [r["test"] for r in source.new_records()] == ["t"]
    with open(path, "a") as f:
        f.write('ne", "outcome": "passed", "extra_info": {}}\n')
    assert source.new_records() == [{"test": "half a line", "outcome": "passed", "extra_info": {}}]
    assert source.new_records() == []


# ---- the CUDA-event clock, with fake events ----------------------------------------------
class FakeGpu:
    """A stream's clock in ms: the delay kernel and every call advance it when "executed"."""

    def __init__(self):
        self.now = 0.0
        self.log = []

    def event(self):
        gpu = self

        class Event:
            def record(self):
                self.at = gpu.now
                gpu.log.append("record")

            def synchronize(self):
                gpu.log.append(("synchronize", self.at))

        return Event()

    def delay(self):
        self.log.append("delay")
        self.now += 0.1

    def clock(self):
        return gcases.EventClock(self.event, lambda start, end: end.at - start.at, self.delay)


def test_the_event_clock_delays_the_start_waits_only_for_the_end_and_gives_seconds():
    gpu = FakeGpu()
    clock = gpu.clock()
    start = clock()
    assert gpu.log == ["delay", "record"]  # the delay is queued before the start event, and nothing waits
    gpu.now += 3.0  # the round's calls
    end = clock()
    assert gpu.log == ["delay", "record", "record"]  # no delay before the end event
    assert end - start == pytest.approx(3e-3)  # ms on the GPU, seconds for pytest-benchmark
    assert gpu.log[-1] == ("synchronize", end.event.at)  # waits for the end event only
    clock()
    assert gpu.log[-2:] == ["delay", "record"]  # the next round starts with the delay again
    clock.reset()  # a benchmark that raised mid-round left the clock expecting an end
    clock()
    assert gpu.log[-2:] == ["delay", "record"]


def test_the_event_clock_times_pytest_benchmark_rounds_per_call(tmp_path):
    # pytest-benchmark's own runner with the clock as a benchmark marker's timer, as bench_gpu.py uses it
    (tmp_path / "test_clock.py").write_text(
        f"import sys\nsys.path.insert(0, {str(ROOT / 'benchmarks')!r})\n"
        "import pytest\nimport gpu_cases\n"
        f"sys.path.insert(0, {str(ROOT / 'tests')!r})\nfrom test_gpu_check import FakeGpu\n"
        "gpu = FakeGpu()\nclock = gpu.clock()\n\n"
        "def call():\n    gpu.now += 2.0  # each call: 2 ms on the fake GPU\n\n"
        "@pytest.mark.benchmark(timer=clock)\n"
        "def test_fake_gpu(benchmark):\n"
        "    clock.reset()\n"
        "    benchmark.pedantic(call, rounds=4, warmup_rounds=1, iterations=5)\n"
        "    assert gpu.log.count('delay') == 5  # a delay per round, the warm-up round's too\n")
    out = tmp_path / "bench.json"
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--benchmark-only",
                             f"--benchmark-json={out}", str(tmp_path / "test_clock.py")], cwd=tmp_path,
                            env=dict(os.environ, PYTHONPATH=str(ROOT)), capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    bench = json.loads(out.read_text())["benchmarks"][0]
    assert bench["stats"]["iterations"] == 5 and bench["stats"]["rounds"] == 4
    # 5 calls of 2 ms a round, the delay before the start event not counted: 2 ms per call, every round
    assert bench["stats"]["min"] == pytest.approx(2e-3) and bench["stats"]["max"] == pytest.approx(2e-3)
    assert bench["options"]["timer"] == "cuda_event_clock"


def fake_cupy(log, stream=0, devices=1):
    """What cuda_device() uses of CuPy, logging the calls."""
    class Event:
        def record(self):
            log.append("record")

    ns = types.SimpleNamespace
    runtime = ns(getDeviceCount=lambda: devices, getDeviceProperties=lambda i: {"l2CacheSize": 50 * gc.MIB})
    return ns(cuda=ns(runtime=runtime, Device=lambda: ns(id=0, synchronize=lambda: log.append("synchronize")),
                      Event=Event, get_elapsed_time=lambda start, end: 1.5,
                      get_current_stream=lambda: ns(ptr=stream)),
              RawKernel=lambda source, name: lambda grid, block, args: log.append(("delay", name, grid, block, args)),
              copyto=np.copyto, get_default_memory_pool=lambda: ns(free_all_blocks=lambda: log.append("free")))


def test_the_cuda_device_compiles_the_delay_first_and_times_on_the_legacy_default_stream(monkeypatch):
    log = []
    monkeypatch.setitem(sys.modules, "torch", None)
    monkeypatch.setitem(sys.modules, "cupy", fake_cupy(log))
    device = gcases.open_device(settings())
    assert device.kind == "cuda" and device.l2_bytes == 50 * gc.MIB and list(device.copies) == ["copyto", "memcpy"]
    assert device.torch is None and "not importable" in device.torch_unavailable
    # the delay kernel: one thread, 100 µs in ns, compiled and run once before any benchmark
    assert log == [("delay", "gpu_bench_delay", (1,), (1,), (np.uint64(gcases.DELAY_US * 1000),)), "synchronize"]
    device.clock()  # a round's start, and its benchmark raised before the end
    device.before_timing()
    log.clear()
    device.clock()
    assert [e if isinstance(e, str) else e[0] for e in log] == ["delay", "record"]  # the next starts afresh
    device.release()
    assert log[-2:] == ["synchronize", "free"]
    monkeypatch.setitem(sys.modules, "cupy", fake_cupy(log, stream=2))  # e.g. CuPy's per-thread default stream
    with pytest.raises(RuntimeError, match="legacy default stream"):
        gcases.open_device(settings()).before_timing()
    monkeypatch.setitem(sys.modules, "cupy", fake_cupy(log, devices=0))
    with pytest.raises(gcases.DeviceUnavailable, match="no NVIDIA GPU"):
        gcases.open_device(settings())


# ---- implementations on NumPy ------------------------------------------------------------
@functools.cache
def host_device():
    return gcases.host_device()  # imports torch where it is installed: only when a test needs it


def test_case_data_layout_dtype_and_distinct_inputs():
    data = gcases.make_case_data(np, gcases.Case((4, 3, 5, 6), "nhwc", "float16"), 3)
    assert len(data.xs) == len(data.dys) == 3
    x = data.xs[0]
    assert x.shape == (4, 3, 5, 6) and x.dtype == np.float16
    assert x.strides[1] == 2 and x.transpose(0, 2, 3, 1).flags.c_contiguous  # channels-last
    assert not np.array_equal(data.xs[0], data.xs[1])
    assert data.gamma.dtype == data.running_var.dtype == np.float32
    assert (data.running_var > 0).all()
    nchw = gcases.make_case_data(np, gcases.Case((4, 3, 5, 6), "nchw", "float32"), 2)
    assert nchw.xs[0].flags.c_contiguous


@pytest.mark.parametrize("mode", gcases.MODES)
@pytest.mark.parametrize("case", SMALL_CASES, ids=lambda c: c.name)
def test_every_implementation_matches_the_float64_reference(mode, case):
    impls = ["cupybn", "textbook"] + (["torch"] if host_device().torch and case.dtype == "float32" else [])
    data = gcases.make_case_data(np, case, 2)
    ref = gcases.reference_output(np, mode, data)
    tol = 1e-5 if case.dtype == "float32" else 3e-3
    for impl in impls:
        target = host_device().target(impl, mode, data)
        assert len(target.inputs) == 2
        out = target.output(target.fn(target.inputs[1]))
        assert out.shape == case.shape
        assert gcases.max_rel_err(np, target.output(target.fn(target.inputs[0])), ref) < tol, impl
        assert gcases.max_rel_err(np, out, ref) > tol  # the second input is another array


def test_max_rel_err_is_relative_above_one_and_absolute_below():
    ref = np.array([0.5, -4.0, 100.0, 0.0])
    value = np.array([0.25, -4.0, 99.0, 0.0], dtype=np.float32)
    assert gcases.max_rel_err(np, value, ref) == pytest.approx(0.25)  # |0.25 - 0.5| / 1 beats 1 / 100
    assert gcases.max_rel_err(np, value[1:], ref[1:]) == pytest.approx(0.01)


def test_reference_is_the_textbook_in_float64():
    data = gcases.make_case_data(np, gcases.Case((8, 3, 4, 4), "nchw", "float32"), 1)
    x = data.xs[0].astype(np.float64)
    y = gcases.reference_output(np, "forward-train", data)
    mean = x.mean(axis=(0, 2, 3), keepdims=True)
    var = x.var(axis=(0, 2, 3), keepdims=True)
    expect = (x - mean) / np.sqrt(var + gcases.EPS) * data.gamma.reshape(1, 3, 1, 1) + data.beta.reshape(1, 3, 1, 1)
    np.testing.assert_allclose(y, expect, rtol=1e-12, atol=1e-12)


def test_textbook_backward_is_the_gradient():
    rng = np.random.default_rng(1)
    x, dy = rng.standard_normal((5, 2, 3)), rng.standard_normal((5, 2, 3))
    gamma, beta = rng.standard_normal(2), rng.standard_normal(2)
    _, cache = textbook.forward_train(x, gamma, beta)
    dx, dgamma, dbeta = textbook.backward(dy, cache)

    def loss(x):
        return float((textbook.forward_train(x, gamma, beta)[0] * dy).sum())

    h, numeric = 1e-6, np.zeros_like(x)
    for i in np.ndindex(x.shape):
        e = np.zeros_like(x)
        e[i] = h
        numeric[i] = (loss(x + e) - loss(x - e)) / (2 * h)
    np.testing.assert_allclose(dx, numeric, atol=1e-6)
    np.testing.assert_allclose(dbeta, dy.sum(axis=(0, 2)))
    xhat = (x - x.mean(axis=(0, 2), keepdims=True)) / np.sqrt(x.var(axis=(0, 2), keepdims=True) + gcases.EPS)
    np.testing.assert_allclose(dgamma, (dy * xhat).sum(axis=(0, 2)))


def test_textbook_updates_running_statistics_with_the_unbiased_variance():
    x = np.arange(12, dtype=np.float64).reshape(6, 2)
    rm, rv = np.zeros(2), np.ones(2)
    textbook.forward_train(x, np.ones(2), np.zeros(2), running_mean=rm, running_var=rv, momentum=0.5)
    np.testing.assert_allclose(rm, 0.5 * x.mean(axis=0))
    np.testing.assert_allclose(rv, 0.5 + 0.5 * x.var(axis=0, ddof=1))


def test_torch_gets_the_same_memory_in_channels_last_format():
    torch = pytest.importorskip("torch")
    data = gcases.make_case_data(np, gcases.Case((4, 3, 5, 6), "nhwc", "float32"), 2)
    target = gcases.torch_target(torch, np, "forward-train", data)
    t = target.inputs[0]
    assert t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()
    assert t.data_ptr() == data.xs[0].ctypes.data  # no copy
    y = target.fn(t)
    assert y.is_contiguous(memory_format=torch.channels_last)


def test_torch_backward_times_the_backward_alone():
    torch = pytest.importorskip("torch")
    data = gcases.make_case_data(np, gcases.Case((4, 3, 5), "nchw", "float32"), 2)
    target = gcases.torch_target(torch, np, "backward", data)
    calls = []
    real = torch.nn.functional.batch_norm
    torch.nn.functional.batch_norm = lambda *a, **k: calls.append(1) or real(*a, **k)
    try:
        dx = target.output(target.fn(target.inputs[0]))
        target.fn(target.inputs[1])
    finally:
        torch.nn.functional.batch_norm = real
    assert calls == []  # the forward ran once, when the graphs were built
    assert gcases.max_rel_err(np, dx, gcases.reference_output(np, "backward", data)) < 1e-5


# ---- targets ------------------------------------------------------------------------------
def test_roofline_targets_judge_large_inputs_only():
    rows = [measurement("big1", share=0.85), measurement("big2", share=0.81),
            measurement("small", nbytes=gc.MIB, share=0.10),
            measurement("big1", impl="torch", share=0.10)]
    t = next(t for t in gc.evaluate_targets(rows) if t["name"] == "forward-train-roofline")
    assert t["met"] is True and (t["cases_met"], t["cases"]) == (2, 2)
    assert t["value"] == pytest.approx(0.81) and t["worst_case"] == "big2"

    rows.append(measurement("big3", share=0.79))
    t = next(t for t in gc.evaluate_targets(rows) if t["name"] == "forward-train-roofline")
    assert t["met"] is False and (t["cases_met"], t["cases"]) == (2, 3) and t["worst_case"] == "big3"


def test_inference_target_is_ninety_percent():
    rows = [measurement("big", mode="inference", share=0.89)]
    t = next(t for t in gc.evaluate_targets(rows) if t["name"] == "inference-roofline")
    assert t["threshold"] == 0.9 and t["met"] is False
    rows = [measurement("big", mode="inference", share=0.91)]
    assert next(t for t in gc.evaluate_targets(rows) if t["name"] == "inference-roofline")["met"] is True


def test_a_failed_large_case_misses_the_target_and_no_data_is_not_measured():
    rows = [measurement("big1", share=0.95), measurement("big2", error="NotImplementedError: no backend")]
    t = next(t for t in gc.evaluate_targets(rows) if t["name"] == "forward-train-roofline")
    assert t["met"] is False and "failed" in t["note"]
    only_failed = [measurement("big2", error="NotImplementedError: no backend")]
    t = next(t for t in gc.evaluate_targets(only_failed) if t["name"] == "forward-train-roofline")
    assert t["met"] is None and "failed on all" in t["note"]
    no_roofline = [measurement("big1", share=None)]
    t = next(t for t in gc.evaluate_targets(no_roofline) if t["name"] == "forward-train-roofline")
    assert t["met"] is None and t["note"] == "not measured"
    assert all(t["met"] is None for t in gc.evaluate_targets([]))


def test_torch_target_uses_the_median_ratio():
    rows = []
    for case, mine, theirs in [("a", 1.0, 2.0), ("b", 1.0, 1.5), ("c", 3.0, 1.0)]:  # ratios 0.5, 0.67, 3
        rows += [measurement(case, mode="backward", median=mine), measurement(case, mode="backward", impl="torch",
                                                                            median=theirs)]
    t = next(t for t in gc.evaluate_targets(rows) if t["name"] == "backward-vs-torch")
    assert t["met"] is True and t["value"] == pytest.approx(1 / 1.5) and t["cases_met"] == 2
    rows.append(measurement("d", mode="backward", median=5.0))
    rows.append(measurement("d", mode="backward", impl="torch", median=1.0))
    rows.append(measurement("e", mode="backward", median=5.0))
    rows.append(measurement("e", mode="backward", impl="torch", median=1.0))
    t = next(t for t in gc.evaluate_targets(rows) if t["name"] == "backward-vs-torch")
    assert t["met"] is False and t["value"] == pytest.approx(3.0) and t["cases"] == 5
    no_torch = [measurement("a", mode="backward")]
    assert next(t for t in gc.evaluate_targets(no_torch) if t["name"] == "backward-vs-torch")["met"] is None


def test_ratio_is_cupybn_over_the_other():
    rows = [measurement("a", median=2.0), measurement("a", impl="textbook", median=8.0),
            measurement("a", impl="torch", error="boom")]
    assert gc.ratio(rows, "a", "forward-train", "textbook") == pytest.approx(0.25)
    assert gc.ratio(rows, "a", "forward-train", "torch") is None


def test_exit_status_needs_passing_tests_clean_sanitizers_and_every_benchmark():
    ran, passed, failed = gc.TestRun(ran=False), gc.TestRun(ran=True, exit_status=0), gc.TestRun(ran=True,
                                                                                                  exit_status=1)
    ok = [measurement()]
    assert gc.exit_status(ran, [], passed, ok) == 0
    assert gc.exit_status(failed, [], passed, ok) == 1
    assert gc.exit_status(ran, [], failed, ok) == 1  # e.g. a benchmark module that did not import
    assert gc.exit_status(ran, [], gc.TestRun(ran=True, exit_status=None), ok) == 1  # timed out
    assert gc.exit_status(ran, [], ran, []) == 1  # not a checkout: nothing benchmarked
    assert gc.exit_status(ran, [], passed, []) == 1
    assert gc.exit_status(ran, [], passed, ok + [measurement(error="ValueError: x")]) == 1


# ---- pytest runs: the test step and the benchmark step ----------------------------------------
def test_parse_pytest_counts():
    assert gc.parse_pytest_counts("x\n1 failed, 510 passed in 80.71s (0:01:20)\n") == {"failed": 1, "passed": 510}
    text = "....\n===== 3 passed, 2 skipped, 1 error, 4 warnings in 1.20s =====\n"
    assert gc.parse_pytest_counts(text) == {"passed": 3, "skipped": 2, "errors": 1, "warnings": 4}
    assert gc.parse_pytest_counts("5 passed, 2 xfailed, 3 deselected in 0.5s") == {
        "passed": 5, "xfailed": 2, "deselected": 3}
    assert gc.parse_pytest_counts("no tests ran in 0.01s") == {}
    assert gc.parse_pytest_counts("ImportError: No module named pytest") == {}


def test_run_tests_requires_gpu_tests_and_records_the_outcome(tmp_path):
    script = ("import os\nprint('CUPYBN_REQUIRE_GPU=' + os.environ['CUPYBN_REQUIRE_GPU'] + ' ' + os.environ['X'])\n"
              "print('2 failed, 5 passed, 1 skipped in 0.10s')\nraise SystemExit(1)\n")
    out = io.StringIO()
    result = gc.run_tests([sys.executable, "-c", script], tmp_path, out, env={"X": "extra"})
    assert "CUPYBN_REQUIRE_GPU=1 extra" in out.getvalue()  # echoed as it ran
    assert result.exit_status == 1 and not result.passed
    assert result.counts == {"failed": 2, "passed": 5, "skipped": 1}
    ok = gc.run_tests([sys.executable, "-c", "print('7 passed in 0.01s')"], tmp_path, io.StringIO())
    assert ok.passed and ok.exit_status == 0 and ok.counts == {"passed": 7}
    assert gc.TestRun(ran=False).passed


def test_output_reaches_the_caller_before_the_line_ends(tmp_path):
    # pytest -q prints a progress letter per test and a newline only every 80 or so
    script = "import sys, time\nsys.stdout.write('.')\nsys.stdout.flush()\ntime.sleep(60)\n"
    seen = []

    def on_output():
        seen.append(out.getvalue())
        raise KeyboardInterrupt  # stops waiting: the letter came before the line's end

    out = io.StringIO()
    started = time.perf_counter()
    with pytest.raises(KeyboardInterrupt):
        gc.run_tests([sys.executable, "-c", script], tmp_path, out, timeout_s=10, on_output=on_output)
    assert seen == ["."] and time.perf_counter() - started < 5  # not when the time-out ends the line


def test_a_hanging_test_suite_is_killed(tmp_path):
    result = gc.run_tests([sys.executable, "-c", "import time; time.sleep(60)"], tmp_path, io.StringIO(),
                          timeout_s=0.5)
    assert result.exit_status is None and not result.passed and "killed" in result.note
    assert result.seconds < 30


def test_pytest_command_takes_extra_arguments():
    assert gc.pytest_command()[:7] == [sys.executable, "-m", "pytest", "-q", "tests", "-k", gc.GPU_TESTS]
    assert gc.pytest_command("-n 8 -k 'a or b'")[-3:] == ["8", "-k", "a or b"]
    assert gc.build_parser().parse_args(["--pytest-args=-n 8"]).pytest_args == "-n 8"


def test_the_test_step_selects_the_gpu_tests_only():
    # A slot is too short for the host harness and its sanitizer builds: CI runs those.
    command = gc.pytest_command("--collect-only")
    listed = subprocess.run(command, cwd=gc.tests_dir().parent, capture_output=True, text=True, check=False).stdout
    ids = [line for line in listed.splitlines() if "::" in line]
    # the GPU tests: test_cupy_gpu.py, the cupy-gpu backend of every property, and tests named *_cupy_gpu
    assert ids and all("cupy-gpu" in i or "cupy_gpu" in i for i in ids), ids[:5]
    assert any("test_cupy_gpu.py" in i for i in ids) and any("[cupy-gpu" in i or "-cupy-gpu" in i for i in ids)
    assert any("test_distributed_nccl.py" in i for i in ids)  # NCCL, a world of one GPU


def _wait_until_gone(pid):
    for _ in range(50):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.1)
    return False


def _sleeper_with_a_child(marker):
    return (f"import subprocess, sys, time\n"
            f"child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
            f"open({str(marker)!r}, 'w').write(str(child.pid))\n"
            f"print('started', flush=True)\n"
            f"time.sleep(60)\n")


def test_a_timed_out_suite_is_killed_with_every_process_it_started(tmp_path):
    marker = tmp_path / "child.pid"
    result = gc.run_tests([sys.executable, "-c", _sleeper_with_a_child(marker)], tmp_path, io.StringIO(), timeout_s=3)
    assert result.exit_status is None and "killed" in result.note
    assert _wait_until_gone(int(marker.read_text())), "the suite's child process survived the time-out"


def test_an_interrupted_run_is_killed_with_every_process_it_started(tmp_path):
    marker = tmp_path / "child.pid"

    def interrupt():
        raise KeyboardInterrupt  # what gpu-check sees when its own slot ends

    with pytest.raises(KeyboardInterrupt):
        gc.run_tests([sys.executable, "-c", _sleeper_with_a_child(marker)], tmp_path, io.StringIO(), timeout_s=30,
                     on_output=interrupt)
    assert _wait_until_gone(int(marker.read_text())), "the run's child process survived the interrupt"


def _fake_sanitizer(tmp_path, exit_status):
    script = tmp_path / f"compute-sanitizer-{exit_status}"
    script.write_text(f"#!/bin/sh\necho \"sanitizer $2 on $6 $7\"\nexit {exit_status}\n")
    script.chmod(0o755)
    return str(script)


def test_compute_sanitizer_runs_memcheck_and_racecheck_on_the_smoke_calls(tmp_path):
    out = io.StringIO()
    clean = gc.run_sanitizers(out, executable=_fake_sanitizer(tmp_path, 0))
    assert [(r["tool"], r["clean"]) for r in clean] == [("memcheck", True), ("racecheck", True)]
    assert "sanitizer memcheck on -m cupybn._gpu_smoke" in out.getvalue()
    dirty = gc.run_sanitizers(io.StringIO(), executable=_fake_sanitizer(tmp_path, 1))
    assert not any(r["clean"] for r in dirty)
    passed = gc.TestRun(ran=True, exit_status=0)
    assert gc.exit_status(gc.TestRun(ran=False), dirty, passed, [measurement()]) == 1
    assert gc.exit_status(gc.TestRun(ran=False), clean, passed, [measurement()]) == 0
    missing = [{"tool": "memcheck", "ran": False, "note": "not on PATH"}]
    assert gc.exit_status(gc.TestRun(ran=False), missing, passed, [measurement()]) == 0


def test_tests_and_benchmarks_are_found_in_a_checkout():
    assert gc.tests_dir() is not None and (gc.tests_dir() / "test_gpu_check.py").is_file()
    assert (gc.benchmarks_dir() / "bench_gpu.py").is_file()
    assert gc.load_gpu_cases() is gcases


def test_the_benchmark_step_is_pytest_benchmark_on_bench_gpu_with_the_options_as_settings():
    command = gc.benchmark_command(gc.Path("out.json"))
    assert command[:5] == [sys.executable, "-m", "pytest", "benchmarks/bench_gpu.py", "--benchmark-only"]
    assert command[-2:] == ["--benchmark-json", "out.json"]
    args = gc.build_parser().parse_args(["--quick", "--cases", "7x7", "--cases", "2d", "--repeat", "3",
                                         "--warmup", "0", "--copy-mib", "16"])
    env = gc.benchmark_environment(args)
    assert env == {"CUPYBN_GPU_BENCH_SET": "quick", "CUPYBN_GPU_BENCH_CASES": "7x7,2d",
                   "CUPYBN_GPU_BENCH_REPEAT": "3", "CUPYBN_GPU_BENCH_WARMUP": "0", "CUPYBN_GPU_BENCH_COPY_MIB": "16"}
    s = gcases.Settings.from_env(env)
    assert (s.case_set, s.patterns, s.repeat, s.warmup, s.copy_mib) == ("quick", ("7x7", "2d"), 3, 0, 16)
    assert gc.benchmark_environment(gc.build_parser().parse_args([])) == {}


# ---- the benchmarks on their own ----------------------------------------------------------------
def _bench(tmp_path, env):
    out = tmp_path / "bench.json"
    command = [sys.executable, "-m", "pytest", "benchmarks/bench_gpu.py", "--benchmark-only", "-q", "-rs",
               "-p", "no:cacheprovider", f"--benchmark-json={out}"]
    result = subprocess.run(command, cwd=ROOT, env=dict(os.environ, **env), capture_output=True, text=True,
                            timeout=300)
    return result, out


def _without_torch(tmp_path):
    """PYTHONPATH under which ``import torch`` fails, installed or not."""
    (tmp_path / "no_torch").mkdir(exist_ok=True)
    (tmp_path / "no_torch" / "torch.py").write_text("raise ModuleNotFoundError('torch is hidden from this test')\n")
    return {"PYTHONPATH": str(tmp_path / "no_torch")}


def test_the_gpu_benchmarks_skip_cleanly_without_a_gpu(tmp_path):
    try:
        import cupy

        if cupy.cuda.runtime.getDeviceCount() > 0:
            pytest.skip("there is a GPU here")
    except Exception:
        pass
    result, _ = _bench(tmp_path, {})
    assert result.returncode in (0, 5), result.stdout + result.stderr
    assert "1 skipped" in result.stdout and "CUPYBN_GPU_BENCH_DEVICE=host" in result.stdout
    assert "CuPy is not importable" in result.stdout or "GPU" in result.stdout


def test_the_gpu_benchmarks_run_on_the_host_and_record_every_benchmark(tmp_path):
    records = tmp_path / "records.jsonl"
    result, out = _bench(tmp_path, {**HOST, "CUPYBN_GPU_BENCH_CASES": TINY_CASES[0], "CUPYBN_GPU_BENCH_REPEAT": "2",
                                    "CUPYBN_GPU_BENCH_RESULTS": str(records), **_without_torch(tmp_path)})
    assert result.returncode == 0, result.stdout + result.stderr
    benchmarks = json.loads(out.read_text())["benchmarks"]
    lines = [json.loads(line) for line in records.read_text().splitlines()]
    timed = [b["extra_info"]["impl"] for b in benchmarks if b["group"].startswith("gpu-2x64x8x8")]
    # case-major: every mode and implementation of the case, in order; torch skips, and says why
    assert timed == ["cupybn", "textbook"] * 3
    assert [b["group"] for b in benchmarks[:1]] == ["gpu-copy"]
    # then the fused epilogue on the case (the largest of its layout and dtype)
    assert [(r["extra_info"]["mode"], r["extra_info"]["impl"]) for r in lines[1:]] == [
        (m, i) for m in gcases.MODES for i in gcases.IMPLEMENTATIONS] + [
        (m, i) for m in gcases.EPILOGUE_MODES for i in gcases.EPILOGUE_IMPLEMENTATIONS]
    for b, r in zip(benchmarks, (r for r in lines if r["outcome"] == "passed"), strict=True):
        assert b["stats"]["iterations"] == r["iterations"] == gcases.CALLS_PER_ROUND
        assert b["stats"]["rounds"] == r["rounds"] == 2
        assert r["median_us"] == pytest.approx(b["stats"]["median"] * 1e6)
        assert r["extra_info"] == b["extra_info"] and r["extra_info"]["clock"] == "perf_counter"
    skipped = [r for r in lines if r["outcome"] == "skipped"]
    assert [r["extra_info"]["impl"] for r in skipped] == ["torch"] * 6
    assert all(r["skipped"] == "torch is not importable (ModuleNotFoundError)" for r in skipped)


def test_the_benchmarks_hold_one_case_s_data_at_a_time(monkeypatch):
    monkeypatch.setenv("CUPYBN_GPU_BENCH_DEVICE", "host")
    monkeypatch.setitem(sys.modules, "torch", None)  # not needed here, and slow to import
    spec = importlib.util.spec_from_file_location("bench_gpu_here", ROOT / "benchmarks" / "bench_gpu.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    released = []
    monkeypatch.setattr(bench.DEVICE, "release", lambda: released.append((bench.DATA.key, bench.REFERENCE.key)))
    built = []

    def build(name):
        return lambda: built.append(name) or name

    assert bench.DATA.get("a", build("a")) == "a" and bench.REFERENCE.get(("a", "inference"), build("ref")) == "ref"
    assert bench.DATA.get("a", build("a again")) == "a" and built == ["a", "ref"]  # the benchmarks of a case share it
    released.clear()
    assert bench.DATA.get("b", build("b")) == "b"
    # the reference and the data of "a" are dropped, and memory handed back, before "b" is built
    assert released[-1] == (None, None) and built[-1] == "b"
    assert bench.REFERENCE.key is None and bench.DATA.key == "b"


# ---- the whole command, on the host ---------------------------------------------------------
REPORT_KEYS = {"schema": str, "date": str, "command": list, "complete": bool, "device": dict, "versions": dict,
               "settings": dict, "implementations": dict, "tests": dict, "sanitizers": list, "benchmarks": dict,
               "copy": dict, "measurements": list, "epilogue": list, "targets": list, "exit_status": int}
MEASUREMENT_KEYS = {"case": str, "shape": list, "layout": str, "dtype": str, "mode": str, "implementation": str,
                    "nbytes": int, "inputs": int, "median_us": float, "min_us": float, "iqr_us": float,
                    "gbps": float, "roofline_share": float, "max_err": float, "error": type(None)}
TARGET_KEYS = {"name", "mode", "threshold", "description", "cases", "cases_met", "value", "worst_case", "met"}
FAST = ["--no-tests", "--no-sanitizers", "--repeat", "2", "--warmup", "1"]


def _host_without_torch(monkeypatch, tmp_path, env=HOST):
    """The host settings of ``env``, with torch hidden here and in the benchmarks' process: importing it
    takes seconds, and the test with torch is the one above."""
    monkeypatch.setitem(sys.modules, "torch", None)
    for name, value in {**env, **_without_torch(tmp_path)}.items():
        monkeypatch.setenv(name, value)


def _gpu_check_here(monkeypatch, tmp_path, argv, env=HOST):
    """gpu-check in this process on the host, without torch; (exit status, output, report)."""
    _host_without_torch(monkeypatch, tmp_path, env)
    out = io.StringIO()
    monkeypatch.setattr(sys, "stdout", out)
    status = gc.main([*argv, "--json", str(tmp_path / "report.json")])
    return status, out.getvalue(), json.loads((tmp_path / "report.json").read_text())


def test_gpu_check_on_the_host_benchmarks_every_case_mode_and_implementation(tmp_path):
    argv = [*FAST, "--cases", TINY_CASES[0], "--cases", TINY_CASES[1], "--json", str(tmp_path)]
    result = subprocess.run([sys.executable, "-m", "cupybn", "gpu-check", *argv], cwd=ROOT,
                            env=dict(os.environ, **HOST), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    (path,) = tmp_path.glob("gpu-host-*[0-9].json")
    report = json.loads(path.read_text())
    for key, kind in REPORT_KEYS.items():
        assert isinstance(report[key], kind), key
    assert report["schema"] == gc.SCHEMA and report["complete"] is True and report["exit_status"] == 0
    assert report["command"] == ["python", "-m", "cupybn", "gpu-check", *argv]
    assert report["device"]["name"] == "host" and report["settings"]["device"] == "host"
    assert report["tests"]["ran"] is False and report["benchmarks"]["exit_status"] == 0
    run, unavailable = report["implementations"]["run"], report["implementations"]["unavailable"]
    assert sorted(run + list(unavailable)) == sorted(gcases.IMPLEMENTATIONS)
    assert ("torch" in unavailable) == (host_device().torch is None)
    copy = report["copy"]
    assert copy["nbytes"] == gcases.HOST_COPY_MIB * gc.MIB and copy["gbps"] > 0
    rows = report["measurements"]
    assert [(r["case"], r["mode"], r["implementation"]) for r in rows] == [
        (c, m, i) for c in TINY_CASES for m in gcases.MODES for i in gcases.IMPLEMENTATIONS if i in run]
    for r in rows:
        assert set(r) == set(MEASUREMENT_KEYS)
        for key, kind in MEASUREMENT_KEYS.items():
            assert isinstance(r[key], kind), key
        assert 0 < r["min_us"] <= r["median_us"] < 1e6 and r["inputs"] == 2
        assert r["max_err"] < (1e-5 if r["dtype"] == "float32" else 3e-3)
        expect = gcases.PASSES[r["mode"]] * r["nbytes"] / r["median_us"] / 1e3
        assert r["gbps"] == pytest.approx(expect)
        assert r["roofline_share"] == pytest.approx(expect / copy["gbps"])
    assert [t["name"] for t in report["targets"]] == [
        "forward-train-roofline", "inference-roofline", "backward-roofline",
        "forward-train-vs-torch", "inference-vs-torch", "backward-vs-torch"]
    assert all(set(t) >= TARGET_KEYS for t in report["targets"])
    # the fused epilogue on both cases (each the largest of its layout and dtype), against the same work
    # unfused (and torch, where it runs)
    epilogue = report["epilogue"]
    assert report["settings"]["epilogue_cases"] == TINY_CASES
    assert [(r["case"], r["mode"], r["implementation"]) for r in epilogue] == [
        (c, m, i) for c in TINY_CASES for m in gcases.EPILOGUE_MODES for i in gcases.EPILOGUE_IMPLEMENTATIONS
        if i in run or i == "unfused"]
    for r in epilogue:
        assert set(r) == set(MEASUREMENT_KEYS) and 0 < r["median_us"] < 1e6
        assert r["max_err"] < (1e-5 if r["dtype"] == "float32" else 3e-3)
        assert r["gbps"] == pytest.approx(gcases.EPILOGUE_PASSES[r["mode"]] * r["nbytes"] / r["median_us"] / 1e3)
    assert "== fused epilogue" in out and out.count("forward-train+add+relu") >= len(TINY_CASES)
    # pytest-benchmark's own file has the same measurements
    (bench_json,) = tmp_path.glob("*.pytest-benchmark.json")
    assert len(json.loads(bench_json.read_text())["benchmarks"]) == 1 + len(rows) + len(epilogue)
    # the printed tables: the copy, a table per case, every mode, the overview and the targets
    assert "== copy roofline" in out
    for i, case in enumerate(TINY_CASES, 1):
        assert f"[{i}/2, " in out and f"] {case}: x " in out
    assert out.count("forward-train cupybn") == len(TINY_CASES)
    assert "== overview" in out and "== targets" in out and "exit status 0" in out


def test_a_run_cut_short_leaves_a_report_of_the_cases_done(tmp_path, monkeypatch):
    # A slot can end at any time: the report is rewritten as every benchmark finishes.
    real = gc.BenchmarkWatch.add

    def second_case_is_cut(watch, record):
        if record["extra_info"].get("case") == TINY_CASES[1]:
            raise KeyboardInterrupt  # what a killed run looks like from here
        real(watch, record)

    monkeypatch.setattr(gc.BenchmarkWatch, "add", second_case_is_cut)
    with pytest.raises(KeyboardInterrupt):
        _gpu_check_here(monkeypatch, tmp_path, [*FAST, "--cases", TINY_CASES[0], "--cases", TINY_CASES[1]])
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["complete"] is False and report["exit_status"] is None
    assert [(r["case"], r["mode"], r["implementation"]) for r in report["measurements"]] == [
        (TINY_CASES[0], m, i) for m in gcases.MODES for i in ("cupybn", "textbook")]
    assert report["copy"]["gbps"] > 0


def test_an_implementation_that_raises_is_recorded_and_fails_the_command(tmp_path, monkeypatch):
    # One value per channel: training (forward and the forward that backward needs) cannot estimate a
    # variance, so cupybn raises there, and the textbook's running variance divides by zero.
    status, out, report = _gpu_check_here(monkeypatch, tmp_path, [*FAST, "--cases", "1x2048x1x1-nchw-f32"],
                                          env={**HOST, "CUPYBN_GPU_BENCH_SCALE": "1,16"})
    assert status == 1 and report["exit_status"] == 1 and report["complete"] is True
    assert report["benchmarks"]["exit_status"] == 1
    errors = {(r["mode"], r["implementation"]): r["error"] for r in report["measurements"] if r["error"]}
    assert errors[("forward-train", "cupybn")].startswith("ValueError: training needs at least 2 values per channel")
    assert ("backward", "cupybn") in errors and ("forward-train", "textbook") in errors
    assert all(r["median_us"] > 0 for r in report["measurements"] if (r["mode"], r["implementation"]) not in errors)
    assert {r["mode"] for r in report["measurements"] if not r["error"]} >= {"inference"}
    assert "error: ValueError: training needs" in out


def test_failing_tests_fail_the_command_but_the_benchmarks_still_run(tmp_path, monkeypatch):
    _host_without_torch(monkeypatch, tmp_path)
    args = gc.build_parser().parse_args([*FAST[1:], "--cases", TINY_CASES[0], "--json", str(tmp_path / "r.json")])
    failing = [sys.executable, "-c", "print('1 failed, 2 passed in 0.01s'); raise SystemExit(1)"]
    out = io.StringIO()
    assert gc.run(args, gc.host_machine(), stream=out, test_command=failing) == 1
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["tests"]["exit_status"] == 1 and report["tests"]["counts"] == {"failed": 1, "passed": 2}
    assert report["measurements"] and all(r["error"] is None for r in report["measurements"])
    assert "FAILED" in out.getvalue()


def test_outside_a_checkout_the_benchmarks_are_not_run_and_the_report_says_why(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(gc, "benchmarks_dir", lambda: None)
    monkeypatch.setattr(gc, "tests_dir", lambda: None)
    assert gc.main(["--list"]) == 2
    assert "needs a checkout" in capsys.readouterr().err
    args = gc.build_parser().parse_args(["--no-sanitizers", "--json", str(tmp_path / "r.json")])
    out = io.StringIO()
    assert gc.run(args, gc.host_machine(), stream=out) == 1
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["benchmarks"]["ran"] is False and "need a checkout" in report["benchmarks"]["note"]
    assert report["measurements"] == [] and report["complete"] is True
    assert "need a checkout" in out.getvalue()


# ---- output -------------------------------------------------------------------------------------
def test_json_path():
    assert gc.device_slug("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"
    default = gc.resolve_json_path(None, "NVIDIA H100 80GB HBM3", "2026-05-06")
    assert default.name == "gpu-nvidia-h100-80gb-hbm3-2026-05-06.json"
    assert default.parent.parts[-2:] == ("benchmarks", "results")
    assert gc.resolve_json_path("out/x.json", "A", "d") == gc.Path("out/x.json")
    assert gc.resolve_json_path("out/", "A", "2026-05-06").name == "gpu-a-2026-05-06.json"


def test_case_table_shows_ratios_and_errors():
    rows = [gc.measurement_from_record(record(mode="forward-train", passes=3, median=10.0), 1000.0),
            gc.measurement_from_record(record(mode="forward-train", passes=3, impl="textbook", median=40.0,
                                              max_err=2e-7), 1000.0),
            gc.measurement_from_record({**record(mode="backward", outcome="failed"), "error": "ValueError: bad"},
                                       1000.0)]
    table = gc.format_case_table(rows, repeat=3, calls=10)
    assert "0.25" in table and "2.0e-07" in table and "error: ValueError: bad" in table
    assert table.splitlines()[0].startswith("c: x 1.0 MB, 4 inputs rotated, median of 3 rounds of 10 calls")
    assert [line.split()[0] for line in table.splitlines()[2:]] == ["forward-train", "textbook", "backward"]


def test_format_targets_marks_each_target():
    rows = [measurement("big", share=0.5)]
    text = gc.format_targets(gc.evaluate_targets(rows))
    assert text.count("NOT MET") == 1 and text.count("n/a") == 5


# ---- without CuPy or a GPU ------------------------------------------------------------------------
def test_without_cupy_the_command_exits_2_with_one_line():
    code = ("import sys\nsys.modules['cupy'] = None\n"  # makes 'import cupy' fail even where CuPy is installed
            "from cupybn.__main__ import main\nraise SystemExit(main(['gpu-check', '--no-tests']))\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stdout == ""
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
    assert "CuPy" in result.stderr


def test_python_m_cupybn_gpu_check_without_cupy():
    try:
        import cupy  # noqa: F401
    except Exception:
        pass
    else:
        pytest.skip("CuPy is importable here; the test above blocks it explicitly")
    result = subprocess.run([sys.executable, "-m", "cupybn", "gpu-check", "--quick"], cwd=ROOT, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.startswith("gpu-check: CuPy is not importable")


def test_cupy_without_a_gpu_exits_2(monkeypatch, capsys):
    def no_device():
        raise RuntimeError("cudaErrorNoDevice: no CUDA-capable\ndevice is detected")

    fake = types.SimpleNamespace(cuda=types.SimpleNamespace(runtime=types.SimpleNamespace(getDeviceCount=no_device)))
    monkeypatch.setitem(sys.modules, "cupy", fake)
    assert gc.main(["--no-tests"]) == 2
    err = capsys.readouterr().err
    assert err == "gpu-check: no usable NVIDIA GPU: cudaErrorNoDevice: no CUDA-capable device is detected\n"


def test_usage_errors_exit_2(capsys, monkeypatch):
    assert gc.main(["--cases", "no-such-case"]) == 2
    assert gc.main(["--repeat", "0"]) == 2
    monkeypatch.setenv("CUPYBN_GPU_BENCH_DEVICE", "tpu")
    assert gc.main(["--list"]) == 2
    err = capsys.readouterr().err
    assert "no case matches" in err and "CUPYBN_GPU_BENCH_DEVICE='tpu'" in err


def test_list_needs_no_gpu(capsys, monkeypatch):
    assert gc.main(["--list", "--quick"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == [c.name for c in gcases.quick_cases()]
    monkeypatch.setenv("CUPYBN_GPU_BENCH_SCALE", "2,16")
    assert gc.main(["--list", "--cases", "2d"]) == 0
    assert [line.split()[0] for line in capsys.readouterr().out.splitlines()] == ["64x292-2d-f32", "64x292-2d-f16"]


def test_importing_the_module_imports_neither_cupy_nor_torch():
    code = ("import sys\nimport cupybn._gpu_check, cupybn.__main__\n"
            "cupybn._gpu_check.load_gpu_cases()\n"
            "print(sorted(m for m in ('cupy', 'torch') if m in sys.modules))\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
