"""The CUDA backend: numba-cuda kernels (backends/cuda_kernels.py) on NVIDIA GPUs, activations in device memory.

Every activation is a :class:`DeviceArray`, a float32 array in GPU memory with the glue the engine uses on
backend arrays (``+``, ``-``, ``*`` with broadcasting, ``reshape``, slicing, row lists,
``len``); ``np.asarray`` on one copies it to the host. Resident weights are prepared once into GPU memory:
quantised ones as their packed words with their scales and biases in their own dtype (one buffer per
weight, nothing dequantised), float ones as float32. The KV caches live in GPU memory too
(:meth:`CudaBackend.new_kv_cache`).

Host overhead: a decode token is ~130 launches of small kernels, so the host's cost per launch sets the
pace (the GPU's share of a token is a fraction of a millisecond). Kernels are launched through cached
plans that bypass numba's dispatcher (:func:`_launch`), output arrays of a known size skip numba's array
constructor (:func:`_device_empty`), small host arrays go up through a pinned ring (:class:`_Uploads`), and
the backend keeps the CUDA context attached to its thread.

Streamed experts: the expert store reads each expert into a host buffer; :meth:`CudaBackend.allocate_buffer`
makes those buffers page-aligned *pinned* memory, so each expert's bytes cross PCIe in one DMA copy at full
speed (pageable memory goes through a driver bounce buffer). One copy per expert covers its nine tensors:
the tensors are views into the expert's buffer, so the backend copies the byte span holding all of them
into a device staging buffer and the kernels address each tensor by its offset there, reading the bf16 /
f16 / f32 scales from their raw bits. The k experts of a decode token then run in two launches: gate+up
with SwiGLU for all k experts, and down with the router-weighted sum. The copies go on a stream of their
own and the kernels wait for them through an event, so kernels already queued (the shared expert) overlap
them; the call returns once its copies are done, as the store may then reuse the host buffers.

VRAM tier: :meth:`CudaBackend.configure_expert_cache` keeps up to a byte budget of streamed experts in GPU
memory by (layer, expert) key, evicted by a flashmoe/runtime/eviction.py policy; ``experts_ffn`` / ``expert_ffn``
take the keys, and an expert already there (:meth:`CudaBackend.has_expert`) may be passed as None, so its
read can be skipped: the engine's decode step reads only the experts the GPU does not hold (``--gpu-memory``);
prefill stages every expert it uses.

Without a GPU, ``NUMBA_ENABLE_CUDASIM=1`` runs the same kernels in numba's CUDA simulator (slow: for the
conformance tests on tiny shapes).
"""

from __future__ import annotations

import ctypes
import math
from dataclasses import dataclass, replace
from functools import lru_cache
from typing import Any

import ml_dtypes
import numpy as np

try:
    from numba import cuda

    from flashmoe.backends import cuda_kernels as K
except ImportError as _e:  # the registry reports this through unavailable_reason
    cuda = None
    _IMPORT_ERROR: str | None = str(_e)
else:
    _IMPORT_ERROR = None

from flashmoe.backends.base import Backend, BackendError, Expert, KVCacheBuffer
from flashmoe.runtime.eviction import DEFAULT_POLICY, make_policy
from flashmoe.format.quant import QuantizedTensor

_PAGE = 4096
# Freed device blocks up to this size are kept for reuse (activations, staging); larger ones are freed.
_CACHE_MAX_BLOCK = 256 << 20
_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
# Expert staging slots start on this boundary (bytes).
_STAGE_ALIGN = 256


def _scale_format(dtype: np.dtype, name: str) -> int:
    if dtype == np.float32:
        return K.F32
    if dtype == np.float16:
        return K.F16
    if dtype == ml_dtypes.bfloat16:
        return K.BF16
    raise BackendError(f"{name}: scales/biases must be float32, float16 or bfloat16, got {dtype}")


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


if cuda is not None and not K.SIMULATOR:
    import weakref

    from numba.cuda.cudadrv import driver as _driver

    class _CachingMemoryManager(_driver.NumbaCUDAMemoryManager):
        """numba's device allocator (an External Memory Management plugin) keeping freed blocks by size for
        reuse. Decode allocates the same few dozen activation sizes in every layer, and numba otherwise calls
        cuMemAlloc per array and batches cuMemFree, which waits for the GPU. Every kernel runs on the one
        default stream, in order, so a block freed on the host is never reused before the GPU is done with
        it (the expert copy stream writes only into the staging buffer, and each call waits for its copies).
        Blocks over _CACHE_MAX_BLOCK take numba's own path."""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._free: dict[int, list] = {}

        def memalloc(self, size: int) -> Any:
            if size > _CACHE_MAX_BLOCK:
                return super().memalloc(size)
            size = _cdiv(size, 512) * 512
            free = self._free.setdefault(size, [])
            ptr = free.pop() if free else self._attempt_allocation(lambda: _driver.driver.cuMemAlloc(size))
            return _driver.MemoryPointer(weakref.proxy(self.context), ptr, size, finalizer=lambda: free.append(ptr))

        def reset(self) -> None:
            for blocks in self._free.values():
                for ptr in blocks:
                    _driver.driver.cuMemFree(ptr)
            self._free.clear()
            super().reset()

    # Before any CUDA context exists: numba creates one with the manager set at that time.
    cuda.set_memory_manager(_CachingMemoryManager)

    import types as _pytypes

    from cuda.core import LaunchConfig as _LaunchConfig
    from cuda.core import launch as _core_launch
    from numba.cuda.cudadrv.devicearray import DeviceNDArray as _DEVICE_NDARRAY

    # cuda.core's launch and LaunchConfig for _launch; the legacy default stream (numba's stream 0) as
    # cuda.core sees it, made at the first plan, and the context's memory manager, found at the first
    # allocation of _device_empty (both need the context).
    _DIRECT: Any = _pytypes.SimpleNamespace(launch=_core_launch, LaunchConfig=_LaunchConfig, stream=None,
                                            memory=None)
else:
    _DIRECT = None
    _DEVICE_NDARRAY = None


# -- arrays -----------------------------------------------------------------------------------------------------
class DeviceArray:
    """A C-contiguous float32 array in GPU memory with NumPy-like glue: a flat numba device array and a shape.

    Keeping the flat array and the shape apart makes ``reshape`` and every kernel launch free of numba
    device-array construction (tens of microseconds each, measured to dominate decode on the H200).
    Binary ops take another DeviceArray, a NumPy array or a Python number, with NumPy broadcasting (up to
    4 dimensions). Indexing: basic slices (a non-contiguous result is copied), ``None`` for a new leading
    axis, and a list of row indices (gathered).
    """

    __slots__ = ("flat", "shape")
    __array_ufunc__ = None  # numpy scalars/arrays defer to our reflected operators instead of converting us

    def __init__(self, flat: Any, shape: tuple[int, ...]) -> None:
        self.flat = flat  # 1-D numba device array of exactly prod(shape) float32
        self.shape = tuple(shape)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(np.float32)

    @property
    def nbytes(self) -> int:
        return 4 * self.size

    def __len__(self) -> int:
        return self.shape[0]

    def __repr__(self) -> str:
        return f"DeviceArray(shape={self.shape}, float32)"

    def reshape(self, *shape: Any) -> "DeviceArray":
        if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
            shape = tuple(shape[0])
        shape = tuple(int(s) for s in shape)
        if -1 in shape:
            known = math.prod(s for s in shape if s != -1)
            shape = tuple(self.size // max(known, 1) if s == -1 else s for s in shape)
        if math.prod(shape) != self.size:
            raise ValueError(f"cannot reshape {self.shape} into {shape}")
        return DeviceArray(self.flat, shape)

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        host = self.flat.copy_to_host().reshape(self.shape)
        return host if dtype is None else host.astype(dtype, copy=False)

    def __getitem__(self, idx: Any) -> "DeviceArray":
        if idx is None:
            return self.reshape((1,) + self.shape)
        if isinstance(idx, (list, np.ndarray)):
            return _gather_rows(self, np.asarray(idx, np.int64).reshape(-1))
        idx = _expand_ellipsis(idx, self.ndim)
        block = _contiguous_block(self.shape, idx)
        if block is not None:
            start, shape = block
            return DeviceArray(self.flat[start:start + math.prod(shape)], shape)
        view = self.flat.reshape(*self.shape)[idx]
        if view.is_c_contiguous():
            return DeviceArray(view.reshape(view.size), view.shape)
        return _contiguous(view)

    def _binary(self, other: Any, op: int, reflected: bool = False) -> "DeviceArray":
        a, b = self, _to_device(other)
        if reflected:
            a, b = b, a
        shape, dims = _broadcast(a.shape, b.shape)
        out = _empty(shape)
        _flat_launch(K.binary(op), out.size, a.flat, b.flat, out.flat, *dims)
        return out

    def __add__(self, other: Any) -> "DeviceArray":
        return self._binary(other, K.ADD)

    def __radd__(self, other: Any) -> "DeviceArray":
        return self._binary(other, K.ADD, reflected=True)

    def __mul__(self, other: Any) -> "DeviceArray":
        return self._binary(other, K.MUL)

    def __rmul__(self, other: Any) -> "DeviceArray":
        return self._binary(other, K.MUL, reflected=True)

    def __sub__(self, other: Any) -> "DeviceArray":
        return self._binary(other, K.SUB)

    def __rsub__(self, other: Any) -> "DeviceArray":
        return self._binary(other, K.SUB, reflected=True)


@lru_cache(maxsize=1024)
def _broadcast(a: tuple[int, ...], b: tuple[int, ...]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(broadcast shape, the binary kernel's shape and stride arguments) of a op b, computed once per pair of
    shapes (the engine repeats the same few every layer)."""
    try:
        shape = np.broadcast_shapes(a, b)
    except ValueError:
        raise BackendError(f"cannot broadcast device arrays {a} and {b}") from None
    if len(shape) > 4:
        raise BackendError(f"device arrays of {len(shape)} dimensions: at most 4 are supported")
    dims = (1,) * (4 - len(shape)) + tuple(shape)
    return shape, (*dims[1:], *_broadcast_strides(a, dims), *_broadcast_strides(b, dims))


def _broadcast_strides(shape: tuple[int, ...], dims: tuple[int, ...]) -> tuple[int, ...]:
    """Element strides of a C-contiguous array of `shape` read as the 4-D broadcast shape `dims` (0 along
    the axes it is broadcast over)."""
    shape = (1,) * (4 - len(shape)) + tuple(shape)
    strides, step = [], 1
    for size, want in zip(reversed(shape), reversed(dims)):
        strides.append(step if size == want and size != 1 else 0)
        step *= size
    return tuple(reversed(strides))


def _contiguous_block(shape: tuple[int, ...], idx: tuple) -> tuple[int, tuple[int, ...]] | None:
    """(first flat element, shape) of ``a[idx]`` for a C-contiguous ``a`` of `shape` when idx (integers and
    step-1 slices) selects a contiguous block: after the first axis that keeps more than one index, every
    axis is taken whole. None otherwise (numba's strided view path then copies it)."""
    if len(idx) > len(shape):
        return None
    start, out, stride, spread = 0, [], math.prod(shape), False
    for axis, n in enumerate(shape):
        stride //= max(n, 1)
        i = idx[axis] if axis < len(idx) else slice(None)
        if isinstance(i, slice):
            a, b, step = i.indices(n)
            if step != 1:
                return None
            m = max(b - a, 0)
            out.append(m)
        elif isinstance(i, (int, np.integer)):
            a, m = (int(i) + n if i < 0 else int(i)), 1
            if not 0 <= a < n:
                raise IndexError(f"index {int(i)} is out of bounds for axis {axis} with size {n}")
        else:
            return None
        if spread and m != n:
            return None
        spread = spread or m > 1
        start += a * stride
    return start, tuple(out)


def _expand_ellipsis(idx: Any, ndim: int) -> Any:
    """Replace ``...`` by the full slices it stands for (numba device arrays do not take Ellipsis)."""
    idx = idx if isinstance(idx, tuple) else (idx,)
    if Ellipsis not in idx:
        return idx
    i = idx.index(Ellipsis)
    rest = [j for j in idx if j is not Ellipsis]
    return tuple(idx[:i]) + (slice(None),) * (ndim - len(rest)) + tuple(idx[i + 1:])


def _empty(shape: tuple[int, ...]) -> DeviceArray:
    """An uninitialised float32 DeviceArray (at least one element is allocated)."""
    return DeviceArray(_device_empty(max(math.prod(shape), 1), np.dtype(np.float32)), shape)


def _device_empty(n: int, dtype: np.dtype) -> Any:
    """An uninitialised flat numba device array of n elements of dtype.

    On a GPU, the array for a (size, dtype) seen before is built from that pair's saved attributes and a
    block from the context's (caching) allocator: numba's constructor derives shape, strides and a layout
    descriptor in Python every time, measured at about a fifth of decode's host time."""
    key = (n, dtype.char)
    fields = _ARRAY_FIELDS.get(key)
    if fields is None or _DIRECT is None:
        flat = cuda.device_array(n, dtype)
        if _DIRECT is not None and len(_ARRAY_FIELDS) < _MAX_ARRAY_FIELDS:
            _ARRAY_FIELDS[key] = {k: v for k, v in vars(flat).items() if k != "gpu_data"}
            if _DIRECT.memory is None:
                _DIRECT.memory = flat.gpu_data.context.memory_manager
        return flat
    flat = _DEVICE_NDARRAY.__new__(_DEVICE_NDARRAY)
    flat.__dict__.update(fields)
    flat.gpu_data = _DIRECT.memory.memalloc(n * dtype.itemsize)
    return flat


# (element count, dtype char) -> the attributes of a numba device array of that shape, less its memory.
_ARRAY_FIELDS: dict[tuple[int, str], dict] = {}
_MAX_ARRAY_FIELDS = 4096


def _to_device(x: Any) -> DeviceArray:
    """A DeviceArray as it is; a NumPy array or number copied to the GPU (numbers kept: the engine multiplies
    by the same few constants every layer, and each upload from pageable memory waits for the GPU)."""
    if isinstance(x, DeviceArray):
        return x
    if isinstance(x, (int, float, np.floating)):
        key = float(x)
        if key in _SCALARS:
            return _SCALARS[key]
        scalar = _to_device(np.array([key], np.float32)).reshape(())
        if len(_SCALARS) < _MAX_SCALARS:
            _SCALARS[key] = scalar
        return scalar
    a = np.asarray(x, dtype=np.float32)
    return DeviceArray(cuda.to_device(np.ascontiguousarray(a).reshape(-1)), a.shape)


_SCALARS: dict[float, DeviceArray] = {}
_MAX_SCALARS = 64  # model constants; router weights multiplied one at a time (a fallback path) are not kept


class _Uploads:
    """Small host arrays (token ids, positions, expert slots, router weights) to the GPU without waiting for
    it. A copy from pageable memory first waits for the default stream to drain, which stops the host from
    running ahead of the GPU several times a layer; these are staged in a pinned ring instead and copied
    asynchronously on the default stream, ahead of the kernels that read them. Before the ring is
    reused from its start, the copies of its previous lap are waited for."""

    def __init__(self, nbytes: int = 1 << 20) -> None:
        self.ring = cuda.pinned_array(nbytes, np.uint8)
        self.at = 0
        self.lap = _new_event()
        self.stream = cuda.legacy_default_stream()  # the default stream of the launches, as a stream object

    def __call__(self, a: np.ndarray) -> Any:
        raw = np.ascontiguousarray(a).reshape(-1).view(np.uint8)
        n = raw.nbytes
        if not n or 4 * n > self.ring.nbytes:
            return cuda.to_device(np.ascontiguousarray(a).reshape(-1))
        if self.at + n > self.ring.nbytes:
            self.lap.record(0)
            self.lap.synchronize()
            self.at = 0
        src = self.ring[self.at:self.at + n]
        src[:] = raw
        self.at += _cdiv(n, 64) * 64
        dst = _device_empty(a.size, a.dtype)
        dst.copy_to_device(src.view(a.dtype), stream=self.stream)
        return dst


def _upload(a: np.ndarray) -> Any:
    """A small host array as a flat numba device array, through the pinned ring."""
    if not _UPLOADS:
        _UPLOADS.append(_Uploads())
    return _UPLOADS[0](a)


_UPLOADS: list[_Uploads] = []


def _positions(positions: np.ndarray) -> Any:
    """Token positions as an int64 device array, uploaded once per forward call: rope (q and k) and attention
    of every full-attention layer use the same positions."""
    pos = np.ascontiguousarray(positions, dtype=np.int64).reshape(-1)
    key = pos.tobytes()
    if _LAST_POSITIONS and _LAST_POSITIONS[0] == key:
        return _LAST_POSITIONS[1]
    _LAST_POSITIONS[:] = [key, _upload(pos)]
    return _LAST_POSITIONS[1]


_LAST_POSITIONS: list = []


@lru_cache(maxsize=16)
def _inv_freq(theta: float, rotary_dim: int) -> Any:
    """RoPE's inverse frequencies ``theta ** -(arange(0, rotary_dim, 2) / rotary_dim)``, float64 on the device."""
    return cuda.to_device(1.0 / theta ** (np.arange(0, rotary_dim, 2, dtype=np.float64) / rotary_dim))


def _flat_launch(kernel: Any, n: int, *args: Any) -> None:
    """One thread per element for n elements."""
    if n:
        _launch(kernel, _cdiv(n, K.FLAT_BLOCK), K.FLAT_BLOCK, args)


def _row_launch(kernel: Any, n_rows: int, grid_y: int, *args: Any) -> None:
    """One row of LANES threads per output row, ROWS rows per block, grid_y along the second axis."""
    if n_rows and grid_y:
        _launch(kernel, (_cdiv(n_rows, K.ROWS), grid_y), (K.LANES, K.ROWS), args)


class _Plan:
    """How to launch one compiled kernel without numba's dispatcher: the driver-level kernel and, per
    argument, 0 for an int64 scalar, 1 for a float32 scalar or the item size of a 1-D array."""

    __slots__ = ("codes", "kernel")

    def __init__(self, kernel: Any, codes: tuple[int, ...]) -> None:
        self.kernel, self.codes = kernel, codes


# (dispatcher, argument kinds) -> _Plan, or None where the dispatcher's own path must be taken.
_PLANS: dict[tuple, _Plan | None] = {}
_CONFIGS: dict[tuple, Any] = {}
_MAX_CONFIGS = 4096


def _arg_kind(a: Any) -> Any:
    """A cheap key that fixes the numba type of a kernel argument, or None for a type _Plan does not pack."""
    t = type(a)
    if t is int:
        return 0
    if t is np.float32:
        return 1
    if t is _DEVICE_NDARRAY and a.ndim == 1:
        return a.dtype.char, a.strides[0]  # a strided 1-D view is typed apart from a contiguous one
    return None


def _launch(kernel: Any, grid: Any, block: Any, args: tuple) -> None:
    """kernel[grid, block](*args) on the default stream, through a cached plan where one applies.

    numba's launch path (typing every argument, a launch-configuration object with an occupancy check,
    per-argument marshalling through a strided-memory shim) costs tens of microseconds per launch, and a
    decode token makes over a hundred launches of small kernels: measured to be most of the time on the
    H200. Once a kernel is compiled for its argument types, a plan packs them as numba's ABI does (an array
    as meminfo, parent, size, itemsize, data pointer, shape, strides) and hands them to cuda.core's launch
    directly. Other arguments (multi-dimensional arrays) and the simulator take numba's path."""
    if _DIRECT is None:
        kernel[grid, block](*args)
        return
    key = (kernel, *map(_arg_kind, args))
    plan = _PLANS.get(key, False)
    if plan is False:
        kernel[grid, block](*args)  # compiles on first use
        _PLANS[key] = _make_plan(kernel, args) if None not in key else None
        return
    if plan is None:
        kernel[grid, block](*args)
        return
    values: list = []
    for code, a in zip(plan.codes, args):
        if code == 0:
            values.append(a)
        elif code == 1:
            values.append(ctypes.c_float(a))
        else:
            n = a.size
            values += (0, 0, n, code, int(a.gpu_data.device_pointer) if n else 0, n, code)
    config = _CONFIGS.get((grid, block))
    if config is None:
        config = _DIRECT.LaunchConfig(grid=grid, block=block)
        if len(_CONFIGS) < _MAX_CONFIGS:
            _CONFIGS[(grid, block)] = config
    _DIRECT.launch(_DIRECT.stream, config, plan.kernel, *values)


def _make_plan(kernel: Any, args: tuple) -> _Plan | None:
    """The plan of `kernel` for the types of `args` (already compiled for them), or None when one of its
    arguments is of a type a plan does not pack or the kernel needs numba's launch (debug, extensions)."""
    from numba.cuda import types as nbtypes

    compiled = kernel.compile(tuple(kernel.typeof_pyval(a) for a in args))
    if compiled.debug or compiled.extensions or getattr(compiled, "cooperative", False):
        return None
    codes = []
    for ty in compiled.argument_types:
        if ty == nbtypes.int64:
            codes.append(0)
        elif ty == nbtypes.float32:
            codes.append(1)
        elif isinstance(ty, nbtypes.Array) and ty.ndim == 1 and ty.layout == "C":
            codes.append(ty.dtype.bitwidth // 8)
        else:
            return None
    if _DIRECT.stream is None:
        _DIRECT.stream = _driver._to_core_stream(0)
    return _Plan(compiled._codelibrary.get_cufunc().kernel, tuple(codes))


def _contiguous(view: Any) -> DeviceArray:
    """A C-contiguous copy of a strided device view of 1 to 3 dimensions."""
    shape = tuple(view.shape)
    if not 1 <= len(shape) <= 3:
        raise BackendError(f"cannot copy a non-contiguous device view of {len(shape)} dimensions")
    out = _empty(shape)
    _flat_launch(K.copy_strided(len(shape)), out.size, view, out.flat)
    return out


def _gather_rows(x: DeviceArray, rows: np.ndarray) -> DeviceArray:
    cols = x.size // max(x.shape[0], 1)
    out = _empty((len(rows), *x.shape[1:]))
    _flat_launch(K.gather_rows, out.size, x.flat, cols, _upload(rows), out.flat)
    return out


def _new_copy_stream() -> Any:
    """A stream for host -> device expert copies that does not synchronise with the default stream (a
    numba stream would: every copy would wait for all queued kernels, and they for it)."""
    if K.SIMULATOR:
        return cuda.stream()
    flags = _driver.binding.CUstream_flags.CU_STREAM_NON_BLOCKING.value
    return _driver.Stream(_driver.driver.cuStreamCreate(flags))


def _new_event() -> Any:
    """An event without timing (cheaper to record and wait on); the simulator's events take no arguments."""
    return cuda.event() if K.SIMULATOR else cuda.event(timing=False)


def _host_to_device(buffer: Any, offset: int, span: np.ndarray, stream: Any) -> None:
    """Copy host bytes `span` (pinned memory: the copy is asynchronous) into the device byte buffer at
    `offset` on `stream`, without building a numba device array for the destination."""
    if K.SIMULATOR:
        buffer[offset:offset + span.nbytes].copy_to_device(span, stream=stream)
    else:
        _driver.host_to_device(buffer.gpu_data.view(offset, offset + span.nbytes), span, span.nbytes, stream=stream)


# -- weights ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DeviceQuantized:
    """A quantised matrix in GPU memory, MLX layout, as the kernels address it.

    b32 / b16: the same device buffer viewed as uint32 / uint16; the words ``[out, in * bits / 32]`` start at
    b32[w_off]; scales and biases ``[out, in / group_size]`` at s_off / b_off, counted in b32 elements for
    float32 scales (fmt F32) and in b16 elements for float16 / bfloat16."""

    b32: Any
    b16: Any
    w_off: int
    s_off: int
    b_off: int
    out_features: int
    in_features: int
    bits: int
    group_size: int
    fmt: int

    @property
    def n_units(self) -> int:
        """32-code units per row."""
        return self.in_features // 32


def _raw_bytes(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a).reshape(-1).view(np.uint8)


def _scale_offset(byte_offset: int, fmt: int) -> int:
    return byte_offset // (4 if fmt == K.F32 else 2)


def _upload_quantized(t: QuantizedTensor, name: str) -> DeviceQuantized:
    """Words, scales and biases of a 2-D QuantizedTensor into one device buffer, each 4-byte aligned."""
    if t.weight.ndim != 2 or t.scales.shape != t.biases.shape or t.scales.shape[0] != t.weight.shape[0]:
        raise BackendError(f"{name}: expected weight [out, in*bits/32] with scales/biases [out, in/group_size], "
                           f"got weight {t.weight.shape}, scales {t.scales.shape}, biases {t.biases.shape}")
    out_f, in_f = t.shape
    if t.weight.shape[1] * 32 != in_f * t.bits or in_f % t.group_size or t.group_size % 32:
        raise BackendError(f"{name}: weight {t.weight.shape} does not hold {t.bits}-bit values for scales "
                           f"{t.scales.shape} with group_size {t.group_size}")
    fmt = _scale_format(t.scales.dtype, name)
    parts = [_raw_bytes(np.asarray(t.weight, np.uint32)), _raw_bytes(t.scales), _raw_bytes(t.biases)]
    offsets, pos = [], 0
    for p in parts:
        offsets.append(pos)
        pos += _cdiv(p.nbytes, 4) * 4
    host = np.zeros(pos, np.uint8)
    for p, off in zip(parts, offsets):
        host[off:off + p.nbytes] = p
    buf = cuda.to_device(host)
    return DeviceQuantized(buf.view(np.uint32), buf.view(np.uint16), 0, _scale_offset(offsets[1], fmt),
                           _scale_offset(offsets[2], fmt), out_f, in_f, int(t.bits), int(t.group_size), fmt)


@dataclass(frozen=True)
class _ExpertLayout:
    """Where an expert's tensors lie in its byte span (every streamed expert of a model alike):
    ``tensors[name] = ((words, scales, biases) byte offsets, out, in, bits, group_size, scale format)``."""

    tensors: tuple
    span_bytes: int

    @property
    def stride(self) -> int:
        """Bytes between experts in device memory."""
        return _cdiv(self.span_bytes, _STAGE_ALIGN) * _STAGE_ALIGN

    def parts(self, b32: Any, b16: Any) -> dict[str, DeviceQuantized]:
        """The projections of the expert at the start of the buffer viewed as b32 / b16."""
        out = {}
        for name, ((w_at, s_at, b_at), out_f, in_f, bits, group_size, fmt) in zip(_PROJECTIONS, self.tensors):
            out[name] = DeviceQuantized(b32, b16, w_at // 4, _scale_offset(s_at, fmt), _scale_offset(b_at, fmt),
                                        out_f, in_f, bits, group_size, fmt)
        return out


def _expert_layout(expert: Expert, arrays: list[np.ndarray], offsets: tuple[int, ...]) -> _ExpertLayout | None:
    """The layout of one quantised expert whose nine arrays lie at byte `offsets` from the start of its span;
    None when the kernels cannot address it in place (misaligned tensor, group size not a multiple of 32,
    gate and up quantised apart)."""
    tensors, end = [], 0
    for j, name in enumerate(_PROJECTIONS):
        t = expert[name]
        fmt = _scale_format(t.scales.dtype, f"expert {name}")
        at = offsets[3 * j:3 * j + 3]
        scale_align = 4 if fmt == K.F32 else 2
        if at[0] % 4 or at[1] % scale_align or at[2] % scale_align or t.group_size % 32:
            return None
        tensors.append((at, *t.shape, int(t.bits), int(t.group_size), fmt))
        end = max([end] + [o + a.nbytes for o, a in zip(at, arrays[3 * j:3 * j + 3])])
    if tensors[0][1:] != tensors[1][1:]:
        return None
    return _ExpertLayout(tuple(tensors), end)


@dataclass(frozen=True)
class _StagedExperts:
    """k experts in device memory: expert e in slot ``slots[e]`` of a buffer of ``stride``-byte slots;
    ``parts`` address slot 0 (the kernels add ``slots[e] * stride``)."""

    parts: dict[str, DeviceQuantized]
    stride: int
    slots: Any  # int64 device array [k]
    first_slot: int
    copied: bool  # whether any expert was copied from the host for this call (on the copy stream)

    @property
    def k(self) -> int:
        return self.slots.shape[0]


class _VramCache:
    """The VRAM tier: slots of GPU memory holding streamed experts by (layer, expert) key, evicted by a
    flashmoe/runtime/eviction.py policy. The slab is allocated when the first expert's size is known."""

    def __init__(self, nbytes: int, policy: str) -> None:
        self.nbytes, self.policy_name = nbytes, policy
        self.layout: _ExpertLayout | None = None
        self.hits = self.misses = 0

    def prepare(self, layout: _ExpertLayout, k: int) -> None:
        """Make room for k experts of `layout` (a new layout empties the cache). Raises BackendError when
        fewer than k fit."""
        n = self.nbytes // layout.stride
        if n < k:
            raise BackendError(f"GPU expert cache of {self.nbytes} bytes holds {n} experts of {layout.stride} "
                               f"bytes; one token needs {k}")
        if layout == self.layout:
            return
        self.layout = layout
        self.slab = cuda.device_array(n * layout.stride, np.uint8)
        self.views = (self.slab.view(np.uint32), self.slab.view(np.uint16))
        self.policy = make_policy(self.policy_name, n)
        self.slot_of: dict = {}
        self.free = list(range(n - 1, -1, -1))

    def slot(self, key: Any, pinned: set) -> tuple[int, bool]:
        """(slot of key, whether it was there); a missing key gets a free or evicted slot (never one of
        `pinned`, the keys of the current call)."""
        if key in self.slot_of:
            self.hits += 1
            self.policy.touch(key)
            return self.slot_of[key], True
        self.misses += 1
        if not self.free:
            victim = self.policy.victim(lambda k: k not in pinned, key)
            self.policy.remove(victim)
            self.free.append(self.slot_of.pop(victim))
        slot = self.free.pop()
        self.slot_of[key] = slot
        self.policy.insert(key)
        return slot, False


def _root(a: np.ndarray) -> np.ndarray:
    while isinstance(a.base, np.ndarray):
        a = a.base
    return a


def _expert_arrays(expert: Expert) -> list[np.ndarray] | None:
    """The nine arrays of a quantised expert (words, scales, biases per projection) or None if any
    projection is a float array."""
    arrays = []
    for name in _PROJECTIONS:
        t = expert[name]
        if not isinstance(t, QuantizedTensor):
            return None
        arrays += [t.weight, t.scales, t.biases]
    return arrays


def _expert_span(expert: Expert) -> tuple[np.ndarray, _ExpertLayout] | None:
    """(the host bytes holding a quantised expert's nine arrays, starting at a multiple of 4 bytes, and where
    each array lies in them), or None when the fused kernels cannot address it in place (a float projection,
    a non-contiguous array, see also _expert_layout).

    Views into one buffer (the store's read buffers) give a view of that buffer: no host copy. Anything else
    is packed into a fresh array at the same relative offsets. Every expert of a model has the same layout,
    so it is computed once per distinct arrangement (a decode token stages tens of experts)."""
    arrays = _expert_arrays(expert)
    if arrays is None or not all(a.flags.c_contiguous for a in arrays):
        return None
    ptrs = [a.ctypes.data for a in arrays]
    lo = min(ptrs) & ~3
    offsets = tuple(p - lo for p in ptrs)
    key = (offsets, *((a.shape, a.dtype) for a in arrays),
           *((expert[n].bits, expert[n].group_size) for n in _PROJECTIONS))
    layout = _LAYOUTS.get(key, False)
    if layout is False:
        layout = _expert_layout(expert, arrays, offsets)
        if len(_LAYOUTS) < _MAX_LAYOUTS:
            _LAYOUTS[key] = layout
    if layout is None:
        return None
    hi = lo + layout.span_bytes
    root = _root(arrays[0])
    base = root.ctypes.data
    if root.flags.c_contiguous and base <= lo and hi <= base + root.nbytes:
        # Every array lies inside root's memory, so these bytes are theirs, whichever object owns them.
        return root.reshape(-1).view(np.uint8)[lo - base:hi - base], layout
    span = np.zeros(hi - lo, np.uint8)
    for offset, a in zip(offsets, arrays):
        span[offset:offset + a.nbytes] = _raw_bytes(a)
    return span, layout


_LAYOUTS: dict[tuple, _ExpertLayout | None] = {}
_MAX_LAYOUTS = 256


class _DeviceKVCacheBuffer(KVCacheBuffer):
    """A KV cache in GPU memory: keys and values flat float32 ``[capacity * kv_heads * head_dim]`` each, grown
    by doubling on the device. ``append`` copies the new positions in one launch and returns device views of
    all cached positions, so attention reads them where they are (the NumPy cache cost two copies to the
    host and two back per token and full-attention layer)."""

    def __init__(self, kv_heads: int, head_dim: int, capacity: int = 256):
        self.row = (kv_heads, head_dim)
        self.k = cuda.device_array(capacity * kv_heads * head_dim, np.float32)
        self.v = cuda.device_array(capacity * kv_heads * head_dim, np.float32)
        self.length = 0

    def append(self, k: Any, v: Any) -> tuple[DeviceArray, DeviceArray]:
        k, v = _to_device(k), _to_device(v)
        if k.shape[1:] != self.row or v.shape != k.shape:
            raise BackendError(f"KV cache of {self.row} per position: got keys {k.shape}, values {v.shape}")
        row = math.prod(self.row)
        end = self.length + k.shape[0]
        if end * row > self.k.size:
            capacity = max(end, 2 * self.k.size // row)
            grown_k = cuda.device_array(capacity * row, np.float32)
            grown_v = cuda.device_array(capacity * row, np.float32)
            if self.length:
                _flat_launch(K.kv_append, self.length * row, self.k[:self.length * row],
                             self.v[:self.length * row], grown_k, grown_v, 0)
            self.k, self.v = grown_k, grown_v
        _flat_launch(K.kv_append, k.size, k.flat, v.flat, self.k, self.v, self.length * row)
        self.length = end
        return (DeviceArray(self.k[:end * row], (end, *self.row)), DeviceArray(self.v[:end * row], (end, *self.row)))


class CudaBackend(Backend):
    """numba-cuda kernels on a CUDA GPU (or numba's simulator); arrays are :class:`DeviceArray`."""

    name = "cuda"

    @classmethod
    def unavailable_reason(cls) -> str | None:
        if _IMPORT_ERROR is not None:
            return (f"needs numba-cuda (pip install -e '.[cuda]') and an NVIDIA GPU with its driver; numba's "
                    f"CUDA target cannot be imported: {_IMPORT_ERROR}")
        if K.SIMULATOR:
            return None
        try:
            if cuda.is_available():
                return None
        except Exception as e:  # a broken driver install raises instead of answering False
            return f"no usable CUDA GPU: {e}"
        return ("needs an NVIDIA GPU with its driver: none found (numba.cuda.is_available() is False); "
                "NUMBA_ENABLE_CUDASIM=1 runs the kernels in numba's CPU simulator instead")

    @staticmethod
    def device_description() -> str:
        """The GPU and its memory, e.g. "gpu: NVIDIA H200, 139.8 GiB (numba-cuda 0.30.4)"."""
        from importlib.metadata import PackageNotFoundError, version

        try:
            which = f"numba-cuda {version('numba-cuda')}"
        except PackageNotFoundError:
            which = "numba's built-in CUDA target"
        if K.SIMULATOR:
            return f"numba CUDA simulator on the CPU ({which})"
        dev = cuda.get_current_device()
        free, total = cuda.current_context().get_memory_info()
        name = dev.name.decode() if isinstance(dev.name, bytes) else dev.name
        return f"gpu: {name}, {total / 2**30:.1f} GiB, {free / 2**30:.1f} GiB free ({which})"

    def __init__(self) -> None:
        self._stage = None  # device staging buffer of streamed experts, grown on demand
        self._stage_views = None
        self._cache: _VramCache | None = None
        # The copy stream and its events, made at the first expert copy (they need the CUDA context).
        self._copy_stream = self._copied = self._slots_free = None
        if not K.SIMULATOR:
            # Every numba call that needs the context (allocations, copies) otherwise asks the driver for the
            # current context and device again (~4 driver calls and a lock each, hundreds per token) unless an
            # enclosing scope attached it; this scope stays open for the thread that made the backend.
            from numba.cuda.cudadrv.devices import _runtime

            self._context_scope = _runtime.ensure_context()
            self._context_scope.__enter__()
        #: host -> device bytes and copies of streamed experts since construction (statistics)
        self.expert_bytes_copied = 0
        self.expert_copies = 0

    # -- arrays and weights ---------------------------------------------------------------------------------
    def asarray(self, x: Any) -> DeviceArray:
        return _to_device(x)

    def to_numpy(self, x: Any) -> np.ndarray:
        if isinstance(x, DeviceArray):
            return np.asarray(x)
        return np.ascontiguousarray(x, dtype=np.float32)

    def prepare(self, t: Any) -> DeviceQuantized | DeviceArray:
        if isinstance(t, DeviceQuantized | DeviceArray):
            return t
        if isinstance(t, QuantizedTensor):
            return _upload_quantized(t, "weight")
        if isinstance(t, np.ndarray):
            return _to_device(t)
        raise BackendError(f"weight: expected a float array or QuantizedTensor, got {type(t).__name__}")

    def allocate_buffer(self, nbytes: int) -> np.ndarray:
        """A page-aligned, pinned (page-locked) host buffer of nbytes for the expert store's ``allocate=``:
        experts read into it reach the GPU by DMA without the driver's bounce copy."""
        raw = cuda.pinned_array(nbytes + _PAGE, np.uint8)
        start = (-raw.ctypes.data) % _PAGE
        return raw[start:start + nbytes]

    def new_kv_cache(self, kv_heads: int, head_dim: int) -> KVCacheBuffer:
        """A KV cache in GPU memory (:class:`_DeviceKVCacheBuffer`)."""
        return _DeviceKVCacheBuffer(kv_heads, head_dim)

    # -- dense ops ------------------------------------------------------------------------------------------
    def linear(self, x: Any, w: Any) -> DeviceArray:
        x = _to_device(x)
        w = self.prepare(w)
        in_f = w.in_features if isinstance(w, DeviceQuantized) else w.shape[1]
        if x.ndim != 2 or x.shape[1] != in_f:
            raise BackendError(f"linear: input {x.shape} does not match a weight taking {in_f} features")
        return self._linear(x, w)

    def _linear(self, x: DeviceArray, w: DeviceQuantized | DeviceArray) -> DeviceArray:
        T = x.shape[0]
        if isinstance(w, DeviceArray):
            out = _empty((T, w.shape[0]))
            _row_launch(K.flinear, w.shape[0], T, w.flat, w.shape[1], x.flat, out.flat)
            return out
        out = _empty((T, w.out_features))
        _row_launch(K.qlinear(w.bits, w.group_size, w.fmt), w.out_features, T, w.b32, w.b16, w.w_off, w.s_off,
                    w.b_off, w.out_features, w.n_units, x.flat, out.flat)
        return out

    def embed(self, ids: np.ndarray, w: Any) -> DeviceArray:
        ids = np.ascontiguousarray(ids, dtype=np.int64).reshape(-1)
        w = self.prepare(w)
        if isinstance(w, DeviceArray):
            return _gather_rows(w, ids)
        out = _empty((len(ids), w.in_features))
        _flat_launch(K.qembed(w.bits, w.group_size, w.fmt), out.size, w.b32, w.b16, w.w_off, w.s_off, w.b_off,
                     w.in_features, _upload(ids), out.flat)
        return out

    def rms_norm(self, x: Any, weight: Any, eps: float) -> DeviceArray:
        x, weight = _to_device(x), _to_device(weight)
        out = _empty(x.shape)
        rows = x.size // max(weight.size, 1)
        _row_launch(K.rms_norm, rows, 1, x.flat, weight.flat, np.float32(eps), out.flat)
        return out

    def rope(self, x: Any, positions: np.ndarray, theta: float, rotary_dim: int) -> DeviceArray:
        x = _to_device(x)
        _, H, D = x.shape
        out = _empty(x.shape)
        _flat_launch(K.rope, x.size, x.flat, H, D, rotary_dim // 2, _positions(positions),
                     _inv_freq(float(theta), int(rotary_dim)), out.flat)
        return out

    def attention(self, q: Any, k: Any, v: Any, q_positions: np.ndarray, scale: float) -> DeviceArray:
        q, k, v = _to_device(q), _to_device(k), _to_device(v)
        T, Hq, D = q.shape
        S, Hkv = k.shape[0], k.shape[1]
        pos = np.asarray(q_positions).reshape(-1)
        if pos.size and pos.max() >= S:
            raise BackendError(f"attention: query position {pos.max()} is beyond the {S} cached keys")
        scores = _empty((T * Hq * S,)).flat
        out = _empty(q.shape)
        _row_launch(K.attention, T * Hq, 1, q.flat, k.flat, v.flat, _positions(pos), np.float32(scale), Hq,
                    Hkv, D, scores, out.flat)
        return out

    def causal_conv1d(self, x: Any, state: Any, weight: Any) -> tuple[DeviceArray, DeviceArray]:
        x, state, weight = _to_device(x), _to_device(state), _to_device(weight)
        T, C = x.shape
        Kw = weight.shape[1]
        y, new_state = _empty((T, C)), _empty((Kw - 1, C))
        _flat_launch(K.causal_conv1d, (T + Kw - 1) * C, state.flat, x.flat, weight.flat, Kw, y.flat, new_state.flat)
        return y, new_state

    def gated_delta_rule(self, q: Any, k: Any, v: Any, g: Any, beta: Any, state: Any
                         ) -> tuple[DeviceArray, DeviceArray]:
        q, k, v, g, beta, state = (_to_device(a) for a in (q, k, v, g, beta, state))
        T, Hk, Dk = q.shape
        H, Dv = v.shape[1], v.shape[2]
        new_state, o = _empty((H, Dk, Dv)), _empty((T, H, Dv))
        _flat_launch(K.gated_delta_rule, H * Dv, q.flat, k.flat, v.flat, g.flat, beta.flat, T, Hk, Dk, state.flat,
                     new_state.flat, o.flat)
        return o, new_state

    # -- elementwise glue -----------------------------------------------------------------------------------
    def _unary(self, x: Any, op: int) -> DeviceArray:
        x = _to_device(x)
        out = _empty(x.shape)
        _flat_launch(K.unary(op), x.size, x.flat, out.flat)
        return out

    def sigmoid(self, x: Any) -> DeviceArray:
        return self._unary(x, K.SIGMOID)

    def silu(self, x: Any) -> DeviceArray:
        return self._unary(x, K.SILU)

    def softplus(self, x: Any) -> DeviceArray:
        return self._unary(x, K.SOFTPLUS)

    def l2_normalize(self, x: Any, eps: float = 1e-6) -> DeviceArray:
        x = _to_device(x)
        n = x.shape[-1]
        out = _empty(x.shape)
        _row_launch(K.l2_normalize, x.size // max(n, 1), 1, x.flat, n, np.float32(eps), out.flat)
        return out

    def clip(self, x: Any, limit: float) -> DeviceArray:
        x = _to_device(x)
        out = _empty(x.shape)
        _flat_launch(K.clip, x.size, x.flat, np.float32(limit), out.flat)
        return out

    # -- experts --------------------------------------------------------------------------------------------
    def configure_expert_cache(self, nbytes: int, policy: str = DEFAULT_POLICY) -> None:
        """Keep up to `nbytes` of streamed experts in GPU memory (the VRAM tier in front of the host's), keyed
        by the ``keys`` given to :meth:`experts_ffn` / :meth:`expert_ffn` and evicted by `policy` ("lru",
        "lfu", "fifo"; flashmoe/runtime/eviction.py). 0 turns it off. Raises FlashMoeError for an unknown policy."""
        make_policy(policy)  # fail now, not at the first expert
        self._cache = _VramCache(nbytes, policy) if nbytes > 0 else None

    def has_expert(self, key: Any) -> bool:
        """Whether expert `key` is in the GPU expert cache (its bytes need not be read or passed again)."""
        return self._cache is not None and self._cache.layout is not None and key in self._cache.slot_of

    @property
    def expert_cache_stats(self) -> dict[str, int]:
        """The VRAM tier's hits and misses and the host -> device expert bytes and copies so far."""
        c = self._cache
        return {"gpu_hits": c.hits if c else 0, "gpu_misses": c.misses if c else 0,
                "bytes_copied": self.expert_bytes_copied, "copies": self.expert_copies}

    def _stage_experts(self, experts: list[Expert | None], keys: list | None = None) -> _StagedExperts | None:
        """Put the k experts in device memory: each given expert's byte span in one host -> device copy,
        into the GPU expert cache when keys are given and it is configured (an expert already there is
        not copied, and may be given as None), else into slots 0..k-1 of the staging buffer.

        None when the fused kernels cannot address them in place: a float projection, gate and up quantised
        differently, misaligned tensors, or experts laid out differently."""
        spans, layout = [], None
        for e in experts:
            if e is None:
                spans.append(None)
                continue
            found = _expert_span(e)
            if found is None:
                return None
            span, this = found
            if layout is not None and this != layout:
                return None
            layout = layout or this
            spans.append(span)
        cache = self._cache if keys is not None else None
        if cache is not None:
            if layout is None:
                layout = cache.layout
            if layout is None:
                raise BackendError("experts_ffn: every expert was passed as None but the GPU cache holds none")
            cache.prepare(layout, len(experts))
            pinned = set(keys)
            slots, hits = zip(*(cache.slot(key, pinned) for key in keys))
            buffer, views = cache.slab, cache.views
        else:
            if layout is None:
                raise BackendError("experts_ffn: an expert passed as None needs keys and a GPU expert cache")
            slots, hits = tuple(range(len(experts))), (False,) * len(experts)
            if self._stage is None or self._stage.size < layout.stride * len(experts):
                self._stage = cuda.device_array(layout.stride * len(experts), np.uint8)
                self._stage_views = (self._stage.view(np.uint32), self._stage.view(np.uint16))
            buffer, views = self._stage, self._stage_views
        copies = []
        for slot, hit, span, key in zip(slots, hits, spans, keys or [None] * len(spans)):
            if hit:
                continue
            if span is None:
                raise BackendError(f"expert {key}: not in the GPU expert cache and not given")
            copies.append((slot * layout.stride, span))
        if copies:
            self._copy(buffer, copies)
        return _StagedExperts(layout.parts(*views), layout.stride, _upload(np.array(slots, np.int64)),
                              slots[0], bool(copies))

    def _copy(self, buffer: Any, copies: list[tuple[int, np.ndarray]]) -> None:
        """Copy each (byte offset, host span) into `buffer` on the copy stream, after the expert kernels
        launched so far (they may read the slots being overwritten); the default stream, where every kernel
        runs, waits for the copies before its next kernel. Work already queued there (the shared expert)
        overlaps them."""
        if self._copy_stream is None:
            self._copy_stream = _new_copy_stream()
            self._copied, self._slots_free = _new_event(), _new_event()
        self._slots_free.wait(self._copy_stream)  # an event never recorded does not hold the stream
        for offset, span in copies:
            _host_to_device(buffer, offset, span, self._copy_stream)
            self.expert_bytes_copied += span.nbytes
            self.expert_copies += 1
        self._copied.record(self._copy_stream)
        self._copied.wait(0)

    def _experts_launched(self, staged: _StagedExperts) -> None:
        """After the kernels reading `staged`: later copies may overwrite its slots once these kernels are
        done, and the host buffers the copies read are free again once this returns (the expert store may
        reuse them for the next reads)."""
        self._slots_free.record(0)
        if staged.copied:
            self._copied.synchronize()

    def _gate_up(self, x: DeviceArray, staged: _StagedExperts) -> DeviceArray:
        """h [k * T, inter] = silu(gate_e x_t) * (up_e x_t) for every staged expert e and token t."""
        g, u = staged.parts["gate_proj"], staged.parts["up_proj"]
        T = x.shape[0]
        h = _empty((staged.k * T, g.out_features))
        _row_launch(K.qgate_up(g.bits, g.group_size, g.fmt), g.out_features, staged.k * T, g.b32, g.b16,
                    g.w_off, g.s_off, g.b_off, u.w_off, u.s_off, u.b_off, staged.stride // 4,
                    _scale_offset(staged.stride, g.fmt), staged.slots, g.out_features, g.n_units, T, x.flat,
                    h.flat)
        return h

    def expert_ffn(self, x: Any, expert: Expert | None, key: Any = None) -> DeviceArray:
        """As :meth:`Backend.expert_ffn`; with `key` ((layer, expert)) and a GPU expert cache configured,
        the expert is kept there and may be passed as None once it is (:meth:`has_expert`)."""
        x = _to_device(x)
        staged = self._stage_experts([expert], None if key is None else [key])
        if staged is None:
            h = self.silu(self.linear(x, expert["gate_proj"])) * self.linear(x, expert["up_proj"])
            return self.linear(h, expert["down_proj"])
        d = staged.parts["down_proj"]
        at = staged.first_slot * staged.stride
        down = replace(d, w_off=d.w_off + at // 4, s_off=d.s_off + _scale_offset(at, d.fmt),
                       b_off=d.b_off + _scale_offset(at, d.fmt))
        y = self._linear(self._gate_up(x, staged), down)
        self._experts_launched(staged)
        return y

    def experts_ffn(self, x: Any, experts: list[Expert | None], weights: np.ndarray, keys: list | None = None
                    ) -> DeviceArray:
        """As :meth:`Backend.experts_ffn`; with `keys` (one (layer, expert) per expert) and a GPU expert cache
        configured, experts are kept there and those already there may be passed as None."""
        x = _to_device(x).reshape(1, -1)
        weights = np.ascontiguousarray(weights, dtype=np.float32).reshape(-1)
        staged = self._stage_experts(experts, keys)
        if staged is None:
            out = None
            for e, w in zip(experts, weights):
                y = self.expert_ffn(x, e).reshape(-1) * float(w)
                out = y if out is None else out + y
            return out
        h = self._gate_up(x, staged)
        d = staged.parts["down_proj"]
        out = _empty((d.out_features,))
        _row_launch(K.qdown_combine(d.bits, d.group_size, d.fmt), d.out_features, 1, d.b32, d.b16, d.w_off,
                    d.s_off, d.b_off, staged.stride // 4, _scale_offset(staged.stride, d.fmt), staged.slots,
                    d.out_features, d.n_units, h.flat, _upload(weights), out.flat)
        self._experts_launched(staged)
        return out
