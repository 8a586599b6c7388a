"""What the GPU benchmarks time: ResNet-50's BatchNorm shapes, their data on the device, and
cupybn, torch and textbook BatchNorm on them, each checked against float64.

``bench_gpu.py`` times these with pytest-benchmark and ``python -m cupybn gpu-check`` runs that
module; its tests import this one by path.  CuPy and torch are imported only by
:func:`open_device`, never at import time.

Settings come from the environment (gpu-check sets them from its options):

  CUPYBN_GPU_BENCH_SET       ``full`` (default): ResNet-50's 12 BN input shapes in NCHW and
                             channels-last, float32 and float16, then the rows case in both dtypes
                             (50 cases); ``quick``: 3 of the shapes, float32, NCHW
  CUPYBN_GPU_BENCH_CASES     comma-separated substrings: keep the cases whose name contains any
                             (names look like 256x64x56x56-nhwc-f16 and 8192x4096-2d-f32)
  CUPYBN_GPU_BENCH_REPEAT    timed rounds per benchmark, each of CALLS_PER_ROUND calls
                             (default 20; 10 with ``quick``)
  CUPYBN_GPU_BENCH_WARMUP    untimed rounds before them (default 2)
  CUPYBN_GPU_BENCH_COPY_MIB  the copy roofline's buffer in MiB (default 1024; 8 on the host)
  CUPYBN_GPU_BENCH_DEVICE    ``cuda`` (default) or ``host``: the very same benchmarks on NumPy
                             arrays (cupybn's NumPy backend, torch on the CPU when importable) with a
                             wall-clock timer, so that CI runs the whole pipeline without a GPU
  CUPYBN_GPU_BENCH_SCALE     ``batch,image`` (default ``256,224``): ResNet-50 at another batch and
                             image size; the rows case shrinks in proportion (rows with the batch,
                             features with the image).  Case names follow the actual shapes.
  CUPYBN_GPU_BENCH_EPILOGUE  ``1`` (default): also time the fused epilogue, ``relu(BN(x) + z)``, on
                             the largest selected case of each layout and dtype (``epilogue_cases``);
                             ``0``: not
"""
from __future__ import annotations

import math
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

import cupybn
from cupybn import _textbook as textbook  # the one textbook BN; it runs on CuPy arrays too
from cupybn._cuda_probe import cupy_with_gpu

MODES = ("forward-train", "inference", "backward")
IMPLEMENTATIONS = ("cupybn", "torch", "textbook")
# Passes over x-sized data that each mode cannot avoid: forward training reads x
# for the statistics, reads it again and writes y; inference reads x and writes y
# (one copy); backward reads dy and x for the sums, reads both again and writes dx.
PASSES = {"forward-train": 3, "inference": 2, "backward": 5}
# The fused epilogue y = relu(BN(x) + z): "cupybn" fused, "unfused" the same work as separate calls
# (cupybn's BN, then the add and the ReLU as array operations), and torch's relu(batch_norm(x) + z).
# Its passes: the residual read once more forward; backward reads y with dy and x in both of its
# passes and also writes dz.
EPILOGUE_MODES = ("forward-train+add+relu", "inference+add+relu", "backward+add+relu")
EPILOGUE_IMPLEMENTATIONS = ("cupybn", "unfused", "torch")
EPILOGUE_PASSES = {"forward-train+add+relu": 4, "inference+add+relu": 3, "backward+add+relu": 8}
EPS = 1e-5
MOMENTUM = 0.1
SEED = 20240601
MIB = 1 << 20

RESNET50_BATCH = 256
RESNET50_IMAGE = 224
ROWS_SHAPE = (8192, 4096)  # at ResNet-50's batch and image size
QUICK_CHANNELS = (1024, 2048)  # --quick: the first shape (the largest map) and these (many channels, small maps)
DTYPES = ("float32", "float16")
LAYOUTS = ("nchw", "nhwc")
SHORT_DTYPE = {"float16": "f16", "float32": "f32", "float64": "f64"}

# Enough distinct inputs that those visited between two uses of one exceed the L2
# cache several times over: otherwise small cases are timed from cache.
ROTATION_COVER = 3
MAX_ROTATION = 64
DEFAULT_L2_BYTES = 128 * MIB  # when the device does not say

# A round queues this many calls without waiting, and its time / CALLS_PER_ROUND is the time per
# call with the GPU's queue full; the delay kernel before a round's start event hides the host's
# cost of queueing the first call (see EventClock).
CALLS_PER_ROUND = 10
DELAY_US = 100
DEFAULT_REPEAT = 20
QUICK_REPEAT = 10
DEFAULT_WARMUP = 2
DEFAULT_COPY_MIB = 1024
HOST_COPY_MIB = 8
ENV_PREFIX = "CUPYBN_GPU_BENCH_"


# ---- settings ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Settings:
    """The benchmarks' settings; :meth:`from_env` reads them."""

    case_set: str             # "full" or "quick"
    patterns: tuple[str, ...]  # keep cases whose name contains any (all when empty)
    repeat: int               # timed rounds
    warmup: int               # untimed rounds
    copy_mib: int
    device: str               # "cuda" or "host"
    batch: int
    image: int
    epilogue: bool = True     # time the fused epilogue too

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> Settings:
        """The settings in ``environ`` (os.environ, or what gpu-check passes); ValueError if one is bad."""
        def get(name: str) -> str:
            return environ.get(ENV_PREFIX + name, "").strip()

        case_set = get("SET") or "full"
        device = get("DEVICE") or "cuda"
        for name, value, allowed in (("SET", case_set, ("full", "quick")), ("DEVICE", device, ("cuda", "host"))):
            if value not in allowed:
                raise ValueError(f"{ENV_PREFIX}{name}={value!r}: expected one of {', '.join(allowed)}")
        scale = get("SCALE") or f"{RESNET50_BATCH},{RESNET50_IMAGE}"
        try:
            batch, image = (int(v) for v in scale.split(","))
        except ValueError:
            raise ValueError(f"{ENV_PREFIX}SCALE={scale!r}: expected batch,image (e.g. 2,16)") from None
        if batch < 1 or image < 1:
            raise ValueError(f"{ENV_PREFIX}SCALE={scale!r}: batch and image must be >= 1")
        epilogue = get("EPILOGUE") or "1"
        if epilogue not in ("0", "1"):
            raise ValueError(f"{ENV_PREFIX}EPILOGUE={epilogue!r}: expected 0 or 1")
        return cls(case_set=case_set, patterns=tuple(p.strip() for p in get("CASES").split(",") if p.strip()),
                   repeat=_count(get, "REPEAT", QUICK_REPEAT if case_set == "quick" else DEFAULT_REPEAT, 1),
                   warmup=_count(get, "WARMUP", DEFAULT_WARMUP, 0),
                   copy_mib=_count(get, "COPY_MIB", DEFAULT_COPY_MIB if device == "cuda" else HOST_COPY_MIB, 1),
                   device=device, batch=batch, image=image, epilogue=epilogue == "1")


def _count(get: Callable[[str], str], name: str, default: int, minimum: int) -> int:
    text = get(name)
    if not text:
        return default
    if not re.fullmatch(r"\d+", text) or int(text) < minimum:
        raise ValueError(f"{ENV_PREFIX}{name}={text!r}: expected an integer >= {minimum}")
    return int(text)


# ---- cases -----------------------------------------------------------------------------------
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


def rows_shape(batch: int = RESNET50_BATCH, image: int = RESNET50_IMAGE) -> tuple[int, int]:
    """ROWS_SHAPE scaled like the network: rows with the batch, features with the image size."""
    return (max(2, ROWS_SHAPE[0] * batch // RESNET50_BATCH), max(1, ROWS_SHAPE[1] * image // RESNET50_IMAGE))


def all_cases(batch: int = RESNET50_BATCH, image: int = RESNET50_IMAGE) -> list[Case]:
    """ResNet-50's BN shapes in both layouts and both dtypes, then the rows case in both dtypes."""
    cases = [Case(shape, layout, dtype)
             for shape in resnet50_bn_shapes(batch, image) for layout in LAYOUTS for dtype in DTYPES]
    return cases + [Case(rows_shape(batch, image), "2d", dtype) for dtype in DTYPES]


def quick_cases(batch: int = RESNET50_BATCH, image: int = RESNET50_IMAGE) -> list[Case]:
    """A smoke subset: three ResNet-50 shapes (large map, many channels, small map), float32, NCHW."""
    shapes = resnet50_bn_shapes(batch, image)
    return [Case(s, "nchw", "float32") for s in shapes if s == shapes[0] or s[1] in QUICK_CHANNELS]


def select_cases(cases: Sequence[Case], patterns: Sequence[str]) -> list[Case]:
    """The cases whose name contains any of ``patterns`` (all of them when there are none)."""
    if not patterns:
        return list(cases)
    return [c for c in cases if any(p in c.name for p in patterns)]


def selected_cases(settings: Settings) -> list[Case]:
    cases = (quick_cases if settings.case_set == "quick" else all_cases)(settings.batch, settings.image)
    return select_cases(cases, settings.patterns)


def epilogue_cases(cases: Sequence[Case]) -> list[Case]:
    """The largest of ``cases`` in each layout and dtype, in the order they come."""
    largest: dict[tuple[str, str], Case] = {}
    for c in cases:
        kind = (c.layout, c.dtype)
        if kind not in largest or c.nbytes > largest[kind].nbytes:
            largest[kind] = c
    return [c for c in cases if largest.get((c.layout, c.dtype)) is c]


def rotation_count(nbytes: int, l2_bytes: int) -> int:
    """How many distinct inputs to cycle through so that the set covers the L2 cache ROTATION_COVER times."""
    return max(2, min(MAX_ROTATION, math.ceil(ROTATION_COVER * l2_bytes / nbytes)))


# ---- data ------------------------------------------------------------------------------------
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


def make_residuals(xp, case: Case, count: int, seed: int = SEED + 1) -> list:
    """``count`` residuals for the epilogue benchmarks, laid out like the case's x."""
    sample = _sampler(xp, seed)
    return [_sample_x(sample, case) for _ in range(count)]


def make_copy_buffers(xp, nbytes: int) -> tuple[Any, Any]:
    """A source and a destination of ``nbytes`` (rounded down to float32s) for the copy roofline."""
    src = xp.ones(nbytes // 4, dtype=xp.float32)
    return src, xp.empty_like(src)


# ---- implementations ---------------------------------------------------------------------------
@dataclass
class Target:
    """What one implementation times for one mode: ``fn(inputs[i])``, and its main output (y or dx)."""

    fn: Callable[[Any], Any]
    inputs: list
    output: Callable[[Any], Any]


def _first(result):
    return result[0]


def cupybn_target(mode: str, d: CaseData) -> Target:
    """cupybn through its public API (the backend follows from the arrays)."""
    if mode == "forward-train":
        rm, rv = d.running_mean.copy(), d.running_var.copy()
        return Target(lambda x: cupybn.batch_norm(x, d.gamma, d.beta, running_mean=rm, running_var=rv,
                                                  training=True, momentum=MOMENTUM, eps=EPS, axis=1), d.xs, _first)
    if mode == "inference":
        return Target(lambda x: cupybn.batch_norm(x, d.gamma, d.beta, running_mean=d.running_mean,
                                                  running_var=d.running_var, training=False, eps=EPS, axis=1),
                      d.xs, _first)
    saved = [cupybn.batch_norm(x, d.gamma, d.beta, training=True, eps=EPS, axis=1)[1] for x in d.xs]
    return Target(lambda a: cupybn.batch_norm_backward(*a), list(zip(d.dys, saved, strict=True)), _first)


def textbook_target(mode: str, d: CaseData) -> Target:
    """The textbook formulas in plain array operations of x's module (CuPy on the GPU)."""
    if mode == "forward-train":
        rm, rv = d.running_mean.copy(), d.running_var.copy()
        return Target(lambda x: textbook.forward_train(x, d.gamma, d.beta, eps=EPS, running_mean=rm,
                                                       running_var=rv, momentum=MOMENTUM), d.xs, _first)
    if mode == "inference":
        return Target(lambda x: textbook.forward_infer(x, d.gamma, d.beta, d.running_mean, d.running_var, eps=EPS),
                      d.xs, lambda y: y)
    caches = [textbook.forward_train(x, d.gamma, d.beta, eps=EPS)[1] for x in d.xs]
    return Target(lambda a: textbook.backward(*a), list(zip(d.dys, caches, strict=True)), _first)


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


def torch_target(torch, xp, mode: str, d: CaseData) -> Target:
    """torch.nn.functional.batch_norm (cuDNN or PyTorch's kernels, as PyTorch picks) on the same buffers."""
    F = torch.nn.functional

    def to_xp(t):
        return xp.from_dlpack(t.detach())

    xs = [_as_tensor(torch, x) for x in d.xs]
    w, b = _as_tensor(torch, d.gamma), _as_tensor(torch, d.beta)
    rm0, rv0 = _as_tensor(torch, d.running_mean), _as_tensor(torch, d.running_var)
    if mode == "forward-train":
        rm, rv = rm0.clone(), rv0.clone()
        return Target(lambda x: F.batch_norm(x, rm, rv, w, b, training=True, momentum=MOMENTUM, eps=EPS), xs, to_xp)
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


def epilogue_target(torch, xp, impl: str, mode: str, d: CaseData, zs: list) -> Target:
    """One implementation of ``relu(BN(x) + z)`` (EPILOGUE_IMPLEMENTATIONS) for one of EPILOGUE_MODES;
    its inputs are (x, z) pairs forward and (dy, what the forward gave) backward."""
    base = mode.split("+")[0]
    pairs = list(zip(d.xs, zs, strict=True))
    if impl == "torch":
        return _torch_epilogue_target(torch, xp, base, d, pairs)
    stats = {} if base == "backward" else (
        dict(running_mean=d.running_mean.copy(), running_var=d.running_var.copy(), momentum=MOMENTUM)
        if base == "forward-train" else
        dict(running_mean=d.running_mean, running_var=d.running_var, training=False))

    def bn(x, **epilogue):
        return cupybn.batch_norm(x, d.gamma, d.beta, eps=EPS, axis=1, **stats, **epilogue)

    if impl == "cupybn":
        if base != "backward":
            return Target(lambda a: bn(a[0], residual=a[1], activation="relu"), pairs, _first)
        saved = [bn(x, residual=z, activation="relu")[1] for x, z in pairs]
        return Target(lambda a: cupybn.batch_norm_backward(*a), list(zip(d.dys, saved, strict=True)), _first)

    def unfused_forward(a):
        y, saved = bn(a[0])
        s = y + a[1]
        return xp.maximum(s, 0, out=s), saved

    if base != "backward":
        return Target(unfused_forward, pairs, _first)

    def unfused_backward(a):
        dy, y, saved = a
        g = dy * (y > 0)
        return (*cupybn.batch_norm_backward(g, saved), g)

    forwards = [unfused_forward(p) for p in pairs]
    return Target(unfused_backward, [(dy, y, saved) for dy, (y, saved) in zip(d.dys, forwards, strict=True)],
                  _first)


def _torch_epilogue_target(torch, xp, base: str, d: CaseData, pairs: list) -> Target:
    F = torch.nn.functional
    w, b = _as_tensor(torch, d.gamma), _as_tensor(torch, d.beta)
    rm, rv = _as_tensor(torch, d.running_mean).clone(), _as_tensor(torch, d.running_var).clone()
    tensors = [(_as_tensor(torch, x), _as_tensor(torch, z)) for x, z in pairs]

    def to_xp(t):
        return xp.from_dlpack(t.detach())

    if base != "backward":
        training = base == "forward-train"
        return Target(lambda a: F.relu(F.batch_norm(a[0], rm, rv, w, b, training=training, momentum=MOMENTUM,
                                                    eps=EPS) + a[1]), tensors, to_xp)
    graphs = []
    for (x, z), dy in zip(tensors, d.dys, strict=True):
        leaves = tuple(t.detach().requires_grad_() for t in (x, w, b, z))
        y = F.relu(F.batch_norm(leaves[0], None, None, leaves[1], leaves[2], training=True, eps=EPS) + leaves[3])
        graphs.append((y, leaves, _as_tensor(torch, dy)))
    return Target(lambda g: torch.autograd.grad(g[0], g[1], g[2], retain_graph=True), graphs,
                  lambda grads: to_xp(grads[0]))


def reference_epilogue_output(xp, mode: str, d: CaseData, z):
    """The main output of an epilogue mode for the first input, in float64 by the textbook formulas
    (the ReLU's gradient taken from the float64 y)."""
    base = mode.split("+")[0]
    x, z64 = d.xs[0].astype(xp.float64), z.astype(xp.float64)
    g, b = d.gamma.astype(xp.float64), d.beta.astype(xp.float64)
    if base == "inference":
        rm, rv = d.running_mean.astype(xp.float64), d.running_var.astype(xp.float64)
        return xp.maximum(textbook.forward_infer(x, g, b, rm, rv, eps=EPS) + z64, 0)
    y, cache = textbook.forward_train(x, g, b, eps=EPS)
    y = xp.maximum(y + z64, 0)
    if base == "forward-train":
        return y
    return textbook.backward(d.dys[0].astype(xp.float64) * (y > 0), cache)[0]


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


def max_rel_err(xp, value, ref) -> float:
    """max over elements of |value - ref| / max(1, |ref|), in float64."""
    diff = xp.abs(xp.asarray(value).astype(xp.float64) - ref) / xp.maximum(1.0, xp.abs(ref))
    return float(diff.max())


# ---- the device and its clock ------------------------------------------------------------------
class DeviceUnavailable(Exception):
    """No CuPy or no GPU: the GPU benchmarks skip."""


class _Stamp:
    """A recorded event; ``end - start`` waits for ``end`` and gives the seconds between the two."""

    def __init__(self, event, elapsed_ms: Callable[[Any, Any], float]):
        self.event = event
        self.elapsed_ms = elapsed_ms

    def __sub__(self, start: _Stamp) -> float:
        self.event.synchronize()
        return self.elapsed_ms(start.event, self.event) / 1e3


class EventClock:
    """A pytest-benchmark timer read on the GPU.

    pytest-benchmark times a round as ``start = timer(); K calls; end = timer(); end - start``.
    Calls of this clock alternate: a round's start launches ``delay`` (a kernel that spins for
    DELAY_US) and then records an event; its end records another.  Neither waits, so the host
    queues the round's first calls while the GPU is still in the delay, and the events span the
    GPU's time for the K calls with its queue full, not the host's cost of starting the round.
    ``end - start`` waits for the end event and returns seconds.  Call :meth:`reset` before a
    benchmark, in case the previous one raised between its start and its end.
    """

    __name__ = "cuda_event_clock"  # how pytest-benchmark's JSON names the timer

    def __init__(self, new_event: Callable[[], Any], elapsed_ms: Callable[[Any, Any], float],
                 delay: Callable[[], None]):
        self.new_event = new_event
        self.elapsed_ms = elapsed_ms
        self.delay = delay
        self.starting = True

    def reset(self) -> None:
        self.starting = True

    def __call__(self) -> _Stamp:
        if self.starting:
            self.delay()
        event = self.new_event()
        event.record()
        self.starting = not self.starting
        return _Stamp(event, self.elapsed_ms)


DELAY_SOURCE = r"""
extern "C" __global__ void gpu_bench_delay(unsigned long long nanoseconds) {
    unsigned long long start, now;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(start));
    do {
        asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(now));
    } while (now - start < nanoseconds);
}
"""


def delay_kernel(cupy, microseconds: float) -> Callable[[], None]:
    """Launches a one-thread kernel that spins on the GPU's nanosecond timer for ``microseconds``."""
    kernel = cupy.RawKernel(DELAY_SOURCE, "gpu_bench_delay")
    nanoseconds = np.uint64(microseconds * 1000)

    def delay() -> None:
        kernel((1,), (1,), (nanoseconds,))

    delay()  # compiled here, not in the first benchmark
    cupy.cuda.Device().synchronize()
    return delay


def _no_op() -> None:
    pass


@dataclass
class Device:
    """Where the benchmarks run: the array module, the timer and what each implementation needs."""

    kind: str                                         # "cuda" or "host"
    xp: Any                                           # cupy or numpy
    clock: Callable[[], Any]                          # pytest-benchmark's timer
    l2_bytes: int                                     # 0 on the host: two inputs rotated
    copies: dict[str, Callable[[Any, Any], object]]   # copy roofline methods: fn(dst, src)
    torch: Any = None
    torch_unavailable: str = ""                       # why torch is not run
    release: Callable[[], None] = _no_op              # hand cached memory back to the device
    before_timing: Callable[[], None] = _no_op        # checks, and the clock's reset

    @property
    def clock_name(self) -> str:
        return getattr(self.clock, "__name__", type(self.clock).__name__)

    def target(self, impl: str, mode: str, data: CaseData) -> Target:
        if impl == "cupybn":
            return cupybn_target(mode, data)
        if impl == "textbook":
            return textbook_target(mode, data)
        return torch_target(self.torch, self.xp, mode, data)


def _import_torch(cuda: bool) -> tuple[Any, str]:
    """torch, or None and why it is not run."""
    try:
        import torch
    except Exception as e:  # ImportError, or libraries that fail to load
        return None, f"torch is not importable ({type(e).__name__})"
    if cuda and not torch.cuda.is_available():
        return None, f"torch {torch.__version__} has no CUDA device"
    return torch, ""


def host_device() -> Device:
    torch, why = _import_torch(cuda=False)
    return Device("host", np, time.perf_counter, 0, {"copyto": np.copyto}, torch, why)


def cuda_device() -> Device:
    cupy, why = cupy_with_gpu()
    if cupy is None:
        raise DeviceUnavailable(why)
    torch, why = _import_torch(cuda=True)
    clock = EventClock(cupy.cuda.Event, cupy.cuda.get_elapsed_time, delay_kernel(cupy, DELAY_US))
    props = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)

    def release() -> None:
        cupy.cuda.Device().synchronize()
        cupy.get_default_memory_pool().free_all_blocks()
        if torch is not None:
            torch.cuda.empty_cache()

    def before_timing() -> None:
        # CuPy's events time torch's kernels too only if both queue on one stream: the legacy default
        streams = {"cupy": cupy.cuda.get_current_stream().ptr}
        if torch is not None:
            streams["torch"] = torch.cuda.current_stream().cuda_stream
        if any(streams.values()):
            raise RuntimeError(f"the benchmarks need the legacy default stream (0) everywhere; current: {streams}")
        clock.reset()

    copies: dict[str, Callable[[Any, Any], object]] = {
        "copyto": cupy.copyto,  # an elementwise kernel
        "memcpy": lambda dst, src: dst.data.copy_from_device_async(src.data, src.nbytes),  # cudaMemcpyAsync
    }
    return Device("cuda", cupy, clock, int(props.get("l2CacheSize", 0)) or DEFAULT_L2_BYTES, copies, torch, why,
                  release, before_timing)


def open_device(settings: Settings) -> Device:
    """The device of ``settings``; DeviceUnavailable when it is CUDA and there is no CuPy or GPU."""
    return host_device() if settings.device == "host" else cuda_device()
