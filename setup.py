"""Builds the NumPy backend's optional compiled kernels (cupybn/kernels/batch_norm_cpu.c).

Everything else about the package is in pyproject.toml.  The extension is
optional: when it does not build (no C compiler, or one without GCC's
extensions, such as MSVC) the install goes on, and the NumPy backend runs its
NumPy paths (cupybn.backends._numpy_compiled.AVAILABLE says which).
"""
import platform

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

# GCC and Clang: no fused multiply-adds (they would make results depend on the
# machine the module was built for); errno-free sqrt, one instruction; on 32-bit
# x86, float arithmetic in SSE registers rather than x87's wider ones.
GNU_FLAGS = ["-O3", "-ffp-contract=off", "-fno-math-errno"]
if platform.machine().lower() in ("i386", "i486", "i586", "i686", "x86"):
    GNU_FLAGS += ["-msse2", "-mfpmath=sse"]


class BuildExt(build_ext):
    """Compiler flags chosen by the compiler in use, not by the platform."""

    def build_extensions(self):
        if self.compiler.compiler_type in ("unix", "mingw32", "cygwin"):
            for ext in self.extensions:
                ext.extra_compile_args = GNU_FLAGS
        super().build_extensions()


setup(ext_modules=[Extension("cupybn._batch_norm_cpu", ["cupybn/kernels/batch_norm_cpu.c"], optional=True)],
      cmdclass={"build_ext": BuildExt})
