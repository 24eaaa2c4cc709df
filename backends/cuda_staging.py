"""Streamed experts on the GPU: quantised weights in device memory, host -> device copies of experts and
the VRAM tier that keeps them.

The expert store reads each expert into a host buffer (page-aligned pinned memory from
:meth:`flashmoe.backends.cuda_backend.CudaBackend.allocate_buffer`, so each expert crosses PCIe in one DMA
copy at full speed). One copy per expert covers its nine tensors: the tensors are views into the expert's
buffer, so the byte span holding all of them is copied into a device slot and the kernels address each
tensor by its offset there, reading the bf16 / f16 / f32 scales from their raw bits. The copies go on a
stream of their own and the kernels wait for them through an event, so kernels already queued (the shared
expert) overlap them; a call returns once its copies are done, as the store may then reuse the host buffers.

VRAM tier: :class:`ExpertStaging` can keep up to a byte budget of streamed experts in GPU memory by (layer,
expert) key, evicted by a flashmoe/runtime/eviction.py policy; an expert already there need not be read or
copied again (``--gpu-memory``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import ml_dtypes
import numpy as np
from numba import cuda

from flashmoe.arch.tensors import EXPERT_PROJS
from flashmoe.backends import cuda_kernels as K
from flashmoe.backends.base import BackendError, Expert
from flashmoe.backends.cuda_arrays import CAPTURE, cdiv, new_event, upload
from flashmoe.format.manifest import MXFP4
from flashmoe.format.mxfp4 import Mxfp4Tensor
from flashmoe.format.quant import FORMAT_GROUP_SIZES, QuantizedTensor
from flashmoe.runtime.eviction import make_policy

if not K.SIMULATOR:
    from numba.cuda.cudadrv import driver as _driver

# Expert staging slots start on this boundary (bytes).
_STAGE_ALIGN = 256
# Expert ids chosen on the GPU kept before they are copied back (~170 tokens of 48 layers at k = 8).
_ROUTED_RING = 1 << 16


def _scale_format(dtype: np.dtype, name: str) -> int:
    if dtype == np.float32:
        return K.F32
    if dtype == np.float16:
        return K.F16
    if dtype == ml_dtypes.bfloat16:
        return K.BF16
    raise BackendError(f"{name}: scales/biases must be float32, float16 or bfloat16, got {dtype}")


# -- weights ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DeviceQuantized:
    """A quantised matrix in GPU memory, MLX layout, as the kernels address it.

    b32 / b16: the same device buffer viewed as uint32 / uint16; the words ``[out, in * bits / 32]`` start at
    b32[w_off]; scales and biases ``[out, in / group_size]`` at s_off / b_off, counted in b32 elements for
    float32 scales (fmt F32) and in b16 elements for float16 / bfloat16.

    bits MXFP4 (gpt-oss's experts as published, backends/cuda_mxfp4.py): the blocks ``[out, in / 2]`` from
    word w_off, the E8M0 scales ``[out, in / 32]`` from *byte* s_off, and the projection's bias ``[out]`` at
    b_off in format fmt (-1: none); group_size 32."""

    b32: Any
    b16: Any
    w_off: int
    s_off: int
    b_off: int
    out_features: int
    in_features: int
    bits: int | str
    group_size: int
    fmt: int

    @property
    def n_units(self) -> int:
        """32-code units per row."""
        return self.in_features // 32


def _raw_bytes(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a).reshape(-1).view(np.uint8)


def scale_offset(byte_offset: int, fmt: int) -> int:
    return byte_offset // (4 if fmt == K.F32 else 2)


def upload_quantized(t: QuantizedTensor, name: str) -> DeviceQuantized:
    """Words, scales and biases of a 2-D QuantizedTensor into one device buffer, each 4-byte aligned."""
    if t.weight.ndim != 2 or t.scales.shape != t.biases.shape or t.scales.shape[0] != t.weight.shape[0]:
        raise BackendError(f"{name}: expected weight [out, in*bits/32] with scales/biases [out, in/group_size], "
                           f"got weight {t.weight.shape}, scales {t.scales.shape}, biases {t.biases.shape}")
    out_f, in_f = t.shape
    if t.weight.shape[1] * 32 != in_f * t.bits or in_f % max(t.group_size, 32) \
            or t.group_size not in FORMAT_GROUP_SIZES:
        raise BackendError(f"{name}: weight {t.weight.shape} does not hold {t.bits}-bit values for scales "
                           f"{t.scales.shape} with group_size {t.group_size}")
    fmt = _scale_format(t.scales.dtype, name)
    buf, offsets = _upload([np.asarray(t.weight, np.uint32), t.scales, t.biases])
    return DeviceQuantized(buf.view(np.uint32), buf.view(np.uint16), 0, scale_offset(offsets[1], fmt),
                           scale_offset(offsets[2], fmt), out_f, in_f, int(t.bits), int(t.group_size), fmt)


def upload_mxfp4(t: Mxfp4Tensor, name: str) -> DeviceQuantized:
    """Blocks and scales of a 2-D Mxfp4Tensor into one device buffer (bits MXFP4, no bias: b_off -1)."""
    if t.blocks.ndim != 2:
        raise BackendError(f"{name}: expected a 2-D MXFP4 weight, got blocks {t.blocks.shape}")
    buf, offsets = _upload([t.blocks, t.scales])
    return DeviceQuantized(buf.view(np.uint32), buf.view(np.uint16), 0, offsets[1], -1, *t.shape, MXFP4, 32, K.F32)


def _upload(arrays: list[np.ndarray]) -> tuple[Any, list[int]]:
    """(one device byte buffer holding `arrays`' bytes each from a multiple of 4, their byte offsets)."""
    parts = [_raw_bytes(a) for a in arrays]
    offsets, pos = [], 0
    for p in parts:
        offsets.append(pos)
        pos += cdiv(p.nbytes, 4) * 4
    host = np.zeros(pos, np.uint8)
    for p, off in zip(parts, offsets):
        host[off:off + p.nbytes] = p
    return cuda.to_device(host), offsets


@dataclass(frozen=True)
class _ExpertLayout:
    """Where an expert's tensors lie in its byte span (every streamed expert of a model alike):
    ``tensors[name] = ((words, scales, biases) byte offsets, out, in, bits, group_size, scale format)``; an
    MXFP4 projection has bits MXFP4, (blocks, scales, bias) offsets and its bias's format."""

    tensors: tuple
    span_bytes: int

    @property
    def stride(self) -> int:
        """Bytes between experts in device memory."""
        return cdiv(self.span_bytes, _STAGE_ALIGN) * _STAGE_ALIGN

    def parts(self, b32: Any, b16: Any) -> dict[str, DeviceQuantized]:
        """The projections of the expert at the start of the buffer viewed as b32 / b16."""
        out = {}
        for name, ((w_at, s_at, b_at), out_f, in_f, bits, group_size, fmt) in zip(EXPERT_PROJS, self.tensors):
            out[name] = DeviceQuantized(b32, b16, w_at // 4, s_at if bits == MXFP4 else scale_offset(s_at, fmt),
                                        scale_offset(b_at, fmt), out_f, in_f, bits, group_size, fmt)
        return out


def _expert_layout(expert: Expert, arrays: list[np.ndarray], offsets: tuple[int, ...]) -> _ExpertLayout | None:
    """The layout of one quantised expert whose nine arrays lie at byte `offsets` from the start of its span;
    None when the kernels cannot address it in place (misaligned tensor, rows not whole 32-code units,
    gate and up quantised apart)."""
    tensors, end = [], 0
    for j, name in enumerate(EXPERT_PROJS):
        t = expert[name]
        mxfp4 = isinstance(t, Mxfp4Tensor)
        fmt = _scale_format(arrays[3 * j + 2].dtype, f"expert {name}")  # the biases, or MXFP4's bias
        at = offsets[3 * j:3 * j + 3]
        align = 4 if fmt == K.F32 else 2
        if at[0] % 4 or (at[1] % align and not mxfp4) or at[2] % align or t.shape[1] % 32 \
                or (not mxfp4 and t.group_size not in FORMAT_GROUP_SIZES):
            return None
        tensors.append((at, *t.shape, *((MXFP4, 32) if mxfp4 else (int(t.bits), int(t.group_size))), fmt))
        end = max([end] + [o + a.nbytes for o, a in zip(at, arrays[3 * j:3 * j + 3])])
    if tensors[0][1:] != tensors[1][1:]:
        return None
    return _ExpertLayout(tuple(tensors), end)


@dataclass(frozen=True)
class StagedExperts:
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
        self.evictions = 0  # slot tables and captured graphs are good until the next one
        self.per_layer: dict[int, int] = {}  # layer -> experts of it held (keys (layer, expert))
        self.tables: dict[int, StagedExperts] = {}  # layer -> all its experts, slots: [E] by expert id

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
            self.evictions += 1
            self._count(victim, -1)
        slot = self.free.pop()
        self.slot_of[key] = slot
        self.policy.insert(key)
        self._count(key, 1)
        return slot, False

    def _count(self, key: Any, change: int) -> None:
        if isinstance(key, tuple) and len(key) == 2:
            self.per_layer[key[0]] = self.per_layer.get(key[0], 0) + change
            self.tables.pop(key[0], None)

    def table(self, layer: int, num_experts: int) -> StagedExperts | None:
        """Experts 0..num_experts-1 of `layer`, their slots an int64 device array indexed by expert id, when the
        cache holds every one of them (made once, until one is evicted); else None."""
        table = self.tables.get(layer)
        if table is None and self.per_layer.get(layer, 0) == num_experts:
            slots = [self.slot_of.get((layer, e)) for e in range(num_experts)]
            if None not in slots:
                table = self.tables[layer] = StagedExperts(self.layout.parts(*self.views), self.layout.stride,
                                                           cuda.to_device(np.array(slots, np.int64)), 0, False)
        return table


def _root(a: np.ndarray) -> np.ndarray:
    while isinstance(a.base, np.ndarray):
        a = a.base
    return a


def _expert_arrays(expert: Expert) -> list[np.ndarray] | None:
    """The nine arrays of a quantised expert (words, scales, biases per projection; MXFP4: blocks, scales and
    the projection's bias) or None if any projection is a float array, an MXFP4 one without a bias, or an
    affine one with a bias (gpt-oss converted with --expert-bits: the affine kernels have no bias term, so
    such experts are neither staged nor held in the VRAM tier, and base.py's composite runs them)."""
    arrays = []
    for name in EXPERT_PROJS:
        t = expert[name]
        if isinstance(t, QuantizedTensor) and expert.get(f"{name}.bias") is None:
            arrays += [t.weight, t.scales, t.biases]
        elif isinstance(t, Mxfp4Tensor) and expert.get(f"{name}.bias") is not None:
            arrays += [t.blocks, t.scales, expert[f"{name}.bias"]]
        else:
            return None
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
           *((getattr(expert[n], "bits", MXFP4), getattr(expert[n], "group_size", 32)) for n in EXPERT_PROJS))
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


def _new_copy_stream() -> Any:
    """A stream for host -> device expert copies that does not synchronise with the default stream (a
    numba stream would: every copy would wait for all queued kernels, and they for it)."""
    if K.SIMULATOR:
        return cuda.stream()
    flags = _driver.binding.CUstream_flags.CU_STREAM_NON_BLOCKING.value
    return _driver.Stream(_driver.driver.cuStreamCreate(flags))




def _host_to_device(buffer: Any, offset: int, span: np.ndarray, stream: Any) -> None:
    """Copy host bytes `span` (pinned memory: the copy is asynchronous) into the device byte buffer at
    `offset` on `stream`, without building a numba device array for the destination."""
    if K.SIMULATOR:
        buffer[offset:offset + span.nbytes].copy_to_device(span, stream=stream)
    else:
        _driver.host_to_device(buffer.gpu_data.view(offset, offset + span.nbytes), span, span.nbytes, stream=stream)



class ExpertStaging:
    """Where a call's experts are in device memory: the staging buffer (slots 0..k-1, reused every call) or,
    once :meth:`configure_cache` gave it a budget, the VRAM tier; the copy stream and its events; counters of
    host -> device expert bytes and copies."""

    def __init__(self) -> None:
        self._stage = None  # device staging buffer of streamed experts, grown on demand
        self._stage_views = None
        self.cache: _VramCache | None = None
        # The copy stream and its events, made at the first expert copy (they need the CUDA context).
        self._copy_stream = self._copied = self._slots_free = None
        #: host -> device bytes and copies of streamed experts since construction (statistics)
        self.bytes_copied = 0
        self.copies = 0
        # Experts chosen on the GPU (route_on_device) leave their ids in a device ring, copied back and counted
        # as hits (refreshing the eviction policy) before the cache is next consulted.
        self._routed = None
        self._routed_at = 0
        self._pending: list[tuple[int, int, int]] = []  # (layer, ring offset, k)

    def configure_cache(self, nbytes: int, policy: str) -> None:
        """A VRAM tier of `nbytes` evicted by `policy`; 0 turns it off. Raises FlashMoeError for an unknown
        policy (now, not at the first expert)."""
        make_policy(policy)
        self.settle()
        self.cache = _VramCache(nbytes, policy) if nbytes > 0 else None

    def holds(self, key: Any) -> bool:
        """Whether expert `key` is in the VRAM tier."""
        c = self.cache
        if self._pending:
            self.settle()
        return c is not None and c.layout is not None and key in c.slot_of

    def resident(self, layer: int, num_experts: int) -> StagedExperts | None:
        """Every expert of `layer` in the VRAM tier, staged with their slot table as ``slots`` (index the table
        by expert id: [num_experts]); None unless the tier holds all of them."""
        c = self.cache
        return None if c is None or c.layout is None else c.table(layer, num_experts)

    def route_on_device(self, layer: int, k: int) -> tuple[Any, int]:
        """Where the GPU writes the ids of the k experts of `layer` it is about to choose: (the int64 device
        ring of chosen ids, the offset in it). :meth:`settle` copies the ring back and counts them."""
        if self._routed is None:
            self._routed = cuda.device_array(_ROUTED_RING, np.int64)
        if self._routed_at + k > _ROUTED_RING:
            self.settle()
        at = self._routed_at
        self._pending.append((layer, at, k))
        self._routed_at += k
        return self._routed, at

    def settle(self) -> None:
        """Copy back the ids of the experts chosen on the GPU since the last call (waiting for them) and count
        them as hits of the VRAM tier, in order (the eviction policy sees them as if the host had routed)."""
        if self._pending:
            ids = self._routed[:self._routed_at].copy_to_host()
            c = self.cache
            for layer, at, k in self._pending:
                for e in ids[at:at + k].tolist():
                    c.hits += 1
                    c.policy.touch((layer, e))
            self._pending.clear()
        self._routed_at = 0

    def take_pending(self) -> list[tuple[int, int, int]]:
        """Remove and return the routed-id ring's entries (layer, offset, k) since the last :meth:`settle`,
        uncounted: those of a CUDA graph's capture, which computed nothing."""
        pending, self._pending, self._routed_at = self._pending, [], 0
        return pending

    def replayed(self, entries: list[tuple[int, int, int]]) -> None:
        """A replayed graph wrote the ids of `entries` (from :meth:`take_pending`) into the ring again: count
        them at the next settle."""
        self._pending.extend(entries)
        self._routed_at = max([self._routed_at] + [at + k for _, at, k in entries])

    def tier_version(self) -> tuple[int, int]:
        """Changes whenever a slot the GPU may have looked up changes (a new tier, an eviction)."""
        c = self.cache
        return (id(c), c.evictions if c is not None else 0)

    @property
    def stats(self) -> dict[str, int]:
        """The VRAM tier's hits and misses and the host -> device expert bytes and copies so far."""
        self.settle()
        c = self.cache
        return {"gpu_hits": c.hits if c else 0, "gpu_misses": c.misses if c else 0,
                "bytes_copied": self.bytes_copied, "copies": self.copies}

    def stage(self, experts: list[Expert | None], keys: list | None = None) -> StagedExperts | None:
        """Put the k experts in device memory: each given expert's byte span in one host -> device copy,
        into the VRAM tier when keys are given and it is configured (an expert already there is not copied,
        and may be given as None), else into slots 0..k-1 of the staging buffer.

        None when the fused kernels cannot address them in place: a float projection, gate and up quantised
        differently, misaligned tensors, or experts laid out differently."""
        self.settle()
        found = _spans(experts)
        if found is None:
            return None
        spans, layout = found
        slots, hits, buffer, views, layout = self.place(layout, keys, len(experts))
        copies = []
        for slot, hit, span, key in zip(slots, hits, spans, keys or [None] * len(spans)):
            if hit:
                continue
            if span is None:
                raise BackendError(f"expert {key}: not in the GPU expert cache and not given")
            copies.append((slot * layout.stride, span))
        if copies:
            self.open_copies()
            for offset, span in copies:
                self.copy(buffer, offset, span)
            self.close_copies()
        return StagedExperts(layout.parts(*views), layout.stride, upload(np.array(slots, np.int64)),
                             slots[0], bool(copies))

    def place(self, layout: _ExpertLayout | None, keys: list | None, k: int) -> tuple:
        """Slots for a call's k experts of `layout` (None: the VRAM tier's, every expert being held there):
        (slots, whether each was there, the device byte buffer and its (uint32, uint16) views, the layout).
        With `keys` and the VRAM tier configured, each key's slot there (a missing key evicts another, never
        one of this call's); else slots 0..k-1 of the staging buffer."""
        cache = self.cache if keys is not None else None
        if cache is not None:
            layout = layout or cache.layout
            if layout is None:
                raise BackendError("experts_ffn: every expert was passed as None but the GPU cache holds none")
            cache.prepare(layout, k)
            pinned = set(keys)
            slots, hits = zip(*(cache.slot(key, pinned) for key in keys))
            return slots, hits, cache.slab, cache.views, layout
        if layout is None:
            raise BackendError("experts_ffn: an expert passed as None needs keys and a GPU expert cache")
        if self._stage is None or self._stage.size < layout.stride * k:
            self._stage = cuda.device_array(layout.stride * k, np.uint8)
            self._stage_views = (self._stage.view(np.uint32), self._stage.view(np.uint16))
        return tuple(range(k)), (False,) * k, self._stage, self._stage_views, layout

    def open_copies(self) -> None:
        """Before a call's first copy: the copy stream (made at the first ever) waits for the expert kernels
        launched so far, which may read the slots about to be overwritten."""
        if self._copy_stream is None:
            self._copy_stream = _new_copy_stream()
            self._copied, self._slots_free = new_event(), new_event()
        self._slots_free.wait(self._copy_stream)  # an event never recorded does not hold the stream

    def copy(self, buffer: Any, offset: int, span: np.ndarray) -> None:
        """Queue the copy of host bytes `span` (pinned) to byte `offset` of device `buffer` on the copy
        stream (after :meth:`open_copies`)."""
        _host_to_device(buffer, offset, span, self._copy_stream)
        self.bytes_copied += span.nbytes
        self.copies += 1

    def close_copies(self) -> None:
        """After a call's last copy: the default stream, where every kernel runs, waits for the copies before
        its next kernel. Work already queued there (the shared expert) overlaps them."""
        self._copied.record(self._copy_stream)
        self._copied.wait(0)

    def wait_copies(self) -> None:
        """Block until every copy queued so far is done: the host buffers they read may then be reused."""
        if self._copied is not None:
            self._copied.synchronize()

    def as_read(self, keys: list) -> "StagingAsRead":
        """A call's experts put in device memory one by one, each copied as soon as it is given
        (:class:`StagingAsRead`)."""
        self.settle()
        return StagingAsRead(self, keys)

    def launched(self, staged: StagedExperts, wait: bool = True) -> None:
        """After the kernels reading `staged`: later copies may overwrite its slots once these kernels are
        done, and (with `wait`) the host buffers the copies read are free again once this returns (the expert
        store may reuse them for the next reads); without it the caller calls :meth:`wait_copies` before
        reusing them. Inside a CUDA graph's capture nothing is recorded: an event on the default stream would
        break the capture, and each replay finishes before the host goes on."""
        if CAPTURE.active is None:
            self._slots_free.record(0)
        if staged.copied and wait:
            self._copied.synchronize()


class StagingAsRead:
    """One call's experts (by `keys`) staged as they arrive: :meth:`put` queues each one's host -> device copy
    at once (the slots are placed at the first, whose layout every other must share), :meth:`staged` then
    gives them to the kernels as :meth:`ExpertStaging.stage` would have."""

    def __init__(self, staging: ExpertStaging, keys: list) -> None:
        self._staging, self.keys = staging, list(keys)
        self.layout: _ExpertLayout | None = None
        self.given = [False] * len(self.keys)

    def _place(self, layout: _ExpertLayout | None) -> None:
        self.slots, self.hits, self.buffer, self.views, self.layout = self._staging.place(layout, self.keys,
                                                                                          len(self.keys))

    def put(self, i: int, expert: Expert) -> bool:
        """Copy expert `i` (views into one pinned buffer) into its slot on the copy stream. False, with nothing
        placed, when the first expert given is one the kernels cannot address in place (see
        :func:`_expert_span`); raises BackendError when a later one is, or has another layout."""
        found = _expert_span(expert)
        if found is None or (self.layout is not None and found[1] != self.layout):
            if self.layout is None:
                return False
            raise BackendError(f"expert {self.keys[i]} is laid out unlike the experts given before it")
        span, layout = found
        if self.layout is None:
            self._place(layout)
            self._staging.open_copies()
        if not self.hits[i] and not self.given[i]:
            self._staging.copy(self.buffer, self.slots[i] * layout.stride, span)
        self.given[i] = True
        return True

    def staged(self) -> StagedExperts:
        """The experts for the kernels, once every one not held was given; the default stream waits for their
        copies. Raises BackendError for an expert neither held nor given."""
        if self.layout is None:  # nothing given: every expert is in the VRAM tier
            self._place(None)
        for key, hit, given in zip(self.keys, self.hits, self.given):
            if not hit and not given:
                raise BackendError(f"expert {key}: not in the GPU expert cache and not given")
        copied = any(g and not h for g, h in zip(self.given, self.hits))
        if copied:
            self._staging.close_copies()
        return StagedExperts(self.layout.parts(*self.views), self.layout.stride,
                             upload(np.array(self.slots, np.int64)), self.slots[0], copied)


def _spans(experts: list[Expert | None]) -> tuple[list, _ExpertLayout | None] | None:
    """(each expert's host byte span, or None where the expert is None; their common layout, None when every
    expert is None), or None when the fused kernels cannot address them in place."""
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
    return spans, layout
