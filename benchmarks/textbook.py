"""The textbook NumPy Batch Normalization the benchmarks compare against.

It lives in the package (``cupybn._textbook``) so that ``python -m cupybn
compare`` can use it when cupybn is installed; this module only re-exports it.
"""
from cupybn._textbook import Cache, backward, forward_infer, forward_train

__all__ = ["Cache", "backward", "forward_infer", "forward_train"]
