"""``python -m cupybn gpu-check``: every GPU check and benchmark in one command.

GPU time is borrowed rarely and briefly, so one command does it all: print the
device, run the GPU tests, run compute-sanitizer on a small call of each mode,
run the GPU benchmarks (the copy roofline, then cupybn, PyTorch and textbook
CuPy on ResNet-50's BatchNorm shapes), print tables and the targets, and write
one JSON report, rewritten after every step and every benchmark.

The benchmarks are pytest-benchmark benchmarks in the checkout's ``benchmarks/``
(``bench_gpu.py``; the cases, data, implementations and timer are in
``gpu_cases.py``): this command runs ``pytest benchmarks/bench_gpu.py
--benchmark-only`` in a subprocess and reads the line each benchmark appends to
a results file as it finishes (``benchmarks/conftest.py``).  With
CUPYBN_GPU_BENCH_DEVICE=host they run on NumPy arrays, which is how the tests
drive the whole command without a GPU.  CuPy and torch are imported only inside
functions: ``import cupybn`` never pulls them in.
"""
from __future__ import annotations

import argparse
import codecs
import importlib.util
import json
import os
import platform
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import date
from pathlib import Path
from types import ModuleType
from typing import Any, TextIO

import numpy as np

from ._cuda_probe import cupy_with_gpu

SCHEMA = "cupybn-gpu-check/1"
MIB = 1 << 20
LARGE_BYTES = 64 * MIB  # "large input": the targets are judged on these
ROOFLINE_TARGETS = {"forward-train": 0.80, "inference": 0.90, "backward": 0.80}
MODES = tuple(ROOFLINE_TARGETS)  # the benchmarks' modes (gpu_cases.MODES), in table order
ABBREV = {"forward-train": "fwd", "inference": "inf", "backward": "bwd"}
# The whole command should fit in 8 minutes: unless --bench-timeout says otherwise,
# the benchmarks get what the earlier steps left of that, and at least a minute.
COMMAND_BUDGET_S = 480.0
MIN_BENCH_TIMEOUT_S = 60.0
RESULTS_ENV = "CUPYBN_GPU_BENCH_RESULTS"  # where benchmarks/conftest.py appends a line per benchmark


# ---- the benchmarks in the checkout ---------------------------------------------------------
def benchmarks_dir() -> Path | None:
    """The repository's benchmarks/ when cupybn runs from a checkout, else None."""
    path = Path(__file__).resolve().parent.parent / "benchmarks"
    return path if (path / "bench_gpu.py").is_file() and (path / "gpu_cases.py").is_file() else None


def load_gpu_cases() -> ModuleType | None:
    """benchmarks/gpu_cases.py of the checkout (what the benchmarks run, and their settings), or None."""
    folder = benchmarks_dir()
    if folder is None:
        return None
    path = folder / "gpu_cases.py"
    module = sys.modules.get("gpu_cases")
    if module is not None and Path(module.__file__ or "").resolve() == path:
        return module
    spec = importlib.util.spec_from_file_location("gpu_cases", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_cases"] = module  # dataclasses look their module up while it runs
    spec.loader.exec_module(module)
    return module


def benchmark_environment(args: argparse.Namespace) -> dict[str, str]:
    """The options as the benchmarks' settings (environment variables; gpu_cases.py documents them)."""
    env = {}
    if args.quick:
        env["CUPYBN_GPU_BENCH_SET"] = "quick"
    if args.cases:
        env["CUPYBN_GPU_BENCH_CASES"] = ",".join(args.cases)
    for name, value in (("REPEAT", args.repeat), ("WARMUP", args.warmup), ("COPY_MIB", args.copy_mib)):
        if value is not None:
            env[f"CUPYBN_GPU_BENCH_{name}"] = str(value)
    return env


@dataclass
class Plan:
    """What the benchmarks will run: None and [] outside a checkout."""

    gpu_cases: ModuleType | None
    settings: Any = None  # gpu_cases.Settings
    cases: list = field(default_factory=list)


def plan(args: argparse.Namespace) -> Plan:
    """The settings and cases the benchmarks get from ``args`` and the environment (ValueError: a bad variable)."""
    gpu_cases = load_gpu_cases()
    if gpu_cases is None:
        return Plan(None)
    settings = gpu_cases.Settings.from_env({**os.environ, **benchmark_environment(args)})
    return Plan(gpu_cases, settings, gpu_cases.selected_cases(settings))


def benchmark_command(json_path: Path) -> list[str]:
    """The benchmark step's command, run from the repository's root; pytest-benchmark's table is left
    out (``--benchmark-quiet``): this command prints its own."""
    return [sys.executable, "-m", "pytest", "benchmarks/bench_gpu.py", "--benchmark-only", "-q", "-p",
            "no:cacheprovider", "--benchmark-quiet", "--tb=short", "--benchmark-json", str(json_path)]


# ---- arithmetic of the roofline ---------------------------------------------------------------
def copy_gbps(nbytes: int, time_us: float) -> float:
    """Bandwidth of a copy of ``nbytes``: it reads and writes them, 2 * nbytes moved."""
    return 2 * nbytes / time_us / 1e3


def effective_gbps(passes: int, nbytes: int, time_us: float) -> float:
    """GB/s as if the call moved exactly ``passes`` times x's bytes."""
    return passes * nbytes / time_us / 1e3


# ---- measurements ----------------------------------------------------------------------
@dataclass(frozen=True)
class Measurement:
    case: str
    shape: tuple[int, ...]
    layout: str
    dtype: str
    mode: str
    implementation: str
    nbytes: int
    inputs: int                         # distinct inputs rotated through
    median_us: float | None = None      # per call
    min_us: float | None = None
    iqr_us: float | None = None
    gbps: float | None = None           # effective: passes * nbytes / median
    roofline_share: float | None = None  # gbps / copy roofline: the copy-bound time over the measured time
    max_err: float | None = None        # main output vs float64, first input
    error: str | None = None            # set when the implementation raised

    @property
    def ok(self) -> bool:
        return self.error is None and self.median_us is not None


def measurement_from_record(record: dict, roofline_gbps: float | None) -> Measurement:
    """One batch-norm benchmark's record (benchmarks/conftest.py) as a measurement against the roofline."""
    info = record["extra_info"]
    m = Measurement(info["case"], tuple(info["shape"]), info["layout"], info["dtype"], info["mode"], info["impl"],
                    info["nbytes"], info["inputs"], max_err=info.get("max_err"))
    median = record.get("median_us")
    if record["outcome"] != "passed" or median is None:
        return replace(m, error=record.get("error") or f"{record['outcome']} without a timing")
    gbps = effective_gbps(info["passes"], m.nbytes, median)
    return replace(m, median_us=median, min_us=record["min_us"], iqr_us=record["iqr_us"], gbps=gbps,
                    roofline_share=None if roofline_gbps is None else gbps / roofline_gbps)


@dataclass
class BenchmarkResults:
    """The records the benchmarks have written so far, one per benchmark, in the order they ran."""

    records: list[dict] = field(default_factory=list)

    def _of(self, kind: str) -> list[dict]:
        return [r for r in self.records if r["extra_info"].get("kind") == kind]

    @property
    def copy(self) -> dict | None:
        """The copy roofline: the fastest copy method's GB/s (None until one is timed)."""
        timed = [r for r in self._of("copy") if r.get("median_us") is not None]
        if not timed:
            return None
        methods = {r["extra_info"]["method"]: {**{k: r[k] for k in ("median_us", "min_us", "iqr_us")},
                                               "gbps": copy_gbps(r["extra_info"]["nbytes"], r["median_us"])}
                   for r in timed}
        best = max(methods, key=lambda k: methods[k]["gbps"])
        return {"nbytes": timed[0]["extra_info"]["nbytes"], "method": best, "gbps": methods[best]["gbps"],
                "methods": methods}

    @property
    def measurements(self) -> list[Measurement]:
        return self._measured("batch-norm")

    @property
    def epilogue(self) -> list[Measurement]:
        """The fused epilogue's benchmarks (benchmarks/bench_gpu.py: test_gpu_epilogue)."""
        return self._measured("epilogue")

    def _measured(self, kind: str) -> list[Measurement]:
        copy = self.copy
        roofline = copy["gbps"] if copy else None
        return [measurement_from_record(r, roofline) for r in self._of(kind) if r["outcome"] != "skipped"]

    @property
    def unavailable(self) -> dict[str, str]:
        """Implementations that skipped, and why (torch without CUDA, say)."""
        return {r["extra_info"]["impl"]: r.get("skipped", "") for r in self._of("batch-norm")
                if r["outcome"] == "skipped"}


class RecordFile:
    """The lines the benchmarks append to ``path``, read as they land (a partial last line waits)."""

    def __init__(self, path: Path):
        self.path = path
        self.offset = 0

    def new_records(self) -> list[dict]:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read()
        except FileNotFoundError:
            return []
        whole = data[:data.rfind(b"\n") + 1]
        self.offset += len(whole)
        return [json.loads(line) for line in whole.splitlines() if line.strip()]


class BenchmarkWatch:
    """Follows the benchmark run: takes each record as it lands, saves the report after each one and
    prints the copy roofline, then a table per case once its benchmarks are done."""

    def __init__(self, source: RecordFile, results: BenchmarkResults, *, cases: int, repeat: int, calls: int,
                 say: Callable[[str], None], save: Callable[[], None]):
        self.source, self.results = source, results
        self.cases, self.repeat, self.calls = cases, repeat, calls
        self.say, self.save = say, save
        self.case: str | None = None  # the case whose table is still to print
        self.cases_done = 0
        self.copy_said = False
        self.since = time.perf_counter()

    def poll(self) -> None:
        for record in self.source.new_records():
            self.add(record)

    def add(self, record: dict) -> None:
        info = record["extra_info"]
        if info.get("kind") == "batch-norm":
            self._say_copy()
            if info["case"] != self.case:
                self._say_case()
                self.case = info["case"]
            if record["outcome"] == "skipped" and info["impl"] not in self.results.unavailable:
                self.say(f"\n{info['impl']}: not run ({record.get('skipped')})")
        self.results.records.append(record)
        self.save()

    def finish(self) -> None:
        self.poll()
        self._say_copy()
        self._say_case()

    def _say_copy(self) -> None:
        if self.copy_said:
            return
        self.copy_said = True
        copy = self.results.copy
        if copy is None:
            errors = "; ".join(r["error"] for r in self.results.records if "error" in r)
            self.say(f"\n== copy roofline: not measured{': ' + errors if errors else ''}")
            return
        self.say(f"\n== copy roofline: {copy['nbytes'] / 2**30:.2f} GiB, {copy['method']}, {copy['gbps']:.0f} GB/s "
                 "(read + write; " + ", ".join(f"{k} {v['gbps']:.0f}" for k, v in copy["methods"].items()) + ")")

    def _say_case(self) -> None:
        rows = [m for m in self.results.measurements if m.case == self.case]
        if self.case is None or not rows:
            return
        self.cases_done += 1
        now = time.perf_counter()
        self.say(f"\n[{self.cases_done}/{self.cases}, {now - self.since:.1f} s] "
                 f"{format_case_table(rows, repeat=self.repeat, calls=self.calls)}")
        self.since = now
        self.case = None


# ---- targets ---------------------------------------------------------------------------
def _find(measurements: Sequence[Measurement], case: str, mode: str, impl: str) -> Measurement | None:
    return next((m for m in measurements if (m.case, m.mode, m.implementation) == (case, mode, impl)), None)


def ratio(measurements: Sequence[Measurement], case: str, mode: str, impl: str) -> float | None:
    """cupybn's median time over ``impl``'s for one case and mode (below 1: cupybn is faster)."""
    a, b = _find(measurements, case, mode, "cupybn"), _find(measurements, case, mode, impl)
    if a is None or b is None or not (a.ok and b.ok):
        return None
    return a.median_us / b.median_us  # type: ignore[operator]


def _roofline_target(measurements: Sequence[Measurement], mode: str, threshold: float, large_bytes: int) -> dict:
    rows = [m for m in measurements if m.implementation == "cupybn" and m.mode == mode and m.nbytes >= large_bytes]
    target = {"name": f"{mode}-roofline", "mode": mode, "threshold": threshold,
              "description": f"cupybn {mode} at >= {threshold:.0%} of the copy roofline on every large input "
                             f"(x >= {large_bytes // MIB} MiB)",
              "cases": len(rows), "cases_met": 0, "value": None, "worst_case": None, "met": None}
    ok = [m for m in rows if m.ok and m.roofline_share is not None]
    if not ok:
        failed = all(not m.ok for m in rows)
        target["note"] = f"cupybn failed on all {len(rows)} large cases" if rows and failed else "not measured"
        return target
    worst = min(ok, key=lambda m: m.roofline_share)  # type: ignore[arg-type, return-value]
    target.update(cases_met=sum(m.roofline_share >= threshold for m in ok),  # type: ignore[operator]
                  value=worst.roofline_share, worst_case=worst.case)
    target["met"] = target["cases_met"] == len(rows)  # a case that failed misses the target
    if len(ok) < len(rows):
        target["note"] = f"cupybn failed on {len(rows) - len(ok)} large cases"
    return target


def _torch_target(measurements: Sequence[Measurement], mode: str) -> dict:
    cases = list(dict.fromkeys(m.case for m in measurements if m.mode == mode))
    ratios = [r for r in (ratio(measurements, c, mode, "torch") for c in cases) if r is not None]
    target = {"name": f"{mode}-vs-torch", "mode": mode, "threshold": 1.0,
              "description": f"cupybn {mode} faster than torch on the median case (median of cupybn/torch < 1)",
              "cases": len(ratios), "cases_met": sum(r < 1 for r in ratios), "value": None, "worst_case": None,
              "met": None}
    if not ratios:
        target["note"] = "not measured"
        return target
    median = float(statistics.median(ratios))
    target.update(value=median, met=median < 1.0)
    return target


def evaluate_targets(measurements: Sequence[Measurement], large_bytes: int = LARGE_BYTES) -> list[dict]:
    """The performance targets, each met (True), missed (False) or not measured (None)."""
    targets = [_roofline_target(measurements, mode, ROOFLINE_TARGETS[mode], large_bytes) for mode in MODES]
    return targets + [_torch_target(measurements, mode) for mode in MODES]


# ---- pytest runs: the tests and the benchmarks --------------------------------------------------
@dataclass
class TestRun:
    """The outcome of a pytest run (the tests or the benchmarks): ``exit_status`` None when it was not
    run or timed out."""

    __test__ = False  # not a pytest class

    ran: bool
    command: list[str] = field(default_factory=list)
    exit_status: int | None = None
    counts: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    note: str = ""

    @property
    def passed(self) -> bool:
        return not self.ran or self.exit_status == 0


_COUNT = re.compile(r"(\d+) (passed|failed|skipped|deselected|xfailed|xpassed|errors?|warnings?)\b")
_PLURAL = {"error": "errors", "warning": "warnings"}


def parse_pytest_counts(output: str) -> dict[str, int]:
    """Counts from pytest's closing line, e.g. '1 failed, 510 passed, 3 skipped in 80.71s'."""
    for line in reversed(output.splitlines()):
        found = _COUNT.findall(line)
        if found and re.search(r"\bin [\d.]+s\b", line):
            return {_PLURAL.get(kind, kind): int(n) for n, kind in found}
    return {}


def tests_dir() -> Path | None:
    """The repository's tests/ when cupybn runs from a checkout, else None."""
    path = Path(__file__).resolve().parent.parent / "tests"
    return path if path.is_dir() else None


# Only what needs the GPU: the cupy-gpu entry of the backend fixture and
# tests/test_cupy_gpu.py.  The host harness, its sanitizer builds and the NVRTC
# gate run in CI on every commit; a GPU slot is too short for them.
GPU_TESTS = "cupy_gpu or cupy-gpu"
DEFAULT_TEST_TIMEOUT_S = 300.0


def pytest_command(extra_args: str = "") -> list[str]:
    """The test step's command, run from the repository's root."""
    return [sys.executable, "-m", "pytest", "-q", "tests", "-k", GPU_TESTS, "-p", "no:cacheprovider",
            *shlex.split(extra_args)]


def run_tests(command: Sequence[str], cwd: Path, stream: TextIO, timeout_s: float | None = None, *,
              env: dict[str, str] | None = None, on_output: Callable[[], None] | None = None) -> TestRun:
    """Run a pytest command with GPU tests required and ``env`` added, echoing its output as it comes
    and calling ``on_output`` after each piece.  A hang is killed after ``timeout_s``; so is the run
    when this process is interrupted."""
    full_env = dict(os.environ, CUPYBN_REQUIRE_GPU="1", PYTHONUNBUFFERED="1", **(env or {}))
    # derandomised Hypothesis without deadlines: the first call of a kernel compiles it
    full_env.setdefault("HYPOTHESIS_PROFILE", "ci")
    started = time.perf_counter()
    # Its own process group, so that a time-out kills whatever the run started too.
    proc = subprocess.Popen(list(command), cwd=cwd, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    killed = threading.Event()

    def kill() -> None:
        killed.set()
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:  # it has just ended
            pass

    watchdog = threading.Timer(timeout_s, kill) if timeout_s else None
    if watchdog:
        watchdog.start()
    assert proc.stdout is not None
    # pieces, not lines: pytest -q prints a test's progress letter without a newline
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    output = []
    try:
        while chunk := os.read(proc.stdout.fileno(), 1 << 16):
            text = decoder.decode(chunk)
            stream.write(text)
            stream.flush()
            output.append(text)
            if on_output:
                on_output()
        status = proc.wait()
    except BaseException:
        kill()
        proc.wait()
        raise
    finally:
        if watchdog:
            watchdog.cancel()
        proc.stdout.close()
    return TestRun(ran=True, command=list(command), exit_status=None if killed.is_set() else status,
                   counts=parse_pytest_counts("".join(output)), seconds=round(time.perf_counter() - started, 1),
                   note=f"killed after {timeout_s:g} s" if killed.is_set() else "")


# ---- the machine ------------------------------------------------------------------------
@dataclass
class Machine:
    device: dict
    versions: dict


def _cuda_version(v: int) -> str:
    return f"{v // 1000}.{v % 1000 // 10}"


def device_slug(name: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3'."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "gpu"


def _versions(**more: Any) -> dict:
    import cupybn

    versions = {"python": platform.python_version(), "numpy": np.__version__, **more, "cupybn": cupybn.__version__}
    try:
        import torch
    except Exception:  # not installed, or libraries that fail to load
        return {**versions, "torch": None}
    return {**versions, "torch": torch.__version__, "torch_cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version() if torch.cuda.is_available() else None}


def probe_gpu() -> Machine | str:
    """The GPU and the versions, or a one-line reason why there is none (no CuPy, no GPU)."""
    cupy, why = cupy_with_gpu()
    if cupy is None:
        return why
    try:
        runtime = cupy.cuda.runtime
        return Machine(_cupy_device(cupy), _versions(cupy=cupy.__version__,
                                                     cuda_driver=_cuda_version(runtime.driverGetVersion()),
                                                     cuda_runtime=_cuda_version(runtime.runtimeGetVersion())))
    except Exception as e:
        return f"the GPU could not be set up: {type(e).__name__}: {' '.join(str(e).split())}"


def _cupy_device(cupy) -> dict:
    dev = cupy.cuda.Device()
    props = cupy.cuda.runtime.getDeviceProperties(dev.id)
    name = props["name"]
    name = name.decode(errors="replace") if isinstance(name, bytes) else str(name)
    free, total = dev.mem_info
    return {"id": dev.id, "name": name, "compute_capability": f"{props['major']}.{props['minor']}",
            "sm_count": int(props["multiProcessorCount"]), "memory_bytes": int(total), "free_bytes": int(free),
            "l2_bytes": int(props.get("l2CacheSize", 0)) or None}


def host_machine() -> Machine:
    """CUPYBN_GPU_BENCH_DEVICE=host: no GPU; the benchmarks run on NumPy arrays."""
    return Machine({"id": None, "name": "host", "note": "CUPYBN_GPU_BENCH_DEVICE=host: NumPy arrays, wall clock"},
                   _versions())


# ---- output ---------------------------------------------------------------------------------
def _fmt(v: float | None, spec: str, width: int) -> str:
    return f"{'-':>{width}}" if v is None else f"{v:>{width}{spec}}"


def format_device(device: dict, versions: dict) -> str:
    mem, l2 = device.get("memory_bytes"), device.get("l2_bytes")
    facts = [device["note"]] if device.get("note") else [
        f"compute capability {device.get('compute_capability')}", f"{device.get('sm_count')} SMs",
        f"{mem / 2**30:.1f} GiB" if mem else "memory unknown", f"L2 {l2 / MIB:.0f} MiB" if l2 else "L2 unknown"]
    return (f"device   {device.get('name')} ({', '.join(facts)})\n"
            "versions " + ", ".join(f"{k} {v}" for k, v in versions.items() if v is not None))


def _table_row(label: str, m: Measurement, rows: Sequence[Measurement]) -> str:
    if not m.ok:
        return f"  {label:<14}{m.implementation:<10}  error: {(m.error or '')[:90]}"
    share = None if m.roofline_share is None else 100 * m.roofline_share
    # cupybn's time over this implementation's: below 1, cupybn is faster
    vs = None if m.implementation == "cupybn" else ratio(rows, m.case, m.mode, m.implementation)
    return (f"  {label:<14}{m.implementation:<10}{_fmt(m.median_us, '.1f', 11)}{_fmt(m.min_us, '.1f', 11)}"
            f"{_fmt(m.gbps, '.0f', 9)}{_fmt(share, '.1f', 9)}%"
            f"{' ' * 13 if vs is None else _fmt(vs, '.2f', 13)}{_fmt(m.max_err, '.1e', 12)}")


def format_case_table(rows: Sequence[Measurement], *, repeat: int, calls: int) -> str:
    """One case's measurements, a row each, in the order they ran (mode by mode)."""
    first = rows[0]
    lines = [f"{first.case}: x {first.nbytes / 1e6:.1f} MB, {first.inputs} inputs rotated, "
             f"median of {repeat} rounds of {calls} calls",
             f"  {'mode':<14}{'impl':<10}{'median us':>11}{'min us':>11}{'GB/s':>9}{'roofline':>10}"
             f"{'cupybn/impl':>13}{'err vs f64':>12}"]
    modes = [m.mode for m in rows]
    lines += [_table_row(m.mode if i == modes.index(m.mode) else "", m, rows) for i, m in enumerate(rows)]
    return "\n".join(lines)


def format_overview(measurements: Sequence[Measurement]) -> str:
    """One line per case: cupybn's share of the roofline and its time over torch's, per mode."""
    lines = [f"{'case':<28}{'x MB':>8}" + "".join(f"{ABBREV[m] + ' roof':>10}{ABBREV[m] + '/torch':>11}"
                                                   for m in MODES)]
    for case in dict.fromkeys(m.case for m in measurements):
        rows = [m for m in measurements if m.case == case]
        cells = ""
        for mode in MODES:
            mine = _find(rows, case, mode, "cupybn")
            if mine is None or mine.ok:
                share = None if mine is None or mine.roofline_share is None else 100 * mine.roofline_share
                cells += _fmt(share, ".0f", 9) + ("%" if share is not None else " ")
            else:
                cells += f"{'error':>10}"
            cells += _fmt(ratio(rows, case, mode, "torch"), ".2f", 11)
        lines.append(f"{case:<28}{rows[0].nbytes / 1e6:>8.1f}{cells}")
    return "\n".join(lines)


def _over(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else a / b


def format_epilogue(measurements: Sequence[Measurement]) -> str:
    """The fused epilogue per case and mode: cupybn's time, the unfused calls' and torch's, and
    theirs over cupybn's (above 1: the fused call is faster)."""
    lines = [f"  {'case':<26}{'mode':<24}{'cupybn us':>11}{'unfused us':>12}{'torch us':>10}"
             f"{'unfused/cupybn':>16}{'torch/cupybn':>14}{'roofline':>10}"]
    for case in dict.fromkeys(m.case for m in measurements):
        for mode in dict.fromkeys(m.mode for m in measurements if m.case == case):
            got = {impl: _find(measurements, case, mode, impl) for impl in ("cupybn", "unfused", "torch")}
            us = {impl: m.median_us if m is not None and m.ok else None for impl, m in got.items()}
            mine = got["cupybn"]
            share = None if mine is None or mine.roofline_share is None else 100 * mine.roofline_share
            over = {impl: _over(us[impl], us["cupybn"]) for impl in ("unfused", "torch")}
            lines.append(f"  {case:<26}{mode:<24}{_fmt(us['cupybn'], '.1f', 11)}{_fmt(us['unfused'], '.1f', 12)}"
                         f"{_fmt(us['torch'], '.1f', 10)}{_fmt(over['unfused'], '.2f', 16)}"
                         f"{_fmt(over['torch'], '.2f', 14)}{_fmt(share, '.1f', 9)}%")
    return "\n".join(lines)


def format_targets(targets: Sequence[dict]) -> str:
    lines = []
    for t in targets:
        mark = {True: "MET    ", False: "NOT MET", None: "n/a    "}[t["met"]]
        if t["value"] is None:
            detail = t.get("note", "not measured")
        elif t["name"].endswith("roofline"):
            detail = (f"{t['cases_met']}/{t['cases']} cases, worst {100 * t['value']:.1f}% ({t['worst_case']})"
                      + (f"; {t['note']}" if t.get("note") else ""))
        else:
            detail = f"median cupybn/torch {t['value']:.2f} over {t['cases']} cases ({t['cases_met']} faster)"
        lines.append(f"  {mark}  {t['description']}: {detail}")
    return "\n".join(lines)


def format_tests(tests: TestRun) -> str:
    if not tests.ran:
        return f"not run ({tests.note})"
    counts = ", ".join(f"{n} {k}" for k, n in tests.counts.items()) or "no summary line"
    state = "passed" if tests.passed else ("timed out" if tests.exit_status is None else "FAILED")
    return f"{state} ({counts}; exit status {tests.exit_status}; {tests.seconds:.0f} s)"


def exit_status(tests: TestRun, sanitizers: Sequence[dict], benchmarks: TestRun,
                measurements: Sequence[Measurement]) -> int:
    """0 when the tests passed, the sanitizers found nothing and the benchmarks ran through with every
    implementation measured; 1 otherwise.  Missed targets do not fail the command."""
    sanitized = all(r.get("clean") for r in sanitizers if r["ran"])
    benchmarked = benchmarks.ran and benchmarks.exit_status == 0 and bool(measurements)
    return 0 if tests.passed and sanitized and benchmarked and all(m.ok for m in measurements) else 1


def build_report(*, machine: Machine, today: str, argv: Sequence[str], settings: dict, tests: TestRun,
                 sanitizers: Sequence[dict], benchmarks: TestRun, results: BenchmarkResults, status: int | None,
                 complete: bool = True) -> dict:
    """The JSON report; ``complete`` False (and ``status`` None) for the one written after each step."""
    measurements = results.measurements
    return {"schema": SCHEMA, "date": today, "command": ["python", "-m", "cupybn", "gpu-check", *argv],
            "complete": complete, "device": machine.device, "versions": machine.versions, "settings": settings,
            "implementations": {"run": list(dict.fromkeys(m.implementation for m in measurements)),
                                "unavailable": results.unavailable},
            "tests": asdict(tests), "sanitizers": list(sanitizers), "benchmarks": asdict(benchmarks),
            "copy": results.copy, "measurements": [{**asdict(m), "shape": list(m.shape)} for m in measurements],
            "epilogue": [{**asdict(m), "shape": list(m.shape)} for m in results.epilogue],
            "targets": evaluate_targets(measurements), "exit_status": status}


# ---- compute-sanitizer -----------------------------------------------------------------
SANITIZER_TOOLS = ("memcheck", "racecheck")
SANITIZER_TIMEOUT_S = 180.0


def run_sanitizers(stream: TextIO, *, timeout_s: float = SANITIZER_TIMEOUT_S,
                   executable: str | None = None) -> list[dict]:
    """memcheck and racecheck on one small call of each mode (``python -m cupybn._gpu_smoke``)."""
    exe = executable or shutil.which("compute-sanitizer")
    if exe is None:
        return [{"tool": tool, "ran": False, "note": "compute-sanitizer is not on PATH"} for tool in SANITIZER_TOOLS]
    results = []
    for tool in SANITIZER_TOOLS:
        command = [exe, "--tool", tool, "--error-exitcode", "1", sys.executable, "-m", "cupybn._gpu_smoke"]
        print(f"\n== compute-sanitizer: {' '.join(command[1:4])} ...", file=stream, flush=True)
        run = run_tests(command, Path.cwd(), stream, timeout_s)
        results.append({"tool": tool, "ran": True, "command": command, "exit_status": run.exit_status,
                        "seconds": run.seconds, "note": run.note,
                        "clean": run.exit_status == 0})
    return results


def default_json_path(device_name: str, today: str) -> Path:
    """benchmarks/results/ of the checkout (the current directory otherwise)."""
    root = Path(__file__).resolve().parent.parent
    folder = root / "benchmarks" / "results" if (root / "benchmarks").is_dir() else Path.cwd()
    return folder / f"gpu-{device_slug(device_name)}-{today}.json"


def resolve_json_path(arg: str | None, device_name: str, today: str) -> Path:
    """--json PATH as given; a folder gets the default file name in it."""
    default = default_json_path(device_name, today)
    if arg is None:
        return default
    path = Path(arg)
    return path / default.name if path.is_dir() or arg.endswith(("/", os.sep)) else path


# ---- command line ------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m cupybn gpu-check",
        description="On a machine with an NVIDIA GPU and CuPy: print the device, run the tests with GPU tests "
                    "required, then the GPU benchmarks of benchmarks/bench_gpu.py (the copy roofline, and cupybn, "
                    "torch and textbook CuPy on ResNet-50's BatchNorm shapes); print tables and targets, and write "
                    "a JSON report.  Exit status: 0 all well, 1 a test failed, a sanitizer reported, an implementation "
                    "raised or the benchmarks did not run through, 2 no CuPy or GPU.  CUPYBN_GPU_BENCH_* "
                    "variables reach the benchmarks (benchmarks/gpu_cases.py).")
    parser.add_argument("--quick", action="store_true", help="3 shapes, float32, NCHW, fewer rounds: a smoke run")
    parser.add_argument("--cases", action="append", metavar="TEXT",
                        help="only cases whose name contains TEXT (repeatable; names look like "
                             "256x64x56x56-nhwc-f16, 8192x4096-2d-f32)")
    parser.add_argument("--list", action="store_true", help="print the selected cases and exit (needs no GPU)")
    parser.add_argument("--no-tests", action="store_true", help="skip the test suite")
    parser.add_argument("--test-timeout", type=float, metavar="S",
                        help=f"kill the GPU tests after S seconds (default {DEFAULT_TEST_TIMEOUT_S:g})")
    parser.add_argument("--no-sanitizers", action="store_true",
                        help="skip compute-sanitizer (memcheck, racecheck) on one small call of each mode")
    parser.add_argument("--pytest-args", default="", metavar="ARGS",
                        help="more pytest arguments for the tests, one string (e.g. --pytest-args='-n 8 -x')")
    g = load_gpu_cases()  # the benchmarks' defaults, in a checkout
    parser.add_argument("--repeat", type=int, help="timed rounds per benchmark" + (
        f", of {g.CALLS_PER_ROUND} calls each (default {g.DEFAULT_REPEAT}; {g.QUICK_REPEAT} with --quick)"
        if g else ""))
    parser.add_argument("--warmup", type=int,
                        help="untimed rounds before them" + (f" (default {g.DEFAULT_WARMUP})" if g else ""))
    parser.add_argument("--copy-mib", type=int,
                        help="size of the copy-roofline buffer" + (f" (default {g.DEFAULT_COPY_MIB})" if g else ""))
    parser.add_argument("--bench-timeout", type=float, metavar="S",
                        help=f"kill the benchmarks after S seconds (default: what is left of "
                             f"{COMMAND_BUDGET_S / 60:g} minutes since the start, at least {MIN_BENCH_TIMEOUT_S:g} s)")
    parser.add_argument("--json", metavar="PATH", help="where to write the report (a folder: the default name in "
                                                       "it; default benchmarks/results/gpu-<device>-<date>.json)")
    return parser


def _settings_report(args: argparse.Namespace, bench: Plan) -> dict:
    settings: dict[str, Any] = {"quick": args.quick, "cases_filter": args.cases, "large_bytes": LARGE_BYTES,
                                "roofline_targets": ROOFLINE_TARGETS}
    s, g = bench.settings, bench.gpu_cases
    if s is None or g is None:
        return settings
    timing = (f"rounds of {g.CALLS_PER_ROUND} calls queued without waiting; CUDA events at a round's start and "
              f"end, a {g.DELAY_US} us delay kernel before the start; per call: round / {g.CALLS_PER_ROUND}"
              if s.device == "cuda" else f"host: time.perf_counter around rounds of {g.CALLS_PER_ROUND} calls")
    settings.update(device=s.device, scale=[s.batch, s.image], warmup=s.warmup, repeat=s.repeat,
                    calls_per_round=g.CALLS_PER_ROUND, copy_mib=s.copy_mib, eps=g.EPS, momentum=g.MOMENTUM,
                    passes=g.PASSES, rotation_cover_l2=g.ROTATION_COVER, timing=timing,
                    epilogue_cases=[c.name for c in g.epilogue_cases(bench.cases)] if s.epilogue else [],
                    epilogue_passes=g.EPILOGUE_PASSES)
    return settings


def run_benchmarks(bench: Plan, args: argparse.Namespace, report_path: Path, results: BenchmarkResults, *,
                   stream: TextIO, save: Callable[[], None], timeout_s: float) -> TestRun:
    """``pytest benchmarks/bench_gpu.py --benchmark-only`` from the checkout's root, with the options as
    its settings; each benchmark's record lands in ``results`` (and ``save`` runs) as soon as it is done.
    pytest-benchmark's own JSON goes next to the report."""
    g, folder = bench.gpu_cases, benchmarks_dir()
    if g is None or folder is None:
        return TestRun(ran=False, note="the benchmarks need a checkout: no benchmarks/bench_gpu.py next to the package")

    def say(text: str) -> None:
        print(text, file=stream, flush=True)

    command = benchmark_command(report_path.with_suffix(".pytest-benchmark.json"))
    say(f"\n== benchmarks: {len(bench.cases)} cases x {len(g.MODES)} modes x {', '.join(g.IMPLEMENTATIONS)}; "
        f"median of {bench.settings.repeat} rounds of {g.CALLS_PER_ROUND} calls after {bench.settings.warmup} "
        f"warm-up rounds; roofline = {', '.join(f'{m} {p}' for m, p in g.PASSES.items())} passes of x at the "
        f"copy's GB/s\n== {' '.join(command)}  (time-out {timeout_s:.0f} s)")
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as scratch:
        records = Path(scratch) / "records.jsonl"
        watch = BenchmarkWatch(RecordFile(records), results, cases=len(bench.cases), repeat=bench.settings.repeat,
                               calls=g.CALLS_PER_ROUND, say=say, save=save)
        run = run_tests(command, folder.parent, stream, timeout_s,
                        env={**benchmark_environment(args), RESULTS_ENV: str(records)}, on_output=watch.poll)
        watch.finish()
    return run


def run(args: argparse.Namespace, machine: Machine, *, argv: Sequence[str] = (), stream: TextIO | None = None,
        test_command: Sequence[str] | None = None, today: str | None = None, started: float | None = None) -> int:
    """The whole check on ``machine``; returns the exit status.  ``stream`` is where it prints (stdout),
    ``test_command`` replaces the test suite (the tests use a stand-in), ``started`` is when the command
    began (its time budget counts from there)."""
    out = stream or sys.stdout
    started = time.monotonic() if started is None else started
    today = today or date.today().isoformat()
    bench = plan(args)

    def say(text: str = "") -> None:
        print(text, file=out, flush=True)

    say(format_device(machine.device, machine.versions))
    settings = _settings_report(args, bench)
    path = resolve_json_path(args.json, machine.device.get("name") or "gpu", today)
    path.parent.mkdir(parents=True, exist_ok=True)
    results = BenchmarkResults()
    state: dict[str, Any] = {"tests": TestRun(ran=False, note="not reached"), "sanitizers": [],
                             "benchmarks": TestRun(ran=False, note="not reached")}

    def save(status: int | None = None) -> None:
        """The report so far: a run cut short (a slot that ends) still leaves its results."""
        report = build_report(machine=machine, today=today, argv=argv, settings=settings, tests=state["tests"],
                              sanitizers=state["sanitizers"], benchmarks=state["benchmarks"], results=results,
                              status=status, complete=status is not None)
        path.write_text(json.dumps(report, indent=1) + "\n")

    folder = tests_dir()
    if args.no_tests:
        tests = TestRun(ran=False, note="--no-tests")
    elif folder is None and test_command is None:
        tests = TestRun(ran=False, note="no tests/ folder next to the package (not a checkout)")
    else:
        command = list(test_command or pytest_command(args.pytest_args))
        say(f"\n== tests: CUPYBN_REQUIRE_GPU=1 {' '.join(command)}")
        tests = run_tests(command, folder.parent if folder else Path.cwd(), out,
                          args.test_timeout or DEFAULT_TEST_TIMEOUT_S)
    state["tests"] = tests
    say(f"== tests: {format_tests(tests)}")
    save()

    if not args.no_sanitizers:
        state["sanitizers"] = run_sanitizers(out)
        say("== compute-sanitizer: " + "; ".join(
            f"{r['tool']} {'clean' if r.get('clean') else 'not run' if not r['ran'] else 'FAILED'}"
            for r in state["sanitizers"]))
        save()

    state["benchmarks"] = run_benchmarks(bench, args, path, results, stream=out, save=save, timeout_s=(
        args.bench_timeout or max(MIN_BENCH_TIMEOUT_S, COMMAND_BUDGET_S - (time.monotonic() - started))))
    say(f"== benchmarks: {format_tests(state['benchmarks'])}")

    measurements = results.measurements
    targets = evaluate_targets(measurements)
    status = exit_status(tests, state["sanitizers"], state["benchmarks"], [*measurements, *results.epilogue])
    say("\n== overview (cupybn: share of the roofline, and time / torch's: below 1 is faster)")
    say(format_overview(measurements))
    if results.epilogue:
        say("\n== fused epilogue relu(BN(x) + z): cupybn fused, the same work unfused, torch")
        say(format_epilogue(results.epilogue))
    say(f"\n== targets (large: x >= {LARGE_BYTES // MIB} MiB; a missed target does not fail the command)")
    say(format_targets(targets))
    save(status)
    errors = sum(not m.ok for m in measurements)
    met = sum(t["met"] is True for t in targets)
    say(f"\ngpu-check: tests {format_tests(tests)}; {len(measurements)} measurements, {errors} errors; "
        f"targets met {met}/{len(targets)}; report {path}; exit status {status}")
    return status


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m cupybn gpu-check [options]``; returns the exit status (2: no CuPy or no GPU)."""
    started = time.monotonic()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if (args.repeat is not None and args.repeat < 1 or args.warmup is not None and args.warmup < 0
            or args.copy_mib is not None and args.copy_mib < 1):
        print("gpu-check: --repeat and --copy-mib must be >= 1 and --warmup >= 0", file=sys.stderr)
        return 2
    try:
        bench = plan(args)
    except ValueError as e:  # a CUPYBN_GPU_BENCH_* variable that makes no sense
        print(f"gpu-check: {e}", file=sys.stderr)
        return 2
    if bench.settings is None and args.list:
        print("gpu-check: --list needs a checkout (benchmarks/gpu_cases.py next to the package)", file=sys.stderr)
        return 2
    if bench.settings is not None and not bench.cases:
        print(f"gpu-check: no case matches {args.cases}; see --list", file=sys.stderr)
        return 2
    if args.list:
        for case in bench.cases:
            print(f"{case.name:<28}{case.nbytes / 1e6:>9.1f} MB")
        return 0
    machine = host_machine() if bench.settings is not None and bench.settings.device == "host" else probe_gpu()
    if isinstance(machine, str):
        print(f"gpu-check: {machine}", file=sys.stderr)
        return 2
    return run(args, machine, argv=argv, started=started)
