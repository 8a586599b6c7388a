"""Registry of the CUDA kernel sources that cupybn compiles.

Every ``.cu`` file in this directory is listed in :data:`PACKAGE_SOURCES`, once
per set of template instantiations (``name_expressions``) and compile options
it is built with.  Two consumers read this one list:

* the CuPy backend, which must build its ``cupy.RawModule`` objects from these
  very entries (``code=entry.path.read_text()``,
  ``options=entry.compile_options()``,
  ``name_expressions=entry.name_expressions``), never from a list of its own;
* the NVRTC compile gate (``python -m cupybn.testing.nvrtc``, run in CI), which
  compiles every entry for sm_70, sm_80 and sm_90 with warnings as failures and
  reports an error for any ``.cu`` file here that is not registered.

So the gate checks exactly what the backend compiles, and the two cannot drift.

This module is imported by the backend at run time: it uses the standard
library only.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

KERNEL_DIR = Path(__file__).parent

# Forms NVRTC (and CuPy, which passes options through) accepts for an include directory.
_INCLUDE_FLAGS = ("--include-path=", "-I=", "-I")
_INCLUDE_FLAGS_WITH_SEPARATE_VALUE = ("-I", "--include-path")


@dataclass(frozen=True)
class KernelSource:
    """One ``.cu`` file as it is compiled.

    ``path``: the source file; ``name_expressions``: the template
    instantiations (or other kernel names) to compile and look up, such as
    ``"bn_forward<float, 256>"``; ``options``: NVRTC/CuPy options such as
    ``-std=c++17``, ``-DNAME=1`` or ``-I<dir>`` (a relative ``<dir>`` is
    relative to the source file's directory).
    """

    path: Path
    name_expressions: tuple[str, ...] = ()
    options: tuple[str, ...] = ()

    def compile_options(self) -> tuple[str, ...]:
        """The options to hand to the compiler.

        The source file's directory comes first as an include directory (the
        source is compiled from a string, so the compiler does not know where it
        lives), and relative include directories are made absolute against it,
        so the result does not depend on the working directory.
        """
        source_dir = Path(self.path).resolve().parent
        resolved = [f"-I{source_dir}"]
        pending_include_value = False
        for option in self.options:
            if pending_include_value:
                resolved.append(f"-I{_absolute(option, source_dir)}")
                pending_include_value = False
            elif option.strip() in _INCLUDE_FLAGS_WITH_SEPARATE_VALUE:
                pending_include_value = True
            else:
                resolved.append(_resolve_include_option(option, source_dir))
        if pending_include_value:
            raise ValueError(f"{self.path}: option {self.options[-1]!r} needs a directory after it")
        return tuple(resolved)


def _resolve_include_option(option: str, source_dir: Path) -> str:
    for flag in _INCLUDE_FLAGS:
        if option.startswith(flag):
            return f"-I{_absolute(option[len(flag) :], source_dir)}"
    return option


def _absolute(directory: str, source_dir: Path) -> Path:
    return (source_dir / directory.strip()).resolve()


# ---- batch_norm.cu: one module per data type -----------------------------------

BATCH_NORM_FILE = KERNEL_DIR / "batch_norm.cu"

# Threads per block of the reduction kernels.  The planar kernels are 1-D blocks
# of that many threads, the rows kernels (32, threads / 32).  256 is the GPU
# default; 64 keeps host-harness tests fast (every CUDA thread is an OS thread
# there) and checks that nothing depends on the block size.
BLOCK_THREADS = (64, 256)

# data dtype -> (storage type, arithmetic type) in the kernels
C_TYPES = {"float16": ("cupybn::half", "float"), "float32": ("float", "float"), "float64": ("double", "double")}


# The elementwise kernels move 16 bytes at a time where arrays allow it.
VECTOR_BYTES = 16
ITEMSIZE = {"float16": 2, "float32": 4, "float64": 8}

# dtype of a per-channel array (gamma, beta, running statistics, dgamma, dbeta)
# -> the `kind` code the kernels read it by (batch_norm.cu: ChannelArray); 0 is "absent".
CHANNEL_KINDS = {"float16": 1, "float32": 2, "float64": 3}

# Bits of the `epilogue` argument of the elementwise and gradient kernels
# (batch_norm.cu: Epilogue): a residual added to y, a ReLU on y (and dy passed
# back through it), the residual's gradient written out.
ADD_RESIDUAL, RELU, WRITE_GRADIENT = 1, 2, 4


# The kernels with a fused epilogue (residual add, ReLU): each is instantiated
# twice, its last template argument `kEpilogue` false or true.  The false
# variants load and test nothing for the epilogue, so calls without one keep the
# registers (and occupancy) the kernels had before it; the true variants are a
# module of their own, compiled only when a call first asks for an epilogue.
EPILOGUE_TEMPLATES = ("bn_normalize", "bn_normalize_running", "bn_backward_elementwise", "bn_grad_planar",
                      "bn_grad_rows")


def batch_norm_instantiations(dtype: str, epilogue: bool = False) -> tuple[str, ...]:
    """The template instantiations of batch_norm.cu that the backend uses for ``dtype``:
    every kernel, the epilogue kernels as their ``false`` variants (``epilogue=False``),
    or the ``true`` variants of the epilogue kernels alone (``epilogue=True``)."""
    t, acc = C_TYPES[dtype]
    flag = "true" if epilogue else "false"
    every = not epilogue  # the kernels without an epilogue parameter go in the first module only
    names = []
    for vec in (1, VECTOR_BYTES // ITEMSIZE[dtype]):  # scalar, and 16-byte packs
        names += [f"bn_normalize<{t}, {acc}, {vec}, {flag}>", f"bn_normalize_running<{t}, {acc}, {vec}, {flag}>",
                  f"bn_backward_elementwise<{t}, {acc}, {vec}, {flag}>"]
    for threads in BLOCK_THREADS:
        rows = threads // 32
        names += [*([f"bn_stats_rows<{t}, {acc}, {rows}>"] if every else []),
                  f"bn_grad_rows<{t}, {acc}, {rows}, {flag}>"]
        for vec in (1, VECTOR_BYTES // ITEMSIZE[dtype]):
            names += [*([f"bn_stats_planar<{t}, {acc}, {threads}, {vec}>"] if every else []),
                      f"bn_grad_planar<{t}, {acc}, {threads}, {vec}, {flag}>"]
    if every:
        # The general path's per-channel kernels depend on the arithmetic type only;
        # float16 and float32 both instantiate the float ones (each module is compiled alone).
        names += [f"bn_stats_channelwise<{acc}>", f"bn_infer_channelwise<{acc}>", f"bn_grad_channelwise<{acc}>"]
    return tuple(names)


_BATCH_NORM_OPTIONS = ("-std=c++17",)
BATCH_NORM_SOURCES = {
    dtype: KernelSource(BATCH_NORM_FILE, batch_norm_instantiations(dtype), _BATCH_NORM_OPTIONS) for dtype in C_TYPES
}
# The epilogue kernels' `true` variants, one module per data type.
BATCH_NORM_EPILOGUE_SOURCES = {
    dtype: KernelSource(BATCH_NORM_FILE, batch_norm_instantiations(dtype, epilogue=True), _BATCH_NORM_OPTIONS)
    for dtype in C_TYPES
}

PACKAGE_SOURCES: tuple[KernelSource, ...] = (*BATCH_NORM_SOURCES.values(), *BATCH_NORM_EPILOGUE_SOURCES.values())


# ---- CUDA headers ------------------------------------------------------------------

CUDA_INCLUDE_ENV = "CUPYBN_CUDA_INCLUDE"


def cuda_header_dirs() -> list[Path]:
    """Directories with cuda_fp16.h, which NVRTC does not build in.

    In order: ``$CUPYBN_CUDA_INCLUDE`` (os.pathsep-separated), the include
    folders of NVIDIA's runtime wheels (nvidia-cuda-runtime-cu12, or the CUDA 13
    layout), and the CUDA toolkit of ``$CUDA_PATH``/``$CUDA_HOME``.  The NVRTC
    gate compiles the test kernels that include the header with these; cupybn's
    own kernels include no CUDA header (docs/nvrtc-gate.md).
    """
    explicit = [Path(p) for p in os.environ.get(CUDA_INCLUDE_ENV, "").split(os.pathsep) if p]
    toolkits = [Path(os.environ[v]) / "include" for v in ("CUDA_PATH", "CUDA_HOME") if os.environ.get(v)]
    wheels: list[Path] = []
    try:
        spec = importlib.util.find_spec("nvidia")
    except (ImportError, ValueError):
        spec = None
    if spec is not None and spec.submodule_search_locations is not None:
        for root in map(Path, spec.submodule_search_locations):
            wheels += [root / "cuda_runtime" / "include", root / "cu13" / "include"]
    found = explicit + [d for d in wheels + toolkits if (d / "cuda_fp16.h").is_file()]
    return list(dict.fromkeys(found))
