"""Whether CuPy can reach a GPU here: the one check that the demo, gpu-check and
the GPU benchmarks make before any GPU work.  Importing this module imports
nothing optional."""
from __future__ import annotations


def one_line(exc: BaseException) -> str:
    """An exception's message on one line (CUDA errors span several)."""
    return " ".join(str(exc).split()) or type(exc).__name__


def cupy_with_gpu():
    """``(cupy, "")`` when CuPy imports and sees an NVIDIA GPU, else ``(None, reason)``
    with a one-line reason."""
    try:
        import cupy  # noqa: PLC0415 - optional
    except Exception as e:  # ImportError, or CUDA libraries that fail to load
        return None, f"CuPy is not importable ({type(e).__name__}: {one_line(e)}); install cupy-cuda12x or cupy-cuda13x"
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as e:  # no driver, no device
        return None, f"no usable NVIDIA GPU: {one_line(e)}"
    if count < 1:
        return None, "no NVIDIA GPU found"
    return cupy, ""
