"""Host versions of CuPy's ``ElementwiseKernel`` and ``ReductionKernel``.

They take the same parameter strings, operation strings and call arguments as
CuPy's classes, generate CUDA C++ for them, and run that code through
:class:`~cupybn.testing.hostcuda.RawModule` on NumPy arrays.  With ``RawModule``
they make this package a *kernel factory* (an object with ``RawModule``,
``ElementwiseKernel`` and ``ReductionKernel`` attributes, as the ``cupy`` module
is one), so code written against CuPy's kernel API can be tested without a GPU.

CuPy semantics kept (see CuPy's ``_kernel.pyx`` and ``_reduction.pyx``):

* parameter strings ``"T x, raw T y, float32 z"``: one-letter type placeholders
  bound from the dtypes of the array arguments (outputs first, then inputs),
  concrete dtype names, the ``raw`` and ``_non_const`` keywords; placeholders
  are ``typedef``-ed before the preamble, so ``T(0)`` works anywhere;
* broadcasting of the non-raw array arguments, scalars (Python or NumPy) cast
  to their parameter's type as an assignment into an array of that type would
  cast them, outputs allocated from the loop shape and the bound types;
* in the operation, ``i`` is the linear index, ``_ind`` the indexer
  (``_ind.size()``), non-raw parameters are references to their element and
  raw ones are ``CArray`` views (``y[i]`` counts C order over y's own shape,
  ``y[idx]`` takes a multi-index);
* reductions: ``map_expr`` per element, ``reduce_expr`` over ``a`` and ``b`` of
  type ``_type_reduce`` (``reduce_type``, by default the C type of the first
  output), ``identity`` a C expression (empty: zero, and an error on empty
  input), ``post_map_expr`` writing outputs from ``a``; ``_J`` is the element's
  index among the reduced elements and ``_i`` the output index; ``axis`` None,
  int, negative or a tuple, ``keepdims``, ``out=``; like CuPy a reduction
  returns its *first* output only, even when it has several;
* the shape collapsing of ``reduce_dims`` (it shows only in ``_ind``'s and the
  ``_raw_x`` views' shapes, never in which element ``i`` is).

Differences, each of which raises rather than behaves differently:

* complex dtypes (and any dtype without a C type here) raise ``TypeError``;
* a placeholder bound by no array raises ``TypeError`` (CuPy: ``KeyError``);
* read-only output arrays raise ``ValueError`` (CuPy arrays are never read-only);
* ``CIndexer`` parameters in the parameter strings raise ``NotImplementedError``.

Reductions run one thread per output element, which combines that output's
elements one after the other, in C order of the reduced axes (sorted
ascending): ``s = REDUCE(s, map(x_J))`` for ``J = 0, 1, ...`` from the
identity.  CuPy combines partial results in a tree, so a floating-point result
here can differ from CuPy's in the last bits; ``reduce_expr`` must be
associative and commutative for the two to agree, as CuPy requires anyway.

Kernels run as one block of at most :data:`MAX_THREADS` threads (every thread
of the harness is an OS thread); CuPy's ``block_size`` only lowers that.
``float16`` values have CuPy's C type ``float16`` (defined in
``hostcuda/cupy_kernels.h``): half-precision storage that computes as float,
so ``x * x`` is rounded to half only when stored.  ``type_in0_raw`` / ``type_out0_raw``
(the dtypes of the first input and output arrays) are typedef-ed in
reductions, as CuPy's CUB path and simple reductions provide them.
"""
from __future__ import annotations

import re
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["MAX_THREADS", "ElementwiseKernel", "ReductionKernel", "parse_params"]

# Threads of the single block a kernel runs as; each one is an OS thread.
MAX_THREADS = 128

_HEADER = '#include "hostcuda/cupy_kernels.h"'

# C names of the dtypes, as CuPy writes them in generated code (float16 is
# CuPy's class, defined in the header; kernel parameters use __half).
_C_TYPES: dict[np.dtype, str] = {
    np.dtype(np.float64): "double",
    np.dtype(np.float32): "float",
    np.dtype(np.float16): "float16",
    np.dtype(np.int64): "long long",
    np.dtype(np.int32): "int",
    np.dtype(np.int16): "short",
    np.dtype(np.int8): "signed char",
    np.dtype(np.uint64): "unsigned long long",
    np.dtype(np.uint32): "unsigned int",
    np.dtype(np.uint16): "unsigned short",
    np.dtype(np.uint8): "unsigned char",
    np.dtype(np.bool_): "bool",
}

_KERNEL_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


# --------------------------------------------------------------------------
# Types
# --------------------------------------------------------------------------

def c_type(dtype: Any) -> str:
    """The C type name of ``dtype`` in generated code; TypeError for unsupported dtypes."""
    dt = np.dtype(dtype)
    try:
        return _C_TYPES[dt]
    except KeyError:
        kind = "complex dtypes are" if dt.kind == "c" else f"dtype {dt} is"
        raise TypeError(f"{kind} not supported by the host CuPy kernels") from None


def _signature_type(dtype: np.dtype) -> str:
    """The C type of a kernel parameter: the harness' own name for float16."""
    return "__half" if dtype == np.float16 else c_type(dtype)


# --------------------------------------------------------------------------
# Parameter strings
# --------------------------------------------------------------------------

@dataclass(frozen=True)
class ParamInfo:
    """One parameter of a parameter string such as ``"raw T x"``."""

    name: str
    ctype: str  # the placeholder letter, or the C type of `dtype`
    dtype: np.dtype | None  # None for a placeholder
    raw: bool
    is_const: bool


def _parse_param(text: str, is_const: bool) -> ParamInfo:
    words = text.split()
    if len(words) < 2:
        raise ValueError(f"Syntax error: {text!r}")
    *keywords, type_name, name = words
    raw = False
    for keyword in keywords:
        if keyword == "raw":
            raw = True
        elif keyword == "_non_const":
            is_const = False
        else:
            raise ValueError(f'Unknown keyword "{keyword}" in parameter {text!r}')
    if type_name == "CIndexer":
        raise NotImplementedError("CIndexer parameters are not supported by the host CuPy kernels")
    if len(type_name) == 1:  # a placeholder, as in CuPy: any one-character type name
        return ParamInfo(name, type_name, None, raw, is_const)
    try:
        dtype = np.dtype(type_name)
    except TypeError:
        raise ValueError(f"Unknown type {type_name!r} in parameter {text!r}") from None
    return ParamInfo(name, c_type(dtype), dtype, raw, is_const)


def parse_params(text: str, is_const: bool) -> tuple[ParamInfo, ...]:
    """Parse a comma-separated parameter string (inputs are const, outputs not)."""
    if len(text) == 0:
        return ()
    return tuple(_parse_param(part, is_const) for part in text.strip().split(","))


def _check_kernel_name(name: str) -> None:
    if not _KERNEL_NAME.match(name):
        raise ValueError(f'Invalid kernel name: "{name}"')


TypeMap = tuple[tuple[str, np.dtype], ...]


def _bind_one(param: ParamInfo, dtype: np.dtype, bound: dict[str, np.dtype]) -> None:
    if param.dtype is not None:
        if dtype != param.dtype:
            raise TypeError(f"Type is mismatched. {param.name} {dtype} {param.dtype}")
    elif param.ctype in bound:
        if dtype != bound[param.ctype]:
            raise TypeError(f"Type is mismatched. {param.name} {dtype} {bound[param.ctype]} {param.ctype}")
    else:
        bound[param.ctype] = dtype


def bind_types(
    in_params: Sequence[ParamInfo],
    out_params: Sequence[ParamInfo],
    in_dtypes: Sequence[np.dtype | None],
    out_dtypes: Sequence[np.dtype] | None,
) -> tuple[tuple[np.dtype, ...], tuple[np.dtype, ...], TypeMap]:
    """Resolve every parameter's dtype from the array arguments' dtypes (None: a scalar).

    Outputs bind placeholders first, then inputs, as in CuPy; an argument that
    contradicts its parameter's dtype or an earlier binding raises TypeError.
    """
    bound: dict[str, np.dtype] = {}
    for param, dtype in zip(out_params, out_dtypes or (), strict=False):
        _bind_one(param, dtype, bound)
    for param, maybe_dtype in zip(in_params, in_dtypes, strict=True):
        if maybe_dtype is not None:
            _bind_one(param, maybe_dtype, bound)

    def resolved(param: ParamInfo) -> np.dtype:
        if param.dtype is not None:
            return param.dtype
        if param.ctype not in bound:
            raise TypeError(
                f"Cannot decide the type {param.ctype} of parameter {param.name!r}: "
                "no array argument binds it (pass an array or the outputs)"
            )
        return bound[param.ctype]

    in_types = tuple(resolved(p) for p in in_params)
    out_types = tuple(resolved(p) for p in out_params)
    return in_types, out_types, tuple(sorted(bound.items()))


def _typedefs(pairs: Sequence[tuple[str, np.dtype]]) -> str:
    return "".join(f"typedef {c_type(dtype)} {name};\n" for name, dtype in pairs)


# --------------------------------------------------------------------------
# Arguments
# --------------------------------------------------------------------------

def _check_kernel_arg(arg: Any) -> Any:
    """``arg`` itself if it is an array or a scalar of a supported dtype; TypeError otherwise."""
    if isinstance(arg, (complex, np.complexfloating)):
        raise TypeError("complex scalars are not supported by the host CuPy kernels")
    if isinstance(arg, np.ndarray):
        c_type(arg.dtype)
    elif isinstance(arg, (bool, int, float, np.generic)):
        c_type(np.asarray(arg).dtype)  # e.g. a Python int beyond uint64 has none
    else:
        raise TypeError(f"Unsupported type {type(arg)}")
    return arg


def _cast_scalar(value: Any, dtype: np.dtype) -> Any:
    """``value`` as a ``dtype`` scalar, cast as assigning it into a ``dtype`` array casts.

    CuPy stores scalar arguments with NumPy's assignment logic, which rejects
    out-of-range Python integers and NaN to integer.  NumPy 1.x only warns about an
    out-of-range Python integer and wraps it, so the range is checked here.
    """
    dtype = np.dtype(dtype)
    if isinstance(value, int) and not isinstance(value, bool) and dtype.kind in "iu":
        info = np.iinfo(dtype)
        if not info.min <= value <= info.max:
            raise OverflowError(f"Python integer {value} out of bounds for {dtype}")
    holder = np.empty((), dtype=dtype)
    holder[()] = value
    return holder[()]


def _broadcast_shape(args: Sequence[Any], params: Sequence[ParamInfo], size: int | None) -> tuple[int, ...]:
    """The loop shape: the broadcast of the non-raw array arguments, or ``(size,)``."""
    shapes = [a.shape for a, p in zip(args, params, strict=False) if isinstance(a, np.ndarray) and not p.raw]
    if size is not None:
        if shapes:
            raise ValueError("Specified 'size' can be used only if all of the ndarray are 'raw'.")
        return (size,)
    if not shapes:
        raise ValueError("Loop size is undecided.")
    try:
        return tuple(np.broadcast_shapes(*shapes))
    except ValueError:
        raise ValueError(
            "operands could not be broadcast together with shapes " + " ".join(map(str, shapes))
        ) from None


def _check_output(arr: np.ndarray, param: ParamInfo, shape: tuple[int, ...]) -> None:
    if not param.raw and arr.shape != shape:
        raise ValueError(f"Out shape is mismatched: {arr.shape} for a loop of shape {shape}")
    if not arr.flags.writeable:
        raise ValueError(f"output array {param.name!r} is read-only")


def _allocate_outputs(out_params: Sequence[ParamInfo], out_types: Sequence[np.dtype], shape: tuple[int, ...],
                      size_given: bool) -> list[np.ndarray]:
    if not size_given and any(p.raw for p in out_params):
        raise ValueError("Output array size is Undecided")
    return [np.empty(shape, dtype=t) for t in out_types]


def _output_dtypes(out_args: Sequence[Any]) -> tuple[np.dtype, ...]:
    for arr in out_args:
        if not isinstance(arr, np.ndarray):
            raise TypeError("Output arguments must be numpy.ndarray")
    return tuple(arr.dtype for arr in out_args)


# --------------------------------------------------------------------------
# Index spaces: shapes, strides and reduce_dims
# --------------------------------------------------------------------------

Layout = tuple[tuple[int, ...], tuple[int, ...]]  # (shape, byte strides)


def collapse_dims(shape: Sequence[int], strides_list: Sequence[Sequence[int]]
                  ) -> tuple[tuple[int, ...], list[tuple[int, ...]]]:
    """Merge axes that every array walks as one (CuPy's ``reduce_dims``) and drop length-1 axes.

    Axis ``ax`` joins the axis kept before it when, in every array, the kept
    axis' stride is ``ax``'s stride times ``ax``'s length.  The C-order
    enumeration of the elements, hence every linear index, is unchanged.  A
    shape of only 1s keeps one axis; a 0-d shape stays 0-d.
    """
    kept_shape: list[int] = []
    kept_strides: list[list[int]] = [[] for _ in strides_list]
    for ax, extent in enumerate(shape):
        if extent == 1:
            continue
        pairs = list(zip(kept_strides, strides_list, strict=True))
        if kept_shape and all(kept[-1] == strides[ax] * extent for kept, strides in pairs):
            kept_shape[-1] *= extent
            for kept, strides in pairs:
                kept[-1] = strides[ax]
        else:
            kept_shape.append(extent)
            for kept, strides in pairs:
                kept.append(strides[ax])
    if not kept_shape and len(shape) > 0:
        return (1,), [(0,) for _ in strides_list]
    return tuple(kept_shape), [tuple(s) for s in kept_strides]


def _loop_layouts(shape: tuple[int, ...], arrays: Sequence[np.ndarray], reduce_dims: bool
                  ) -> tuple[tuple[int, ...], list[Layout]]:
    """The loop shape and each array's (shape, strides) over it, collapsed if asked."""
    strides = [a.strides for a in arrays]
    if reduce_dims:
        shape, strides = collapse_dims(shape, strides)
    return shape, [(shape, tuple(s)) for s in strides]


def _axes(axis: Any, ndim: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(reduced axes, kept axes), both ascending, from an ``axis`` argument."""
    if axis is None:
        return tuple(range(ndim)), ()
    requested = tuple(axis) if isinstance(axis, Sequence) else (axis,)
    reduced = []
    for ax in requested:
        ax = int(ax)
        if not -ndim <= ax < ndim:
            raise np.exceptions.AxisError(ax, ndim)
        reduced.append(ax % ndim)
    if len(set(reduced)) != len(reduced):
        raise ValueError("duplicate value in 'axis'")
    reduced.sort()
    return tuple(reduced), tuple(ax for ax in range(ndim) if ax not in reduced)


# --------------------------------------------------------------------------
# Code generation
# --------------------------------------------------------------------------

@dataclass(frozen=True)
class _Slot:
    """How one argument reaches the kernel: its parameter, its dtype and, for an array, its layout.

    The layout is the (shape, byte strides) the kernel indexes it with: the
    loop's (maybe collapsed) for a non-raw array, the array's own for a raw one.
    Generated code depends on the number of dimensions only, not on the sizes.
    """

    param: ParamInfo
    dtype: np.dtype
    layout: Layout | None  # None for a scalar

    @property
    def is_array(self) -> bool:
        return self.layout is not None

    @property
    def ndim(self) -> int:
        return 0 if self.layout is None else len(self.layout[0])


class _Meta:
    """Hands out places in the kernel's one int64 metadata array (shapes, then strides)."""

    def __init__(self) -> None:
        self.values: list[int] = []

    def add(self, numbers: Sequence[int]) -> int:
        offset = len(self.values)
        self.values.extend(int(n) for n in numbers)
        return offset

    def array(self) -> np.ndarray:
        # Never empty, so that its pointer always points at memory.
        return np.array(self.values or [0], dtype=np.int64)


def _signature(name: str, slots: Sequence[_Slot]) -> str:
    params = [
        f"{_signature_type(s.dtype)}{'*' if s.is_array else ''} _arg{k}" for k, s in enumerate(slots)
    ]
    params.append("const long long* _meta")
    return f'extern "C" __global__ void {name}({", ".join(params)})'


def _declarations(slots: Sequence[_Slot], offsets: Sequence[int]) -> list[str]:
    """Views of the arrays (``_raw_x``, or ``x`` for raw parameters) and the scalars."""
    lines = []
    for k, (slot, offset) in enumerate(zip(slots, offsets, strict=True)):
        p = slot.param
        const = "const " if p.is_const else ""
        if slot.is_array:
            view = p.name if p.raw else f"_raw_{p.name}"
            shape_at, strides_at = offset, offset + slot.ndim
            ctype = c_type(slot.dtype)  # float16 views the __half data in place
            lines.append(f"{const}CArray<{ctype}, {slot.ndim}> {view}"
                         f"(reinterpret_cast<{ctype}*>(_arg{k}), _meta + {shape_at}, _meta + {strides_at});")
        else:
            ctype = c_type(slot.dtype)
            lines.append(f"{const}{ctype} {p.name} = static_cast<{ctype}>(_arg{k});")
    return lines


def _element_references(slots: Sequence[_Slot], indexer: str, by_value_inputs: bool) -> list[str]:
    """``x`` as the element of ``_raw_x`` at the indexer, for the non-raw array parameters."""
    lines = []
    for slot in slots:
        p = slot.param
        if not slot.is_array or p.raw:
            continue
        element = f"_raw_{p.name}[{indexer}.get()]"
        if not p.is_const:
            lines.append(f"{p.ctype} &{p.name} = {element};")
        elif by_value_inputs:
            lines.append(f"const {p.ctype} {p.name} = {element};")
        else:
            lines.append(f"const {p.ctype} &{p.name} = {element};")
    return lines


def _array_offsets(meta: _Meta, slots: Sequence[_Slot]) -> list[int]:
    """Put each array's shape and strides into the metadata; their offsets (-1 for scalars)."""
    return [-1 if s.layout is None else meta.add(s.layout[0] + s.layout[1]) for s in slots]


def _join(*parts: str | Sequence[str], indent: str = "") -> str:
    """Lines (strings, possibly multi-line, or lists of them), each indented by ``indent``."""
    lines: list[str] = []
    for part in parts:
        for text in [part] if isinstance(part, str) else part:
            lines.extend(text.split("\n"))
    return "\n".join(indent + line for line in lines)


def elementwise_source(
    name: str, slots: Sequence[_Slot], offsets: Sequence[int], loop_ndim: int, type_map: TypeMap,
    operation: str, preamble: str, loop_prep: str, after_loop: str,
) -> str:
    """CUDA C++ of an elementwise kernel whose loop shape starts the metadata array."""
    body = _join(
        _declarations(slots, offsets),
        f"CIndexer<{loop_ndim}> _ind(_meta + 0);",
        f"{loop_prep};",
        "CUPY_FOR(i, _ind.size()) {",
        "  _ind.set(i);",
        _join(_element_references(slots, "_ind", by_value_inputs=False), f"{operation};", indent="  "),
        "}",
        f"{after_loop};",
        indent="  ",
    )
    return f"{_HEADER}\n{_typedefs(type_map)}{preamble}\n{_signature(name, slots)} {{\n{body}\n}}\n"


@dataclass(frozen=True)
class _ReductionExprs:
    map_expr: str
    reduce_expr: str
    post_map_expr: str
    identity: str
    reduce_type: str


def reduction_source(
    name: str, slots: Sequence[_Slot], offsets: Sequence[int], n_in: int, loop_ndims: tuple[int, int],
    type_map: TypeMap, exprs: _ReductionExprs, preamble: str,
) -> str:
    """CUDA C++ of a reduction: one thread per output combines that output's elements in order.

    The metadata array starts with the input loop's shape (reduced axes first)
    and the output loop's shape; element ``_J`` of output ``_i`` is at the
    input loop's linear index ``_J * out_size + _i``.
    """
    in_ndim, out_ndim = loop_ndims
    per_output = _join(
        f"_type_reduce _s = _type_reduce({exprs.identity});",
        "for (ptrdiff_t _J = 0; _J < _reduce_size; ++_J) {",
        "  const ptrdiff_t _j = _J * _out_ind.size() + _i;",
        "  _in_ind.set(_j);",
        _join(_element_references(slots[:n_in], "_in_ind", by_value_inputs=True), indent="  "),
        f"  _type_reduce _a = static_cast<_type_reduce>({exprs.map_expr});",
        "  _s = REDUCE(_s, _a);",
        "}",
        "_out_ind.set(_i);",
        _element_references(slots[n_in:], "_out_ind", by_value_inputs=True),
        "POST_MAP(_s);",
        indent="  ",
    )
    body = _join(
        _declarations(slots, offsets),
        f"CIndexer<{in_ndim}> _in_ind(_meta + 0);",
        f"CIndexer<{out_ndim}> _out_ind(_meta + {in_ndim});",
        "const ptrdiff_t _reduce_size = _out_ind.size() > 0 ? _in_ind.size() / _out_ind.size() : 0;",
        "CUPY_FOR(_i, _out_ind.size()) {",
        per_output,
        "}",
        indent="  ",
    )
    macros = (f"#define REDUCE(a, b) ({exprs.reduce_expr})\n"
              f"#define POST_MAP(a) ({exprs.post_map_expr})\n"
              f"typedef {exprs.reduce_type} _type_reduce;\n")
    return (f"{_HEADER}\n{_typedefs(type_map)}{preamble}\n{macros}"
            f"{_signature(name, slots)} {{\n{body}\n}}\n")


# --------------------------------------------------------------------------
# Compiling and launching
# --------------------------------------------------------------------------

_compiled: dict[tuple[str, tuple[str, ...], str | None], tuple[Any, dict[str, Any]]] = {}
_compiled_lock = threading.Lock()


def _kernel_function(source: str, name: str, options: Sequence[str], sanitize: str | None) -> Any:
    """The launchable kernel ``name`` of ``source``; one RawModule per (source, options, sanitize)."""
    key = (source, tuple(options), sanitize)
    with _compiled_lock:
        entry = _compiled.get(key)
        if entry is None:
            from cupybn.testing.hostcuda import RawModule  # noqa: PLC0415 (the package imports this module)

            entry = (RawModule(code=source, options=tuple(options), sanitize=sanitize), {})
            _compiled[key] = entry
        module, functions = entry
        if name not in functions:
            functions[name] = module.get_function(name)
        return functions[name]


def _thread_count(work_items: int, block_size: int | None) -> int:
    limit = MAX_THREADS if block_size is None else min(block_size, MAX_THREADS)
    return max(1, min(limit, work_items))


def _check_block_size(block_size: int | None) -> None:
    if block_size is not None and block_size <= 0:
        raise ValueError("block_size must be greater than zero")


def _broadcast_inputs(in_args: Sequence[Any], in_params: Sequence[ParamInfo], shape: tuple[int, ...]) -> list[Any]:
    return [
        np.broadcast_to(a, shape) if isinstance(a, np.ndarray) and not p.raw else a
        for a, p in zip(in_args, in_params, strict=True)
    ]


def _cast_scalars(args: Sequence[Any], types: Sequence[np.dtype]) -> list[Any]:
    return [a if isinstance(a, np.ndarray) else _cast_scalar(a, t) for a, t in zip(args, types, strict=True)]


def _slots(params: Sequence[ParamInfo], args: Sequence[Any], nonraw_layouts: Sequence[Layout]) -> list[_Slot]:
    """Each argument with its layout: the loop's for non-raw arrays (in order), its own for raw ones."""
    pending = iter(nonraw_layouts)
    slots = []
    for p, a in zip(params, args, strict=True):
        if not isinstance(a, np.ndarray):
            slots.append(_Slot(p, a.dtype, None))
        else:
            slots.append(_Slot(p, a.dtype, (a.shape, a.strides) if p.raw else next(pending)))
    return slots


def _nonraw_arrays(params: Sequence[ParamInfo], args: Sequence[Any]) -> list[np.ndarray]:
    return [a for p, a in zip(params, args, strict=True) if isinstance(a, np.ndarray) and not p.raw]


class ElementwiseKernel:
    """CuPy's ``ElementwiseKernel`` run on NumPy arrays through the host harness.

    Called as ``k(*inputs[, *outputs], size=None, block_size=None)``; returns
    the output array, a tuple of them (several outputs or ``return_tuple``), or
    None (``no_return``).  ``stream`` is accepted and ignored: launches are
    synchronous.
    """

    def __init__(self, in_params: str, out_params: str, operation: str, name: str = "kernel",
                 reduce_dims: bool = True, preamble: str = "", no_return: bool = False,
                 return_tuple: bool = False, loop_prep: str = "", after_loop: str = "",
                 options: Sequence[str] = (), sanitize: str | None = None) -> None:
        _check_kernel_name(name)
        self.in_params = parse_params(in_params, True)
        self.out_params = parse_params(out_params, False)
        self.nin = len(self.in_params)
        self.nout = len(self.out_params)
        self.nargs = self.nin + self.nout
        self.params = self.in_params + self.out_params
        if "i" in (p.name for p in self.params):
            raise ValueError("Can not use 'i' as a parameter name")
        self.operation = operation
        self.name = self.__name__ = name
        self.reduce_dims = reduce_dims
        self.preamble = preamble
        self.no_return = no_return
        self.return_tuple = return_tuple
        self.loop_prep = loop_prep
        self.after_loop = after_loop
        self.options = tuple(options)
        self.sanitize = sanitize

    def __call__(self, *args: Any, size: int | None = None, block_size: int | None = None,
                 stream: Any = None) -> Any:
        _check_block_size(block_size)
        if size == -1:  # CuPy's "not given"
            size = None
        if len(args) not in (self.nin, self.nargs):
            raise TypeError(
                f"Wrong number of arguments for {self.name!r}. It must be either {self.nin} or "
                f"{self.nargs} (with outputs), but given {len(args)}."
            )
        del stream  # launches are synchronous
        args = tuple(_check_kernel_arg(a) for a in args)
        shape = _broadcast_shape(args, self.params, size)
        in_args = _broadcast_inputs(args[: self.nin], self.in_params, shape)
        out_args = list(args[self.nin:])
        in_dtypes = [a.dtype if isinstance(a, np.ndarray) else None for a in in_args]
        in_types, out_types, type_map = bind_types(
            self.in_params, self.out_params, in_dtypes, _output_dtypes(out_args) if out_args else None)
        if out_args:
            for arr, p in zip(out_args, self.out_params, strict=True):
                _check_output(arr, p, shape)
        else:
            out_args = _allocate_outputs(self.out_params, out_types, shape, size is not None)

        if self.no_return:
            result = None
        elif self.nout == 1 and not self.return_tuple:
            result = out_args[0]
        else:
            result = tuple(out_args)
        if 0 not in shape:
            self._launch(_cast_scalars(in_args, in_types) + out_args, shape, type_map, block_size)
        return result

    def _launch(self, args: list[Any], shape: tuple[int, ...], type_map: TypeMap, block_size: int | None) -> None:
        loop_shape, nonraw_layouts = _loop_layouts(shape, _nonraw_arrays(self.params, args), self.reduce_dims)
        slots = _slots(self.params, args, nonraw_layouts)
        meta = _Meta()
        meta.add(loop_shape)
        offsets = _array_offsets(meta, slots)
        source = elementwise_source(self.name, slots, offsets, len(loop_shape), type_map, self.operation,
                                    self.preamble, self.loop_prep, self.after_loop)
        kernel = _kernel_function(source, self.name, self.options, self.sanitize)
        threads = _thread_count(int(np.prod(loop_shape)), block_size)
        kernel((1,), (threads,), (*args, meta.array()))


class ReductionKernel:
    """CuPy's ``ReductionKernel`` run on NumPy arrays through the host harness.

    Called as ``k(*inputs[, *outputs], out=None, axis=None, keepdims=False)``;
    returns the first output array, as CuPy does.  ``stream`` is accepted and
    ignored.  See the module docstring for the (sequential) reduction order.
    """

    def __init__(self, in_params: str, out_params: str, map_expr: str, reduce_expr: str, post_map_expr: str,
                 identity: Any, name: str = "reduce_kernel", reduce_type: str | None = None,
                 reduce_dims: bool = True, preamble: str = "", options: Sequence[str] = (),
                 sanitize: str | None = None) -> None:
        _check_kernel_name(name)
        self.in_params = parse_params(in_params, True)
        self.out_params = parse_params(out_params, False)
        if not self.out_params:
            raise ValueError("a ReductionKernel needs at least one output parameter")
        self.nin = len(self.in_params)
        self.nout = len(self.out_params)
        self.nargs = self.nin + self.nout
        self.params = self.in_params + self.out_params
        self.name = self.__name__ = name
        self.identity = "" if identity is None else str(identity)
        self.map_expr = map_expr
        self.reduce_expr = reduce_expr
        self.post_map_expr = post_map_expr
        self.reduce_type = self.out_params[0].ctype if reduce_type is None else reduce_type
        self.reduce_dims = reduce_dims
        self.preamble = preamble
        self.options = tuple(options)
        self.sanitize = sanitize

    def __call__(self, *args: Any, out: np.ndarray | None = None, axis: Any = None, keepdims: bool = False,
                 stream: Any = None) -> np.ndarray:
        del stream  # launches are synchronous
        if len(args) not in (self.nin, self.nargs):
            raise TypeError(f"Wrong number of arguments for {self.name}")
        out_args = list(args[self.nin:])
        if out is not None:
            if self.nout != 1:
                raise NotImplementedError("out= is only supported for a single output; pass the outputs as arguments")
            if out_args:
                raise ValueError("cannot specify 'out' as both a positional and keyword argument")
            out_args = [out]
        in_args = [_check_kernel_arg(a) for a in args[: self.nin]]
        shape = _broadcast_shape(in_args, self.in_params, None)
        in_args = _broadcast_inputs(in_args, self.in_params, shape)
        in_dtypes = [a.dtype if isinstance(a, np.ndarray) else None for a in in_args]
        in_types, out_types, type_map = bind_types(
            self.in_params, self.out_params, in_dtypes, _output_dtypes(out_args) if out_args else None)

        reduced, kept = _axes(axis, len(shape))
        out_shape = tuple(1 if ax in reduced else n for ax, n in enumerate(shape)) if keepdims else tuple(
            shape[ax] for ax in kept)
        if out_args:
            for arr, p in zip(out_args, self.out_params, strict=True):
                _check_output(arr, p, out_shape)
        else:
            out_args = _allocate_outputs(self.out_params, out_types, out_shape, size_given=False)
        result = out_args[0]
        if result.size == 0:
            return result
        if self.identity == "" and 0 in shape:
            raise ValueError(f"zero-size array to reduction operation {self.name} which has no identity")

        in_args = _cast_scalars(in_args, in_types)
        raw_typedefs = _raw_typedefs(in_args, out_args)
        self._launch(in_args, out_args, (shape, reduced + kept, out_shape), type_map + raw_typedefs)
        return result

    def _launch(self, in_args: list[Any], out_args: list[Any],
                shapes: tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]], type_map: TypeMap) -> None:
        shape, permutation, out_shape = shapes
        if permutation != tuple(range(len(shape))) and any(p.raw for p in self.in_params):
            raise NotImplementedError("Illegal conditions: raw inputs need the reduced axes to lead")
        in_arrays = [a.transpose(permutation) for a in _nonraw_arrays(self.in_params, in_args)]
        in_shape, in_layouts = _loop_layouts(tuple(shape[ax] for ax in permutation), in_arrays, self.reduce_dims)
        out_shape, out_layouts = _loop_layouts(out_shape, _nonraw_arrays(self.out_params, out_args),
                                               self.reduce_dims)
        args = in_args + out_args
        slots = _slots(self.in_params, in_args, in_layouts) + _slots(self.out_params, out_args, out_layouts)
        meta = _Meta()
        meta.add(in_shape)
        meta.add(out_shape)
        offsets = _array_offsets(meta, slots)
        exprs = _ReductionExprs(self.map_expr, self.reduce_expr, self.post_map_expr, self.identity, self.reduce_type)
        source = reduction_source(self.name, slots, offsets, self.nin, (len(in_shape), len(out_shape)),
                                  type_map, exprs, self.preamble)
        kernel = _kernel_function(source, self.name, self.options, self.sanitize)
        kernel((1,), (_thread_count(int(np.prod(out_shape)), None),), (*args, meta.array()))


def _raw_typedefs(in_args: Sequence[Any], out_args: Sequence[np.ndarray]) -> TypeMap:
    """``type_in0_raw`` and ``type_out0_raw``: the dtypes of the first input and output arrays."""
    pairs = []
    if in_args and isinstance(in_args[0], np.ndarray):
        pairs.append(("type_in0_raw", in_args[0].dtype))
    pairs.append(("type_out0_raw", out_args[0].dtype))
    return tuple(pairs)
