"""pytest setup for the benchmarks: run with ``pytest benchmarks --benchmark-only``.

``--benchmark-only`` overrides the ``--benchmark-skip`` in pyproject's addopts,
which keeps a plain ``pytest`` run from timing anything.  bench_batch_norm.py and
bench_host_overhead.py time the CPU; bench_gpu.py times the GPU and skips without one.

With CUPYBN_GPU_BENCH_RESULTS=PATH, every benchmark appends one JSON line to PATH as
soon as it finishes: its ``extra_info``, the outcome, and the median, minimum and
interquartile range per call in µs, or the error it raised, or why it was skipped.
``python -m cupybn gpu-check`` reads these while the run goes on, so a run cut short
still reports what it measured.
"""
from __future__ import annotations

import json
import os
import platform
import subprocess

import numpy as np
import pytest
from cases import THREADS

# the run's neighbours skew timings, multi-threaded ones most: keep the load at the start
LOADAVG_AT_START = os.getloadavg()[0] if hasattr(os, "getloadavg") else None


def _commit() -> str | None:
    """The checked-out commit of the code measured (None outside a git clone)."""
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=os.path.dirname(os.path.abspath(__file__)), timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def pytest_collect_file(file_path, parent):
    # benchmark modules are named bench_*.py so the test run never picks them up; a file named
    # on the command line is pytest's own to collect, and collecting it here too would run it twice
    if (file_path.suffix == ".py" and file_path.name.startswith("bench_")
            and not parent.session.isinitpath(file_path)):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


def _record(item, call, report) -> dict:
    fixture = getattr(item, "funcargs", {}).get("benchmark")
    record = {"test": item.nodeid, "outcome": report.outcome,
              "extra_info": dict(fixture.extra_info) if fixture is not None else {}}
    if report.failed and call.excinfo is not None:
        record["error"] = " ".join(f"{call.excinfo.typename}: {call.excinfo.value}".split())[:500]  # one line
    elif report.skipped and call.excinfo is not None:
        record["skipped"] = str(getattr(call.excinfo.value, "msg", call.excinfo.value))
    elif fixture is not None and fixture.stats:  # pytest-benchmark's statistics are per call, in seconds
        stats = fixture.stats.stats
        record.update(median_us=stats.median * 1e6, min_us=stats.min * 1e6, iqr_us=stats.iqr * 1e6,
                      rounds=stats.rounds, iterations=fixture.stats.iterations)
    return record


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    path = os.environ.get("CUPYBN_GPU_BENCH_RESULTS")
    # a benchmark ends with its call, or earlier when its set-up fails or skips
    ended = report.when == "call" or (report.when == "setup" and not report.passed)
    if path and ended and "benchmark" in item.fixturenames:
        # written before pytest prints the test's progress letter: a reader of the output finds it there
        with open(path, "a") as f:
            f.write(json.dumps(_record(item, call, report), default=str) + "\n")
    return report


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def pytest_benchmark_update_machine_info(config, machine_info):
    # recorded in the --benchmark-json file, where benchmarks/report.py reads it
    try:
        import torch
        torch_version = torch.__version__
    except ImportError:
        torch_version = None
    import cupybn

    machine_info["cupybn"] = {
        "platform": platform.platform(),
        "cpu_model": cpu_model(),
        "cores": os.cpu_count(),
        "threads": THREADS,
        "numpy": np.__version__,
        "torch": torch_version,
        "cupybn": cupybn.__version__,
        "cupybn_commit": _commit(),
        # float32 calls ran the compiled kernels (else the NumPy paths)
        "cupybn_compiled_float32": cupybn.backends.numpy_backend._compiled.AVAILABLE,
        "torch_thp_mem_alloc": os.environ.get("THP_MEM_ALLOC_ENABLE"),
        "loadavg_at_start": LOADAVG_AT_START,
    }
