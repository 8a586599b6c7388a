"""Run CUDA kernels on the CPU: CuPy's kernel API on NumPy arrays.

``cupybn.testing.hostcuda`` compiles CUDA C++ source, unchanged, with the host
C++ compiler (g++ >= 12, C++20) against a small compatibility header, and runs
kernels on NumPy arrays.  Every CUDA thread of a block is a real thread and
``__syncthreads()`` a real barrier; warps meet only at warp-level sync points.
The same source can be built with a race check that follows CUDA's orderings
(``sanitize="race"``) or with AddressSanitizer and UndefinedBehaviorSanitizer
(``sanitize="address"``).  See ``docs/hostcuda.md`` for the model and its limits.

The names mirror CuPy's, so code that takes its kernel factory as a parameter
(``cupy`` on a GPU) runs unchanged with this module::

    from cupybn.testing import hostcuda
    mod = hostcuda.RawModule(code=src, name_expressions=("scale<float>",))
    mod.get_function("scale<float>")((4,), (128,), (x, y, np.float32(2), np.int32(x.size)))
"""
from ._build import CompileError
from ._cupy_kernels import ElementwiseKernel, ReductionKernel
from ._races import Race, RaceAccess
from ._raw import Function, KernelError, RawKernel, RawModule, SanitizerError

__all__ = ["CompileError", "ElementwiseKernel", "Function", "HostKernels", "KernelError", "Race", "RaceAccess",
           "RawKernel", "RawModule", "ReductionKernel", "SanitizerError", "host_cupy_backend"]


class HostKernels:
    """A kernel factory shaped like the ``cupy`` module (``RawModule``,
    ``ElementwiseKernel``, ``ReductionKernel``) whose kernels run on the host,
    optionally under a sanitizer."""

    def __init__(self, sanitize: str | None = None):
        self.sanitize = sanitize

    def RawModule(self, **kwargs):  # noqa: N802
        return RawModule(sanitize=self.sanitize, **kwargs)

    def RawKernel(self, *args, **kwargs):  # noqa: N802
        return RawKernel(*args, sanitize=self.sanitize, **kwargs)

    def ElementwiseKernel(self, *args, **kwargs):  # noqa: N802
        return ElementwiseKernel(*args, sanitize=self.sanitize, **kwargs)

    def ReductionKernel(self, *args, **kwargs):  # noqa: N802
        return ReductionKernel(*args, sanitize=self.sanitize, **kwargs)


def host_cupy_backend(sanitize: str | None = None, *, threads: int = 64, sm_count: int = 2,
                      values_per_thread: int = 16, **options):
    """cupybn's CuPy backend wired to NumPy arrays and host kernels.

    Usable as ``backend=`` in every public function and in the layer.  The
    defaults keep launches small (every CUDA thread is an OS thread here):
    64-thread reduction blocks and a pretend GPU of 2 SMs.  Other ``options``
    go to :class:`cupybn.backends.cupy_backend.CupyBackend`.
    """
    import numpy  # noqa: PLC0415

    from cupybn.backends.cupy_backend import CupyBackend  # noqa: PLC0415 - avoid an import cycle

    name = "host" if sanitize is None else f"host-{sanitize}"
    return CupyBackend(xp=numpy, kernels=HostKernels(sanitize), threads=threads, sm_count=sm_count,
                       values_per_thread=values_per_thread, name=name, **options)
