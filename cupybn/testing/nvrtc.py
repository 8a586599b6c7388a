"""The NVRTC compile gate: every CUDA kernel cupybn uses must compile cleanly.

Each registered source (:data:`cupybn.kernels.PACKAGE_SOURCES`, and with
``--tests`` the ``SOURCES`` of ``tests/cuda/manifest.py``) is compiled with
NVRTC, once per template instantiation set, for sm_70, sm_80 and sm_90.  Any
compile error and any warning fails the gate; ptxas' verbose report gives the
registers, spills, shared memory and stack of every kernel.

NVRTC is loaded with ctypes from the ``nvidia-cuda-nvrtc-cu12`` wheel (the one
CuPy uses; it needs no GPU), or from the file named by ``CUPYBN_NVRTC_LIBRARY``.
CuPy is not needed.  Run it as::

    python -m cupybn.testing.nvrtc [--tests] [--manifest PATH]... [--arch sm_XX]... [--record FILE]

Nothing imports this module when ``cupybn`` is imported.
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import functools
import importlib.util
import json
import os
import re
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

from cupybn.kernels import CUDA_INCLUDE_ENV, KERNEL_DIR, PACKAGE_SOURCES, KernelSource, cuda_header_dirs

LIBRARY_ENV = "CUPYBN_NVRTC_LIBRARY"
INCLUDE_ENV = CUDA_INCLUDE_ENV
DEFAULT_ARCHS = ("sm_70", "sm_80", "sm_90")
TESTS_MANIFEST = Path("tests") / "cuda" / "manifest.py"
INSTALL_HINT = "pip install nvidia-cuda-nvrtc-cu12"
HEADERS_HINT = (
    "cuda_fp16.h and friends are not built into NVRTC: pip install nvidia-cuda-runtime-cu12 "
    f"(its headers are found automatically) or set {INCLUDE_ENV} to a CUDA include directory"
)
NVRTC_SUCCESS = 0

# NVRTC 12.x prints this for sm_70 whatever the source; it says nothing about our code.
_TOOLCHAIN_NOTICES = (re.compile(r"^nvrtc: warning: Architectures prior to .* are deprecated"),)
_SILENCING_OPTIONS = ("-w", "--disable-warnings")
_WARNING = re.compile(r"\bwarning\b", re.IGNORECASE)
_PTXAS_REPORT = re.compile(r"^ptxas\s+(info\s*:|\.)")
_PTXAS_ENTRY = re.compile(r"Compiling entry function '([^']+)'")
_PTXAS_PROPERTIES = re.compile(r"Function properties for (\S+)")
_PTXAS_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_PTXAS_USED = re.compile(r"Used (\d+) registers")
_PTXAS_SMEM = re.compile(r"(\d+) bytes smem")
_MISSING_CUDA_HEADER = re.compile(r'(could not|cannot) open source file "cuda_\w+\.h"')


class NvrtcUnavailable(RuntimeError):
    """libnvrtc.so.12 could not be found or loaded."""


class NvrtcError(RuntimeError):
    """An NVRTC call other than the compilation itself failed."""


class GateFailed(RuntimeError):
    """Some source did not compile cleanly; the message holds the logs."""


# --------------------------------------------------------------------------- the library


def find_library() -> Path:
    """The path of libnvrtc.so.12: ``$CUPYBN_NVRTC_LIBRARY``, else the nvidia-cuda-nvrtc-cu12 wheel's."""
    explicit = os.environ.get(LIBRARY_ENV)
    if explicit:
        if not Path(explicit).is_file():
            raise NvrtcUnavailable(f"{LIBRARY_ENV}={explicit} is not a file")
        return Path(explicit)
    for directory in _nvidia_package_dirs():
        candidate = directory / "cuda_nvrtc" / "lib" / "libnvrtc.so.12"
        if candidate.is_file():
            return candidate
    raise NvrtcUnavailable(f"libnvrtc.so.12 not found: {INSTALL_HINT} (or set {LIBRARY_ENV} to its path)")


def _nvidia_package_dirs() -> list[Path]:
    # `nvidia` is a namespace package shared by all the nvidia-*-cu12 wheels.
    try:
        spec = importlib.util.find_spec("nvidia")
    except (ImportError, ValueError):
        return []
    if spec is None or spec.submodule_search_locations is None:
        return []
    return [Path(location) for location in spec.submodule_search_locations]


def cuda_include_dirs() -> list[Path]:
    """Directories holding cuda_fp16.h / cuda_bf16.h, which NVRTC does not build in
    (the same search as the backend's: :func:`cupybn.kernels.cuda_header_dirs`)."""
    return cuda_header_dirs()


_Program = ctypes.c_void_p
_SizeGetter = Callable[[_Program, Any], int]
_DataGetter = Callable[[_Program, Any], int]


class Nvrtc:
    """A thin ctypes binding of the NVRTC calls the gate needs."""

    def __init__(self, path: Path) -> None:
        try:
            self._lib = ctypes.CDLL(str(path))
        except OSError as exc:
            raise NvrtcUnavailable(f"cannot load {path}: {exc}; {INSTALL_HINT}") from exc
        self.path = path
        self._declare_signatures()

    def _declare_signatures(self) -> None:
        lib, c_int, c_char_p, size_p = self._lib, ctypes.c_int, ctypes.c_char_p, ctypes.POINTER(ctypes.c_size_t)
        char_pp = ctypes.POINTER(ctypes.c_char_p)
        signatures = {
            "nvrtcVersion": [ctypes.POINTER(c_int), ctypes.POINTER(c_int)],
            "nvrtcCreateProgram": [ctypes.POINTER(_Program), c_char_p, c_char_p, c_int, char_pp, char_pp],
            "nvrtcDestroyProgram": [ctypes.POINTER(_Program)],
            "nvrtcAddNameExpression": [_Program, c_char_p],
            "nvrtcCompileProgram": [_Program, c_int, char_pp],
            "nvrtcGetProgramLogSize": [_Program, size_p],
            "nvrtcGetProgramLog": [_Program, ctypes.c_char_p],
            "nvrtcGetPTXSize": [_Program, size_p],
            "nvrtcGetPTX": [_Program, ctypes.c_char_p],
            "nvrtcGetCUBINSize": [_Program, size_p],
            "nvrtcGetCUBIN": [_Program, ctypes.c_char_p],
            "nvrtcGetLoweredName": [_Program, c_char_p, ctypes.POINTER(c_char_p)],
        }
        for name, argtypes in signatures.items():
            function = getattr(lib, name)
            function.argtypes = argtypes
            function.restype = c_int
        lib.nvrtcGetErrorString.argtypes = [c_int]
        lib.nvrtcGetErrorString.restype = c_char_p

    def error_string(self, result: int) -> str:
        return (self._lib.nvrtcGetErrorString(result) or b"unknown NVRTC error").decode()

    def _check(self, result: int, call: str) -> None:
        if result != NVRTC_SUCCESS:
            raise NvrtcError(f"{call} failed: {self.error_string(result)}")

    def version(self) -> tuple[int, int]:
        major, minor = ctypes.c_int(), ctypes.c_int()
        self._check(self._lib.nvrtcVersion(ctypes.byref(major), ctypes.byref(minor)), "nvrtcVersion")
        return major.value, minor.value

    def create_program(self, source: str, name: str) -> _Program:
        program = _Program()
        result = self._lib.nvrtcCreateProgram(ctypes.byref(program), source.encode(), name.encode(), 0, None, None)
        self._check(result, "nvrtcCreateProgram")
        return program

    def destroy_program(self, program: _Program) -> None:
        self._check(self._lib.nvrtcDestroyProgram(ctypes.byref(program)), "nvrtcDestroyProgram")

    def add_name_expression(self, program: _Program, expression: str) -> None:
        self._check(self._lib.nvrtcAddNameExpression(program, expression.encode()), "nvrtcAddNameExpression")

    def compile_program(self, program: _Program, options: Sequence[str]) -> int:
        """The NVRTC result code: compile errors are the caller's to report, with the log."""
        encoded = (ctypes.c_char_p * len(options))(*(option.encode() for option in options))
        return int(self._lib.nvrtcCompileProgram(program, len(options), encoded))

    def log(self, program: _Program) -> str:
        return self._read_text(program, self._lib.nvrtcGetProgramLogSize, self._lib.nvrtcGetProgramLog, "log")

    def ptx(self, program: _Program) -> bytes:
        return self._read_bytes(program, self._lib.nvrtcGetPTXSize, self._lib.nvrtcGetPTX, "PTX").rstrip(b"\0")

    def cubin(self, program: _Program) -> bytes:
        return self._read_bytes(program, self._lib.nvrtcGetCUBINSize, self._lib.nvrtcGetCUBIN, "CUBIN")

    def lowered_name(self, program: _Program, expression: str) -> str:
        lowered = ctypes.c_char_p()
        result = self._lib.nvrtcGetLoweredName(program, expression.encode(), ctypes.byref(lowered))
        self._check(result, f"nvrtcGetLoweredName({expression!r})")
        return (lowered.value or b"").decode()

    def _read_bytes(self, program: _Program, get_size: _SizeGetter, get_data: _DataGetter, what: str) -> bytes:
        size = ctypes.c_size_t()
        self._check(get_size(program, ctypes.byref(size)), f"getting the {what} size")
        buffer = ctypes.create_string_buffer(size.value)
        self._check(get_data(program, buffer), f"getting the {what}")
        return buffer.raw

    def _read_text(self, program: _Program, get_size: _SizeGetter, get_data: _DataGetter, what: str) -> str:
        return self._read_bytes(program, get_size, get_data, what).rstrip(b"\0").decode(errors="replace")


@functools.cache
def _load(path: Path) -> Nvrtc:
    return Nvrtc(path)


def nvrtc() -> Nvrtc:
    """The loaded library; raises :class:`NvrtcUnavailable` when there is none."""
    return _load(find_library())


# --------------------------------------------------------------------------- one compilation


@dataclass(frozen=True)
class KernelResources:
    """What ptxas reported for one kernel (entry function) on one architecture."""

    kernel: str  # the lowered (mangled) name
    registers: int
    spill_stores: int
    spill_loads: int
    shared_bytes: int
    stack_bytes: int


@dataclass(frozen=True)
class CompileResult:
    """The outcome of compiling one source for one architecture."""

    name: str
    arch: str
    options: tuple[str, ...]
    compiled: bool  # NVRTC reported success
    log: str
    warnings: tuple[str, ...]  # log lines that are warnings: each one fails the gate
    notices: tuple[str, ...]  # toolchain notices that do not concern the source (sm_70 deprecation)
    binary: bytes  # CUBIN for sm_XX, PTX for compute_XX
    lowered_names: dict[str, str] = field(default_factory=dict)  # name expression -> lowered name
    resources: tuple[KernelResources, ...] = ()

    @property
    def passed(self) -> bool:
        return self.compiled and not self.warnings

    def name_expression(self, lowered: str) -> str | None:
        return next((expr for expr, name in self.lowered_names.items() if name == lowered), None)

    def failure_message(self) -> str:
        reason = "failed to compile" if not self.compiled else f"{len(self.warnings)} warning line(s)"
        message = f"{self.name} [{self.arch}]: {reason}\n  options: {' '.join(self.options)}\n{self.log.rstrip()}"
        if _MISSING_CUDA_HEADER.search(self.log):
            message += f"\n  hint: {HEADERS_HINT}"
        return message


# What CuPy appends to every compile after the caller's options
# (cupy/cuda/compiler.py: `options += ('-ftz=true',)`, then the architecture, then
# `--device-as-default-execution-space`), so the gate compiles what a GPU runs:
# float32 subnormals flushed to zero.  (CuPy's --pch only caches headers.)
CUPY_OPTIONS = ("-ftz=true", "--device-as-default-execution-space")


def gate_options(arch: str, options: Iterable[str] = (), *, cuda_headers: bool = True) -> tuple[str, ...]:
    """The options the gate compiles with: target, ptxas report, the source's own, CuPy's, then the CUDA headers.

    The CUDA include directories come last so that a source's own directories
    take precedence; ``cuda_headers=False`` leaves them out (cupybn's own
    kernels must build with NVRTC alone: CuPy does not always find them).
    """
    target = [f"--gpu-architecture={arch}"]
    if arch.startswith("sm_"):  # only a real architecture runs ptxas
        target.append("--ptxas-options=-v")
    headers = [f"-I{directory}" for directory in cuda_include_dirs()] if cuda_headers else []
    return (*target, *options, *CUPY_OPTIONS, *headers)


def compile_source(
    source: str,
    *,
    name: str,
    name_expressions: Iterable[str] = (),
    options: Iterable[str] = (),
    arch: str = "sm_90",
    cuda_headers: bool = True,
) -> CompileResult:
    """Compile ``source`` with NVRTC for ``arch``; compile errors are in the result, not raised."""
    library = nvrtc()
    all_options = gate_options(arch, options, cuda_headers=cuda_headers)
    expressions = tuple(name_expressions)
    program = library.create_program(source, name)
    try:
        for expression in expressions:
            library.add_name_expression(program, expression)
        compiled = library.compile_program(program, all_options) == NVRTC_SUCCESS
        log = library.log(program)
        binary = b""
        lowered: dict[str, str] = {}
        if compiled:
            binary = library.cubin(program) if arch.startswith("sm_") else library.ptx(program)
            lowered = {expression: library.lowered_name(program, expression) for expression in expressions}
    finally:
        library.destroy_program(program)
    warnings, notices = classify_log(log)
    warnings += tuple(f"option {option} hides warnings from the gate" for option in hidden_warning_options(all_options))
    return CompileResult(
        name=name,
        arch=arch,
        options=all_options,
        compiled=compiled,
        log=log,
        warnings=warnings,
        notices=notices,
        binary=binary,
        lowered_names=lowered,
        resources=parse_ptxas_report(log),
    )


def hidden_warning_options(options: Iterable[str]) -> list[str]:
    """Options that silence every warning, which would defeat the gate (``-diag-suppress=N`` stays allowed)."""
    return [option for option in options if option.strip() in _SILENCING_OPTIONS]


def classify_log(log: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(warnings, toolchain notices) among the log's lines.

    NVRTC 12.x has no option that turns warnings into errors, so any line that
    says "warning" fails the gate, except ptxas' own report (which may name a
    kernel "warning...") and the known toolchain notices.
    """
    warnings, notices = [], []
    for line in log.splitlines():
        if not _WARNING.search(line) or _PTXAS_REPORT.match(line):
            continue
        if any(notice.match(line) for notice in _TOOLCHAIN_NOTICES):
            notices.append(line.strip())
        else:
            warnings.append(line.strip())
    return tuple(warnings), tuple(notices)


def parse_ptxas_report(log: str) -> tuple[KernelResources, ...]:
    """Per-kernel resources from the ``--ptxas-options=-v`` lines of a log.

    ptxas prints, per entry function: "Compiling entry function 'K'", then
    "Function properties for K" followed by the stack/spill line, then "Used N
    registers, ..., S bytes smem, ...".  Non-inlined device functions get the
    properties lines only, so they are not reported as kernels.
    """
    frames: dict[str, tuple[int, int, int]] = {}
    usage: dict[str, tuple[int, int]] = {}
    entries: list[str] = []
    entry = properties_of = None
    for line in log.splitlines():
        if match := _PTXAS_ENTRY.search(line):
            entry = match.group(1)
            entries.append(entry)
        elif match := _PTXAS_PROPERTIES.search(line):
            properties_of = match.group(1)
        elif (match := _PTXAS_FRAME.search(line)) and properties_of is not None:
            frames[properties_of] = (int(match.group(1)), int(match.group(2)), int(match.group(3)))
        elif (match := _PTXAS_USED.search(line)) and entry is not None:
            shared = _PTXAS_SMEM.search(line)
            usage[entry] = (int(match.group(1)), int(shared.group(1)) if shared else 0)
    return tuple(_resources(kernel, frames, usage) for kernel in entries)


def _resources(
    kernel: str, frames: dict[str, tuple[int, int, int]], usage: dict[str, tuple[int, int]]
) -> KernelResources:
    stack, spill_stores, spill_loads = frames.get(kernel, (0, 0, 0))
    registers, shared = usage.get(kernel, (0, 0))
    return KernelResources(kernel, registers, spill_stores, spill_loads, shared, stack)


# --------------------------------------------------------------------------- the gate


def compile_kernel_source(entry: KernelSource, arch: str) -> CompileResult:
    path = Path(entry.path)
    return compile_source(
        path.read_text(encoding="utf-8"),
        name=str(path),
        name_expressions=entry.name_expressions,
        options=entry.compile_options(),
        arch=arch,
        cuda_headers=entry not in PACKAGE_SOURCES,  # the package's kernels include no CUDA header
    )


def gate(
    sources: Iterable[KernelSource], archs: Sequence[str] = DEFAULT_ARCHS, *, jobs: int | None = None
) -> list[CompileResult]:
    """Compile every source for every architecture, in a thread pool (NVRTC releases the GIL).

    The results come in (source, arch) order; check them with
    :func:`raise_for_failures` or ``result.passed``.
    """
    tasks = [(entry, arch) for entry in sources for arch in archs]
    if not tasks:
        return []
    nvrtc()  # fail fast, and load the library once, before the threads start
    with ThreadPoolExecutor(max_workers=jobs or os.cpu_count() or 1) as pool:
        return list(pool.map(lambda task: compile_kernel_source(*task), tasks))


def raise_for_failures(results: Iterable[CompileResult]) -> None:
    failures = [result.failure_message() for result in results if not result.passed]
    if failures:
        raise GateFailed("\n\n".join(failures))


def unregistered_kernel_files(kernel_dir: Path, sources: Iterable[KernelSource]) -> list[str]:
    """An error message for each ``.cu`` file in ``kernel_dir`` that no source entry names."""
    registered = {Path(entry.path).resolve() for entry in sources}
    return [
        f"kernel file {path} is not registered in cupybn.kernels.PACKAGE_SOURCES"
        for path in sorted(Path(kernel_dir).rglob("*.cu"))
        if path.resolve() not in registered
    ]


def missing_source_files(sources: Iterable[KernelSource]) -> list[str]:
    return [
        f"registered kernel file {entry.path} does not exist" for entry in sources if not Path(entry.path).is_file()
    ]


def relative_package_paths(sources: Iterable[KernelSource]) -> list[str]:
    """Errors for registry entries with a relative path: the backend would read them relative to the cwd."""
    return [
        f"registered kernel file {entry.path} must be an absolute path (use KERNEL_DIR / name)"
        for entry in sources
        if not Path(entry.path).is_absolute()
    ]


def load_manifest(path: Path) -> tuple[KernelSource, ...]:
    """The ``SOURCES`` of a manifest file, loaded by path (tests/ is not a package).

    A relative source path is relative to the manifest's directory.
    """
    module = _import_file(path)
    sources = getattr(module, "SOURCES", None)
    if sources is None:
        raise GateFailed(f"{path} defines no SOURCES")
    base = path.resolve().parent
    return tuple(
        KernelSource(base / entry.path, tuple(entry.name_expressions), tuple(entry.options)) for entry in sources
    )


def _import_file(path: Path) -> ModuleType:
    module_name = f"_cupybn_nvrtc_manifest_{abs(hash(str(path.resolve())))}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise GateFailed(f"cannot load manifest {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --------------------------------------------------------------------------- command line


def repo_root() -> Path:
    """The checkout holding the cupybn package (tests/ lives beside it)."""
    return KERNEL_DIR.parent.parent


def find_tests_manifest() -> Path:
    for base in (repo_root(), Path.cwd()):
        if (base / TESTS_MANIFEST).is_file():
            return base / TESTS_MANIFEST
    raise GateFailed(f"--tests: {TESTS_MANIFEST} not found under {repo_root()} or {Path.cwd()}")


def display_path(path: Path | str) -> str:
    """A path relative to the repository root when it lies inside it (for output and records)."""
    resolved = Path(path).resolve()
    for base in (repo_root().resolve(), Path.cwd().resolve()):
        if resolved.is_relative_to(base):
            return resolved.relative_to(base).as_posix()
    return str(resolved)


def describe(result: CompileResult) -> str:
    status = "ok  " if result.passed else "FAIL"
    kernels = "; ".join(_describe_kernel(result, resources) for resources in result.resources)
    return f"{status} {result.arch:<6} {display_path(result.name)}: {kernels or 'no kernels'}"


def _describe_kernel(result: CompileResult, resources: KernelResources) -> str:
    label = result.name_expression(resources.kernel) or resources.kernel
    return (
        f"{label} {resources.registers} regs, spills {resources.spill_stores}/{resources.spill_loads} B, "
        f"smem {resources.shared_bytes} B, stack {resources.stack_bytes} B"
    )


def record(results: Sequence[CompileResult], path: Path) -> None:
    """Write the per-kernel resources of ``results`` to ``path`` as JSON."""
    major, minor = nvrtc().version()
    entries = [
        {
            "source": display_path(result.name),
            "arch": result.arch,
            "kernel": resources.kernel,
            "name_expression": result.name_expression(resources.kernel),
            "registers": resources.registers,
            "spill_stores": resources.spill_stores,
            "spill_loads": resources.spill_loads,
            "shared_bytes": resources.shared_bytes,
            "stack_bytes": resources.stack_bytes,
        }
        for result in results
        for resources in result.resources
    ]
    document = {
        "nvrtc_version": f"{major}.{minor}",
        "date": datetime.datetime.now(datetime.timezone.utc).date().isoformat(),
        "entries": entries,
    }
    path.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")


def collect_sources(args: argparse.Namespace) -> tuple[list[KernelSource], list[str]]:
    """(sources to compile, errors found before compiling)."""
    sources = list(PACKAGE_SOURCES)
    errors = unregistered_kernel_files(KERNEL_DIR, PACKAGE_SOURCES) + relative_package_paths(PACKAGE_SOURCES)
    if not PACKAGE_SOURCES:
        print("cupybn.kernels.PACKAGE_SOURCES: no kernel sources registered yet")
    manifests = [Path(path) for path in args.manifest]
    if args.tests:
        try:
            manifests.insert(0, find_tests_manifest())
        except GateFailed as exc:
            errors.append(str(exc))
    for manifest in manifests:
        try:
            entries = load_manifest(manifest)
        except Exception as exc:  # any failure to load a manifest fails the gate, with its reason
            errors.append(f"manifest {manifest}: {type(exc).__name__}: {exc}")
            continue
        print(f"{display_path(manifest)}: {len(entries)} source(s)")
        sources += entries
    errors += missing_source_files(sources)
    return [entry for entry in sources if Path(entry.path).is_file()], errors


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m cupybn.testing.nvrtc",
        description="Compile every registered CUDA kernel with NVRTC; fail on any error or warning.",
    )
    parser.add_argument("--tests", action="store_true", help=f"also compile the SOURCES of {TESTS_MANIFEST}")
    parser.add_argument("--manifest", action="append", default=[], metavar="PATH", help="another manifest (repeatable)")
    parser.add_argument("--arch", action="append", metavar="SM", help=f"target (repeatable; default {DEFAULT_ARCHS})")
    parser.add_argument("--record", type=Path, metavar="FILE", help="write per-kernel resources to FILE as JSON")
    parser.add_argument("--jobs", type=int, default=None, help="parallel compilations (default: CPU count)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    start = time.perf_counter()
    try:
        library = nvrtc()
    except NvrtcUnavailable as exc:
        print(f"NVRTC gate: {exc}", file=sys.stderr)
        return 2
    major, minor = library.version()
    print(f"NVRTC {major}.{minor} from {library.path}")
    sources, errors = collect_sources(args)
    results = gate(sources, tuple(args.arch or DEFAULT_ARCHS), jobs=args.jobs)
    for result in results:
        print(describe(result))
    for notice in sorted({notice for result in results for notice in result.notices}):
        print(f"note (not a failure): {notice}")
    if args.record:
        record(results, args.record)
        print(f"resources recorded in {args.record}")
    failures = [result.failure_message() for result in results if not result.passed]
    sys.stdout.flush()  # keep the report and the errors in order when both go to one terminal or log
    for message in errors + failures:
        print(f"\nERROR: {message}", file=sys.stderr, flush=True)
    elapsed = time.perf_counter() - start
    verdict = "FAILED" if errors or failures else "passed"
    print(
        f"NVRTC gate {verdict}: {len(results)} compilation(s), {len(errors) + len(failures)} error(s), {elapsed:.1f} s"
    )
    return 1 if errors or failures else 0


if __name__ == "__main__":
    sys.exit(main())
