"""The test kernels in tests/cuda/, built the way the NVRTC gate sees them.

``module("warp_collectives.cu")`` gives a host RawModule with the name
expressions and options that tests/cuda/manifest.py lists for that file, so a
test cannot use an instantiation that the compile gate does not check.
"""
from __future__ import annotations

import functools
import importlib.util
from pathlib import Path

from cupybn.testing import hostcuda

CUDA_DIR = Path(__file__).parent / "cuda"


@functools.cache
def manifest():
    spec = importlib.util.spec_from_file_location("cupybn_test_cuda_manifest", CUDA_DIR / "manifest.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@functools.cache
def module(filename: str, sanitize: str | None = None, ftz: bool = True) -> hostcuda.RawModule:
    """The host module of a test source, compiled as CuPy would (``-ftz=true``) unless ``ftz=False``."""
    for source in manifest().SOURCES:
        if source.path.name == filename:
            return hostcuda.RawModule(code=source.path.read_text(), options=tuple(source.options),
                                      name_expressions=source.name_expressions, sanitize=sanitize,
                                      source_name=source.path.name, ftz=ftz)
    raise LookupError(f"{filename} is not listed in tests/cuda/manifest.py")
