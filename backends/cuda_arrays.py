"""Device memory of the CUDA backend: float32 activations as :class:`DeviceArray`, kernel launches, small
uploads, and the KV cache in GPU memory.

A decode token is ~130 launches of small kernels, so the host's cost per launch sets the pace (the GPU's share
of a token is a fraction of a millisecond). Kernels are launched through cached plans that bypass numba's
dispatcher (:func:`launch`), output arrays of a known size skip numba's array constructor
(:func:`device_empty`), freed blocks are kept for reuse by a caching allocator, and small host arrays go up
through a pinned ring (:func:`upload`). Without a GPU (``NUMBA_ENABLE_CUDASIM=1``) numba's own paths run.
"""

from __future__ import annotations

import ctypes
import math
from functools import lru_cache
from typing import Any

import numpy as np
from numba import cuda

from flashmoe.backends import cuda_attention as KA
from flashmoe.backends import cuda_kernels as K
from flashmoe.backends.base import BackendError, KVCacheBuffer

# Freed device blocks up to this size are kept for reuse (activations, staging); larger ones are freed.
_CACHE_MAX_BLOCK = 256 << 20


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for positive integers."""
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
            size = cdiv(size, 512) * 512
            free = self._free.setdefault(size, [])
            ptr = free.pop() if free else self._attempt_allocation(lambda: _driver.driver.cuMemAlloc(size))
            block = _driver.MemoryPointer(weakref.proxy(self.context), ptr, size, finalizer=lambda: free.append(ptr))
            if CAPTURE.active is not None:  # a captured graph reads and writes it at every replay
                CAPTURE.active.keep.append(block)
            return block

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

    # cuda.core's launch and LaunchConfig for launch; the legacy default stream (numba's stream 0) as
    # cuda.core sees it, made at the first plan, and the context's memory manager, found at the first
    # allocation of device_empty (both need the context).
    _DIRECT: Any = _pytypes.SimpleNamespace(launch=_core_launch, LaunchConfig=_LaunchConfig, stream=None,
                                            memory=None)
else:
    _DIRECT = None
    _DEVICE_NDARRAY = None


class DeviceArray:
    """A C-contiguous float32 array in GPU memory: a flat numba device array and a shape.

    Keeping the flat array and the shape apart makes reshaping and every kernel launch free of numba
    device-array construction (tens of microseconds each, measured to dominate decode on the H200). The
    arithmetic on it is the backend's (:class:`flashmoe.backends.cuda_backend.CudaBackend`); ``to_numpy``
    copies it to the host.
    """

    __slots__ = ("flat", "shape")

    def __init__(self, flat: Any, shape: tuple[int, ...]) -> None:
        self.flat = flat  # 1-D numba device array of exactly prod(shape) float32
        self.shape = tuple(shape)

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    def __repr__(self) -> str:
        return f"DeviceArray(shape={self.shape}, float32)"

    def to_host(self) -> np.ndarray:
        """A NumPy float32 copy of this array. Raises CaptureError inside a capture (the host would read
        values the capture does not compute)."""
        refuse_in_capture("a copy to the host")
        return self.flat.copy_to_host().reshape(self.shape)


def binary(a: Any, b: Any, op: int) -> DeviceArray:
    """``a op b`` (op K.ADD or K.MUL) with NumPy broadcasting, up to 4 dimensions; a and b are DeviceArrays,
    NumPy arrays or numbers."""
    a, b = to_device(a), to_device(b)
    shape, dims = _broadcast(a.shape, b.shape)
    out = empty(shape)
    flat_launch(K.binary(op), out.size, a.flat, b.flat, out.flat, *dims)
    return out


def reshape(x: DeviceArray, shape: tuple[int, ...]) -> DeviceArray:
    """The same elements under a new shape (no copy). Raises BackendError when the sizes differ."""
    shape = tuple(int(s) for s in shape)
    if math.prod(shape) != x.size:
        raise BackendError(f"cannot reshape device array {x.shape} into {shape}")
    return DeviceArray(x.flat, shape)


def rows(x: DeviceArray, start: int, stop: int) -> DeviceArray:
    """``x[start:stop]`` along the first axis: a view (rows are contiguous)."""
    start, stop = int(start), int(stop)  # NumPy integers would reach numba's array constructor as shapes
    if not 0 <= start <= stop <= x.shape[0]:
        raise BackendError(f"rows {start}:{stop} of a device array of {x.shape[0]} rows")
    row = math.prod(x.shape[1:])
    return DeviceArray(flat_view(x.flat, start * row, stop * row), (stop - start, *x.shape[1:]))


def split(x: DeviceArray, sizes: Any) -> list[DeviceArray]:
    """Consecutive pieces of the last axis, ``sizes[i]`` features each: views when x has one row of features
    (decode), else copies (one launch per piece)."""
    n_rows, n_cols = x.size // max(x.shape[-1], 1), x.shape[-1]
    if sum(sizes) != n_cols:
        raise BackendError(f"cannot split {n_cols} features into {tuple(sizes)}")
    pieces, start = [], 0
    for width in sizes:
        shape = (*x.shape[:-1], width)
        if n_rows == 1:
            pieces.append(DeviceArray(flat_view(x.flat, start, start + width), shape))
        else:
            out = empty(shape)
            flat_launch(K.copy_columns, out.size, x.flat, n_cols, start, width, out.flat)
            pieces.append(out)
        start += width
    return pieces


def gather_rows(x: DeviceArray, ids: np.ndarray, on_device: Any = None) -> DeviceArray:
    """Rows ``ids`` (int [n]) of x along the first axis -> [n, *x.shape[1:]]; on_device: the same ids already
    on the device (int64), else they are uploaded."""
    ids = np.asarray(ids, np.int64).reshape(-1)
    cols = x.size // max(x.shape[0], 1)
    out = empty((len(ids), *x.shape[1:]))
    flat_launch(K.gather_rows, out.size, x.flat, cols, upload(ids) if on_device is None else on_device, out.flat)
    return out


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


def empty(shape: tuple[int, ...]) -> DeviceArray:
    """An uninitialised float32 DeviceArray (at least one element is allocated)."""
    return DeviceArray(device_empty(max(math.prod(shape), 1), np.dtype(np.float32)), shape)


def device_empty(n: int, dtype: np.dtype) -> Any:
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


def flat_view(flat: Any, start: int, stop: int) -> Any:
    """``flat[start:stop]`` of a contiguous 1-D numba device array, sharing its memory. On a GPU, for a length
    seen before, built like :func:`device_empty`'s arrays on a view of flat's memory: numba's slicing indexes a
    layout descriptor in Python and then constructs the array, several times the cost (KV cache views, decode
    splits and rows, every layer)."""
    if _DIRECT is None or not 0 <= start < stop <= flat.size:
        return flat[start:stop]
    item = flat.dtype.itemsize
    memory = flat.gpu_data.view(start * item, stop * item)
    key = (stop - start, flat.dtype.char)
    fields = _ARRAY_FIELDS.get(key)
    if fields is None:
        view = _DEVICE_NDARRAY(shape=(stop - start,), strides=(item,), dtype=flat.dtype, gpu_data=memory)
        if len(_ARRAY_FIELDS) < _MAX_ARRAY_FIELDS:
            _ARRAY_FIELDS[key] = {k: v for k, v in vars(view).items() if k != "gpu_data"}
        return view
    view = _DEVICE_NDARRAY.__new__(_DEVICE_NDARRAY)
    view.__dict__.update(fields)
    view.gpu_data = memory
    return view


# (element count, dtype char) -> the attributes of a numba device array of that shape, less its memory.
_ARRAY_FIELDS: dict[tuple[int, str], dict] = {}
_MAX_ARRAY_FIELDS = 4096


def to_device(x: Any) -> DeviceArray:
    """A DeviceArray as it is; a NumPy array or number copied to the GPU (numbers kept: the engine multiplies
    by the same few constants every layer, and each upload from pageable memory waits for the GPU)."""
    if isinstance(x, DeviceArray):
        return x
    if isinstance(x, (int, float, np.floating)):
        key = float(x)
        if key in _SCALARS:
            return _SCALARS[key]
        scalar = reshape(to_device(np.array([key], np.float32)), ())
        if len(_SCALARS) < _MAX_SCALARS:
            _SCALARS[key] = scalar
        return scalar
    refuse_in_capture("a copy of a host array")
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
        self.lap = new_event()
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
        self.at += cdiv(n, 64) * 64
        dst = device_empty(a.size, a.dtype)
        dst.copy_to_device(src.view(a.dtype), stream=self.stream)
        return dst


def upload(a: np.ndarray) -> Any:
    """A small host array as a flat numba device array, through the pinned ring. Raises CaptureError inside
    a capture (a replay would copy the capture's values again)."""
    refuse_in_capture("an upload of a host array")
    if not _UPLOADS:
        _UPLOADS.append(_Uploads())
    return _UPLOADS[0](a)


_UPLOADS: list[_Uploads] = []


def device_positions(positions: np.ndarray) -> Any:
    """Token positions as an int64 device array, uploaded once per forward call: rope (q and k) and attention
    of every full-attention layer use the same positions. Inside a capture: the graph's position input."""
    if CAPTURE.active is not None:
        return CAPTURE.active.positions
    pos = np.ascontiguousarray(positions, dtype=np.int64).reshape(-1)
    key = pos.tobytes()
    if _LAST_POSITIONS and _LAST_POSITIONS[0] == key:
        return _LAST_POSITIONS[1]
    _LAST_POSITIONS[:] = [key, upload(pos)]
    return _LAST_POSITIONS[1]


_LAST_POSITIONS: list = []


def device_ids(ids: np.ndarray) -> Any:
    """Token ids (int64 [T]) on the device; inside a capture, the graph's token input."""
    if CAPTURE.active is not None:
        return CAPTURE.active.ids
    return upload(np.ascontiguousarray(ids, dtype=np.int64).reshape(-1))


class CaptureError(BackendError):
    """Work a CUDA graph cannot hold was asked for while capturing one (a copy to or from the host, a launch
    through numba's own path): the caller runs that step without a graph."""


class _Capture:
    """The capture under way: the graph's inputs (token ids and positions, int64 device arrays [1]), where
    launches go (a cuda.core GraphBuilder) and the device blocks allocated meanwhile, kept for the graph."""

    def __init__(self, ids: Any, positions: Any, builder: Any) -> None:
        self.ids, self.positions, self.builder = ids, positions, builder
        self.keep: list = []


class _CaptureSlot:
    active: _Capture | None = None


CAPTURE = _CaptureSlot()


def refuse_in_capture(what: str) -> None:
    """Raise CaptureError naming `what` when a capture is under way."""
    if CAPTURE.active is not None:
        raise CaptureError(f"{what} cannot be part of a CUDA graph")


def flat_launch(kernel: Any, n: int, *args: Any) -> None:
    """One thread per element for n elements."""
    if n:
        launch(kernel, cdiv(n, K.FLAT_BLOCK), K.FLAT_BLOCK, args)


def row_launch(kernel: Any, n_rows: int, grid_y: int, *args: Any) -> None:
    """One row of LANES threads per output row, ROWS rows per block, grid_y along the second axis."""
    if n_rows and grid_y:
        launch(kernel, (cdiv(n_rows, K.ROWS), grid_y), (K.LANES, K.ROWS), args)


class _Plan:
    """How to launch one compiled kernel without numba's dispatcher: the driver-level kernel and, per
    argument, 0 for an int64 scalar, 1 for a float32 scalar or the item size of a 1-D array."""

    __slots__ = ("codes", "kernel")

    def __init__(self, kernel: Any, codes: tuple[int, ...]) -> None:
        self.kernel, self.codes = kernel, codes


#: kernels and graphs the host launched (numba's own path not counted), for the benchmarks
LAUNCHES = [0]

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


def launch(kernel: Any, grid: Any, block: Any, args: tuple) -> None:
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
    if plan is False and CAPTURE.active is not None and None not in key:
        plan = _PLANS[key] = _make_plan(kernel, args)  # compiled without a launch: a capture cannot run one
    if plan is False or plan is None:
        refuse_in_capture("a kernel launched through numba's dispatcher")
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
    LAUNCHES[0] += CAPTURE.active is None
    stream = _DIRECT.stream if CAPTURE.active is None else CAPTURE.active.builder
    _DIRECT.launch(stream, config, plan.kernel, *values)


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
    core_stream()
    return _Plan(compiled._codelibrary.get_cufunc().kernel, tuple(codes))


def core_stream() -> Any:
    """The default stream of the launches as a cuda.core stream (where a replayed graph runs)."""
    if _DIRECT.stream is None:
        _DIRECT.stream = _driver._to_core_stream(0)
    return _DIRECT.stream


def new_event() -> Any:
    """An event without timing (cheaper to record and wait on); the simulator's events take no arguments."""
    return cuda.event() if K.SIMULATOR else cuda.event(timing=False)


class DeviceKVCacheBuffer(KVCacheBuffer):
    """A KV cache in GPU memory: keys and values flat float32 ``[capacity * kv_heads * head_dim]`` each, grown
    by doubling on the device. ``append`` copies the new positions in one launch and returns device views of
    all cached positions, so attention reads them where they are (the NumPy cache cost two copies to the
    host and two back per token and full-attention layer).

    Inside a capture (one decode token) the append writes at the graph's position input and returns views of
    the whole capacity, so that a replay at a later position appends and attends correctly: attention reads
    only positions up to the query's. The caller keeps the capacity above the positions replayed
    (:meth:`reserve`).

    ``values=False`` keeps keys only (``v`` None; the keys are returned as the values too), as
    :class:`KVCacheBuffer`: the append kernels then write each key twice to the same place (the same value,
    so no race)."""

    def __init__(self, kv_heads: int, head_dim: int, capacity: int = 256, values: bool = True):
        self.row = (kv_heads, head_dim)
        self.k = cuda.device_array(capacity * kv_heads * head_dim, np.float32)
        self.v = cuda.device_array(capacity * kv_heads * head_dim, np.float32) if values else None
        self.length = 0

    @property
    def _values(self):
        return self.k if self.v is None else self.v

    @property
    def capacity(self) -> int:
        """Positions the cache holds before it grows (and moves)."""
        return self.k.size // math.prod(self.row)

    def reserve(self, positions: int) -> None:
        row = math.prod(self.row)
        if positions * row <= self.k.size:
            return
        capacity = max(positions, 2 * self.capacity)
        grown_k = cuda.device_array(capacity * row, np.float32)
        grown_v = grown_k if self.v is None else cuda.device_array(capacity * row, np.float32)
        if self.length:
            flat_launch(KA.kv_append, self.length * row, self.k[:self.length * row],
                        self._values[:self.length * row], grown_k, grown_v, 0)
        self.k, self.v = grown_k, (None if self.v is None else grown_v)

    def append(self, k: Any, v: Any = None) -> tuple[DeviceArray, DeviceArray]:
        k = to_device(k)
        v = k if self.v is None else to_device(v)
        if k.shape[1:] != self.row or v.shape != k.shape:
            raise BackendError(f"KV cache of {self.row} per position: got keys {k.shape}, values {v.shape}")
        row = math.prod(self.row)
        end = self.length + k.shape[0]
        self.reserve(end)
        if k.shape[0] == 1:  # decode: at the position on the device, the one kernel eager and captured
            flat_launch(KA.kv_append_at, row, k.flat, v.flat, self.k, self._values,
                        device_positions(np.array([self.length])))
            self.length = end
            if CAPTURE.active is not None:
                return (DeviceArray(self.k, (self.capacity, *self.row)),
                        DeviceArray(self._values, (self.capacity, *self.row)))
        else:
            flat_launch(KA.kv_append, k.size, k.flat, v.flat, self.k, self._values, self.length * row)
            self.length = end
        return (DeviceArray(flat_view(self.k, 0, end * row), (end, *self.row)),
                DeviceArray(flat_view(self._values, 0, end * row), (end, *self.row)))
