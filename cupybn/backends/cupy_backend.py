"""The CuPy backend: Batch Normalization kernels for NVIDIA GPUs.

The kernels are CUDA C++ in ``cupybn/kernels/batch_norm.cu``, compiled on first
use through the kernel factory's ``RawModule`` with the instantiations that
``cupybn.kernels.BATCH_NORM_SOURCES`` lists (the list the NVRTC gate compiles);
the fused epilogue's variants (``BATCH_NORM_EPILOGUE_SOURCES``) are a module of
their own, compiled when a call first has an epilogue.

The backend takes its array module and its kernel factory as parameters: on a
GPU they are ``cupy`` and ``cupy``; in tests they are ``numpy`` and
``cupybn.testing.hostcuda``, which runs the same kernel source on the CPU (see
``cupybn.testing.hostcuda.host_cupy_backend``).  Nothing here synchronises with
the device: every decision that depends on the data is taken by the kernels.
"""
from __future__ import annotations

import functools
import importlib
import math
import threading
from typing import Any

import numpy as np

from ..kernels import (
    ADD_RESIDUAL,
    BATCH_NORM_EPILOGUE_SOURCES,
    BATCH_NORM_SOURCES,
    BLOCK_THREADS,
    C_TYPES,
    CHANNEL_KINDS,
    EPILOGUE_TEMPLATES,
    RELU,
    VECTOR_BYTES,
    WRITE_GRADIENT,
)
from ._cupy_general import GeneralPath
from ._running import update_running
from .numpy_backend import compute_dtype, quiet, split_mean

# Per-channel kernels (general path) run one thread per channel in blocks of this size.
_CHANNEL_BLOCK = 128
# Blocks per SM to fill when the compiled kernel's occupancy is unknown (the
# host harness): elementwise kernels (grid-stride beyond) and reductions.
_ELEMENTWISE_BLOCKS_PER_SM = 8
_REDUCTION_BLOCKS_PER_SM = 4
_MAX_BLOCKS_PER_SM = 32
_REGISTER_GRANULE = 256  # registers are given to warps in units of this many
# Partial counts are float32 in the kernels: keep each block's share exact.
_MAX_VALUES_PER_BLOCK = 2**24
# A planar row that is not a whole number of packs is read in packs when it is
# at least this many packs long (its head and tail are read value by value).
_PEELED_PACKS = 4
_MAX_GRID_Y = 65535
# Rows of the per-channel arrays the kernels write (batch_norm.cu: StatRow, CoefRow).
_MEAN_HI, _MEAN_LO, _VAR, _INV_STD, _SCALE, _OFFSET = range(6)
_STAT_ROWS = 7
_COEF_ROWS = 3
# A ticket per channel (planar) or per tile of 32 channels (rows); the buffer
# grows to the largest call seen on a stream.
_MIN_TICKETS = 1024

_ABSENT = (np.int32(0), np.int64(0))
_KIND = {np.dtype(name): np.int32(kind) for name, kind in CHANNEL_KINDS.items()}  # keyed by dtype: no .name per call
_PASSES = (np.int32(0), np.int32(1))
_MODES = (np.int32(0), np.int32(1))
# The fused epilogue's argument, by (residual, relu) forward and (relu, dz) backward.
_FORWARD_EPILOGUE = {(residual, relu): np.int32(ADD_RESIDUAL * residual + RELU * relu)
                     for residual in (False, True) for relu in (False, True)}
_BACKWARD_EPILOGUE = {(relu, dz): np.int32(RELU * relu + WRITE_GRADIENT * dz)
                      for relu in (False, True) for dz in (False, True)}


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
    kernels move 16 bytes at a time where the arrays allow it.

    A call on contiguous data is a reduction kernel (two in training: the
    second does nothing unless a channel needs it), then one elementwise
    kernel; its launch geometry is worked out once per shape, dtype and
    alignment and kept (``_plan``).  A masked call takes its statistics and dx
    from the general path's masked kernels (docs/cupy-backend.md, "Masks").
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
        self._modules: dict[tuple[str, bool], object] = {}  # (dtype, epilogue variants) -> RawModule
        self._launchers: dict[tuple[str, str], _Launcher] = {}
        self._plans: dict[tuple, _Plan] = {}
        self._channel_codes: dict[tuple, tuple] = {}
        self._tickets: dict[object, Any] = {}  # stream -> uint32 counters
        self._lock = threading.Lock()
        on_device = hasattr(xp, "cuda")
        self._address = (lambda a: a.data.ptr) if on_device else (lambda a: a.ctypes.data)
        # Tickets are reused launch after launch, so each stream has its own.
        self._stream = ((lambda: (xp.cuda.runtime.getDevice(), xp.cuda.get_current_stream().ptr))
                        if on_device else (lambda: None))

    def __repr__(self) -> str:
        return f"CupyBackend({self.name}, threads={self.threads})"

    # A backend is its settings (its compiled kernels, plans and tickets are made
    # again on first use), its array module by name and its kernel factory.
    # Copies share it; the process default unpickles as the process default.
    def __reduce__(self):
        if default_cupy_backend.cache_info().currsize and self is default_cupy_backend():
            return default_cupy_backend, ()
        kernels = None if self._kernels is self.xp else self._kernels
        return _restore_cupy_backend, (self.xp.__name__, kernels, self.threads, self._sm_count,
                                       self.values_per_thread, self.vector_loads, self.name)

    def __copy__(self) -> CupyBackend:
        return self

    def __deepcopy__(self, memo) -> CupyBackend:
        return self

    def owns(self, a) -> bool:
        return isinstance(a, self.xp.ndarray)

    # ---- kernels ------------------------------------------------------------------

    def _function(self, dtype, template: str, *params, epilogue: bool = False) -> _Launcher:
        """The compiled kernel ``template<storage, arithmetic, params...>`` for data of ``dtype``;
        for the kernels with a fused epilogue, its ``true`` variant (``epilogue``) or ``false`` one."""
        name = np.dtype(dtype).name
        if name not in C_TYPES:
            raise TypeError(f"the CuPy backend supports float16, float32 and float64 data, not {name}")
        storage, acc = C_TYPES[name]
        fused = template in EPILOGUE_TEMPLATES
        if epilogue and not fused:
            raise ValueError(f"{template} has no epilogue variant")
        args = [*([storage] if template in _STORAGE_TEMPLATES else []), acc, *map(str, params),
                *(["true" if epilogue else "false"] if fused else [])]
        return self._launcher(name, f"{template}<{', '.join(args)}>", epilogue)

    def _launcher(self, dtype_name: str, expression: str, epilogue: bool = False) -> _Launcher:
        """One launcher per kernel, so the kernel is looked up once, not per call."""
        key = (dtype_name, expression)
        launcher = self._launchers.get(key)
        if launcher is None:
            launcher = self._launchers.setdefault(key, _Launcher(self, dtype_name, expression, epilogue))
        return launcher

    def _module(self, dtype_name: str, epilogue: bool = False):
        """The RawModule of one data type (compiled by the factory on first use):
        every kernel without an epilogue, or (``epilogue``) the epilogue variants,
        which calls without one never compile.

        batch_norm.cu includes no CUDA header, so NVRTC alone builds it
        whatever headers CuPy finds (the NVRTC gate compiles it so)."""
        key = (dtype_name, epilogue)
        with self._lock:
            module = self._modules.get(key)
            if module is None:
                source = (BATCH_NORM_EPILOGUE_SOURCES if epilogue else BATCH_NORM_SOURCES)[dtype_name]
                module = self._kernels.RawModule(code=source.path.read_text(), options=source.compile_options(),
                                                 name_expressions=source.name_expressions)
                self._modules[key] = module
            return module

    def sm_count(self) -> int:
        if self._sm_count is None:
            device = self.xp.cuda.Device()
            self._sm_count = int(device.attributes["MultiProcessorCount"])
        return self._sm_count

    def _forget_tickets(self) -> None:
        """After a failed launch the tickets may not be back at 0: start again from fresh ones."""
        self._tickets.clear()

    def _tickets_for(self, count: int):
        stream = self._stream()
        tickets = self._tickets.get(stream)
        if tickets is None or tickets.size < count:
            tickets = self.xp.zeros(max(count, _MIN_TICKETS), np.uint32)
            self._tickets[stream] = tickets
        return tickets

    # ---- launch geometry (once per shape, dtype and alignment) -------------------------

    @functools.cache  # noqa: B019 - one backend per process in practice; plans are cached per backend too
    def _sm_limits(self) -> tuple[int, int, int] | None:
        """Threads, registers and shared memory per SM of the device (None on the host harness)."""
        if not hasattr(self.xp, "cuda"):
            return None
        try:
            a = self.xp.cuda.Device().attributes
            return (int(a["MaxThreadsPerMultiProcessor"]), int(a["MaxRegistersPerMultiprocessor"]),
                    int(a["MaxSharedMemoryPerMultiprocessor"]))
        except (KeyError, AttributeError):  # an older CuPy: size grids by the defaults
            return None

    def _resident_blocks(self, launcher: _Launcher, threads: int, unknown: int) -> int:
        """Blocks of ``threads`` threads of this compiled kernel that fit on one SM at once:
        its registers and shared memory decide (``unknown`` where they cannot be read)."""
        limits = self._sm_limits()
        regs = None if limits is None else getattr(launcher.compiled(), "num_regs", None)
        if limits is None or not regs:
            return unknown
        sm_threads, sm_regs, sm_shared = limits
        warps = math.ceil(threads / 32)
        per_warp = math.ceil(regs * 32 / _REGISTER_GRANULE) * _REGISTER_GRANULE
        blocks = min(_MAX_BLOCKS_PER_SM, sm_threads // threads, sm_regs // (per_warp * warps))
        shared = getattr(launcher.compiled(), "shared_size_bytes", 0) or 0
        if shared:
            blocks = min(blocks, sm_shared // shared)
        return max(1, blocks)

    def _slices(self, per_channel: int, columns: int, per_thread_step: int, *,
                blocks_per_sm: int = _REDUCTION_BLOCKS_PER_SM) -> tuple[int, int]:
        """How many blocks share a channel, and how many values (planar) or rows each takes.

        ``columns`` blocks exist per slice; as many slices as fit in one wave
        (``blocks_per_sm`` resident blocks on each SM; rounding up would start a
        second wave of a few blocks, which costs as much as a whole one), but
        not so many that a thread gets fewer than ``values_per_thread`` values.
        """
        wanted = max(1, blocks_per_sm * self.sm_count() // columns)
        useful = math.ceil(per_channel / (per_thread_step * self.values_per_thread))
        slices = max(1, min(wanted, useful), math.ceil(per_channel / _MAX_VALUES_PER_BLOCK))
        slices = min(slices, _MAX_GRID_Y)
        per_block = math.ceil(per_channel / slices)
        return math.ceil(per_channel / per_block), per_block  # no empty slices

    def _pack_size(self, dtype, aligned: bool, divides: int) -> int:
        """Values per load/store: 16 bytes' worth where the arrays are 16-byte aligned
        and ``divides`` is a whole number of packs; otherwise 1."""
        vec = VECTOR_BYTES // np.dtype(dtype).itemsize
        return vec if self.vector_loads and aligned and divides % vec == 0 else 1

    def _planar_pack_size(self, dtype, aligned: bool, inner: int) -> int:
        """Values per load in the planar reductions: 16 bytes' worth where x is
        16-byte aligned and its rows are whole packs, or long enough
        (_PEELED_PACKS packs' worth) that their unaligned heads and tails, read
        one value at a time, are a small part of them."""
        vec = VECTOR_BYTES // np.dtype(dtype).itemsize
        worth = inner % vec == 0 or inner >= _PEELED_PACKS * vec
        return vec if self.vector_loads and aligned and worth else 1

    def _reduction(self, family: str, shape, dtype, aligned: bool, epilogue: bool = False) -> _Launch:
        """The statistics ("bn_stats") or gradient ("bn_grad") reduction over a contiguous (outer, C, inner);
        ``epilogue``: the gradient kernel's variant that passes dy through the ReLU."""
        outer, channels, inner = shape
        if inner > 1:
            vec = self._planar_pack_size(dtype, aligned, inner)
            slots, rest = planar_slots(inner, vec)
            kernel = self._function(dtype, f"{family}_planar", self.threads, vec, epilogue=epilogue)
            slices, _ = self._slices(outer * inner, channels, self.threads * vec,
                                     blocks_per_sm=self._resident_blocks(kernel, self.threads,
                                                                         _REDUCTION_BLOCKS_PER_SM))
            slices, per_block, singles_per_block = planar_shares(outer, slots, rest, vec, slices)
            return _Launch(kernel, (channels, slices), (self.threads,),
                           (np.int64(outer), np.int32(channels), np.int64(inner), np.int64(slots),
                            np.int64(per_block), np.int64(singles_per_block)), slices, channels)
        rows = self.threads // 32
        tiles = math.ceil(channels / 32)
        kernel = self._function(dtype, f"{family}_rows", rows, epilogue=epilogue)
        slices, per_block = self._slices(
            outer, tiles, rows, blocks_per_sm=self._resident_blocks(kernel, self.threads, _REDUCTION_BLOCKS_PER_SM))
        return _Launch(kernel, (tiles, slices), (32, rows),
                       (np.int64(outer), np.int32(channels), np.int64(per_block)), slices, tiles)

    def _elementwise(self, template: str, shape, dtype, aligned: bool, epilogue: bool = False) -> _Launch:
        """A grid-stride elementwise kernel (its ``epilogue`` variant or not) of one wave
        (every resident block of the variant launched: they differ in registers).

        Where threads loop, and a grid whose stride is a whole number of
        (C, inner) planes fills at least 3/4 of that wave, it is taken
        ("fixed"): each thread then meets the same channels in every iteration
        and loads their coefficients once (batch_norm.cu: for_each_pack)."""
        outer, channels, inner = shape
        total = outer * channels * inner
        vec = self._pack_size(dtype, aligned, total)
        packs = total // vec
        kernel = self._function(dtype, template, vec, epilogue=epilogue)
        resident = self._resident_blocks(kernel, self.threads, _ELEMENTWISE_BLOCKS_PER_SM)
        wave = resident * self.sm_count()
        needed = max(1, math.ceil(packs / self.threads))  # one pack per thread
        plane = channels * inner
        unit = plane // math.gcd(plane, self.threads * vec)  # grids of whole planes are multiples of this
        whole_planes = wave // unit * unit
        fixed = needed > wave and 4 * whole_planes >= 3 * wave
        grid = whole_planes if fixed else min(needed, wave)
        return _Launch(kernel, (grid,), (self.threads,),
                       (np.int64(total), np.int64(inner), np.int32(channels), np.int32(fixed)), 0, 0)

    def _plan(self, mode: str, x3, *others, elementwise_reads=None, epilogue: bool = False) -> _Plan:
        """The kernels and geometry of one mode for arrays like these (cached).

        ``others`` (None where absent) are read by every kernel of the mode, as
        x3 is; ``elementwise_reads`` (the residual) by the elementwise kernel
        alone, so its alignment leaves the reduction's packs (and bits) alone.
        ``epilogue``: the call has one, so its kernels are the ``true`` variants
        (the statistics kernels have none), with a geometry of their own."""
        aligned = self._address(x3) % VECTOR_BYTES == 0
        for a in others:
            aligned = aligned and (a is None or self._address(a) % VECTOR_BYTES == 0)
        elementwise_aligned = aligned and (elementwise_reads is None
                                           or self._address(elementwise_reads) % VECTOR_BYTES == 0)
        key = (mode, x3.shape, x3.dtype, aligned, elementwise_aligned, epilogue)
        plan = self._plans.get(key)
        if plan is None:
            shape, dtype = x3.shape, x3.dtype
            reduction, elementwise = {  # strided views ("general-*") take the general path's kernels
                "train": ("bn_stats", "bn_normalize"), "infer": (None, "bn_normalize_running"),
                "grad": ("bn_grad", "bn_backward_elementwise"),
                # masked statistics come from the general path's reductions
                "masked-train": (None, "bn_normalize")}.get(mode, (None, None))
            fused_reduction = epilogue and reduction == "bn_grad"  # the statistics take no epilogue
            plan = _Plan(self._reduction(reduction, shape, dtype, aligned, fused_reduction) if reduction else None,
                         self._elementwise(elementwise, shape, dtype, elementwise_aligned, epilogue)
                         if elementwise else None,
                         count=shape[0] * shape[2], acc=np.float64 if dtype == np.float64 else np.float32)
            self._plans[key] = plan
        return plan

    def _channel(self, a, stand_in) -> tuple:
        """A per-channel array as the kernels take it: (array, kind, stride in elements).
        ``stand_in`` fills the pointer of an absent one (kind 0: never read)."""
        if a is None:
            return (stand_in, *_ABSENT)
        key = (a.dtype, a.strides)
        codes = self._channel_codes.get(key)
        if codes is None:
            codes = (_KIND[a.dtype], np.int64(a.strides[0] // a.itemsize))
            self._channel_codes[key] = codes
        return (a, *codes)

    def _kernel_readable(self, a):
        """``a`` if the kernels can read its dtype, else a float64 copy (bfloat16 on the host harness)."""
        return a if a is None or a.dtype in _KIND else self.xp.asarray(a, np.float64)

    def _contiguous(self, a):
        """``a`` as the fast kernels read an array shaped like x3: C-contiguous (a copy if it is not)."""
        return a if a is None or a.flags.c_contiguous else self.xp.ascontiguousarray(a)

    # ---- the three operations (docs/backends.md) ---------------------------------------

    @functools.cached_property
    def _general(self) -> GeneralPath:
        return GeneralPath(self._kernels)

    def forward_train(self, x3, gamma, beta, eps, running_mean=None, running_var=None, momentum=0.1,
                      residual=None, relu=False, mask=None, count=None):
        """As docs/backends.md; with ``mask`` ((outer, 1, inner) booleans selecting
        ``count`` positions) the statistics are those of the selected positions
        (docs/masks.md) and every position is normalised with them."""
        xp = self.xp
        gamma, beta = self._kernel_readable(gamma), self._kernel_readable(beta)
        fused_running = running_mean is not None and running_mean.dtype in _KIND and running_var.dtype in _KIND
        general = not x3.flags.c_contiguous
        epilogue = _FORWARD_EPILOGUE[residual is not None, bool(relu)]
        if not general:
            residual = self._contiguous(residual)
        plan = (self._plan("general-train", x3) if general
                else self._plan("train" if mask is None else "masked-train", x3, elementwise_reads=residual,
                                epilogue=bool(epilogue)))
        if mask is None:
            count = plan.count
        channels = x3.shape[1]
        stats = xp.empty((_STAT_ROWS, channels), plan.acc)
        far = xp.empty(channels, np.int32)
        params = (*self._channel(gamma, stats), *self._channel(beta, stats), np.float64(eps),
                  *self._channel(running_mean if fused_running else None, stats),
                  *self._channel(running_var if fused_running else None, stats),
                  np.float64(momentum), np.float64(count / (count - 1)))
        if mask is not None:
            self._masked_statistics(x3, mask, count, stats, far, params)
            y3 = (self._general_normalize(x3, stats, residual, epilogue) if general
                  else self._normalize(x3, plan, stats, residual, epilogue))
        elif general:
            y3 = self._forward_train_general(x3, plan, stats, far, params, residual, epilogue)
        else:
            self._statistics(x3, plan, stats, far, params)
            y3 = self._normalize(x3, plan, stats, residual, epilogue)
        if running_mean is not None and not fused_running:
            update_running(xp, running_mean, running_var, stats[_MEAN_HI], stats[_MEAN_LO], stats[_VAR],
                           momentum, count)
        return y3, stats[_MEAN_HI], stats[_MEAN_LO], stats[_VAR], stats[_INV_STD]

    def _normalize(self, x3, plan, stats, residual, epilogue):
        """The fast elementwise pass over a C-contiguous x3: y from ``stats``, then the epilogue."""
        y3 = self.xp.empty(x3.shape, x3.dtype)
        normalize = plan.elementwise
        # x stands in for an absent residual: the kernel does not read it then
        normalize((x3, y3, *normalize.geometry, stats, x3 if residual is None else residual, epilogue))
        return y3

    def _masked_moments(self, x3, mask, count):
        """Per channel ``(shift, offset, m2)`` of the ``count`` positions ``mask`` selects,
        in double, any strides: the shift a first mean, the offset the mean of x - shift
        (what the first sum's rounding lost, as the reference's _masked_centred takes
        it), m2 the squared deviations about shift + offset.  Three reductions; the
        mask is broadcast over the channels, never copied."""
        per_channel = (1, x3.shape[1], 1)
        n = np.float64(count)
        general = self._general
        shift = general.masked_shifted_mean(x3, mask, 0.0, n, axis=(0, 2))
        offset = general.masked_shifted_mean(x3, mask, shift.reshape(per_channel), n, axis=(0, 2))
        m2 = general.masked_squared_deviations(x3, mask, shift.reshape(per_channel), offset.reshape(per_channel),
                                               axis=(0, 2))
        return shift, offset, m2

    def _masked_statistics(self, x3, mask, count, stats, far, params) -> None:
        """Fills ``stats`` (and updates fused running statistics) from the selected positions only."""
        channels = x3.shape[1]
        shift, offset, m2 = self._masked_moments(x3, mask, count)
        # the finishing code of every path (finish_stats): TwoSum of shift + offset, 1/std, coefficients
        self._channelwise(x3.dtype, "bn_stats_channelwise", channels,
                          (shift, offset, m2, np.float64(count), np.int32(channels), stats, far, *params))

    def _statistics(self, x3, plan, stats, far, params, passes=_PASSES) -> None:
        """The statistics kernel: fills ``stats`` (and ``far``, in the first pass)."""
        reduce = plan.reduction
        part = self.xp.empty(2 * x3.shape[1] * reduce.slices, plan.acc)
        tickets = self._tickets_for(reduce.tickets)
        # The second pass recomputes the channels whose shift the first found
        # far from the mean; the device decides, so it is always launched.
        for pass_ in passes:
            reduce((x3, *reduce.geometry, pass_, part, tickets, stats, far, *params))

    @quiet  # NumPy arithmetic on the host harness: NaN and Inf are data here, not errors
    def _forward_train_general(self, x3, plan, stats, far, params, residual, epilogue):
        """Strided x3, read in place: two-pass statistics in double (see _cupy_general)."""
        channels = x3.shape[1]
        per_channel = (1, channels, 1)
        shift = x3[0, :, 0].astype(plan.acc)
        mean = self._general.shifted_sum(x3, shift.reshape(per_channel), axis=(0, 2)) / plan.count
        shift64 = shift.astype(np.float64)
        squares = self._general.squared_deviations(x3, (shift64 + mean).reshape(per_channel), axis=(0, 2))
        self._channelwise(x3.dtype, "bn_stats_channelwise", channels,
                          (shift64, mean, squares, np.float64(plan.count), np.int32(channels), stats, far, *params))
        return self._general_normalize(x3, stats, residual, epilogue)

    def _channelwise(self, dtype, template: str, channels: int, args: tuple) -> None:
        """One of the general path's per-channel kernels: one thread per channel."""
        self._function(dtype, template)((math.ceil(channels / _CHANNEL_BLOCK),), (_CHANNEL_BLOCK,), args)

    def _general_normalize(self, x3, stats, residual, epilogue):
        """y = (x - mean_hi) * scale + offset over a strided x3, the coefficients from ``stats``,
        then the epilogue (the residual read in place, whatever its strides)."""
        y3 = self.xp.empty(x3.shape, x3.dtype)
        per_channel = (1, x3.shape[1], 1)
        self._general_affine(x3, *(stats[row].reshape(per_channel) for row in (_MEAN_HI, _SCALE, _OFFSET)),
                             residual, epilogue, y3)
        return y3

    def _general_affine(self, x3, centre, scale, offset, residual, epilogue, y3) -> None:
        """y = (x - centre) * scale + offset, any strides; the epilogue kernel only for a call with one
        (x stands in for an absent residual there, unread)."""
        if epilogue:
            self._general.affine_epilogue(x3, centre, scale, offset, x3 if residual is None else residual, epilogue,
                                          y3)
        else:
            self._general.affine(x3, centre, scale, offset, y3)

    def forward_infer(self, x3, gamma, beta, running_mean, running_var, eps, residual=None, relu=False):
        xp = self.xp
        channels = x3.shape[1]
        general = not x3.flags.c_contiguous
        epilogue = _FORWARD_EPILOGUE[residual is not None, bool(relu)]
        if not general:
            residual = self._contiguous(residual)
        plan = (self._plan("general-infer", x3) if general
                else self._plan("infer", x3, residual, epilogue=bool(epilogue)))
        stats = xp.empty((_STAT_ROWS, channels), plan.acc)
        params = (*self._channel(self._kernel_readable(running_mean), stats),
                  *self._channel(self._kernel_readable(running_var), stats),
                  *self._channel(self._kernel_readable(gamma), stats),
                  *self._channel(self._kernel_readable(beta), stats), np.float64(eps))
        if general:
            self._channelwise(x3.dtype, "bn_infer_channelwise", channels, (*params, np.int32(channels), stats))
            y3 = self._general_normalize(x3, stats, residual, epilogue)
        else:
            y3 = xp.empty(x3.shape, x3.dtype)
            normalize = plan.elementwise
            normalize((x3, y3, *normalize.geometry, *params, stats, x3 if residual is None else residual, epilogue))
        return y3, stats[_MEAN_HI], stats[_MEAN_LO], stats[_VAR], stats[_INV_STD]

    def backward(self, dy3, x3, mean_hi, mean_lo, var, inv_std, gamma, beta, training, relu_y=None,
                 want_dz=False, mask=None, count=None):
        """As docs/backends.md; with ``relu_y`` (the y of a forward call with
        relu) dy passes back through that ReLU first, and with ``want_dz`` the
        gradient of the residual comes fourth: dy3 itself without a ReLU, the
        masked dy (written by the elementwise kernel) with one.  With ``mask``
        (training only: the forward call's, selecting ``count`` positions) the
        sums are still over every position, the coefficients take ``count``,
        and dx has the terms through the statistics only where the mask is True."""
        del var  # the kernels centre on mean_hi whatever the spread
        xp = self.xp
        channels = x3.shape[1]
        general = not (x3.flags.c_contiguous and dy3.flags.c_contiguous)
        relu = relu_y is not None
        if not general:
            relu_y = self._contiguous(relu_y)
        plan = self._plan("general-grad" if general else "grad", x3, dy3, relu_y, epilogue=relu)
        if mask is None:
            count = plan.count
        mean_hi, mean_lo, inv_std = (self._as_acc(a, plan.acc) for a in (mean_hi, mean_lo, inv_std))
        coef = xp.empty((_COEF_ROWS, channels), plan.acc)
        # dgamma/dbeta are written in their parameters' dtypes (float64 where the kernels cannot).
        dgamma = None if gamma is None else xp.empty(channels, _written_dtype(gamma.dtype))
        dbeta = None if beta is None else xp.empty(channels, _written_dtype(beta.dtype))
        mode = _MODES[bool(training)]
        params = (mean_hi, mean_lo, inv_std, *self._channel(self._kernel_readable(gamma), coef), mode,
                  np.float64(count), coef, *self._channel(dgamma, coef)[:2], *self._channel(dbeta, coef)[:2])
        dx3 = xp.empty(x3.shape, x3.dtype)
        dz3 = xp.empty(x3.shape, x3.dtype) if relu and want_dz else None
        epilogue = _BACKWARD_EPILOGUE[relu, dz3 is not None]
        # Stand-ins the kernels do not touch where the epilogue leaves them out:
        # dy for relu_y, dx for dz.
        y_in = dy3 if relu_y is None else relu_y
        dz_out = dx3 if dz3 is None else dz3
        if general:  # strided views, read in place
            general_path, per_channel = self._general, (1, channels, 1)
            centre = mean_hi.reshape(per_channel)
            if relu:  # the epilogue's kernels; the plain ones do not read relu_y at all
                sum_dy = general_path.sum_epilogue(dy3, y_in, epilogue, axis=(0, 2))
                sum_dyx = general_path.centred_product_sum_epilogue(dy3, x3, centre, y_in, epilogue, axis=(0, 2))
            else:
                sum_dy = general_path.sum(dy3, axis=(0, 2))
                sum_dyx = general_path.centred_product_sum(dy3, x3, centre, axis=(0, 2))
            self._channelwise(x3.dtype, "bn_grad_channelwise", channels,
                              (sum_dy, sum_dyx, np.int32(channels), *params))
            if mask is None:
                coefs = [coef[row].reshape(per_channel) for row in range(_COEF_ROWS)]
                if relu:
                    general_path.backward_epilogue(dy3, x3, centre, *coefs, mode, y_in, epilogue, dx3, dz_out)
                else:
                    general_path.backward(dy3, x3, centre, *coefs, mode, dx3)
        else:
            reduce, elementwise = plan.reduction, plan.elementwise
            part = xp.empty(2 * channels * reduce.slices, plan.acc)
            reduce((dy3, x3, *reduce.geometry, part, self._tickets_for(reduce.tickets), *params, y_in, epilogue))
            if mask is None:
                elementwise((dy3, x3, dx3, *elementwise.geometry, mode, mean_hi, coef, y_in, dz_out, epilogue))
        if mask is not None:
            self._masked_input_gradient(dy3, x3, mask, mean_hi, coef, y_in, epilogue, dx3, dz_out)
        if not want_dz:
            return dx3, _as_dtype(dgamma, gamma), _as_dtype(dbeta, beta)
        return dx3, _as_dtype(dgamma, gamma), _as_dtype(dbeta, beta), dy3 if dz3 is None else dz3

    # ---- synchronised statistics (cupybn.distributed) -----------------------------------
    # The general path's kernels (any strides, double sums): a shard's moments and
    # gradient sums, then y and dx from what was merged over the ranks.
    def shard_moments(self, x3, mask=None, count=None):
        """Per-channel ``(mean_hi, mean_lo, m2)`` of a non-empty x3, or of the
        ``count`` > 0 positions ``mask`` selects (see NumpyBackend)."""
        acc = compute_dtype(x3.dtype)
        if mask is not None:
            return self._masked_shard_moments(x3, mask, count, acc)
        per_channel = (1, x3.shape[1], 1)
        shift = x3[0, :, 0].astype(acc)
        offset = self._general.shifted_sum(x3, shift.reshape(per_channel), axis=(0, 2)) / (x3.shape[0] * x3.shape[2])
        shift = shift.astype(np.float64)
        mean = shift + offset  # and what its rounding lost (two-sum): float64 data need it at large offsets
        rounding = (shift - (mean - (mean - shift))) + (offset - (mean - shift))
        m2 = self._general.squared_deviations(x3, mean.reshape(per_channel), axis=(0, 2))
        return (*split_mean(mean, rounding, acc), m2)

    @quiet  # NumPy arithmetic on the host harness: NaN and Inf are data here, not errors
    def _masked_shard_moments(self, x3, mask, count, acc):
        shift, offset, m2 = self._masked_moments(x3, mask, count)
        mean = shift + offset  # and what its rounding lost (two-sum), as above
        rounding = (shift - (mean - (mean - shift))) + (offset - (mean - shift))
        return (*split_mean(mean, rounding, acc), m2)

    def normalize(self, x3, mean, mean_lo, var, gamma, beta, eps, residual=None, relu=False):
        """Training-mode y3 for float64 statistics computed elsewhere (the mean as a
        pair ``mean + mean_lo``): the coefficients in double, then the general path's
        affine kernel, ``y = (x - mean_hi) * scale + offset``, and the epilogue."""
        xp = self.xp
        acc = compute_dtype(x3.dtype)
        mean_hi = mean.astype(acc)
        lo = (mean - mean_hi) + mean_lo  # kept in double: the offset below needs it so
        inv_std = 1.0 / xp.sqrt(var + eps)
        scale = inv_std if gamma is None else inv_std * xp.asarray(gamma, np.float64)
        offset = -lo * scale if beta is None else xp.asarray(beta, np.float64) - lo * scale
        per_channel = (1, x3.shape[1], 1)
        y3 = xp.empty(x3.shape, x3.dtype)
        self._general_affine(x3, mean_hi.reshape(per_channel), scale.astype(acc).reshape(per_channel),
                             offset.astype(acc).reshape(per_channel), residual,
                             _FORWARD_EPILOGUE[residual is not None, bool(relu)], y3)
        return y3

    def relu_gradient(self, dy3, y3):
        """A new array: dy3 passed back through the ReLU whose output was y3
        (0 where y <= 0, y == 0 included; dy elsewhere, NaN y included)."""
        g3 = self.xp.empty(dy3.shape, dy3.dtype)
        self._general.relu_gradient(dy3, y3, g3)
        return g3

    def gradient_sums(self, dy3, x3, mean_hi, mean_lo, var):
        """float64 per channel ``sum(dy)`` and ``sum(dy * (x - mean_hi))``."""
        del mean_lo, var  # centred on mean_hi, as the fused kernels are
        centre = self._as_acc(mean_hi, compute_dtype(x3.dtype)).reshape(1, x3.shape[1], 1)
        return self._general.sum(dy3, axis=(0, 2)), self._general.centred_product_sum(dy3, x3, centre, axis=(0, 2))

    def input_gradient(self, dy3, x3, mean_hi, mean_lo, inv_std, gamma, sum_dy, sum_dyc, count, mask=None):
        """Training-mode dx from per-channel sums over ``count`` values per channel
        (with a ``mask``: the terms through the statistics only where it is True)."""
        xp = self.xp
        channels = x3.shape[1]
        acc = compute_dtype(x3.dtype)
        mean_hi, mean_lo, inv_std = (self._as_acc(a, acc) for a in (mean_hi, mean_lo, inv_std))
        sum_dy, sum_dyc = (self._as_acc(a, np.float64) for a in (sum_dy, sum_dyc))
        coef = xp.empty((_COEF_ROWS, channels), acc)
        absent = self._channel(None, coef)[:2]  # no dgamma/dbeta: the caller forms its own shard's
        self._channelwise(x3.dtype, "bn_grad_channelwise", channels,
                          (sum_dy, sum_dyc, np.int32(channels), mean_hi, mean_lo, inv_std,
                           *self._channel(self._kernel_readable(gamma), coef), _MODES[1], np.float64(count), coef,
                           *absent, *absent))
        per_channel = (1, channels, 1)
        dx3 = xp.empty(x3.shape, x3.dtype)
        if mask is not None:
            self._masked_input_gradient(dy3, x3, mask, mean_hi, coef, None, _BACKWARD_EPILOGUE[False, False], dx3,
                                        dx3)
            return dx3
        self._general.backward(dy3, x3, mean_hi.reshape(per_channel),
                               *(coef[row].reshape(per_channel) for row in range(_COEF_ROWS)), _MODES[1], dx3)
        return dx3

    def _masked_input_gradient(self, dy3, x3, mask, mean_hi, coef, y_in, epilogue, dx3, dz_out) -> None:
        """Training dx of a masked call, any strides: ``a g`` everywhere, plus
        ``b (x - mean_hi) + k`` where the mask is True (one elementwise kernel;
        its epilogue variant, reading ``y_in`` and writing ``dz_out``, only with one)."""
        per_channel = (1, x3.shape[1], 1)
        coefs = [coef[row].reshape(per_channel) for row in range(_COEF_ROWS)]
        if epilogue:
            self._general.masked_backward_epilogue(dy3, x3, mask, mean_hi.reshape(per_channel), *coefs, y_in,
                                                   epilogue, dx3, dz_out)
        else:
            self._general.masked_backward(dy3, x3, mask, mean_hi.reshape(per_channel), *coefs, dx3)

    def _as_acc(self, a, acc):
        """A per-channel statistic as the kernels read it (our own forward passes give it so already)."""
        if a.dtype == acc and a.flags.c_contiguous:
            return a
        return self.xp.ascontiguousarray(self.xp.asarray(a, acc))


def _written_dtype(dtype):
    return dtype if dtype in _KIND else np.dtype(np.float64)


def _as_dtype(result, param):
    if result is None or result.dtype == param.dtype:
        return result
    with np.errstate(all="ignore"):  # an overflow to Inf is the right answer here
        return result.astype(param.dtype)


def planar_slots(inner: int, vec: int) -> tuple[int, int]:
    """Packs and single values the planar reductions read per row of ``inner`` values.

    Row (n, c) starts at element (n C + c) inner: at a multiple of
    g = gcd(inner, vec) within a pack, so its head before the first aligned
    pack is at most vec - g values, and every row holds (inner - vec + g) // vec
    aligned packs after it (inner / vec, and no head or tail, when inner is a
    multiple of vec).  Those are read as packs, the rest of each row one value
    at a time (batch_norm.cu: PlanarRows)."""
    slots = (inner - vec + math.gcd(inner, vec)) // vec
    return slots, inner - slots * vec


def planar_shares(outer: int, slots: int, rest: int, vec: int, slices: int) -> tuple[int, int, int]:
    """(slices, packs per block, singles per block) for about ``slices`` blocks per
    channel: none without packs, none with more than _MAX_VALUES_PER_BLOCK values."""
    packs, singles = outer * slots, outer * rest
    while True:
        per_block = math.ceil(packs / slices)
        slices = math.ceil(packs / per_block)
        singles_per_block = math.ceil(singles / slices)
        if vec * per_block + singles_per_block <= _MAX_VALUES_PER_BLOCK or slices >= _MAX_GRID_Y:
            return slices, per_block, singles_per_block
        slices += 1


class _Launch:
    """A kernel with its grid, block and leading geometry arguments for one shape."""

    __slots__ = ("kernel", "grid", "block", "geometry", "slices", "tickets")

    def __init__(self, kernel: _Launcher, grid: tuple, block: tuple, geometry: tuple, slices: int, tickets: int):
        self.kernel, self.grid, self.block, self.geometry = kernel, grid, block, geometry
        self.slices, self.tickets = slices, tickets

    def __call__(self, args: tuple) -> None:
        self.kernel(self.grid, self.block, args)


class _Plan:
    """What a call of one mode launches for one shape, dtype and alignment."""

    __slots__ = ("reduction", "elementwise", "count", "acc")

    def __init__(self, reduction: _Launch | None, elementwise: _Launch | None, *, count: int, acc):
        self.reduction, self.elementwise = reduction, elementwise
        self.count = count  # values per channel
        self.acc = acc      # the arithmetic (and statistics) dtype


# Templates whose first parameter is the storage type (the others take the arithmetic type only).
_STORAGE_TEMPLATES = ("bn_stats_planar", "bn_stats_rows", "bn_grad_planar", "bn_grad_rows", "bn_normalize",
                      "bn_normalize_running", "bn_backward_elementwise")


class _Launcher:
    """A kernel looked up lazily by name expression, called as ``f(grid, block, args)``."""

    def __init__(self, backend: CupyBackend, dtype_name: str, name: str, epilogue: bool = False):
        self._backend = backend
        self._dtype_name = dtype_name
        self._epilogue = epilogue  # in the epilogue variants' module
        self.name = name

    def compiled(self):
        """The kernel object of the factory (compiled on first use)."""
        return self._kernel

    @functools.cached_property
    def _kernel(self):
        # compiled here, on first use
        return self._backend._module(self._dtype_name, self._epilogue).get_function(self.name)

    def __call__(self, grid, block, args):
        try:
            self._kernel(grid, block, args)
        except (TypeError, ValueError):
            raise  # argument mistakes are bugs here, with their own precise message
        except Exception as e:  # CUDA (or host harness) failures: say which kernel
            self._backend._forget_tickets()
            raise KernelLaunchError(f"cupybn kernel {self.name} (grid {grid}, block {block}) failed: {e}") from e


def _restore_cupy_backend(xp_name: str, kernels, threads: int, sm_count: int | None, values_per_thread: int,
                          vector_loads: bool, name: str) -> CupyBackend:
    return CupyBackend(importlib.import_module(xp_name), kernels, threads=threads, sm_count=sm_count,
                       values_per_thread=values_per_thread, vector_loads=vector_loads, name=name)


@functools.cache
def default_cupy_backend() -> CupyBackend:
    """The backend used for CuPy arrays (one per process)."""
    return CupyBackend()
