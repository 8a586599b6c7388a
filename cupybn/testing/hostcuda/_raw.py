"""RawModule and RawKernel on the host: CuPy's kernel API, NumPy arrays, g++ underneath."""
from __future__ import annotations

import ctypes
import functools
import os
import struct
import subprocess
import tempfile
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from . import _races
from ._build import Build, CompileError, build, plain_kernels
from ._races import Race

__all__ = ["CompileError", "Function", "KernelError", "RawKernel", "RawModule", "SanitizerError"]

# CUDA's default limit on dynamic shared memory; more needs the attribute set
# first (cudaFuncAttributeMaxDynamicSharedMemorySize), as on a GPU.
DEFAULT_MAX_DYNAMIC_SHARED = 48 * 1024

# How long a sanitizer run may take before it is treated as hung.
SANITIZER_TIMEOUT_S = float(os.environ.get("CUPYBN_HOSTCUDA_TIMEOUT", "300"))


class KernelError(RuntimeError):
    """A launch failed: a bad configuration, a trap or assert, a deadlock, a divergent barrier."""


class SanitizerError(KernelError):
    """A sanitizer build of the kernel reported a problem.

    ``report`` holds its text; for the race check, ``races`` holds each race found
    (a :class:`cupybn.testing.hostcuda.Race`: the memory, the variable, the two
    accesses with their threads and source lines, and why nothing orders them).
    """

    def __init__(self, kernel: str, sanitizer: str, report: str, races: tuple[Race, ...] = ()):
        self.kernel = kernel
        self.sanitizer = sanitizer
        self.report = report
        self.races = races
        super().__init__(f"{sanitizer} sanitizer reported a problem in kernel {kernel!r}:\n{report}")


class _LaunchConfig(ctypes.Structure):
    _fields_ = [
        ("grid", ctypes.c_uint * 3),
        ("block", ctypes.c_uint * 3),
        ("shared_mem", ctypes.c_ulonglong),
    ]


def _dims(value: Any, what: str) -> tuple[int, int, int]:
    # CuPy's Function.__call__ declares `tuple grid, tuple block`: an int or a list is a TypeError there.
    if not isinstance(value, tuple):
        raise TypeError(f"Argument '{what}' has incorrect type (expected tuple, got {type(value).__name__}): "
                        f"CuPy's kernels take grid and block as tuples only")
    if not 1 <= len(value) <= 3 or not all(isinstance(d, (int, np.integer)) for d in value):
        raise TypeError(f"{what} must be a tuple of 1 to 3 ints, got {value!r}")
    dims = tuple(int(d) for d in value) + (1,) * (3 - len(value))
    # CuPy would launch max(1, d); a dimension below 1 is always a bug in the caller.
    if any(d < 1 or d >= 2**32 for d in dims):
        raise ValueError(f"{what} dimensions must be in [1, 2**32), got {value!r}")
    return dims  # type: ignore[return-value]


# ---- arguments -----------------------------------------------------------------

def _dtype_code(dtype: np.dtype) -> str:
    if dtype.kind in "fiu" or dtype == np.bool_:
        return f"{dtype.kind}{dtype.itemsize}"
    return f"?{dtype.str}"


_C_NAMES = {
    "b1": "bool", "i1": "signed char", "u1": "unsigned char", "i2": "short", "u2": "unsigned short",
    "i4": "int", "u4": "unsigned int", "i8": "long long", "u8": "unsigned long long",
    "f2": "__half", "f4": "float", "f8": "double", "V": "void",
}


def _describe(code: str) -> str:
    if code.startswith("*"):
        return _describe(code[1:]) + "*"
    base, _, width = code.partition("x")
    if width:
        return f"a vector of {width} x {_C_NAMES.get(base, base)}"
    return _C_NAMES.get(code, f"an unsupported type ({code})")


def _scalar(value: Any) -> np.generic:
    """The value as CuPy would pass it: NumPy scalars as they are, Python scalars widened."""
    if isinstance(value, np.generic):
        return value
    if isinstance(value, bool):
        return np.bool_(value)
    if isinstance(value, int):
        return np.int64(value)
    if isinstance(value, float):
        return np.float64(value)
    raise TypeError(f"unsupported kernel argument of type {type(value).__name__}")


def _extent(a: np.ndarray) -> tuple[int, int]:
    """Byte range [lo, hi) that the array's elements occupy."""
    start = a.ctypes.data
    if a.size == 0:
        return start, start
    lo = hi = start
    for n, s in zip(a.shape, a.strides, strict=True):
        if s < 0:
            lo += s * (n - 1)
        else:
            hi += s * (n - 1)
    return lo, hi + a.itemsize


class _Packed:
    """The arguments of one launch in the form the entry point takes (void** to each value)."""

    def __init__(self, kernel: str, codes: Sequence[str], args: Sequence[Any]):
        if len(args) != len(codes):
            raise TypeError(f"kernel {kernel!r} takes {len(codes)} arguments, got {len(args)}")
        self.keep: list[Any] = []
        self.arrays: dict[int, np.ndarray] = {}
        self.values: dict[int, bytes] = {}
        slots = (ctypes.c_void_p * max(1, len(codes)))()
        for i, (code, arg) in enumerate(zip(codes, args, strict=True)):
            where = f"kernel {kernel!r} argument {i}"
            if code.startswith("*"):
                if not isinstance(arg, np.ndarray):
                    raise TypeError(f"{where}: the parameter is a pointer ({_describe(code)}); pass an array, "
                                    f"not {type(arg).__name__}")
                self._check_pointee(where, code[1:], arg)
                holder = ctypes.c_void_p(arg.ctypes.data)
                self.keep.append(holder)
                self.arrays[i] = arg
                slots[i] = ctypes.cast(ctypes.pointer(holder), ctypes.c_void_p)
            else:
                if isinstance(arg, np.ndarray):
                    raise TypeError(f"{where}: the parameter is {_describe(code)}, not a pointer; "
                                    f"got an array")
                value = _scalar(arg)
                got = _dtype_code(value.dtype)
                if got != code:
                    raise TypeError(
                        f"{where}: the parameter is {_describe(code)} but a {value.dtype} value was passed "
                        f"(CuPy passes it as {value.dtype.itemsize} bytes, unconverted); pass it as the "
                        f"matching NumPy type"
                    )
                data = value.tobytes()
                buf = ctypes.create_string_buffer(data, max(16, len(data)))
                self.keep.append(buf)
                self.values[i] = data
                slots[i] = ctypes.cast(buf, ctypes.c_void_p)
        self.slots = slots

    @staticmethod
    def _check_pointee(where: str, code: str, arr: np.ndarray) -> None:
        if code == "V":
            return
        base, _, width = code.partition("x")
        if _dtype_code(arr.dtype) != base:
            raise TypeError(f"{where}: the parameter is {_describe('*' + code)} but the array's dtype is "
                            f"{arr.dtype}")
        if width:
            align = min(16, arr.itemsize * int(width))
            if arr.ctypes.data % align:
                raise ValueError(f"{where}: {_describe(code)} needs {align}-byte alignment; the array's data "
                                 f"pointer is misaligned (a GPU would fault)")


# ---- sanitizer runs --------------------------------------------------------------

_REPORT_MARKERS = ("ERROR: AddressSanitizer", "runtime error:",
                   "ERROR: LeakSanitizer", "SUMMARY: UndefinedBehaviorSanitizer")


def _pad8(data: bytes) -> bytes:
    return data + b"\0" * (-len(data) % 8)


def _merged_regions(arrays: dict[int, np.ndarray]) -> tuple[list[tuple[int, int]], dict[int, tuple[int, int]]]:
    """Merge overlapping array extents into regions; map each argument to (region, offset)."""
    spans = sorted((*_extent(a), i) for i, a in arrays.items())
    regions: list[list[int]] = []
    owner: dict[int, int] = {}
    for lo, hi, i in spans:
        if regions and lo < regions[-1][1]:
            regions[-1][1] = max(regions[-1][1], hi)
        else:
            regions.append([lo, hi])
        owner[i] = len(regions) - 1
    where = {i: (owner[i], arrays[i].ctypes.data - regions[owner[i]][0]) for i in arrays}
    return [(lo, hi) for lo, hi in regions], where


def _global_namer(packed: _Packed, regions: list[tuple[int, int]], where: dict[int, tuple[int, int]]):
    """For race reports: the kernel argument behind byte `offset` of region `blob`."""
    def describe(blob: int, offset: int) -> tuple[str, int]:
        address = regions[blob][0] + offset
        for i, a in sorted(packed.arrays.items()):
            lo, hi = _extent(a)
            if where[i][0] == blob and lo <= address < hi:
                return f"argument {i} ({a.dtype} array)", address - a.ctypes.data
        return f"array {blob}", offset
    return describe


def _run_sanitized(mod: Build, index: int, kernel: str, cfg: tuple, packed: _Packed, nargs: int,
                   source_name: str) -> None:
    regions, where = _merged_regions(packed.arrays)
    req = [b"HCREQ001", struct.pack("<Q", index)]
    req.append(struct.pack("<7Q", *cfg[0], *cfg[1], cfg[2]))
    req.append(struct.pack("<Q", len(regions)))
    for lo, hi in regions:
        req += [struct.pack("<Q", hi - lo), _pad8(ctypes.string_at(lo, hi - lo))]
    req.append(struct.pack("<Q", nargs))
    for i in range(nargs):
        if i in packed.values:
            data = packed.values[i]
            req += [struct.pack("<QQ", 0, len(data)), _pad8(data)]
        else:
            req.append(struct.pack("<QQQ", 1, *where[i]))
    env = dict(os.environ)
    env.setdefault("ASAN_OPTIONS", "detect_leaks=0 halt_on_error=1 exitcode=66")
    env.setdefault("UBSAN_OPTIONS", "halt_on_error=1 print_stacktrace=1 exitcode=66")
    with tempfile.TemporaryDirectory(prefix="hostcuda-") as tmp:
        request, response = Path(tmp) / "request", Path(tmp) / "response"
        request.write_bytes(b"".join(req))
        try:
            proc = subprocess.run([str(mod.path), str(request), str(response)], capture_output=True, text=True,
                                  env=env, timeout=SANITIZER_TIMEOUT_S)
        except subprocess.TimeoutExpired as e:
            raise KernelError(f"kernel {kernel!r} did not finish within {SANITIZER_TIMEOUT_S:.0f} s "
                              f"under the {mod.sanitize} sanitizer (a hang?)") from e
        report = proc.stderr
        if "hostcuda-race-total" in report:
            races = _races.parse(report, mod.path, source_name, _global_namer(packed, regions, where))
            total = report.rsplit("hostcuda-race-total races=", 1)[1].split()[0]
            raise SanitizerError(kernel, "race", _races.summary(kernel, races, total), races)
        if any(marker in report for marker in _REPORT_MARKERS):
            raise SanitizerError(kernel, str(mod.sanitize), report.strip())
        if proc.returncode == 3 and "hostcuda-kernel-error:" in report:
            message = report.split("hostcuda-kernel-error:", 1)[1].strip()
            raise KernelError(f"kernel {kernel!r} failed: {message}")
        if proc.returncode != 0:
            raise KernelError(f"the {mod.sanitize}-sanitizer run of kernel {kernel!r} exited with status "
                              f"{proc.returncode}:\n{report.strip()}")
        result = response.read_bytes()
    pos = 0
    for lo, hi in regions:
        new = result[pos : pos + (hi - lo)]
        pos += hi - lo
        if new != ctypes.string_at(lo, hi - lo):
            ctypes.memmove(lo, new, hi - lo)


# ---- modules and functions ----------------------------------------------------------

class Function:
    """One kernel of a module, launched as ``f(grid, block, args, shared_mem=0)``."""

    def __init__(self, module: RawModule, index: int, name: str):
        self._module = module
        self._index = index
        self.name = name
        self.max_dynamic_shared_size_bytes = DEFAULT_MAX_DYNAMIC_SHARED
        self._codes: list[str] | None = None

    def _library(self) -> ctypes.CDLL:
        return self._module._library()

    def _parameter_codes(self) -> list[str]:
        if self._codes is None:
            if self._module.sanitize is None:
                lib = self._library()
            else:  # the signature is the same in every build: ask an unsanitized one
                lib = self._module._describer()._library()
            fn = getattr(lib, f"hostcuda_signature_{self._index}")
            fn.restype = ctypes.c_char_p
            self._codes = [c for c in fn().decode().split(",") if c]
        return self._codes

    def __call__(self, grid, block, args, *, shared_mem: int = 0, stream=None) -> None:
        del stream  # launches are synchronous on the host
        g, b = _dims(grid, "grid"), _dims(block, "block")
        if not isinstance(args, (tuple, list)):
            raise TypeError(f"args must be a tuple of kernel arguments, got {type(args).__name__}")
        if not isinstance(shared_mem, (int, np.integer)):
            raise TypeError(f"shared_mem must be an int, got {type(shared_mem).__name__}")
        if shared_mem < 0:
            raise OverflowError(f"shared_mem={shared_mem}: can't convert negative value to size_t")
        if shared_mem > self.max_dynamic_shared_size_bytes:
            raise ValueError(
                f"kernel {self.name!r}: shared_mem={shared_mem} exceeds max_dynamic_shared_size_bytes="
                f"{self.max_dynamic_shared_size_bytes} (set that attribute first, as on a GPU)"
            )
        packed = _Packed(self.name, self._parameter_codes(), args)
        if self._module.sanitize is not None:
            _run_sanitized(self._module._build(), self._index, self.name, (g, b, shared_mem), packed, len(args),
                           self._module._source_name)
            return
        cfg = _LaunchConfig((ctypes.c_uint * 3)(*g), (ctypes.c_uint * 3)(*b), shared_mem)
        err = ctypes.create_string_buffer(2048)
        entry = getattr(self._library(), f"hostcuda_launch_{self._index}")
        entry.restype = ctypes.c_int
        entry.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_char_p, ctypes.c_size_t]
        if entry(ctypes.addressof(cfg), packed.slots, err, len(err)) != 0:
            raise KernelError(f"kernel {self.name!r} failed: {err.value.decode(errors='replace')}")


class RawModule:
    """Host counterpart of ``cupy.RawModule(code=..., options=..., name_expressions=...)``.

    The arguments CuPy takes are checked as CuPy checks them: ``code`` is a
    keyword-only string and ``options`` a tuple.  CuPy compiles every kernel with
    ``-ftz=true`` after the caller's options (float32 subnormals flush to zero),
    and so does this module unless ``ftz=False``, which keeps the options as
    given (NVRTC's default is IEEE subnormals).  CuPy's ``path=`` loads compiled
    cubin or PTX, which the host cannot run, so it is refused.

    Host-only arguments: ``sanitize`` is None (run in this process), ``"race"``
    (the race check, with CUDA's orderings) or ``"address"`` (AddressSanitizer
    and UndefinedBehaviorSanitizer); a sanitizer run happens in a child process
    on copies of the arrays, and a report raises :class:`SanitizerError`.
    ``source_name`` is the file name reports give the source (by default the
    name of the cupybn kernel file with this text, or ``kernel.cu``).  Only
    ``-D``, ``-U``, ``-I`` and ``-ftz`` options change the host build; the module
    is compiled on first use and cached on disk.
    """

    def __init__(self, *, code: str | None = None, path: str | os.PathLike | None = None,
                 options: tuple[str, ...] = (), name_expressions: Sequence[str] | None = None,
                 sanitize: str | None = None, source_name: str | None = None, ftz: bool = True,
                 **cupy_only: Any):
        if (code is None) == (path is None):
            raise TypeError("Exactly one of `code` and `path` keyword arguments must be given.")
        if path is not None:
            raise ValueError("cupy.RawModule(path=...) loads compiled cubin/PTX, which the host harness cannot run; "
                             "pass the CUDA source as code=")
        if not isinstance(code, str):
            raise TypeError(f"Argument 'code' has incorrect type (expected str, got {type(code).__name__})")
        if not isinstance(options, tuple):
            raise TypeError(f"Argument 'options' has incorrect type (expected tuple, got {type(options).__name__})")
        unknown = set(cupy_only) - _CUPY_ONLY_ARGUMENTS
        if unknown:
            raise TypeError(f"RawModule() got unexpected keyword arguments {sorted(unknown)}")
        self.code = code
        self.options = options + ("-ftz=true",) if ftz else options
        self.name_expressions = tuple(name_expressions or ())
        self.sanitize = sanitize
        self._source_name = source_name or _package_source_name(code)
        kernels = list(self.name_expressions)
        kernels += [k for k in plain_kernels(code) if k not in kernels]
        self._kernels = tuple(kernels)
        self._built: Build | None = None
        self._failure: CompileError | None = None
        self._lib: ctypes.CDLL | None = None
        self._plain: RawModule | None = None
        self._lock = threading.Lock()
        self._functions: dict[str, Function] = {}

    def compile(self) -> None:
        self._build()

    def _build(self) -> Build:
        with self._lock:
            if self._failure is not None:  # do not pay for a failing compile twice
                raise self._failure
            if self._built is None:
                try:
                    self._built = build(self.code, self._kernels, self.options, self.sanitize, self._source_name)
                except CompileError as e:
                    self._failure = e
                    raise
            return self._built

    def _library(self) -> ctypes.CDLL:
        if self._lib is None:
            self._lib = ctypes.CDLL(str(self._build().path), mode=os.RTLD_LOCAL)
        return self._lib

    def _describer(self) -> RawModule:
        if self._plain is None:
            self._plain = RawModule(code=self.code, options=self.options, name_expressions=self.name_expressions,
                                    source_name=self._source_name, ftz=False)
        return self._plain

    def get_function(self, name: str) -> Function:
        if name not in self._functions:
            if name not in self._kernels:
                raise KeyError(
                    f"no kernel {name!r} in this module: it has {list(self._kernels)}; templates must be listed "
                    f"in name_expressions"
                )
            self._build()
            self._functions[name] = Function(self, self._kernels.index(name), name)
        return self._functions[name]


class RawKernel(Function):
    """Host counterpart of ``cupy.RawKernel(code, name, options=())``; the host-only
    arguments are :class:`RawModule`'s."""

    def __init__(self, code: str, name: str, options: tuple[str, ...] = (), backend: str = "nvrtc", *,
                 sanitize: str | None = None, source_name: str | None = None, ftz: bool = True, **cupy_only: Any):
        if not isinstance(name, str):
            raise TypeError(f"Argument 'name' has incorrect type (expected str, got {type(name).__name__})")
        del backend  # nvrtc or nvcc: the host compiles either way
        module = RawModule(code=code, options=options, sanitize=sanitize, source_name=source_name, ftz=ftz,
                           name_expressions=None if name in plain_kernels(code) else (name,), **cupy_only)
        super().__init__(module, module._kernels.index(name), name)
        self.module = module


# Arguments of cupy.RawModule/RawKernel that mean nothing on the host.
_CUPY_ONLY_ARGUMENTS = {"backend", "translate_cucomplex", "enable_cooperative_groups", "jitify"}


def _package_source_name(code: str) -> str:
    """The file name of the cupybn kernel source whose text is ``code``, for reports; else ``kernel.cu``."""
    return _package_sources().get(code, "kernel.cu")


@functools.cache
def _package_sources() -> dict[str, str]:
    """Text -> file name of cupybn's kernel sources (read once)."""
    from cupybn.kernels import PACKAGE_SOURCES  # noqa: PLC0415 - cupybn.kernels is standard library only

    return {source.path.read_text(): source.path.name for source in PACKAGE_SOURCES}
