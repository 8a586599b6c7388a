"""The CuPy backend: Batch Normalization kernels for NVIDIA GPUs.

The kernels are CUDA C++ in ``cupybn/kernels/batch_norm.cu``, compiled on first
use through the kernel factory's ``RawModule`` with the instantiations that
``cupybn.kernels.BATCH_NORM_SOURCES`` lists (the list the NVRTC gate compiles).

The backend takes its array module and its kernel factory as parameters: on a
GPU they are ``cupy`` and ``cupy``; in tests they are ``numpy`` and
``cupybn.testing.hostcuda``, which runs the same kernel source on the CPU (see
``cupybn.testing.hostcuda.host_cupy_backend``).  Nothing here synchronises with
the device: every decision that depends on the data is taken by the kernels.
"""
from __future__ import annotations

import functools
import math
import threading

import numpy as np

from ..kernels import BATCH_NORM_SOURCES, BLOCK_THREADS, C_TYPES, RUNNING_TYPES, VECTOR_BYTES, cuda_header_dirs
from ._cupy_general import GeneralPath
from .numpy_backend import quiet

# Per-channel kernels run one thread per channel in blocks of this size.
_CHANNEL_BLOCK = 128
# Elementwise kernels: blocks per SM (grid-stride beyond); their blocks have the
# backend's `threads` threads, like the reductions.
_ELEMENTWISE_BLOCKS_PER_SM = 8
# Partial counts are float32 in the kernels: keep each block's share exact.
_MAX_VALUES_PER_BLOCK = 2**24
_MAX_GRID_Y = 65535


class KernelLaunchError(RuntimeError):
    """A kernel of the CuPy backend failed to compile, launch or run; the message names it."""


class CupyBackend:
    """Batch Normalization through CUDA kernels; the contract is ``docs/backends.md``.

    ``xp``: the array module (``cupy``); ``kernels``: an object with a
    ``RawModule`` like ``cupy``'s; ``threads``: threads per block of the
    reduction kernels (one of ``cupybn.kernels.BLOCK_THREADS``); ``sm_count``:
    multiprocessors to fill (read from the device when None);
    ``values_per_thread``: how much data a reduction thread takes at least
    before a channel is split over more blocks; ``vector_loads``: let the
    elementwise kernels move 16 bytes at a time where the arrays allow it.
    """

    supported_dtypes = frozenset(C_TYPES)  # CuPy has no bfloat16 arrays

    def __init__(self, xp=None, kernels=None, *, threads: int = 256, sm_count: int | None = None,
                 values_per_thread: int = 16, vector_loads: bool = True, name: str = "cupy"):
        if xp is None:
            import cupy  # noqa: PLC0415 - only when a CuPy backend is made

            xp = cupy
        if threads not in BLOCK_THREADS:
            raise ValueError(f"threads must be one of {BLOCK_THREADS}, got {threads}")
        if values_per_thread < 1:
            raise ValueError(f"values_per_thread must be at least 1, got {values_per_thread}")
        self.xp = xp
        self._kernels = kernels if kernels is not None else xp
        self.threads = threads
        self.values_per_thread = values_per_thread
        self.vector_loads = vector_loads
        self._sm_count = sm_count
        self.name = name
        self._modules: dict[str, object] = {}
        self._launchers: dict[tuple[str, str], _Launcher] = {}
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"CupyBackend({self.name}, threads={self.threads})"

    def owns(self, a) -> bool:
        return isinstance(a, self.xp.ndarray)

    # ---- kernels ------------------------------------------------------------------

    def _function(self, dtype, template: str, *params):
        """The compiled kernel ``template<storage, arithmetic, params...>`` for data of ``dtype``."""
        name = np.dtype(dtype).name
        if name not in C_TYPES:
            raise TypeError(f"the CuPy backend supports float16, float32 and float64 data, not {name}")
        storage, acc = C_TYPES[name]
        args = ", ".join([*([storage] if template.startswith(_STORAGE_TEMPLATES) else []), acc, *map(str, params)])
        return self._launcher(name, f"{template}<{args}>")

    def _launcher(self, dtype_name: str, expression: str) -> _Launcher:
        """One launcher per kernel, so the kernel is looked up once, not per call."""
        key = (dtype_name, expression)
        launcher = self._launchers.get(key)
        if launcher is None:
            launcher = self._launchers.setdefault(key, _Launcher(self, dtype_name, expression))
        return launcher

    def _module(self, dtype_name: str, *, with_cuda_headers: bool = False):
        """The RawModule of one data type (compiled by the factory on first use).

        batch_norm.cu includes cuda_fp16.h.  CuPy normally finds it; where it
        does not, the module is rebuilt once with the CUDA header folders that
        cupybn can find (``cupybn.kernels.cuda_header_dirs``).
        """
        with self._lock:
            module = self._modules.get(dtype_name)
            if module is None or with_cuda_headers:
                source = BATCH_NORM_SOURCES[dtype_name]
                options = source.compile_options()
                if with_cuda_headers:
                    options += tuple(f"-I{d}" for d in cuda_header_dirs())
                module = self._kernels.RawModule(code=source.path.read_text(), options=options,
                                                 name_expressions=source.name_expressions)
                self._modules[dtype_name] = module
            return module

    def sm_count(self) -> int:
        if self._sm_count is None:
            device = self.xp.cuda.Device()
            self._sm_count = int(device.attributes["MultiProcessorCount"])
        return self._sm_count

    # ---- launch geometry ------------------------------------------------------------

    def _slices(self, per_channel: int, columns: int, per_thread_step: int, multiple: int = 1) -> tuple[int, int]:
        """How many blocks share a channel, and how many values (planar) or rows each takes.

        ``columns`` blocks exist per slice; enough slices to give the GPU about
        four blocks per SM, but not so many that a thread gets fewer than
        ``values_per_thread`` values.  ``per_block`` is a multiple of ``multiple``
        (the pack size of the planar kernels).
        """
        wanted = math.ceil(4 * self.sm_count() / columns)
        useful = math.ceil(per_channel / (per_thread_step * self.values_per_thread))
        slices = max(1, min(wanted, useful), math.ceil(per_channel / _MAX_VALUES_PER_BLOCK))
        slices = min(slices, _MAX_GRID_Y)
        per_block = math.ceil(per_channel / slices / multiple) * multiple  # whole packs per block
        return math.ceil(per_channel / per_block), per_block  # no empty slices

    def _pack(self, *arrays) -> int:
        """Values per load/store of the elementwise kernels: 16 bytes' worth where
        every array starts 16-byte aligned and the size is a whole number of packs."""
        itemsize = arrays[0].dtype.itemsize
        vec = VECTOR_BYTES // itemsize
        if (self.vector_loads and arrays[0].size % vec == 0
                and all(_address(a) % VECTOR_BYTES == 0 for a in arrays)):
            return vec
        return 1

    def _elementwise(self, template: str, arrays, rest):
        """Launches an elementwise kernel over the (equal-shaped) arrays, then ``rest``."""
        total = arrays[0].size
        vec = self._pack(*arrays)
        packs = total // vec
        grid = max(1, min(math.ceil(packs / self.threads), _ELEMENTWISE_BLOCKS_PER_SM * self.sm_count()))
        self._function(arrays[0].dtype, template, vec)((grid,), (self.threads,), (*arrays, np.int64(total), *rest))

    # ---- building blocks ----------------------------------------------------------------

    def _acc(self, dtype):
        return self.xp.float64 if np.dtype(dtype) == np.float64 else self.xp.float32

    def _per_channel64(self, a, channels: int, default: float):
        xp = self.xp
        if a is None:
            return xp.full(channels, default, xp.float64)
        return xp.ascontiguousarray(xp.asarray(a, xp.float64))

    def _reduce(self, planar_template: str, rows_template: str, x3, arrays_before, arrays_after, parts: int):
        """Launches a planar or rows reduction over x3's layout; returns (partials, slices)."""
        xp = self.xp
        outer, channels, inner = x3.shape
        acc = self._acc(x3.dtype)
        if inner > 1:
            # Packs of 16 bytes where rows are whole packs and every array is aligned.
            vec = self._pack(*arrays_before) if inner % (VECTOR_BYTES // x3.dtype.itemsize) == 0 else 1
            slices, per_block = self._slices(outer * inner, channels, self.threads * vec, multiple=vec)
            partials = [xp.empty(channels * slices, acc) for _ in range(parts)]
            fn = self._function(x3.dtype, planar_template, self.threads, vec)
            fn((channels, slices), (self.threads,),
               (*arrays_before, np.int64(outer), np.int32(channels), np.int64(inner), np.int64(per_block),
                *arrays_after, *partials))
        else:
            rows = self.threads // 32
            tiles = math.ceil(channels / 32)
            slices, per_block = self._slices(outer, tiles, rows)
            partials = [xp.empty(channels * slices, acc) for _ in range(parts)]
            fn = self._function(x3.dtype, rows_template, rows)
            fn((tiles, slices), (32, rows),
               (*arrays_before, np.int64(outer), np.int32(channels), np.int64(per_block), *arrays_after, *partials))
        return partials, slices

    def _affine(self, x3, centre, scale, offset):
        outer, channels, inner = x3.shape
        y3 = self.xp.empty(x3.shape, x3.dtype)
        self._elementwise("bn_affine", (x3, y3), (np.int64(inner), np.int32(channels), centre, scale, offset))
        return y3

    # ---- the three operations (docs/backends.md) ---------------------------------------

    @functools.cached_property
    def _general(self) -> GeneralPath:
        return GeneralPath(self._kernels)

    def _finalize_stats(self, x3, parts, slices, shift, active, gamma64, beta64, eps, outputs, far_out):
        channels = x3.shape[1]
        mean_hi, mean_lo, var, inv_std, scale, offset, next_shift = outputs
        self._function(x3.dtype, "bn_stats_finalize")(
            (math.ceil(channels / _CHANNEL_BLOCK),), (_CHANNEL_BLOCK,),
            (*parts, np.int32(channels), np.int32(slices), shift, active, gamma64, beta64, np.float64(eps),
             mean_hi, mean_lo, var, inv_std, scale, offset, far_out, next_shift))

    def _stats_outputs(self, channels: int, acc):
        xp = self.xp
        mean_hi, mean_lo, inv_std, scale, offset, next_shift = (xp.empty(channels, acc) for _ in range(6))
        return mean_hi, mean_lo, xp.empty(channels, xp.float64), inv_std, scale, offset, next_shift

    def _forward_train_general(self, x3, gamma64, beta64, eps):
        """Strided x3, read in place: two-pass statistics in double (see _cupy_general)."""
        xp = self.xp
        outer, channels, inner = x3.shape
        count = outer * inner
        acc = self._acc(x3.dtype)
        per_channel = (1, channels, 1)
        shift = x3[0, :, 0].astype(acc)
        mean_d = self._general.shifted_sum(x3, shift.reshape(per_channel), axis=(0, 2)) / count
        # mean = shift + mean_d as a double-double (TwoSum): float64 data keeps
        # its last bits at large offsets, and a far shift costs nothing.
        k = shift.astype(xp.float64)
        mean = k + mean_d
        back = mean - k
        error = (k - (mean - back)) + (mean_d - back)
        squares = self._general.squared_deviations(x3, mean.reshape(per_channel), axis=(0, 2))
        # One "slice" per channel, centred on the mean's hi part so that nothing is lost.
        centre = xp.ascontiguousarray(mean.astype(acc))
        parts = (xp.full(channels, count, acc), ((mean - centre) + error).astype(acc), squares.astype(acc))
        outputs = self._stats_outputs(channels, acc)
        self._finalize_stats(x3, parts, 1, centre, xp.ones(channels, xp.int32), gamma64, beta64, eps, outputs,
                             xp.empty(channels, xp.int32))
        mean_hi, mean_lo, var, inv_std, scale, offset, _ = outputs
        y3 = xp.empty(x3.shape, x3.dtype)
        self._general.affine(x3, mean_hi.reshape(per_channel), scale.reshape(per_channel),
                             offset.reshape(per_channel), y3)
        return y3, mean_hi, mean_lo, var, inv_std

    @quiet
    def forward_train(self, x3, gamma, beta, eps):
        xp = self.xp
        channels = x3.shape[1]
        acc = self._acc(x3.dtype)
        gamma64 = self._per_channel64(gamma, channels, 1.0)
        beta64 = self._per_channel64(beta, channels, 0.0)
        if not x3.flags.c_contiguous:
            return self._forward_train_general(x3, gamma64, beta64, eps)
        # The shift: one sample of each channel (the first element).
        shift = xp.ascontiguousarray(x3[0, :, 0].astype(acc))
        every = xp.ones(channels, xp.int32)
        outputs = self._stats_outputs(channels, acc)
        mean_hi, mean_lo, var, inv_std, scale, offset, next_shift = outputs
        far = xp.empty(channels, xp.int32)
        # Second pass, for channels whose sample was far from the mean: decided
        # on the device (far), so the launch always happens and idle blocks leave.
        for active, shift_in, far_out in ((every, shift, far), (far, next_shift, xp.empty(channels, xp.int32))):
            parts, slices = self._reduce("bn_stats_planar", "bn_stats_rows", x3, (x3,), (shift_in, active), parts=3)
            self._finalize_stats(x3, parts, slices, shift_in, active, gamma64, beta64, eps, outputs, far_out)
        y3 = self._affine(x3, mean_hi, scale, offset)
        return y3, mean_hi, mean_lo, var, inv_std

    @quiet
    def update_running(self, running_mean, running_var, mean_hi, mean_lo, var, momentum, count) -> bool:
        """Updates the running statistics in place with one kernel; False (nothing
        done) where that kernel does not apply, and the caller's generic path runs."""
        xp = self.xp
        dtype_name = "float64" if mean_hi.dtype == np.float64 else "float32"  # the module with this Acc
        r = np.dtype(running_mean.dtype).name
        if (r not in RUNNING_TYPES or running_var.dtype != running_mean.dtype or count < 2
                or not (running_mean.flags.c_contiguous and running_var.flags.c_contiguous)):
            return False
        channels = running_mean.shape[0]
        launcher = self._launcher(dtype_name, f"bn_update_running<{C_TYPES[dtype_name][1]}, {RUNNING_TYPES[r]}>")
        launcher((math.ceil(channels / _CHANNEL_BLOCK),), (_CHANNEL_BLOCK,),
                 (mean_hi, mean_lo, xp.asarray(var, xp.float64), np.float64(momentum),
                  np.float64(count / (count - 1)), np.int32(channels), running_mean, running_var))
        return True

    @quiet
    def forward_infer(self, x3, gamma, beta, running_mean, running_var, eps):
        xp = self.xp
        channels = x3.shape[1]
        acc = self._acc(x3.dtype)
        centre, inv_std, scale, offset = (xp.empty(channels, acc) for _ in range(4))
        self._function(x3.dtype, "bn_infer_coefficients")(
            (math.ceil(channels / _CHANNEL_BLOCK),), (_CHANNEL_BLOCK,),
            (self._per_channel64(running_mean, channels, 0.0), self._per_channel64(running_var, channels, 1.0),
             self._per_channel64(gamma, channels, 1.0), self._per_channel64(beta, channels, 0.0), np.float64(eps),
             np.int32(channels), centre, inv_std, scale, offset))
        if not x3.flags.c_contiguous:
            y3 = xp.empty(x3.shape, x3.dtype)
            shape = (1, channels, 1)
            self._general.affine(x3, centre.reshape(shape), scale.reshape(shape), offset.reshape(shape), y3)
            return y3, inv_std
        return self._affine(x3, centre, scale, offset), inv_std

    @quiet
    def backward(self, dy3, x3, mean_hi, mean_lo, var, inv_std, gamma, training):
        del var  # the kernels centre on mean_hi whatever the spread
        xp = self.xp
        outer, channels, inner = x3.shape
        acc = self._acc(x3.dtype)
        centre = xp.ascontiguousarray(xp.asarray(mean_hi, acc))
        lo = xp.ascontiguousarray(xp.asarray(mean_lo, acc))
        inv = xp.ascontiguousarray(xp.asarray(inv_std, acc))
        general = not (x3.flags.c_contiguous and dy3.flags.c_contiguous)
        per_channel = (1, channels, 1)
        if general:  # strided views, read in place; one "slice" per channel
            slices = 1
            part_dy = self._general.sum(dy3, axis=(0, 2)).astype(acc)
            part_dyx = self._general.centred_product_sum(dy3, x3, centre.reshape(per_channel), axis=(0, 2)).astype(acc)
        else:
            (part_dy, part_dyx), slices = self._reduce(
                "bn_grad_sums_planar", "bn_grad_sums_rows", x3, (dy3, x3), (centre,), parts=2)
        dgamma, dbeta = xp.empty(channels, xp.float64), xp.empty(channels, xp.float64)
        a, b, k = (xp.empty(channels, acc) for _ in range(3))
        self._function(x3.dtype, "bn_grad_finalize")(
            (math.ceil(channels / _CHANNEL_BLOCK),), (_CHANNEL_BLOCK,),
            (part_dy, part_dyx, np.int32(channels), np.int32(slices), np.float64(outer * inner), lo, inv,
             self._per_channel64(gamma, channels, 1.0), np.int32(bool(training)), dgamma, dbeta, a, b, k))
        dx3 = xp.empty(x3.shape, x3.dtype)
        if general:
            self._general.backward(dy3, x3, centre.reshape(per_channel), a.reshape(per_channel),
                                   b.reshape(per_channel), k.reshape(per_channel), np.int32(bool(training)), dx3)
        else:
            self._elementwise("bn_backward_elementwise", (dy3, x3, dx3),
                              (np.int64(inner), np.int32(channels), np.int32(bool(training)), centre, a, b, k))
        return dx3, dgamma, dbeta


# Templates whose first parameter is the storage type (the others take the arithmetic type only).
_STORAGE_TEMPLATES = ("bn_stats_planar", "bn_stats_rows", "bn_grad_sums", "bn_affine", "bn_backward_elementwise")


def _address(a) -> int:
    """Where an array's first element is (device or host memory)."""
    interface = getattr(a, "__cuda_array_interface__", None) or a.__array_interface__
    return int(interface["data"][0])


class _Launcher:
    """A kernel looked up lazily by name expression, called as ``f(grid, block, args)``."""

    def __init__(self, backend: CupyBackend, dtype_name: str, name: str):
        self._backend = backend
        self._dtype_name = dtype_name
        self.name = name

    @functools.cached_property
    def _kernel(self):
        try:
            return self._backend._module(self._dtype_name).get_function(self.name)
        except Exception as e:  # the compile happens here, on first use
            if "cuda_fp16.h" not in str(e) or not cuda_header_dirs():
                raise
        return self._backend._module(self._dtype_name, with_cuda_headers=True).get_function(self.name)

    def __call__(self, grid, block, args):
        try:
            self._kernel(grid, block, args)
        except (TypeError, ValueError):
            raise  # argument mistakes are bugs here, with their own precise message
        except Exception as e:  # CUDA (or host harness) failures: say which kernel
            raise KernelLaunchError(f"cupybn kernel {self.name} (grid {grid}, block {block}) failed: {e}") from e


@functools.cache
def default_cupy_backend() -> CupyBackend:
    """The backend used for CuPy arrays (one per process)."""
    return CupyBackend()
