"""The CUDA test kernels of the host harness, for the NVRTC compile gate.

Each entry names a .cu file in this folder, the template instantiations the
tests use, and compile options.  ``python -m cupybn.testing.nvrtc --tests``
compiles every entry for sm_70, sm_80 and sm_90, so the test kernels are real
CUDA, not just code that the host header happens to accept.
"""
from pathlib import Path

from cupybn.kernels import KernelSource

HERE = Path(__file__).parent

SHUFFLE_TYPES = ("int", "unsigned int", "long long", "unsigned long long", "float", "double")
BLOCK_SUMS = ("block_sums<float, float, 128>", "block_sums<double, double, 64>", "block_sums<int, long long, 32>")

SOURCES = (
    KernelSource(HERE / "execution_model.cu", name_expressions=BLOCK_SUMS),
    KernelSource(HERE / "warp_collectives.cu", name_expressions=tuple(f"shuffles<{t}>" for t in SHUFFLE_TYPES)),
    KernelSource(HERE / "planted_bugs.cu"),
    KernelSource(HERE / "planted_races.cu"),
    KernelSource(HERE / "half.cu"),
    KernelSource(HERE / "vector_types.cu"),
    KernelSource(HERE / "math.cu"),
    KernelSource(HERE / "atomics.cu"),
)
