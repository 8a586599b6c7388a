"""What a CuPy-backend call would cost on a GPU, counted on the CPU.

:func:`counting_backend` wires the CuPy backend to NumPy arrays through two
counting stand-ins:

* :class:`CountingKernels`, a kernel factory that counts launches of our own
  kernels (RawModule functions, and the general path's Elementwise and
  Reduction kernels), running them on the host harness or, with
  ``run=False``, not at all (to time the Python side alone);
* :class:`CountingNumpy`, an array module that counts every operation that
  would be a kernel on CuPy: ufuncs and methods of its arrays, and module
  functions other than allocations and views (``empty``, a ``reshape`` that
  shares memory).  Allocations are counted apart.

``Counts.launches`` is then what a GPU would run for the call: our kernels plus
the array module's operations.
"""
from __future__ import annotations

import dataclasses
import functools
import types

import numpy as np

from . import hostcuda


@dataclasses.dataclass
class Counts:
    kernels: list[str] = dataclasses.field(default_factory=list)     # our kernels, by name, in launch order
    operations: list[str] = dataclasses.field(default_factory=list)  # array-module operations (each a kernel)
    allocations: int = 0

    @property
    def launches(self) -> int:
        return len(self.kernels) + len(self.operations)

    def clear(self) -> None:
        self.kernels.clear()
        self.operations.clear()
        self.allocations = 0


class CountingArray(np.ndarray):
    """A NumPy array whose arithmetic and copying methods are counted as operations."""

    counts: Counts | None = None

    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        _operation(f"ufunc {ufunc.__name__}")
        inputs = tuple(i.view(np.ndarray) if isinstance(i, CountingArray) else i for i in inputs)
        if "out" in kwargs:
            kwargs["out"] = tuple(o.view(np.ndarray) if isinstance(o, CountingArray) else o for o in kwargs["out"])
        result = getattr(ufunc, method)(*inputs, **kwargs)
        return _wrap(result)

    def __setitem__(self, key, value):
        _operation("setitem")
        super().__setitem__(key, value)


def _counted_method(name):
    def method(self, *args, **kwargs):
        _operation(f"ndarray.{name}")
        return _wrap(getattr(np.ndarray, name)(self.view(np.ndarray), *args, **kwargs))

    method.__name__ = name
    return method


for _name in ("astype", "copy", "fill", "sum", "mean", "var", "any", "all", "max", "min", "clip", "dot", "cumsum"):
    setattr(CountingArray, _name, _counted_method(_name))

_current: list[Counts] = []


def _operation(what: str) -> None:
    if _current:
        _current[-1].operations.append(what)


def _wrap(result):
    return result.view(CountingArray) if isinstance(result, np.ndarray) and type(result) is np.ndarray else result


def _plain(a):
    return a.view(np.ndarray) if isinstance(a, CountingArray) else a


_ALLOCATIONS = frozenset({"empty", "empty_like"})
# Names that are types or constants, not operations.
_NOT_CALLS = frozenset({"ndarray", "dtype", "generic", "float16", "float32", "float64", "int32", "int64", "uint32",
                        "int8", "uint8", "bool_", "intp", "floating", "integer", "number", "errstate", "seterr",
                        "geterr", "result_type", "promote_types", "can_cast", "finfo", "iinfo", "shares_memory",
                        "may_share_memory", "isscalar", "ndim", "shape", "size"})


class CountingNumpy(types.SimpleNamespace):
    """NumPy as an array module whose every call but allocations and views is counted."""

    def __init__(self, counts: Counts):
        super().__init__()
        self._counts = counts

    def __getattr__(self, name):
        target = getattr(np, name)
        if name in _NOT_CALLS or not callable(target) or isinstance(target, type):
            return target
        counts = self._counts

        @functools.wraps(target)
        def call(*args, **kwargs):
            plain = [_plain(a) for a in args]
            result = target(*plain, **{k: _plain(v) for k, v in kwargs.items()})
            if name in _ALLOCATIONS:
                counts.allocations += 1
            elif not (isinstance(result, np.ndarray)
                      and any(isinstance(a, np.ndarray) and np.shares_memory(result, a) for a in plain)):
                counts.operations.append(f"xp.{name}")  # a new array (or a value): a kernel on CuPy
            return _wrap(result)

        return call


class _CountedFunction:
    def __init__(self, counts: Counts, name: str, function):
        self._counts, self._name, self._function = counts, name, function

    def __call__(self, *args, **kwargs):
        self._counts.kernels.append(self._name)
        if self._function is not None:
            self._function(*args, **kwargs)


class _CountedModule:
    def __init__(self, counts: Counts, module, run: bool):
        self._counts, self._module, self._run = counts, module, run

    def get_function(self, name):
        return _CountedFunction(self._counts, name, self._module.get_function(name) if self._run else None)


class CountingKernels:
    """A kernel factory that counts launches; ``run=False`` skips them (and the compile)."""

    def __init__(self, counts: Counts, *, run: bool = True):
        self._counts, self._run, self._host = counts, run, hostcuda.HostKernels()

    def RawModule(self, **kwargs):  # noqa: N802
        return _CountedModule(self._counts, self._host.RawModule(**kwargs) if self._run else None, self._run)

    def _general(self, factory, kwargs):
        kernel = factory(**kwargs) if self._run else None
        counts = self._counts

        def launch(*args, **kw):
            counts.kernels.append(kwargs.get("name", "kernel"))
            if kernel is None:  # not run: an output of the right shape
                return np.empty(0)
            return kernel(*[_plain(a) for a in args], **{k: _plain(v) for k, v in kw.items()})

        return launch

    def ElementwiseKernel(self, **kwargs):  # noqa: N802
        return self._general(self._host.ElementwiseKernel, kwargs)

    def ReductionKernel(self, **kwargs):  # noqa: N802
        return self._general(self._host.ReductionKernel, kwargs)


def counting_backend(*, run: bool = True, **options):
    """A CuPy backend on counting stand-ins; returns ``(backend, counts)``.

    Options go to :class:`cupybn.backends.cupy_backend.CupyBackend` (host
    defaults: 64-thread blocks, a pretend 8-SM GPU).
    """
    from cupybn.backends.cupy_backend import CupyBackend  # noqa: PLC0415 - avoid an import cycle

    counts = Counts()
    options = {"threads": 64, "sm_count": 8, **options}
    backend = CupyBackend(xp=CountingNumpy(counts), kernels=CountingKernels(counts, run=run), name="counting",
                          **options)
    return backend, counts


class counted:  # noqa: N801 - used as a context manager, like a function
    """``with counted(counts):`` counts the array methods of CountingArrays too."""

    def __init__(self, counts: Counts):
        self._counts = counts

    def __enter__(self) -> Counts:
        self._counts.clear()
        _current.append(self._counts)
        return self._counts

    def __exit__(self, *exc) -> None:
        _current.pop()


def counting_array(a):
    """``a`` as a CountingArray view (None stays None)."""
    return None if a is None else np.asarray(a).view(CountingArray)
