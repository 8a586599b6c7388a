"""RawModule and RawKernel on the host: CuPy's kernel API, NumPy arrays, g++ underneath."""
from __future__ import annotations

import ctypes
import os
import struct
import subprocess
import tempfile
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ._build import Build, CompileError, build, plain_kernels

__all__ = ["CompileError", "Function", "KernelError", "RawKernel", "RawModule", "SanitizerError"]

# CUDA's default limit on dynamic shared memory; more needs the attribute set
# first (cudaFuncAttributeMaxDynamicSharedMemorySize), as on a GPU.
DEFAULT_MAX_DYNAMIC_SHARED = 48 * 1024

# How long a sanitizer run may take before it is treated as hung.
SANITIZER_TIMEOUT_S = float(os.environ.get("CUPYBN_HOSTCUDA_TIMEOUT", "300"))


class KernelError(RuntimeError):
    """A launch failed: a bad configuration, a trap or assert, a deadlock, a divergent barrier."""


class SanitizerError(KernelError):
    """A sanitizer build of the kernel reported a problem; ``report`` holds its text."""

    def __init__(self, kernel: str, sanitizer: str, report: str):
        self.kernel = kernel
        self.sanitizer = sanitizer
        self.report = report
        super().__init__(f"{sanitizer} sanitizer reported a problem in kernel {kernel!r}:\n{report}")


class _LaunchConfig(ctypes.Structure):
    _fields_ = [
        ("grid", ctypes.c_uint * 3),
        ("block", ctypes.c_uint * 3),
        ("shared_mem", ctypes.c_ulonglong),
    ]


def _dims(value: Any, what: str) -> tuple[int, int, int]:
    dims = (value,) if isinstance(value, (int, np.integer)) else tuple(value)
    if not 1 <= len(dims) <= 3 or not all(isinstance(d, (int, np.integer)) for d in dims):
        raise TypeError(f"{what} must be an int or a tuple of 1 to 3 ints, got {value!r}")
    dims = tuple(int(d) for d in dims) + (1,) * (3 - len(dims))
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

_REPORT_MARKERS = ("WARNING: ThreadSanitizer", "ERROR: AddressSanitizer", "runtime error:",
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


def _run_sanitized(mod: Build, index: int, kernel: str, cfg: tuple, packed: _Packed, nargs: int) -> None:
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
    env.setdefault("TSAN_OPTIONS", "halt_on_error=1 exitcode=66 history_size=4")
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
        if shared_mem < 0 or shared_mem > self.max_dynamic_shared_size_bytes:
            raise ValueError(
                f"kernel {self.name!r}: shared_mem={shared_mem} exceeds max_dynamic_shared_size_bytes="
                f"{self.max_dynamic_shared_size_bytes} (set that attribute first, as on a GPU)"
            )
        packed = _Packed(self.name, self._parameter_codes(), args)
        if self._module.sanitize is not None:
            _run_sanitized(self._module._build(), self._index, self.name, (g, b, shared_mem), packed, len(args))
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

    ``sanitize`` is None (run in this process), ``"thread"`` (ThreadSanitizer) or
    ``"address"`` (AddressSanitizer and UndefinedBehaviorSanitizer); a sanitizer
    run happens in a child process on copies of the arrays, and a report raises
    :class:`SanitizerError`.  Only ``-D``, ``-U`` and ``-I`` options change the
    host build; the module is compiled on first use and cached on disk.
    """

    def __init__(self, code: str | None = None, *, path: str | os.PathLike | None = None,
                 options: Sequence[str] = (), name_expressions: Sequence[str] = (),
                 sanitize: str | None = None):
        if (code is None) == (path is None):
            raise TypeError("give exactly one of code= and path=")
        if path is not None:
            code = Path(path).read_text()
            self._source_name = str(path)
        else:
            self._source_name = "kernel.cu"
        assert code is not None
        self.code = code
        self.options = tuple(options)
        self.name_expressions = tuple(name_expressions)
        self.sanitize = sanitize
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
            self._plain = RawModule(self.code, options=self.options, name_expressions=self.name_expressions)
            self._plain._source_name = self._source_name
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
    """Host counterpart of ``cupy.RawKernel(code, name, options=...)``."""

    def __init__(self, code: str, name: str, options: Sequence[str] = (), *, sanitize: str | None = None):
        module = RawModule(code, options=options, name_expressions=() if name in plain_kernels(code) else (name,),
                           sanitize=sanitize)
        super().__init__(module, module._kernels.index(name), name)
        self.module = module

