"""``python -m cupybn gpu-check`` without a GPU: everything but the CUDA timing.

The command takes its array module, timers and implementations from a
``GpuEnv``; here that is NumPy with fake timers, so the case list, the timer
logic, the roofline arithmetic, the targets, the test step, the tables and the
JSON report are all checked on the CPU.  Only ``probe_gpu`` and the CUDA event
timers themselves need the real machine.
"""
from __future__ import annotations

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

import cupybn
from cupybn import _gpu_check as gc
from cupybn import _textbook as textbook

# What torchvision's ResNet-50 feeds its BatchNorm layers at batch 256 and 224x224
# (written out by hand from the architecture: stem, then the four stages).
RESNET50_SHAPES = [
    (256, 64, 112, 112),
    (256, 64, 56, 56), (256, 256, 56, 56),
    (256, 128, 56, 56), (256, 128, 28, 28), (256, 512, 28, 28),
    (256, 256, 28, 28), (256, 256, 14, 14), (256, 1024, 14, 14),
    (256, 512, 14, 14), (256, 512, 7, 7), (256, 2048, 7, 7),
]


# ---- helpers -----------------------------------------------------------------------
class FakeTimer:
    """Runs each call once (so the code paths execute) and reports fixed times in µs."""

    def __init__(self, times_us=(100.0, 110.0, 120.0)):
        self.times_us = list(times_us)
        self.calls = []

    def __call__(self, fn, inputs, *, warmup, repeat):
        self.calls.append((len(inputs), warmup, repeat))
        for a in inputs[:2]:
            fn(a)
        return (self.times_us * repeat)[:repeat]


def numpy_env(impls=None, timers=None, l2_bytes=1):
    timer = FakeTimer()
    return gc.GpuEnv(
        xp=np,
        device={"id": 0, "name": "Fake GPU 9000", "compute_capability": "9.0", "sm_count": 4,
                "memory_bytes": 2**34, "l2_bytes": l2_bytes},
        versions={"numpy": np.__version__, "cupybn": cupybn.__version__},
        timers=timers or {"cupy": timer, "torch": timer},
        impls=impls if impls is not None else [gc.cupybn_impl(), gc.textbook_impl(np)],
    )


SMALL_CASES = [gc.Case((6, 3, 4, 5), "nchw", "float32"), gc.Case((6, 3, 4, 5), "nhwc", "float16"),
               gc.Case((40, 7), "2d", "float32")]


def measurement(case="c", mode="forward-train", impl="cupybn", nbytes=100 * gc.MIB, median=1.0, share=0.5,
                error=None):
    return gc.Measurement(case, (1, 1), "nchw", "float32", mode, impl, nbytes, 2,
                          median_us=None if error else median, roofline_share=None if error else share,
                          error=error)


# ---- cases ---------------------------------------------------------------------------
def test_resnet50_bn_shapes_are_the_twelve_of_the_network():
    assert gc.resnet50_bn_shapes() == RESNET50_SHAPES


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
    assert gc.resnet50_bn_shapes() == list(dict.fromkeys(seen))


def test_case_list_has_every_resnet50_shape_in_both_layouts_and_dtypes_and_the_rows_case():
    cases = gc.all_cases()
    have = {(c.shape, c.layout, c.dtype) for c in cases}
    for shape in RESNET50_SHAPES:
        for layout in ("nchw", "nhwc"):
            for dtype in ("float16", "float32"):
                assert (shape, layout, dtype) in have
    assert ((8192, 4096), "2d", "float16") in have and ((8192, 4096), "2d", "float32") in have
    assert len(cases) == len(have) == 12 * 4 + 2
    assert len({c.name for c in cases}) == len(cases)


def test_case_names_and_sizes():
    case = gc.Case((256, 64, 56, 56), "nhwc", "float16")
    assert case.name == "256x64x56x56-nhwc-f16"
    assert case.nbytes == 256 * 64 * 56 * 56 * 2
    assert case.channels == 64
    assert gc.Case((8192, 4096), "2d", "float32").nbytes == 8192 * 4096 * 4


def test_quick_is_three_float32_nchw_shapes_of_the_full_list():
    quick = gc.quick_cases()
    assert len(quick) == 3
    assert all(c.dtype == "float32" and c.layout == "nchw" for c in quick)
    assert set(quick) <= set(gc.all_cases())


def test_cases_filter_by_substring():
    cases = gc.all_cases()
    assert gc.select_cases(cases, None) == cases
    picked = gc.select_cases(cases, ["7x7-nhwc", "2d-f16"])
    assert {c.name for c in picked} == {"256x512x7x7-nhwc-f32", "256x512x7x7-nhwc-f16", "256x2048x7x7-nhwc-f32",
                                        "256x2048x7x7-nhwc-f16", "8192x4096-2d-f16"}
    assert gc.select_cases(cases, ["no-such-case"]) == []


def test_rotated_inputs_cover_the_l2_cache_several_times():
    l2 = 50 * gc.MIB
    for case in gc.all_cases():
        n = gc.rotation_count(case.nbytes, l2)
        assert n >= 2
        assert n * case.nbytes >= gc.ROTATION_COVER * l2 or n == gc.MAX_ROTATION
    assert gc.rotation_count(12_845_056, l2) == math.ceil(3 * l2 / 12_845_056)  # the smallest f16 case
    assert gc.rotation_count(10**9, l2) == 2


# ---- roofline arithmetic -------------------------------------------------------------
def test_passes_per_mode():
    assert gc.PASSES == {"forward-train": 3, "inference": 2, "backward": 5}


def test_copy_bandwidth_counts_read_and_write():
    assert gc.copy_gbps(10**9, 1000.0) == pytest.approx(2000.0)  # 1 GB copied in 1 ms: 2 TB/s


def test_effective_bandwidth_and_roofline_share():
    nbytes, copy_us = 10**9, 1000.0
    roof = gc.copy_gbps(nbytes, copy_us)
    for mode, passes in gc.PASSES.items():
        # a mode that moves exactly its passes at the copy's speed sits on the roofline
        at_roof = passes / 2 * copy_us
        assert gc.effective_gbps(mode, nbytes, at_roof) == pytest.approx(roof)
        assert gc.roofline_share(mode, nbytes, at_roof, roof) == pytest.approx(1.0)
        assert gc.roofline_share(mode, nbytes, 2 * at_roof, roof) == pytest.approx(0.5)
    assert gc.effective_gbps("backward", 10**9, 5000.0) == pytest.approx(1000.0)


def test_summarize():
    stats = gc.summarize([5.0, 1.0, 3.0, 2.0, 4.0])
    assert stats == {"median_us": 3.0, "min_us": 1.0, "iqr_us": 2.0}


# ---- the CUDA-event timer, with fake events -------------------------------------------
class FakeClock:
    def __init__(self):
        self.now = 0.0  # ms
        self.synchronized = []

    def event(self):
        clock = self

        class Event:
            def record(self):
                self.at = clock.now

            def synchronize(self):
                clock.synchronized.append(self)

        return Event()


def test_event_timer_times_each_call_after_the_warm_up_rotating_inputs():
    clock = FakeClock()
    order = []

    def fn(ms):
        order.append(ms)
        clock.now += ms

    timer = gc.EventTimer(clock.event, lambda start, end: end.at - start.at)
    times = timer(fn, [1.0, 2.0, 3.0], warmup=2, repeat=5)
    assert order == [1.0, 2.0, 1.0, 2.0, 3.0, 1.0, 2.0]  # two warm-up calls, then five timed
    assert times == pytest.approx([1000.0, 2000.0, 3000.0, 1000.0, 2000.0])  # ms -> µs
    assert len(clock.synchronized) == 1  # waits once, on the last event
    with pytest.raises(ValueError):
        timer(fn, [1.0], warmup=0, repeat=0)


# ---- implementations on NumPy ------------------------------------------------------------
def test_case_data_layout_dtype_and_distinct_inputs():
    data = gc.make_case_data(np, gc.Case((4, 3, 5, 6), "nhwc", "float16"), 3)
    assert len(data.xs) == len(data.dys) == 3
    x = data.xs[0]
    assert x.shape == (4, 3, 5, 6) and x.dtype == np.float16
    assert x.strides[1] == 2 and x.transpose(0, 2, 3, 1).flags.c_contiguous  # channels-last
    assert not np.array_equal(data.xs[0], data.xs[1])
    assert data.gamma.dtype == data.running_var.dtype == np.float32
    assert (data.running_var > 0).all()
    nchw = gc.make_case_data(np, gc.Case((4, 3, 5, 6), "nchw", "float32"), 2)
    assert nchw.xs[0].flags.c_contiguous


@pytest.mark.parametrize("mode", gc.MODES)
@pytest.mark.parametrize("case", SMALL_CASES, ids=lambda c: c.name)
def test_every_implementation_matches_the_float64_reference(mode, case):
    torch = pytest.importorskip("torch") if case.dtype == "float32" else None
    impls = [gc.cupybn_impl(), gc.textbook_impl(np)] + ([gc.torch_impl(torch, np)] if torch else [])
    data = gc.make_case_data(np, case, 2)
    ref = gc.reference_output(np, mode, data)
    tol = 1e-5 if case.dtype == "float32" else 3e-3
    for impl in impls:
        target = impl.prepare(mode, data)
        assert len(target.inputs) == 2
        out = target.output(target.fn(target.inputs[1]))
        assert out.shape == case.shape
        assert gc.max_rel_err(np, target.output(target.fn(target.inputs[0])), ref) < tol, impl.name
        assert gc.max_rel_err(np, out, ref) > tol  # the second input is another array


def test_max_rel_err_is_relative_above_one_and_absolute_below():
    ref = np.array([0.5, -4.0, 100.0, 0.0])
    value = np.array([0.25, -4.0, 99.0, 0.0], dtype=np.float32)
    assert gc.max_rel_err(np, value, ref) == pytest.approx(0.25)  # |0.25 - 0.5| / 1 beats 1 / 100
    assert gc.max_rel_err(np, value[1:], ref[1:]) == pytest.approx(0.01)


def test_reference_is_the_textbook_in_float64():
    data = gc.make_case_data(np, gc.Case((8, 3, 4, 4), "nchw", "float32"), 1)
    x = data.xs[0].astype(np.float64)
    y = gc.reference_output(np, "forward-train", data)
    mean = x.mean(axis=(0, 2, 3), keepdims=True)
    var = x.var(axis=(0, 2, 3), keepdims=True)
    expect = (x - mean) / np.sqrt(var + gc.EPS) * data.gamma.reshape(1, 3, 1, 1) + data.beta.reshape(1, 3, 1, 1)
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
    xhat = (x - x.mean(axis=(0, 2), keepdims=True)) / np.sqrt(x.var(axis=(0, 2), keepdims=True) + gc.EPS)
    np.testing.assert_allclose(dgamma, (dy * xhat).sum(axis=(0, 2)))


def test_textbook_updates_running_statistics_with_the_unbiased_variance():
    x = np.arange(12, dtype=np.float64).reshape(6, 2)
    rm, rv = np.zeros(2), np.ones(2)
    textbook.forward_train(x, np.ones(2), np.zeros(2), running_mean=rm, running_var=rv, momentum=0.5)
    np.testing.assert_allclose(rm, 0.5 * x.mean(axis=0))
    np.testing.assert_allclose(rv, 0.5 + 0.5 * x.var(axis=0, ddof=1))


def test_torch_gets_the_same_memory_in_channels_last_format():
    torch = pytest.importorskip("torch")
    data = gc.make_case_data(np, gc.Case((4, 3, 5, 6), "nhwc", "float32"), 2)
    target = gc.torch_impl(torch, np).prepare("forward-train", data)
    t = target.inputs[0]
    assert t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()
    assert t.data_ptr() == data.xs[0].ctypes.data  # no copy
    y = target.fn(t)
    assert y.is_contiguous(memory_format=torch.channels_last)


def test_torch_backward_times_the_backward_alone():
    torch = pytest.importorskip("torch")
    data = gc.make_case_data(np, gc.Case((4, 3, 5), "nchw", "float32"), 2)
    target = gc.torch_impl(torch, np).prepare("backward", data)
    calls = []
    real = torch.nn.functional.batch_norm
    torch.nn.functional.batch_norm = lambda *a, **k: calls.append(1) or real(*a, **k)
    try:
        dx = target.output(target.fn(target.inputs[0]))
        target.fn(target.inputs[1])
    finally:
        torch.nn.functional.batch_norm = real
    assert calls == []  # the forward ran once, when the graphs were built
    assert gc.max_rel_err(np, dx, gc.reference_output(np, "backward", data)) < 1e-5


# ---- measurements and targets ------------------------------------------------------------
def test_measured_fills_bandwidth_and_share():
    case = gc.Case((1000, 250), "2d", "float32")  # 1 MB
    m = gc.measured(case, "inference", "cupybn", [2.0, 1.0, 3.0], 1000.0, inputs=4, max_err=1e-7)
    assert (m.median_us, m.min_us, m.inputs, m.max_err) == (2.0, 1.0, 4, 1e-7)
    assert m.gbps == pytest.approx(2 * 10**6 / 2.0 / 1e3)
    assert m.roofline_share == pytest.approx(1.0)
    assert m.ok
    bad = gc.failed(case, "backward", "torch", RuntimeError("out of\nmemory"), inputs=4)
    assert not bad.ok and bad.error == "RuntimeError: out of memory" and bad.median_us is None


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
    assert t["met"] is None
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


# ---- the test step ------------------------------------------------------------------------
def test_parse_pytest_counts():
    assert gc.parse_pytest_counts("x\n1 failed, 510 passed in 80.71s (0:01:20)\n") == {"failed": 1, "passed": 510}
    text = "....\n===== 3 passed, 2 skipped, 1 error, 4 warnings in 1.20s =====\n"
    assert gc.parse_pytest_counts(text) == {"passed": 3, "skipped": 2, "errors": 1, "warnings": 4}
    assert gc.parse_pytest_counts("5 passed, 2 xfailed, 3 deselected in 0.5s") == {
        "passed": 5, "xfailed": 2, "deselected": 3}
    assert gc.parse_pytest_counts("no tests ran in 0.01s") == {}
    assert gc.parse_pytest_counts("ImportError: No module named pytest") == {}


def test_run_tests_requires_gpu_tests_and_records_the_outcome(tmp_path):
    script = ("import os\nprint('CUPYBN_REQUIRE_GPU=' + os.environ['CUPYBN_REQUIRE_GPU'])\n"
              "print('2 failed, 5 passed, 1 skipped in 0.10s')\nraise SystemExit(1)\n")
    out = io.StringIO()
    result = gc.run_tests([sys.executable, "-c", script], tmp_path, out)
    assert "CUPYBN_REQUIRE_GPU=1" in out.getvalue()  # echoed as it ran
    assert result.exit_status == 1 and not result.passed
    assert result.counts == {"failed": 2, "passed": 5, "skipped": 1}
    ok = gc.run_tests([sys.executable, "-c", "print('7 passed in 0.01s')"], tmp_path, io.StringIO())
    assert ok.passed and ok.exit_status == 0 and ok.counts == {"passed": 7}
    assert gc.TestRun(ran=False).passed


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
    assert ids and all("cupy-gpu" in i or "test_cupy_gpu.py" in i for i in ids), ids[:5]
    assert any("test_cupy_gpu.py" in i for i in ids) and any("[cupy-gpu" in i or "-cupy-gpu" in i for i in ids)


def test_a_timed_out_suite_is_killed_with_every_process_it_started(tmp_path):
    marker = tmp_path / "child.pid"
    script = (f"import subprocess, sys, time\n"
              f"child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
              f"open({str(marker)!r}, 'w').write(str(child.pid))\n"
              f"time.sleep(60)\n")
    result = gc.run_tests([sys.executable, "-c", script], tmp_path, io.StringIO(), timeout_s=3)
    assert result.exit_status is None and "killed" in result.note
    child = int(marker.read_text())
    for _ in range(50):  # the kill reaches the grandchild too
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        pytest.fail("the suite's child process survived the time-out")


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
    assert gc.exit_status(gc.TestRun(ran=False), [], dirty) == 1
    assert gc.exit_status(gc.TestRun(ran=False), [], clean) == 0
    missing = [{"tool": "memcheck", "ran": False, "note": "not on PATH"}]
    assert gc.exit_status(gc.TestRun(ran=False), [], missing) == 0


def test_tests_folder_is_found_in_a_checkout():
    assert gc.tests_dir() is not None and (gc.tests_dir() / "test_gpu_check.py").is_file()


# ---- the whole command on NumPy ------------------------------------------------------------
def _run(tmp_path, argv, env, **kw):
    args = gc.build_parser().parse_args(argv + ["--copy-mib", "1", "--repeat", "3", "--warmup", "1",
                                                "--json", str(tmp_path)])
    out = io.StringIO()
    status = gc.run(args, env, argv=argv, stream=out, cases=kw.pop("cases", SMALL_CASES), today="2026-01-02", **kw)
    return status, out.getvalue(), tmp_path / "gpu-fake-gpu-9000-2026-01-02.json"


REPORT_KEYS = {"schema": str, "date": str, "command": list, "complete": bool, "device": dict, "versions": dict,
               "settings": dict, "implementations": dict, "tests": dict, "sanitizers": list, "copy": dict,
               "measurements": list, "targets": list, "exit_status": int}
MEASUREMENT_KEYS = {"case": str, "shape": list, "layout": str, "dtype": str, "mode": str, "implementation": str,
                    "nbytes": int, "inputs": int, "median_us": float, "min_us": float, "iqr_us": float,
                    "gbps": float, "roofline_share": float, "max_err": float, "error": type(None)}
TARGET_KEYS = {"name", "mode", "threshold", "description", "cases", "cases_met", "value", "worst_case", "met"}


def test_whole_run_on_numpy_writes_the_report(tmp_path):
    status, out, path = _run(tmp_path, ["--no-tests"], numpy_env())
    assert status == 0
    report = json.loads(path.read_text())
    for key, kind in REPORT_KEYS.items():
        assert isinstance(report[key], kind), key
    assert report["schema"] == gc.SCHEMA and report["date"] == "2026-01-02"
    assert report["command"] == ["python", "-m", "cupybn", "gpu-check", "--no-tests"]
    assert report["device"]["name"] == "Fake GPU 9000"
    assert report["tests"]["ran"] is False
    assert report["copy"]["gbps"] == pytest.approx(2 * gc.MIB / 110.0 / 1e3)
    rows = report["measurements"]
    assert len(rows) == len(SMALL_CASES) * 3 * 2
    assert {(r["case"], r["mode"], r["implementation"]) for r in rows} == {
        (c.name, m, i) for c in SMALL_CASES for m in gc.MODES for i in ("cupybn", "textbook")}
    for r in rows:
        assert set(r) == set(MEASUREMENT_KEYS)
        for key, kind in MEASUREMENT_KEYS.items():
            assert isinstance(r[key], kind), key
        assert r["median_us"] == 110.0 and r["inputs"] == 2
        assert r["max_err"] < (1e-5 if r["dtype"] == "float32" else 3e-3)
        expect = gc.PASSES[r["mode"]] * r["nbytes"] / 110.0 / 1e3
        assert r["gbps"] == pytest.approx(expect)
        assert r["roofline_share"] == pytest.approx(expect / report["copy"]["gbps"])
    assert [t["name"] for t in report["targets"]] == [
        "forward-train-roofline", "inference-roofline", "backward-roofline",
        "forward-train-vs-torch", "inference-vs-torch", "backward-vs-torch"]
    assert all(set(t) >= TARGET_KEYS for t in report["targets"])
    assert report["exit_status"] == 0
    # the printed tables: a header per case, every mode, the overview and the targets
    for case in SMALL_CASES:
        assert f"] {case.name}: x " in out
    assert out.count("forward-train cupybn") == len(SMALL_CASES)
    assert "== overview" in out and "== targets" in out and "exit status 0" in out


def test_a_run_cut_short_leaves_a_report_of_the_cases_done(tmp_path, monkeypatch):
    # A slot can end at any time: the report is written after every case.
    real = gc.benchmark_case
    done = []

    def second_case_is_cut(env, case, *args, **kwargs):
        if done:
            raise KeyboardInterrupt  # what a killed run looks like from here
        done.append(case.name)
        return real(env, case, *args, **kwargs)

    monkeypatch.setattr(gc, "benchmark_case", second_case_is_cut)
    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path, ["--no-tests", "--no-sanitizers"], numpy_env(), cases=SMALL_CASES[:2])
    report = json.loads((tmp_path / "gpu-fake-gpu-9000-2026-01-02.json").read_text())
    assert report["complete"] is False and report["exit_status"] is None
    assert {r["case"] for r in report["measurements"]} == {SMALL_CASES[0].name}
    assert report["copy"]["gbps"] > 0


def test_an_implementation_that_raises_is_recorded_and_fails_the_command(tmp_path):
    def prepare(mode, data):
        raise NotImplementedError("no CuPy backend yet")

    env = numpy_env(impls=[gc.Impl("cupybn", prepare, "cupy"), gc.textbook_impl(np)])
    status, out, path = _run(tmp_path, ["--no-tests"], env, cases=SMALL_CASES[:1])
    assert status == 1
    report = json.loads(path.read_text())
    assert report["exit_status"] == 1
    errors = [r for r in report["measurements"] if r["error"]]
    assert len(errors) == 3 and all(r["implementation"] == "cupybn" for r in errors)
    assert errors[0]["error"] == "NotImplementedError: no CuPy backend yet"
    assert all(r["median_us"] for r in report["measurements"] if r["implementation"] == "textbook")
    assert "error: NotImplementedError" in out


def test_failing_tests_fail_the_command_but_the_benchmarks_still_run(tmp_path):
    failing = [sys.executable, "-c", "print('1 failed, 2 passed in 0.01s'); raise SystemExit(1)"]
    status, out, path = _run(tmp_path, [], numpy_env(), cases=SMALL_CASES[:1], test_command=failing)
    assert status == 1
    report = json.loads(path.read_text())
    assert report["tests"]["exit_status"] == 1 and report["tests"]["counts"] == {"failed": 1, "passed": 2}
    assert len(report["measurements"]) == 6 and all(r["error"] is None for r in report["measurements"])
    assert "FAILED" in out
    passing = [sys.executable, "-c", "print('2 passed in 0.01s')"]
    assert _run(tmp_path, [], numpy_env(), cases=SMALL_CASES[:1], test_command=passing)[0] == 0


def test_torch_rows_and_ratios_appear_when_torch_runs(tmp_path):
    torch = pytest.importorskip("torch")
    timers = {"cupy": FakeTimer([100.0]), "torch": FakeTimer([200.0])}
    env = numpy_env(impls=[gc.cupybn_impl(), gc.torch_impl(torch, np), gc.textbook_impl(np)], timers=timers)
    status, out, path = _run(tmp_path, ["--no-tests"], env, cases=[SMALL_CASES[0]])
    assert status == 0
    report = json.loads(path.read_text())
    torch_rows = [r for r in report["measurements"] if r["implementation"] == "torch"]
    assert len(torch_rows) == 3 and all(r["max_err"] < 1e-5 for r in torch_rows)
    vs_torch = [t for t in report["targets"] if t["name"].endswith("vs-torch")]
    assert all(t["met"] is True and t["value"] == pytest.approx(0.5) for t in vs_torch)
    assert "0.50" in out


def test_json_path():
    assert gc.device_slug("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"
    default = gc.resolve_json_path(None, "NVIDIA H100 80GB HBM3", "2026-05-06")
    assert default.name == "gpu-nvidia-h100-80gb-hbm3-2026-05-06.json"
    assert default.parent.parts[-2:] == ("benchmarks", "results")
    assert gc.resolve_json_path("out/x.json", "A", "d") == gc.Path("out/x.json")
    assert gc.resolve_json_path("out/", "A", "2026-05-06").name == "gpu-a-2026-05-06.json"


def test_case_table_shows_ratios_and_errors():
    case = SMALL_CASES[0]
    rows = [gc.measured(case, "forward-train", "cupybn", [10.0], 1000.0, inputs=2, max_err=2e-7),
            gc.measured(case, "forward-train", "textbook", [40.0], 1000.0, inputs=2),
            gc.failed(case, "backward", "cupybn", ValueError("bad"), inputs=2)]
    table = gc.format_case_table(case, rows, repeat=3)
    assert "0.25" in table and "2.0e-07" in table and "error: ValueError: bad" in table
    assert table.splitlines()[0].startswith(case.name)


def test_format_targets_marks_each_target():
    rows = [measurement("big", share=0.5)]
    text = gc.format_targets(gc.evaluate_targets(rows))
    assert text.count("NOT MET") == 1 and text.count("n/a") == 5


# ---- without CuPy or a GPU ------------------------------------------------------------------------
def test_without_cupy_the_command_exits_2_with_one_line():
    code = ("import sys\nsys.modules['cupy'] = None\n"  # makes 'import cupy' fail even where CuPy is installed
            "from cupybn.__main__ import main\nraise SystemExit(main(['gpu-check', '--no-tests']))\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
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
    result = subprocess.run([sys.executable, "-m", "cupybn", "gpu-check", "--quick"], capture_output=True,
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


def test_usage_errors_exit_2(capsys):
    assert gc.main(["--cases", "no-such-case"]) == 2
    assert gc.main(["--repeat", "0"]) == 2
    assert "no case matches" in capsys.readouterr().err


def test_list_needs_no_gpu(capsys):
    assert gc.main(["--list", "--quick"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == [c.name for c in gc.quick_cases()]


def test_importing_the_module_imports_neither_cupy_nor_torch():
    code = ("import sys\nimport cupybn._gpu_check, cupybn.__main__\n"
            "print(sorted(m for m in ('cupy', 'torch') if m in sys.modules))\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
