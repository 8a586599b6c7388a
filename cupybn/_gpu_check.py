"""``python -m cupybn gpu-check``: every GPU check and benchmark in one command.

GPU time is borrowed rarely and briefly, so one command does it all: print the
device, run the test suite with GPU tests required, measure the copy roofline,
time cupybn, PyTorch and a textbook CuPy implementation on ResNet-50's
BatchNorm shapes, print tables and the targets, and write one JSON file.

Only the timing needs a GPU.  Everything else takes its array module, timers
and implementations from a :class:`GpuEnv`, so the tests drive the whole
command with NumPy arrays and fake timers.  CuPy and torch are imported only
inside functions: ``import cupybn`` never pulls them in.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import date
from pathlib import Path
from typing import Any, Protocol, TextIO

import numpy as np

from . import _textbook as textbook  # the one textbook BN, on CuPy arrays here

SCHEMA = "cupybn-gpu-check/1"
MODES = ("forward-train", "inference", "backward")
# Passes over x-sized data that each mode cannot avoid: forward training reads x
# for the statistics, reads it again and writes y; inference reads x and writes y
# (one copy); backward reads dy and x for the sums, reads both again and writes dx.
PASSES = {"forward-train": 3, "inference": 2, "backward": 5}
EPS = 1e-5
MOMENTUM = 0.1
SEED = 20240601
MIB = 1 << 20
LARGE_BYTES = 64 * MIB  # "large input": the targets are judged on these
ROOFLINE_TARGETS = {"forward-train": 0.80, "inference": 0.90, "backward": 0.80}
# Enough distinct inputs that those visited between two uses of one exceed the L2
# cache several times over: otherwise small cases are timed from cache.
ROTATION_COVER = 3
MAX_ROTATION = 64
DEFAULT_L2_BYTES = 128 * MIB  # when the device does not say
DEFAULT_WARMUP = 5
DEFAULT_REPEAT = 50
QUICK_REPEAT = 20
DEFAULT_COPY_MIB = 1024
RESNET50_BATCH = 256
RESNET50_IMAGE = 224
ROWS_SHAPE = (8192, 4096)
QUICK_SHAPES = ((256, 64, 112, 112), (256, 1024, 14, 14), (256, 2048, 7, 7))
DTYPES = ("float32", "float16")
LAYOUTS = ("nchw", "nhwc")
SHORT_DTYPE = {"float16": "f16", "float32": "f32", "float64": "f64"}


# ---- cases -------------------------------------------------------------------
@dataclass(frozen=True)
class Case:
    """One benchmark input.

    ``shape`` is the logical shape, channels on axis 1.  ``layout``: "nchw"
    (C-contiguous), "nhwc" (the same NCHW-shaped array with channels-last
    strides, which is what torch.channels_last is) or "2d" (N, C).
    """

    shape: tuple[int, ...]
    layout: str
    dtype: str

    @property
    def name(self) -> str:
        return f"{'x'.join(map(str, self.shape))}-{self.layout}-{SHORT_DTYPE[self.dtype]}"

    @property
    def channels(self) -> int:
        return self.shape[1]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * np.dtype(self.dtype).itemsize


def _conv_out(size: int, stride: int) -> int:
    # every ResNet convolution pads to "same", so only the stride shrinks the map
    return (size + stride - 1) // stride


def resnet50_bn_shapes(batch: int = RESNET50_BATCH, image: int = RESNET50_IMAGE) -> list[tuple[int, int, int, int]]:
    """The distinct input shapes of ResNet-50's BatchNorm layers, in network order.

    torchvision's ResNet-50 (v1.5: the stride-2 convolution of a downsampling
    bottleneck is its 3x3 one): a 7x7/2 stem convolution, BN, a 3x3/2 max-pool,
    then 3, 4, 6, 3 bottlenecks of widths 64, 128, 256, 512 and expansion 4.
    """
    shapes: list[tuple[int, int, int, int]] = []

    def bn(channels: int, size: int) -> None:
        if (batch, channels, size, size) not in shapes:
            shapes.append((batch, channels, size, size))

    size = _conv_out(image, 2)
    bn(64, size)
    size = _conv_out(size, 2)  # max-pool
    in_channels = 64
    for stage, (blocks, width) in enumerate(zip((3, 4, 6, 3), (64, 128, 256, 512), strict=True)):
        for block in range(blocks):
            stride = 2 if stage > 0 and block == 0 else 1
            bn(width, size)                 # after the 1x1 reduction, before the stride
            out_size = _conv_out(size, stride)
            bn(width, out_size)             # after the 3x3 convolution
            bn(4 * width, out_size)         # after the 1x1 expansion
            if block == 0 and (stride != 1 or in_channels != 4 * width):
                bn(4 * width, out_size)     # the shortcut's projection
            size, in_channels = out_size, 4 * width
    return shapes


def all_cases() -> list[Case]:
    """ResNet-50's BN shapes in both layouts and both dtypes, then the (8192, 4096) rows."""
    cases = [Case(shape, layout, dtype)
             for shape in resnet50_bn_shapes() for layout in LAYOUTS for dtype in DTYPES]
    return cases + [Case(ROWS_SHAPE, "2d", dtype) for dtype in DTYPES]


def quick_cases() -> list[Case]:
    """A smoke subset: three ResNet-50 shapes (large map, many channels, small map), float32, NCHW."""
    return [Case(shape, "nchw", "float32") for shape in QUICK_SHAPES]


def select_cases(cases: Sequence[Case], patterns: Sequence[str] | None) -> list[Case]:
    """The cases whose name contains any of ``patterns`` (all of them when there are none)."""
    if not patterns:
        return list(cases)
    return [c for c in cases if any(p in c.name for p in patterns)]


def rotation_count(nbytes: int, l2_bytes: int) -> int:
    """How many distinct inputs to cycle through so that the set covers the L2 cache ROTATION_COVER times."""
    return max(2, min(MAX_ROTATION, math.ceil(ROTATION_COVER * l2_bytes / nbytes)))


# ---- arithmetic of the roofline ---------------------------------------------------
def copy_gbps(nbytes: int, time_us: float) -> float:
    """Bandwidth of a copy of ``nbytes``: it reads and writes them, 2 * nbytes moved."""
    return 2 * nbytes / time_us / 1e3


def effective_gbps(mode: str, nbytes: int, time_us: float) -> float:
    """GB/s as if ``mode`` moved exactly its PASSES over x's bytes."""
    return PASSES[mode] * nbytes / time_us / 1e3


def roofline_share(mode: str, nbytes: int, time_us: float, roofline_gbps: float) -> float:
    """The copy-bound time of ``mode`` divided by the measured time (1.0: at the roofline)."""
    return effective_gbps(mode, nbytes, time_us) / roofline_gbps


def summarize(samples_us: Sequence[float]) -> dict[str, float]:
    """median, min and interquartile range of per-call times."""
    q1, q3 = np.percentile(np.asarray(samples_us, dtype=np.float64), [25, 75])
    return {"median_us": float(statistics.median(samples_us)), "min_us": float(min(samples_us)),
            "iqr_us": float(q3 - q1)}


# ---- timers ----------------------------------------------------------------------------
class Timer(Protocol):
    def __call__(self, fn: Callable[[Any], object], inputs: Sequence[Any], *, warmup: int,
                 repeat: int) -> list[float]:
        """Per-call times in microseconds of ``fn(inputs[i % len(inputs)])`` for i < repeat, after warm-up."""


class EventTimer:
    """Times calls with pairs of CUDA events recorded around each call.

    The host does not wait between calls, so it queues work ahead of the GPU
    and an event pair spans the GPU's time for that call alone, as in a
    training loop; where the host cannot keep up (tiny inputs, Python overhead),
    the gaps show up in the times, as they would there.
    """

    def __init__(self, new_event: Callable[[], Any], elapsed_ms: Callable[[Any, Any], float]):
        self.new_event = new_event
        self.elapsed_ms = elapsed_ms

    def __call__(self, fn: Callable[[Any], object], inputs: Sequence[Any], *, warmup: int,
                 repeat: int) -> list[float]:
        if repeat < 1 or not inputs:
            raise ValueError("EventTimer needs repeat >= 1 and at least one input")
        for i in range(warmup):
            fn(inputs[i % len(inputs)])
        pairs = []
        for i in range(repeat):
            start, end = self.new_event(), self.new_event()
            start.record()
            fn(inputs[i % len(inputs)])  # the result is dropped at once: outputs return to the pool
            end.record()
            pairs.append((start, end))
        pairs[-1][1].synchronize()  # one stream: the last event done means all are
        return [self.elapsed_ms(start, end) * 1e3 for start, end in pairs]


def max_rel_err(xp, value, ref) -> float:
    """max over elements of |value - ref| / max(1, |ref|), in float64."""
    diff = xp.abs(xp.asarray(value).astype(xp.float64) - ref) / xp.maximum(1.0, xp.abs(ref))
    return float(diff.max())


# ---- data and implementations --------------------------------------------------------------
@dataclass
class CaseData:
    """``count`` distinct inputs x and upstream gradients dy, and float32 parameters."""

    xs: list
    dys: list
    gamma: Any
    beta: Any
    running_mean: Any
    running_var: Any


def _sampler(xp, seed: int) -> Callable[[tuple[int, ...]], Any]:
    """Seeded float32 standard normals drawn on the array module's own device."""
    if xp.__name__ == "numpy":
        rng = np.random.default_rng(seed)
        return lambda shape: rng.standard_normal(shape, dtype=np.float32)
    state = xp.random.RandomState(seed)  # CuPy's: float32 drawn directly on the GPU
    return lambda shape: state.standard_normal(shape, dtype=xp.float32)


def _sample_x(sample, case: Case):
    if case.layout == "nhwc":
        n, c, *spatial = case.shape
        # drawn channels-last, seen NCHW-shaped: channels-last strides, like torch.channels_last
        a = sample((n, *spatial, c))
        a = a.transpose(0, a.ndim - 1, *range(1, a.ndim - 1))
    else:
        a = sample(case.shape)
    return a.astype(case.dtype, copy=False)


def make_case_data(xp, case: Case, count: int, seed: int = SEED) -> CaseData:
    sample = _sampler(xp, seed)
    xs = [_sample_x(sample, case) for _ in range(count)]
    dys = [_sample_x(sample, case) for _ in range(count)]
    c = (case.channels,)
    return CaseData(xs=xs, dys=dys, gamma=1 + 0.1 * sample(c), beta=0.1 * sample(c),
                    running_mean=0.1 * sample(c), running_var=1 + 0.1 * abs(sample(c)))


@dataclass
class Target:
    """What one implementation times for one mode: ``fn(inputs[i])``, and its main output (y or dx)."""

    fn: Callable[[Any], Any]
    inputs: list
    output: Callable[[Any], Any]


@dataclass(frozen=True)
class Impl:
    name: str
    prepare: Callable[[str, CaseData], Target]
    clock: str  # the key of the timer that times it ("cupy" or "torch")


def _first(result):
    return result[0]


def cupybn_impl() -> Impl:
    """cupybn through its public API (the backend follows from the arrays)."""
    from .api import batch_norm, batch_norm_backward

    def prepare(mode: str, d: CaseData) -> Target:
        if mode == "forward-train":
            rm, rv = d.running_mean.copy(), d.running_var.copy()
            return Target(lambda x: batch_norm(x, d.gamma, d.beta, running_mean=rm, running_var=rv, training=True,
                                               momentum=MOMENTUM, eps=EPS, axis=1), d.xs, _first)
        if mode == "inference":
            return Target(lambda x: batch_norm(x, d.gamma, d.beta, running_mean=d.running_mean,
                                               running_var=d.running_var, training=False, eps=EPS, axis=1),
                          d.xs, _first)
        saved = [batch_norm(x, d.gamma, d.beta, training=True, eps=EPS, axis=1)[1] for x in d.xs]
        return Target(lambda a: batch_norm_backward(*a), list(zip(d.dys, saved, strict=True)), _first)

    return Impl("cupybn", prepare, "cupy")


def textbook_impl(xp) -> Impl:
    """The textbook formulas in plain ``xp`` operations (CuPy on the GPU)."""

    def prepare(mode: str, d: CaseData) -> Target:
        if mode == "forward-train":
            rm, rv = d.running_mean.copy(), d.running_var.copy()
            return Target(lambda x: textbook.forward_train(x, d.gamma, d.beta, eps=EPS, running_mean=rm,
                                                           running_var=rv, momentum=MOMENTUM), d.xs, _first)
        if mode == "inference":
            return Target(lambda x: textbook.forward_infer(x, d.gamma, d.beta, d.running_mean, d.running_var,
                                                           eps=EPS), d.xs, lambda y: y)
        caches = [textbook.forward_train(x, d.gamma, d.beta, eps=EPS)[1] for x in d.xs]
        return Target(lambda a: textbook.backward(*a), list(zip(d.dys, caches, strict=True)), _first)

    return Impl("textbook", prepare, "cupy")


def _as_tensor(torch, a):
    """The same memory as a torch tensor (DLPack: no copy), layout checked."""
    t = torch.from_dlpack(a)
    if t.dim() == 4 and t.stride(1) == 1 and t.shape[1] > 1:
        ok = t.is_contiguous(memory_format=torch.channels_last)
    else:
        ok = t.is_contiguous()
    if not ok:
        raise ValueError(f"tensor of shape {tuple(t.shape)} has unexpected strides {t.stride()}")
    return t


def torch_impl(torch, xp) -> Impl:
    """torch.nn.functional.batch_norm (cuDNN or PyTorch's kernels, as PyTorch picks) on the same buffers."""
    F = torch.nn.functional

    def to_xp(t):
        return xp.from_dlpack(t.detach())

    def prepare(mode: str, d: CaseData) -> Target:
        xs = [_as_tensor(torch, x) for x in d.xs]
        w, b = _as_tensor(torch, d.gamma), _as_tensor(torch, d.beta)
        rm0, rv0 = _as_tensor(torch, d.running_mean), _as_tensor(torch, d.running_var)
        if mode == "forward-train":
            rm, rv = rm0.clone(), rv0.clone()
            return Target(lambda x: F.batch_norm(x, rm, rv, w, b, training=True, momentum=MOMENTUM, eps=EPS),
                          xs, to_xp)
        if mode == "inference":
            return Target(lambda x: F.batch_norm(x, rm0, rv0, w, b, training=False, eps=EPS), xs, to_xp)
        # backward alone: one graph per input, built once; each call runs its backward
        graphs = []
        rm, rv = rm0.clone(), rv0.clone()
        for x, dy in zip(xs, d.dys, strict=True):
            leaves = (x.detach().requires_grad_(), w.detach().requires_grad_(), b.detach().requires_grad_())
            y = F.batch_norm(leaves[0], rm, rv, leaves[1], leaves[2], training=True, momentum=MOMENTUM, eps=EPS)
            graphs.append((y, leaves, _as_tensor(torch, dy)))
        return Target(lambda g: torch.autograd.grad(g[0], g[1], g[2], retain_graph=True), graphs,
                      lambda grads: to_xp(grads[0]))

    return Impl("torch", prepare, "torch")


def reference_output(xp, mode: str, d: CaseData):
    """The main output of ``mode`` for the first input, computed in float64 by the textbook formulas."""
    x = d.xs[0].astype(xp.float64)
    g, b = d.gamma.astype(xp.float64), d.beta.astype(xp.float64)
    rm, rv = d.running_mean.astype(xp.float64), d.running_var.astype(xp.float64)
    if mode == "inference":
        return textbook.forward_infer(x, g, b, rm, rv, eps=EPS)
    y, cache = textbook.forward_train(x, g, b, eps=EPS)
    if mode == "forward-train":
        return y
    return textbook.backward(d.dys[0].astype(xp.float64), cache)[0]


# ---- measurements --------------------------------------------------------------------
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
    median_us: float | None = None
    min_us: float | None = None
    iqr_us: float | None = None
    gbps: float | None = None           # effective: PASSES[mode] * nbytes / median
    roofline_share: float | None = None  # gbps / copy roofline
    max_err: float | None = None        # main output vs float64, first input
    error: str | None = None            # set when the implementation raised

    @property
    def ok(self) -> bool:
        return self.error is None and self.median_us is not None


def measured(case: Case, mode: str, impl: str, samples_us: Sequence[float], roofline_gbps: float, *,
             inputs: int, max_err: float | None = None) -> Measurement:
    stats = summarize(samples_us)
    return Measurement(case.name, case.shape, case.layout, case.dtype, mode, impl, case.nbytes, inputs,
                       gbps=effective_gbps(mode, case.nbytes, stats["median_us"]),
                       roofline_share=roofline_share(mode, case.nbytes, stats["median_us"], roofline_gbps),
                       max_err=max_err, median_us=stats["median_us"], min_us=stats["min_us"],
                       iqr_us=stats["iqr_us"])


def failed(case: Case, mode: str, impl: str, error: BaseException, *, inputs: int) -> Measurement:
    message = " ".join(f"{type(error).__name__}: {error}".split())  # one line
    return Measurement(case.name, case.shape, case.layout, case.dtype, mode, impl, case.nbytes, inputs,
                       error=message[:500])


@dataclass
class GpuEnv:
    """What the command needs from the machine; :func:`probe_gpu` builds the real one."""

    xp: Any
    device: dict
    versions: dict
    timers: dict[str, Timer]
    impls: list[Impl]
    unavailable: dict[str, str] = field(default_factory=dict)  # implementation -> why it is not run
    copy_methods: Callable[[Any, Any], dict[str, Callable[[], object]]] | None = None
    release: Callable[[], None] = lambda: None  # hand cached device memory back between cases

    @property
    def l2_bytes(self) -> int:
        return int(self.device.get("l2_bytes") or DEFAULT_L2_BYTES)


def _call(fn: Callable[[], object]) -> object:
    return fn()


def _time_copies(env: GpuEnv, nbytes: int, warmup: int, repeat: int) -> tuple[int, dict]:
    xp = env.xp
    src = xp.ones(nbytes // 4, dtype=xp.float32)
    dst = xp.empty_like(src)
    def copyto() -> object:
        return xp.copyto(dst, src)

    methods = env.copy_methods(dst, src) if env.copy_methods else {"copyto": copyto}
    results = {}
    for name, fn in methods.items():
        stats = summarize(env.timers["cupy"](_call, [fn], warmup=warmup, repeat=repeat))
        results[name] = {**stats, "gbps": copy_gbps(src.nbytes, stats["median_us"])}
    return src.nbytes, results


def measure_copy(env: GpuEnv, nbytes: int, *, warmup: int, repeat: int) -> dict:
    """Device-to-device copy of one large buffer: the roofline is the fastest copy method's bandwidth."""
    copied, results = _time_copies(env, nbytes, warmup, repeat)
    env.release()
    best = max(results, key=lambda k: results[k]["gbps"])
    return {"nbytes": copied, "method": best, "gbps": results[best]["gbps"], "methods": results}


def _measure(env: GpuEnv, impl: Impl, mode: str, case: Case, data: CaseData, ref, roofline_gbps: float, *,
             warmup: int, repeat: int) -> Measurement:
    inputs = len(data.xs)
    try:
        target = impl.prepare(mode, data)
        first = target.output(target.fn(target.inputs[0]))  # also the first warm-up call
        err = None if ref is None else max_rel_err(env.xp, first, ref)
        del first
        samples = env.timers[impl.clock](target.fn, target.inputs, warmup=warmup, repeat=repeat)
        return measured(case, mode, impl.name, samples, roofline_gbps, inputs=inputs, max_err=err)
    except Exception as e:  # recorded; it makes the exit status 1
        return failed(case, mode, impl.name, e, inputs=inputs)


def benchmark_case(env: GpuEnv, case: Case, data: CaseData, roofline_gbps: float, *, warmup: int,
                   repeat: int) -> list[Measurement]:
    """Every mode and implementation on one case; an implementation that raises is recorded, not fatal."""
    out: list[Measurement] = []
    for mode in MODES:
        try:
            ref = reference_output(env.xp, mode, data)
        except Exception:  # the float64 reference needs ~10x x's memory: without it, errors are unknown
            ref = None
        env.release()
        for impl in env.impls:
            out.append(_measure(env, impl, mode, case, data, ref, roofline_gbps, warmup=warmup, repeat=repeat))
            env.release()
        del ref
    return out


def run_benchmarks(env: GpuEnv, cases: Sequence[Case], roofline_gbps: float, *, warmup: int, repeat: int,
                   stream: TextIO, after_case: Callable[[list[Measurement]], None] = lambda rows: None
                   ) -> list[Measurement]:
    """Every case in turn; ``after_case`` gets the measurements so far after each one."""
    results: list[Measurement] = []
    for i, case in enumerate(cases, 1):
        count = rotation_count(case.nbytes, env.l2_bytes)
        started = time.perf_counter()
        try:
            data = make_case_data(env.xp, case, count)
        except Exception as e:  # e.g. out of memory: every measurement of the case fails
            rows = [failed(case, mode, impl.name, e, inputs=count) for mode in MODES for impl in env.impls]
        else:
            rows = benchmark_case(env, case, data, roofline_gbps, warmup=warmup, repeat=repeat)
            del data
        env.release()
        results += rows
        print(f"\n[{i}/{len(cases)}, {time.perf_counter() - started:.1f} s] "
              f"{format_case_table(case, rows, repeat=repeat)}", file=stream, flush=True)
        after_case(results)
    return results


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
                             f"(x >= {large_bytes // MIB} MiB; {PASSES[mode]} passes of x)",
              "cases": len(rows), "cases_met": 0, "value": None, "worst_case": None, "met": None}
    ok = [m for m in rows if m.ok]
    if not ok:
        target["note"] = "not measured" if not rows else f"cupybn failed on all {len(rows)} large cases"
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


# ---- tests --------------------------------------------------------------------------
@dataclass
class TestRun:
    """The outcome of the test step: ``exit_status`` None when it was not run or timed out."""

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


def run_tests(command: Sequence[str], cwd: Path, stream: TextIO, timeout_s: float | None = None) -> TestRun:
    """Run the suite with GPU tests required, echoing its output; a hang is killed after ``timeout_s``."""
    env = dict(os.environ, CUPYBN_REQUIRE_GPU="1", PYTHONUNBUFFERED="1")
    # derandomised Hypothesis without deadlines: the first call of a kernel compiles it
    env.setdefault("HYPOTHESIS_PROFILE", "ci")
    started = time.perf_counter()
    # Its own process group, so that a time-out kills whatever the suite started too.
    proc = subprocess.Popen(list(command), cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, errors="replace", start_new_session=True)
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
    lines = []
    assert proc.stdout is not None
    for line in proc.stdout:
        stream.write(line)
        stream.flush()
        lines.append(line)
    status = proc.wait()
    if watchdog:
        watchdog.cancel()
    return TestRun(ran=True, command=list(command), exit_status=None if killed.is_set() else status,
                   counts=parse_pytest_counts("".join(lines)), seconds=round(time.perf_counter() - started, 1),
                   note=f"killed after {timeout_s:g} s" if killed.is_set() else "")


# ---- the machine ------------------------------------------------------------------------
def _cuda_version(v: int) -> str:
    return f"{v // 1000}.{v % 1000 // 10}"


def device_slug(name: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3'."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "gpu"


def probe_gpu() -> GpuEnv | str:
    """The real environment, or a one-line reason why there is none (no CuPy, no GPU)."""
    try:
        import cupy
    except Exception as e:  # ImportError, or CUDA libraries that fail to load
        return f"CuPy is not importable ({type(e).__name__}: {e}); install cupy-cuda12x or cupy-cuda13x"
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as e:  # no driver, no device
        return f"no usable NVIDIA GPU: {' '.join(str(e).split()) or type(e).__name__}"
    if count < 1:
        return "no NVIDIA GPU found"
    try:
        return _cupy_env(cupy)
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


def _torch_or_reason() -> tuple[Any, str]:
    try:
        import torch
    except Exception as e:
        return None, f"torch is not importable ({type(e).__name__})"
    if not torch.cuda.is_available():
        return None, f"torch {torch.__version__} has no CUDA device"
    return torch, ""


def _cupy_env(cupy) -> GpuEnv:
    import cupybn

    runtime = cupy.cuda.runtime
    torch, reason = _torch_or_reason()
    versions = {"python": platform.python_version(), "numpy": np.__version__, "cupy": cupy.__version__,
                "cupybn": cupybn.__version__, "cuda_driver": _cuda_version(runtime.driverGetVersion()),
                "cuda_runtime": _cuda_version(runtime.runtimeGetVersion()),
                "torch": getattr(torch, "__version__", None),
                "torch_cuda": torch.version.cuda if torch else None,
                "cudnn": torch.backends.cudnn.version() if torch else None}
    timers: dict[str, Timer] = {"cupy": EventTimer(cupy.cuda.Event, cupy.cuda.get_elapsed_time)}
    impls = [cupybn_impl()]
    if torch is not None:
        timers["torch"] = EventTimer(lambda: torch.cuda.Event(enable_timing=True), lambda s, e: s.elapsed_time(e))
        impls.append(torch_impl(torch, cupy))
    impls.append(textbook_impl(cupy))

    def release() -> None:
        cupy.cuda.Device().synchronize()
        cupy.get_default_memory_pool().free_all_blocks()
        if torch is not None:
            torch.cuda.empty_cache()

    def copy_methods(dst, src) -> dict[str, Callable[[], object]]:
        return {"copyto": lambda: cupy.copyto(dst, src),
                "memcpy": lambda: dst.data.copy_from_device_async(src.data, src.nbytes)}

    return GpuEnv(xp=cupy, device=_cupy_device(cupy), versions=versions, timers=timers, impls=impls,
                  unavailable={"torch": reason} if torch is None else {}, copy_methods=copy_methods,
                  release=release)


# ---- output ---------------------------------------------------------------------------------
def _fmt(v: float | None, spec: str, width: int) -> str:
    return f"{'-':>{width}}" if v is None else f"{v:>{width}{spec}}"


def format_device(device: dict, versions: dict) -> str:
    mem, l2 = device.get("memory_bytes"), device.get("l2_bytes")
    facts = [f"compute capability {device.get('compute_capability')}", f"{device.get('sm_count')} SMs",
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


def format_case_table(case: Case, rows: Sequence[Measurement], *, repeat: int) -> str:
    """One case: a row per mode and implementation."""
    inputs = rows[0].inputs if rows else 0
    lines = [f"{case.name}: x {case.nbytes / 1e6:.1f} MB, {inputs} inputs rotated, median of {repeat} runs",
             f"  {'mode':<14}{'impl':<10}{'median us':>11}{'min us':>11}{'GB/s':>9}{'roofline':>10}"
             f"{'cupybn/impl':>13}{'err vs f64':>12}"]
    for mode in MODES:
        lines += [_table_row(mode if i == 0 else "", m, rows) for i, m in enumerate(r for r in rows if r.mode == mode)]
    return "\n".join(lines)


ABBREV = {"forward-train": "fwd", "inference": "inf", "backward": "bwd"}


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
                share = None if mine is None else 100 * mine.roofline_share  # type: ignore[operator]
                cells += _fmt(share, ".0f", 9) + ("%" if share is not None else " ")
            else:
                cells += f"{'error':>10}"
            cells += _fmt(ratio(rows, case, mode, "torch"), ".2f", 11)
        lines.append(f"{case:<28}{rows[0].nbytes / 1e6:>8.1f}{cells}")
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


def exit_status(tests: TestRun, measurements: Sequence[Measurement], sanitizers: Sequence[dict] = ()) -> int:
    """1 when a test failed, a sanitizer reported or an implementation raised; missed targets do
    not fail the command."""
    sanitized = all(r.get("clean") for r in sanitizers if r["ran"])
    return 0 if tests.passed and sanitized and all(m.ok for m in measurements) else 1


def build_report(*, env: GpuEnv, today: str, argv: Sequence[str], settings: dict, tests: TestRun, copy: dict | None,
                 measurements: Sequence[Measurement], targets: Sequence[dict], status: int | None,
                 sanitizers: Sequence[dict] = (), complete: bool = True) -> dict:
    """The JSON report; ``complete`` False (and ``status`` None) for the one written after each step."""
    return {"schema": SCHEMA, "date": today, "command": ["python", "-m", "cupybn", "gpu-check", *argv],
            "complete": complete, "device": env.device, "versions": env.versions, "settings": settings,
            "implementations": {"run": [i.name for i in env.impls], "unavailable": env.unavailable},
            "tests": asdict(tests), "sanitizers": list(sanitizers), "copy": copy,
            "measurements": [{**asdict(m), "shape": list(m.shape)} for m in measurements],
            "targets": list(targets), "exit_status": status}


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
                    "required, measure the copy roofline, benchmark cupybn, torch and textbook CuPy on "
                    "ResNet-50's BatchNorm shapes, print tables and targets, and write a JSON report. "
                    "Exit status: 0 all well, 1 a test failed or an implementation raised, 2 no CuPy or GPU.")
    parser.add_argument("--quick", action="store_true",
                        help=f"3 shapes, float32, NCHW, {QUICK_REPEAT} runs: a smoke run")
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
                        help="more pytest arguments, one string (e.g. --pytest-args='-n 8 -x')")
    parser.add_argument("--repeat", type=int, help=f"timed runs per measurement (default {DEFAULT_REPEAT})")
    parser.add_argument("--warmup", type=int, default=DEFAULT_WARMUP, help="untimed runs before timing")
    parser.add_argument("--copy-mib", type=int, default=DEFAULT_COPY_MIB, help="size of the copy-roofline buffer")
    parser.add_argument("--json", metavar="PATH", help="where to write the report (a folder: the default name in "
                                                       "it; default benchmarks/results/gpu-<device>-<date>.json)")
    return parser


def _selected(args: argparse.Namespace) -> list[Case]:
    return select_cases(quick_cases() if args.quick else all_cases(), args.cases)


def run(args: argparse.Namespace, env: GpuEnv, *, argv: Sequence[str] = (), stream: TextIO = sys.stdout,
        cases: Sequence[Case] | None = None, test_command: Sequence[str] | None = None,
        today: str | None = None) -> int:
    """The whole check on ``env``; returns the exit status.  The keywords replace what the arguments
    would choose (the tests use them for small cases and a stand-in test suite)."""
    cases = _selected(args) if cases is None else list(cases)
    repeat = args.repeat or (QUICK_REPEAT if args.quick else DEFAULT_REPEAT)
    today = today or date.today().isoformat()

    def say(text: str = "") -> None:
        print(text, file=stream, flush=True)

    say(format_device(env.device, env.versions))
    for name, why in env.unavailable.items():
        say(f"{name}: not run ({why})")

    settings = {"quick": args.quick, "cases_filter": args.cases, "warmup": args.warmup, "repeat": repeat,
                "eps": EPS, "momentum": MOMENTUM, "passes": PASSES, "large_bytes": LARGE_BYTES,
                "roofline_targets": ROOFLINE_TARGETS, "rotation_cover_l2": ROTATION_COVER,
                "timing": "CUDA events around each call, no host synchronisation between calls"}
    path = resolve_json_path(args.json, env.device.get("name") or "gpu", today)
    path.parent.mkdir(parents=True, exist_ok=True)
    state: dict[str, Any] = {"tests": TestRun(ran=False, note="not reached"), "sanitizers": [], "copy": None}

    def save(measurements: Sequence[Measurement], status: int | None = None) -> None:
        """The report so far: a run cut short (a slot that ends) still leaves its results."""
        report = build_report(env=env, today=today, argv=argv, settings=settings, tests=state["tests"],
                              copy=state["copy"], measurements=measurements,
                              targets=evaluate_targets(measurements), status=status,
                              sanitizers=state["sanitizers"], complete=status is not None)
        path.write_text(json.dumps(report, indent=1) + "\n")

    folder = tests_dir()
    if args.no_tests:
        tests = TestRun(ran=False, note="--no-tests")
    elif folder is None and test_command is None:
        tests = TestRun(ran=False, note="no tests/ folder next to the package (not a checkout)")
    else:
        command = list(test_command or pytest_command(args.pytest_args))
        say(f"\n== tests: CUPYBN_REQUIRE_GPU=1 {' '.join(command)}")
        tests = run_tests(command, folder.parent if folder else Path.cwd(), stream,
                          args.test_timeout or DEFAULT_TEST_TIMEOUT_S)
    state["tests"] = tests
    say(f"== tests: {format_tests(tests)}")
    save([])

    if not args.no_sanitizers:
        state["sanitizers"] = run_sanitizers(stream)
        say("== compute-sanitizer: " + "; ".join(
            f"{r['tool']} {'clean' if r.get('clean') else 'not run' if not r['ran'] else 'FAILED'}"
            for r in state["sanitizers"]))
        save([])

    copy = measure_copy(env, args.copy_mib * MIB, warmup=args.warmup, repeat=repeat)
    state["copy"] = copy
    say(f"\n== copy roofline: {copy['nbytes'] / 2**30:.2f} GiB, {copy['method']}, {copy['gbps']:.0f} GB/s "
        f"(read + write; " + ", ".join(f"{k} {v['gbps']:.0f}" for k, v in copy["methods"].items()) + ")")
    say(f"== {len(cases)} cases x {len(MODES)} modes x {', '.join(i.name for i in env.impls)}; "
        f"median of {repeat} after {args.warmup} warm-up; roofline = {', '.join(f'{m} {p}' for m, p in PASSES.items())}"
        " passes of x at the copy's GB/s")
    measurements = run_benchmarks(env, cases, copy["gbps"], warmup=args.warmup, repeat=repeat, stream=stream,
                                  after_case=save)

    targets = evaluate_targets(measurements)
    status = exit_status(tests, measurements, state["sanitizers"])
    say("\n== overview (cupybn: share of the roofline, and time / torch's: below 1 is faster)")
    say(format_overview(measurements))
    say(f"\n== targets (large: x >= {LARGE_BYTES // MIB} MiB; a missed target does not fail the command)")
    say(format_targets(targets))
    save(measurements, status)
    errors = sum(not m.ok for m in measurements)
    met = sum(t["met"] is True for t in targets)
    say(f"\ngpu-check: tests {format_tests(tests)}; {len(measurements)} measurements, {errors} errors; "
        f"targets met {met}/{len(targets)}; report {path}; exit status {status}")
    return status


def format_tests(tests: TestRun) -> str:
    if not tests.ran:
        return f"not run ({tests.note})"
    counts = ", ".join(f"{n} {k}" for k, n in tests.counts.items()) or "no summary line"
    state = "passed" if tests.passed else ("timed out" if tests.exit_status is None else "FAILED")
    return f"{state} ({counts}; exit status {tests.exit_status}; {tests.seconds:.0f} s)"


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m cupybn gpu-check [options]``; returns the exit status (2: no CuPy or no GPU)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if args.repeat is not None and args.repeat < 1 or args.warmup < 0 or args.copy_mib < 1:
        print("gpu-check: --repeat and --copy-mib must be >= 1 and --warmup >= 0", file=sys.stderr)
        return 2
    cases = _selected(args)
    if not cases:
        print(f"gpu-check: no case matches {args.cases}; see --list", file=sys.stderr)
        return 2
    if args.list:
        for case in cases:
            print(f"{case.name:<28}{case.nbytes / 1e6:>9.1f} MB")
        return 0
    env = probe_gpu()
    if isinstance(env, str):
        print(f"gpu-check: {env}", file=sys.stderr)
        return 2
    return run(args, env, argv=argv)
