"""Builds the NumPy backend's optional compiled kernels (cupybn/kernels/batch_norm_cpu.c).

Everything else about the package is in pyproject.toml.  The extension is
optional: without a C compiler the install goes on, and the NumPy backend
runs its NumPy paths (cupybn.backends.numpy_backend.COMPILED says which).
"""
import sys

from setuptools import Extension, setup

# No fused multiply-adds (they would round y and dx differently from the NumPy
# paths) and no -ffast-math; errno-free sqrt so that it is one instruction.
FLAGS = [] if sys.platform == "win32" else ["-O3", "-ffp-contract=off", "-fno-math-errno"]

setup(ext_modules=[Extension("cupybn._batch_norm_cpu", ["cupybn/kernels/batch_norm_cpu.c"],
                             extra_compile_args=FLAGS, optional=True)])
