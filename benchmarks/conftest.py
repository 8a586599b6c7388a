"""pytest setup for the benchmarks: run with ``pytest benchmarks --benchmark-only``.

``--benchmark-only`` overrides the ``--benchmark-skip`` in pyproject's addopts,
which keeps a plain ``pytest`` run from timing anything.
"""
from __future__ import annotations

import os
import platform

import numpy as np
import pytest
from cases import THREADS

# the run's neighbours skew timings, multi-threaded ones most: keep the load at the start
LOADAVG_AT_START = os.getloadavg()[0] if hasattr(os, "getloadavg") else None


def pytest_collect_file(file_path, parent):
    # benchmark modules are named bench_*.py so the test run never picks them up; a file named
    # on the command line is pytest's own to collect, and collecting it here too would run it twice
    if (file_path.suffix == ".py" and file_path.name.startswith("bench_")
            and not parent.session.isinitpath(file_path)):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


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
        "torch_thp_mem_alloc": os.environ.get("THP_MEM_ALLOC_ENABLE"),
        "loadavg_at_start": LOADAVG_AT_START,
    }
