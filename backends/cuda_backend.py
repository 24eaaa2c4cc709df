"""The CUDA backend: numba-cuda kernels (backends/cuda_kernels.py, cuda_matvec.py) on NVIDIA GPUs, activations
in device memory.

Every activation is a :class:`~flashmoe.backends.cuda_arrays.DeviceArray`, a float32 array in GPU memory; the
array glue of the Backend contract (add, multiply, reshape, split, rows, gather_rows) runs as kernels
(backends/cuda_arrays.py, which also holds the launch path and the device KV cache). Resident weights are
prepared once into GPU memory: quantised ones as their packed words with their scales and biases in their own
dtype (one buffer per weight, nothing dequantised), float ones as float32.

Streamed experts reach the GPU through :class:`~flashmoe.backends.cuda_staging.ExpertStaging` (pinned read
buffers, one copy per expert, the VRAM tier of ``--gpu-memory``); the k experts of a decode token then run in
two launches: gate+up with SwiGLU for all k experts, and down with the router-weighted sum. ``experts_ffn`` /
``expert_ffn`` take the (layer, expert) keys, and an expert already in the VRAM tier (:meth:`has_expert`) may
be passed as None, so its read can be skipped: the engine's decode step reads only the experts the GPU does
not hold; prefill stages every expert it uses.

Without a GPU, ``NUMBA_ENABLE_CUDASIM=1`` runs the same kernels in numba's CUDA simulator (slow: for the
conformance tests on tiny shapes).
"""

from __future__ import annotations

from dataclasses import replace
from functools import lru_cache
from typing import Any

import numpy as np

try:
    from numba import cuda

    from flashmoe.backends import cuda_arrays as A
    from flashmoe.backends import cuda_attention as KA
    from flashmoe.backends import cuda_fused as F
    from flashmoe.backends import cuda_kernels as K
    from flashmoe.backends import cuda_matvec as MV
    from flashmoe.backends import cuda_mxfp4
    from flashmoe.backends.cuda_arrays import DeviceArray, device_empty, empty, flat_launch, row_launch, to_device, \
        upload
    from flashmoe.backends.cuda_staging import DeviceQuantized, ExpertStaging, StagedExperts, scale_offset, \
        upload_mxfp4, upload_quantized
except ImportError as _e:  # the registry reports this through unavailable_reason
    cuda = None
    _IMPORT_ERROR: str | None = str(_e)
else:
    _IMPORT_ERROR = None

from flashmoe.arch.config import YarnRope
from flashmoe.backends.base import Backend, BackendError, ClampedSwiGLU, Expert, ExpertsAsRead, KVCacheBuffer
from flashmoe.format.manifest import MXFP4
from flashmoe.format.mxfp4 import Mxfp4Tensor
from flashmoe.format.quant import QuantizedTensor
from flashmoe.reference.rope import rope_inv_freq
from flashmoe.runtime.eviction import DEFAULT_POLICY

_PAGE = 4096


@lru_cache(maxsize=16)
def _inv_freq(theta: float, rotary_dim: int, yarn: YarnRope | None) -> Any:
    """RoPE's inverse frequencies (the reference's ``rope_inv_freq``), float64 on the device."""
    return cuda.to_device(rope_inv_freq(rotary_dim, theta, yarn))


@lru_cache(maxsize=16)
def _no_sinks(heads: int) -> DeviceArray:
    """-inf per head: attention without sink logits (made once: an upload per call would wait for the GPU)."""
    return to_device(np.full(heads, -np.inf, np.float32))


class CudaBackend(Backend):
    """numba-cuda kernels on a CUDA GPU (or numba's simulator); arrays are :class:`DeviceArray`."""

    name = "cuda"
    experts_in_place = False  # experts reach the GPU from pinned read buffers (allocate_buffer)

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
        self._experts = ExpertStaging()
        if not K.SIMULATOR:
            # Every numba call that needs the context (allocations, copies) otherwise asks the driver for the
            # current context and device again (~4 driver calls and a lock each, hundreds per token) unless an
            # enclosing scope attached it; this scope stays open for the thread that made the backend.
            from numba.cuda.cudadrv.devices import _runtime

            self._context_scope = _runtime.ensure_context()
            self._context_scope.__enter__()

    # -- arrays and weights ---------------------------------------------------------------------------------
    def asarray(self, x: Any) -> DeviceArray:
        return to_device(x)

    def to_numpy(self, x: Any) -> np.ndarray:
        if isinstance(x, DeviceArray):
            return x.to_host()
        return np.ascontiguousarray(x, dtype=np.float32)

    def prepare(self, t: Any) -> DeviceQuantized | DeviceArray:
        if isinstance(t, DeviceQuantized | DeviceArray):
            return t
        if isinstance(t, QuantizedTensor):
            return upload_quantized(t, "weight")
        if isinstance(t, Mxfp4Tensor):
            return upload_mxfp4(t, "weight")
        if isinstance(t, np.ndarray):
            return to_device(t)
        raise BackendError(f"weight: expected a float array or QuantizedTensor, got {type(t).__name__}")

    def allocate_buffer(self, nbytes: int) -> np.ndarray:
        """A page-aligned, pinned (page-locked) host buffer of nbytes for the expert store's ``allocate=``:
        experts read into it reach the GPU by DMA without the driver's bounce copy."""
        raw = cuda.pinned_array(nbytes + _PAGE, np.uint8)
        start = (-raw.ctypes.data) % _PAGE
        return raw[start:start + nbytes]

    def new_kv_cache(self, kv_heads: int, head_dim: int, values: bool = True) -> KVCacheBuffer:
        """A KV cache in GPU memory (:class:`A.DeviceKVCacheBuffer`); keys only when not ``values``."""
        return A.DeviceKVCacheBuffer(kv_heads, head_dim, values=values)

    # -- dense ops ------------------------------------------------------------------------------------------
    def linear(self, x: Any, w: Any) -> DeviceArray:
        x = to_device(x)
        w = self.prepare(w)
        in_f = w.in_features if isinstance(w, DeviceQuantized) else w.shape[1]
        if len(x.shape) != 2 or x.shape[1] != in_f:
            raise BackendError(f"linear: input {x.shape} does not match a weight taking {in_f} features")
        return self._linear(x, w)

    def _mxfp4_linear(self, x: DeviceArray, w: DeviceQuantized) -> DeviceArray:
        """x [T, in] . W^T (+ W's bias when it has one) for an MXFP4 W (bits MXFP4) in device memory."""
        out = empty((x.shape[0], w.out_features))
        row_launch(cuda_mxfp4.linear(w.fmt), w.out_features, x.shape[0], w.b32, w.b16, w.w_off, w.s_off, w.b_off,
                   w.out_features, w.n_units, x.flat, out.flat)
        return out

    def _linear(self, x: DeviceArray, w: DeviceQuantized | DeviceArray) -> DeviceArray:
        if isinstance(w, DeviceQuantized) and w.bits == MXFP4:
            return self._mxfp4_linear(x, w)
        T = x.shape[0]
        if isinstance(w, DeviceArray):
            out = empty((T, w.shape[0]))
            row_launch(K.flinear, w.shape[0], T, w.flat, w.shape[1], x.flat, out.flat)
            return out
        return self._qlinears(x, [w])[0]

    def _qlinears(self, x: DeviceArray, ws: list[DeviceQuantized]) -> list[DeviceArray]:
        """x [T, in] . W^T for up to three quantised weights of one format and input size, in one launch."""
        T, w0 = x.shape[0], ws[0]
        outs = [empty((T, w.out_features)) for w in ws]
        args = [a for w, out in zip(ws, outs) for a in (w.b32, w.b16, w.w_off, w.s_off, w.b_off, w.out_features,
                                                         out.flat)]
        args += [w0.b32, w0.b16, 0, 0, 0, 0, outs[0].flat] * (3 - len(ws))
        blocks = sum(-(-w.out_features // K.ROWS) for w in ws)
        A.launch(MV.qlinear(w0.bits, w0.group_size, w0.fmt), (blocks, T), (K.LANES, K.ROWS),
                 (*args, w0.n_units, x.flat))
        return outs

    def linears(self, x: Any, ws: list) -> list:
        """As :meth:`Backend.linears`; quantised weights of one format and input size (q, k and v; gate and
        up) in one launch per three."""
        ws = [self.prepare(w) for w in ws]
        kinds = {(w.bits, w.group_size, w.fmt, w.in_features)
                 if isinstance(w, DeviceQuantized) and w.bits != MXFP4 else None for w in ws}
        x = to_device(x)
        if None in kinds or len(kinds) > 1 or len(x.shape) != 2 or x.shape[1] != ws[0].in_features:
            return super().linears(x, ws)
        return [y for i in range(0, len(ws), 3) for y in self._qlinears(x, ws[i:i + 3])]

    def embed(self, ids: np.ndarray, w: Any) -> DeviceArray:
        ids = np.ascontiguousarray(ids, dtype=np.int64).reshape(-1)
        w = self.prepare(w)
        on_device = A.device_ids(ids)  # inside a capture: the graph's token input
        if isinstance(w, DeviceArray):
            return A.gather_rows(w, ids, on_device)
        out = empty((len(ids), w.in_features))
        flat_launch(MV.qembed(w.bits, w.group_size, w.fmt), out.size, w.b32, w.b16, w.w_off, w.s_off, w.b_off,
                    w.in_features, on_device, out.flat)
        return out

    def rms_norm(self, x: Any, weight: Any, eps: float) -> DeviceArray:
        x, weight = to_device(x), to_device(weight)
        out = empty(x.shape)
        rows = x.size // max(weight.size, 1)
        if rows:
            A.launch(K.rms_norm, rows, (K.LANES, K.norm_warps(weight.size)),
                     (x.flat, x.flat, weight.flat, np.float32(eps), K.NORM_PLAIN, x.flat, out.flat))
        return out

    def rms_norm_gated(self, x: Any, gate: Any, weight: Any, eps: float) -> DeviceArray:
        """As :meth:`Backend.rms_norm_gated`, in one launch."""
        x, gate, weight = to_device(x), to_device(gate), to_device(weight)
        if gate.size != x.size:
            return super().rms_norm_gated(x, gate, weight, eps)
        out = empty(x.shape)
        rows = x.size // max(weight.size, 1)
        if rows:
            A.launch(K.rms_norm, rows, (K.LANES, K.norm_warps(weight.size)),
                     (x.flat, gate.flat, weight.flat, np.float32(eps), K.NORM_GATE, x.flat, out.flat))
        return out

    def add_rms_norm(self, h: Any, delta: Any, weight: Any, eps: float) -> tuple[DeviceArray, DeviceArray]:
        """As :meth:`Backend.add_rms_norm`, in one launch."""
        h, delta, weight = to_device(h), to_device(delta), to_device(weight)
        if delta.shape != h.shape:
            return super().add_rms_norm(h, delta, weight, eps)
        total, out = empty(h.shape), empty(h.shape)
        rows = h.size // max(weight.size, 1)
        if rows:
            A.launch(K.rms_norm, rows, (K.LANES, K.norm_warps(weight.size)),
                     (h.flat, delta.flat, weight.flat, np.float32(eps), K.NORM_ADD, total.flat, out.flat))
        return total, out

    def rope(self, x: Any, positions: np.ndarray, theta: float, rotary_dim: int, yarn: YarnRope | None = None
             ) -> DeviceArray:
        x = to_device(x)
        _, H, D = x.shape
        out = empty(x.shape)
        flat_launch(K.rope, x.size, x.flat, H, D, rotary_dim // 2, A.device_positions(positions),
                    _inv_freq(float(theta), int(rotary_dim), yarn), out.flat)
        return out

    def qk_norm_rope(self, q: Any, k: Any, q_weight: Any, k_weight: Any, eps: float, positions: np.ndarray,
                     theta: float, rotary_dim: int, yarn: YarnRope | None = None) -> tuple[DeviceArray, DeviceArray]:
        """As :meth:`Backend.qk_norm_rope`, in one launch (heads up to KA.MAX_HEAD_DIM features)."""
        q, k, q_weight, k_weight = (to_device(a) for a in (q, k, q_weight, k_weight))
        (_, Hq, D), Hkv = q.shape, k.shape[1]
        if D > KA.MAX_HEAD_DIM:
            return super().qk_norm_rope(q, k, q_weight, k_weight, eps, positions, theta, rotary_dim, yarn)
        q_out, k_out = empty(q.shape), empty(k.shape)
        row_launch(KA.qk_norm_rope, (q.size + k.size) // D, 1, q.flat, k.flat, q_weight.flat, k_weight.flat,
                   np.float32(eps), Hq, Hkv, D, rotary_dim // 2, A.device_positions(positions),
                   _inv_freq(float(theta), int(rotary_dim), yarn), q_out.flat, k_out.flat)
        return q_out, k_out

    def attention(self, q: Any, k: Any, v: Any, q_positions: np.ndarray, scale: float, sinks: Any = None
                  ) -> DeviceArray:
        q, k, v = to_device(q), to_device(k), to_device(v)
        T, Hq, D = q.shape
        S, Hkv = k.shape[0], k.shape[1]
        pos = np.asarray(q_positions).reshape(-1)
        if pos.size and pos.max() >= S:
            raise BackendError(f"attention: query position {pos.max()} is beyond the {S} cached keys")
        scores = empty((T * Hq * S,)).flat
        out = empty(q.shape)
        sinks = _no_sinks(Hq) if sinks is None else to_device(sinks)
        if T * Hq:
            A.launch(KA.attention, T * Hq, (K.LANES, 1), (q.flat, k.flat, v.flat, A.device_positions(pos),
                                                          np.float32(scale), sinks.flat, Hq, Hkv, D, scores, out.flat))
        return out

    def causal_conv1d(self, x: Any, state: Any, weight: Any) -> tuple[DeviceArray, DeviceArray]:
        """As :meth:`Backend.causal_conv1d`, the state updated in place (returned as the new state)."""
        x, state, weight = to_device(x), to_device(state), to_device(weight)
        T, C = x.shape
        y = empty((T, C))
        flat_launch(KA.causal_conv1d, C, state.flat, x.flat, weight.flat, weight.shape[1], y.flat)
        return y, state

    def gated_delta_rule(self, q: Any, k: Any, v: Any, g: Any, beta: Any, state: Any
                         ) -> tuple[DeviceArray, DeviceArray]:
        """As :meth:`Backend.gated_delta_rule`, the state updated in place (returned as the new state)."""
        q, k, v, g, beta, state = (to_device(a) for a in (q, k, v, g, beta, state))
        return self._delta_rule(q, k, v, g, beta, g, g, state, False)

    def gated_delta_net(self, q: Any, k: Any, v: Any, b: Any, a: Any, decay_rate: Any, dt_bias: Any, state: Any
                        ) -> tuple[DeviceArray, DeviceArray]:
        """As :meth:`Backend.gated_delta_net`, in one launch (the norms of q and k, beta and the decay taken
        in the recurrence's kernel), the state updated in place."""
        q, k, v, b, a, decay_rate, dt_bias, state = (to_device(x) for x in (q, k, v, b, a, decay_rate, dt_bias,
                                                                              state))
        return self._delta_rule(q, k, v, a, b, decay_rate, dt_bias, state, True)

    def _delta_rule(self, q: DeviceArray, k: DeviceArray, v: DeviceArray, g: DeviceArray, beta: DeviceArray,
                    rate: DeviceArray, dt_bias: DeviceArray, state: DeviceArray, raw: bool
                    ) -> tuple[DeviceArray, DeviceArray]:
        """The recurrence's kernel (KA.gated_delta_rule: with raw, g and beta are a and b of gated_delta_net)."""
        T, Hk, Dk = q.shape
        H, Dv = v.shape[1], v.shape[2]
        o = empty((T, H, Dv))
        A.launch(KA.gated_delta_rule(Dk, raw), H * A.cdiv(Dv, K.LANES), (K.LANES, KA.DELTA_PARTS),
                 (q.flat, k.flat, v.flat, g.flat, beta.flat, rate.flat, dt_bias.flat, T, Hk, state.flat, state.flat,
                  o.flat))
        return o, state

    # -- array glue -----------------------------------------------------------------------------------------
    def add(self, a: Any, b: Any) -> DeviceArray:
        return A.binary(a, b, K.ADD)

    def multiply(self, a: Any, b: Any) -> DeviceArray:
        return A.binary(a, b, K.MUL)

    def reshape(self, x: Any, shape: tuple[int, ...]) -> DeviceArray:
        return A.reshape(to_device(x), shape)

    def split(self, x: Any, sizes: Any) -> list[DeviceArray]:
        return A.split(to_device(x), sizes)

    def rows(self, x: Any, start: int, stop: int) -> DeviceArray:
        return A.rows(to_device(x), start, stop)

    def gather_rows(self, x: Any, ids: list[int]) -> DeviceArray:
        return A.gather_rows(to_device(x), np.asarray(ids, np.int64))

    # -- elementwise glue -----------------------------------------------------------------------------------
    def _unary(self, x: Any, op: int) -> DeviceArray:
        x = to_device(x)
        out = empty(x.shape)
        flat_launch(K.unary(op), x.size, x.flat, out.flat)
        return out

    def sigmoid(self, x: Any) -> DeviceArray:
        return self._unary(x, K.SIGMOID)

    def silu(self, x: Any) -> DeviceArray:
        return self._unary(x, K.SILU)

    def softplus(self, x: Any) -> DeviceArray:
        return self._unary(x, K.SOFTPLUS)

    def l2_normalize(self, x: Any, eps: float = 1e-6) -> DeviceArray:
        x = to_device(x)
        n = x.shape[-1]
        out = empty(x.shape)
        row_launch(K.l2_normalize, x.size // max(n, 1), 1, x.flat, n, np.float32(eps), out.flat)
        return out

    def add_sigmoid_gated(self, a: Any, gate: Any, b: Any) -> DeviceArray:
        """As :meth:`Backend.add_sigmoid_gated`, in one launch."""
        a, gate, b = to_device(a), to_device(gate), to_device(b)
        if a.shape != b.shape or len(b.shape) != 2 or gate.shape not in ((b.shape[0], 1), b.shape):
            return super().add_sigmoid_gated(a, gate, b)
        out = empty(b.shape)
        flat_launch(K.add_sigmoid_gated, out.size, a.flat, gate.flat, b.flat, b.size // max(gate.size, 1), out.flat)
        return out

    def silu_mul(self, gate: Any, up: Any) -> DeviceArray:
        """As :meth:`Backend.silu_mul`, in one launch."""
        gate, up = to_device(gate), to_device(up)
        if gate.shape != up.shape:
            return super().silu_mul(gate, up)
        out = empty(gate.shape)
        flat_launch(K.silu_mul, out.size, gate.flat, up.flat, out.flat)
        return out

    def clamped_swiglu(self, gate: Any, up: Any, act: ClampedSwiGLU) -> DeviceArray:
        gate, up = to_device(gate), to_device(up)
        out = empty(gate.shape)
        flat_launch(K.clamped_swiglu, out.size, gate.flat, up.flat, np.float32(act.limit), np.float32(act.alpha),
                    out.flat)
        return out

    def clip(self, x: Any, limit: float) -> DeviceArray:
        x = to_device(x)
        out = empty(x.shape)
        flat_launch(K.clip, x.size, x.flat, np.float32(limit), out.flat)
        return out

    # -- experts --------------------------------------------------------------------------------------------
    def configure_expert_cache(self, nbytes: int, policy: str = DEFAULT_POLICY) -> None:
        """Keep up to `nbytes` of streamed experts in GPU memory (the VRAM tier in front of the host's), keyed
        by the ``keys`` given to :meth:`experts_ffn` / :meth:`expert_ffn` and evicted by `policy` ("lru",
        "lfu", "fifo"; flashmoe/runtime/eviction.py). 0 turns it off. Raises FlashMoeError for an unknown
        policy."""
        self._experts.configure_cache(nbytes, policy)

    def has_expert(self, key: Any) -> bool:
        """Whether expert `key` is in the GPU expert cache (its bytes need not be read or passed again)."""
        return self._experts.holds(key)

    def hold_experts(self, experts: list[Expert], keys: list) -> None:
        """Copy `experts` into the GPU expert cache (when configured) under `keys`; they count as misses."""
        if self._experts.cache is not None:
            staged = self._experts.stage(experts, keys)
            if staged is not None:
                self._experts.launched(staged)

    @property
    def launches(self) -> int:
        """Kernels and CUDA graphs the host launched so far (a replayed decode step counts one)."""
        return A.LAUNCHES[0]

    @property
    def expert_cache_stats(self) -> dict[str, int]:
        """The VRAM tier's hits and misses and the host -> device expert bytes and copies so far."""
        return dict(self._experts.stats)

    def _gate_up(self, x: DeviceArray, staged: StagedExperts) -> DeviceArray:
        """h [k * T, inter] = silu(gate_e x_t) * (up_e x_t) for every staged expert e and token t."""
        g, u = staged.parts["gate_proj"], staged.parts["up_proj"]
        T = x.shape[0]
        h = empty((staged.k * T, g.out_features))
        row_launch(MV.qgate_up(g.bits, g.group_size, g.fmt), g.out_features, staged.k * T, g.b32, g.b16,
                   g.w_off, g.s_off, g.b_off, u.w_off, u.s_off, u.b_off, staged.stride // 4,
                   scale_offset(staged.stride, g.fmt), staged.slots, g.out_features, g.n_units, T, x.flat,
                   h.flat)
        return h

    def expert_ffn(self, x: Any, expert: Expert | None, key: Any = None, act: ClampedSwiGLU | None = None
                   ) -> DeviceArray:
        """As :meth:`Backend.expert_ffn`; with `key` ((layer, expert)) and a GPU expert cache configured,
        the expert is kept there and may be passed as None once it is (:meth:`has_expert`)."""
        x = to_device(x)
        if act is not None:  # gpt-oss: biases and the clamped SwiGLU
            return self._mxfp4_expert_ffn(x, expert, key, act)
        staged = self._experts.stage([expert], None if key is None else [key])
        if staged is None:
            return super().expert_ffn(x, expert)
        d = staged.parts["down_proj"]
        at = staged.first_slot * staged.stride
        down = replace(d, w_off=d.w_off + at // 4, s_off=d.s_off + scale_offset(at, d.fmt),
                       b_off=d.b_off + scale_offset(at, d.fmt))
        y = self._linear(self._gate_up(x, staged), down)
        self._experts.launched(staged)
        return y

    def experts_ffn(self, x: Any, experts: list[Expert | None], weights: np.ndarray, keys: list | None = None,
                    act: ClampedSwiGLU | None = None) -> DeviceArray:
        """As :meth:`Backend.experts_ffn`; with `keys` (one (layer, expert) per expert) and a GPU expert cache
        configured, experts are kept there and those already there may be passed as None."""
        x = to_device(x)
        if act is not None:
            return self._mxfp4_experts_ffn(x, experts, weights, keys, act)
        staged = self._experts.stage(experts, keys)
        if staged is None:
            return super().experts_ffn(x, experts, weights)
        weights = np.ascontiguousarray(weights, dtype=np.float32).reshape(-1)
        return self._combine(x, staged, upload(weights))

    def experts_as_read(self, layout: Any, keys: list, weights: np.ndarray, act: ClampedSwiGLU | None = None
                        ) -> ExpertsAsRead | None:
        """As :meth:`Backend.experts_as_read`: each expert's host -> device copy is queued on the copy stream as
        soon as its read lands, into its VRAM tier slot (or a staging slot), so the copies run while the
        other experts are still being read; then gate+up and down as :meth:`experts_ffn`'s, and nothing waits
        for the copies until :meth:`ExpertsAsRead.wait`. None for gpt-oss's experts (act)."""
        if act is not None:
            return None
        return _ExpertsAsRead(self, layout, keys, weights)

    def _staged_mxfp4(self, experts: list[Expert | None], keys: list | None) -> StagedExperts | None:
        """The experts in device memory (staged, or in the VRAM tier) when they are MXFP4 with biases (gpt-oss
        as published); None for any other form (the composite of base.py runs them)."""
        if not all(e is None or isinstance(e["gate_proj"], Mxfp4Tensor) for e in experts):
            return None
        staged = self._experts.stage(experts, keys)
        return staged if staged is not None and staged.parts["gate_proj"].bits == MXFP4 else None

    def _mxfp4_gate_up(self, x: DeviceArray, staged: StagedExperts, act: ClampedSwiGLU) -> DeviceArray:
        """h [k * T, inter] = clamped_swiglu(gate_e x_t + b, up_e x_t + b) for every staged expert e, token t."""
        g, u = staged.parts["gate_proj"], staged.parts["up_proj"]
        T = x.shape[0]
        h = empty((staged.k * T, g.out_features))
        row_launch(cuda_mxfp4.gate_up(g.fmt), g.out_features, staged.k * T, g.b32, g.b16, g.w_off, g.s_off, g.b_off,
                   u.w_off, u.s_off, u.b_off, staged.stride, staged.slots, g.out_features, g.n_units, T,
                   np.float32(act.limit), np.float32(act.alpha), x.flat, h.flat)
        return h

    def _mxfp4_expert_ffn(self, x: DeviceArray, expert: Expert | None, key: Any, act: ClampedSwiGLU) -> DeviceArray:
        """One MXFP4 expert on the tokens x [T, hidden] from device memory, in two launches; else base.py's."""
        staged = self._staged_mxfp4([expert], None if key is None else [key])
        if staged is None:
            return super().expert_ffn(x, expert, act)
        d = staged.parts["down_proj"]
        at = staged.first_slot * staged.stride
        y = self._linear(self._mxfp4_gate_up(x, staged, act),
                               replace(d, w_off=d.w_off + at // 4, s_off=d.s_off + at,
                                       b_off=d.b_off + scale_offset(at, d.fmt)))
        self._experts.launched(staged)
        return y

    def _mxfp4_experts_ffn(self, x: DeviceArray, experts: list[Expert | None], weights: np.ndarray, keys: list | None,
                           act: ClampedSwiGLU) -> DeviceArray:
        """One token's k MXFP4 experts and their weighted sum from device memory, in two launches; else
        base.py's composite."""
        staged = self._staged_mxfp4(experts, keys)
        if staged is None:
            return super().experts_ffn(x, experts, weights, keys, act)
        h = self._mxfp4_gate_up(A.reshape(x, (1, x.size)), staged, act)
        d = staged.parts["down_proj"]
        out = empty((d.out_features,))
        row_launch(cuda_mxfp4.down_combine(d.fmt), d.out_features, 1, d.b32, d.b16, d.w_off, d.s_off, d.b_off,
                   staged.stride, staged.slots, d.out_features, d.n_units, h.flat,
                   upload(np.ascontiguousarray(weights, dtype=np.float32).reshape(-1)), out.flat)
        self._experts.launched(staged)
        return out

    def _combine(self, x: DeviceArray, staged: StagedExperts, weights: Any, wait: bool = True) -> DeviceArray:
        """sum_e weights[e] * expert_e(x) [hidden] for one token over the staged experts (weights: float32
        device array [k]), in two launches; with `wait`, once the copies staging them are done (see
        ExpertStaging.launched)."""
        x = A.reshape(x, (1, x.size))
        h = self._gate_up(x, staged)
        d = staged.parts["down_proj"]
        out = empty((d.out_features,))
        row_launch(MV.qdown_combine(d.bits, d.group_size, d.fmt), d.out_features, 1, d.b32, d.b16, d.w_off,
                   d.s_off, d.b_off, staged.stride // 4, scale_offset(staged.stride, d.fmt), staged.slots,
                   d.out_features, d.n_units, h.flat, weights, out.flat)
        self._experts.launched(staged, wait)
        return out

    def capture_decode(self, step: Any) -> Any | None:
        """As :meth:`Backend.capture_decode`: a CUDA graph (backends/cuda_graph.py); None in the simulator,
        which has no graphs. Raises cuda_arrays.CaptureError for a step with a host round trip."""
        if K.SIMULATOR:
            return None
        from flashmoe.backends.cuda_graph import capture_decode

        return capture_decode(step, self._experts)

    def routed_experts(self, x: Any, router_weight: Any, layer: int, k: int, norm_topk_prob: bool
                       ) -> DeviceArray | None:
        """As :meth:`Backend.routed_experts`: when the VRAM tier holds every expert of `layer`, the router,
        its softmax top-k and the k experts run as four launches with nothing waited for; the chosen ids reach
        the tier's statistics and eviction policy later (:meth:`ExpertStaging.settle`)."""
        w = self.prepare(router_weight)
        n_experts = w.out_features if isinstance(w, DeviceQuantized) else w.shape[0]
        everything = self._experts.resident(layer, n_experts)
        if everything is None:
            return None
        x = to_device(x)
        logits = self.linear(x, w)
        ids, at = self._experts.route_on_device(layer, k)
        slots, weights = device_empty(k, np.dtype(np.int64)), empty((k,))
        A.launch(F.softmax_topk(F.per_lane(n_experts)), 1, (K.LANES, 1),
                 (logits.flat, n_experts, k, int(norm_topk_prob), everything.slots, ids, at, slots, weights.flat))
        y = self._combine(x, replace(everything, slots=slots), weights.flat)
        return A.reshape(y, (1, y.size))


class _ExpertsAsRead(ExpertsAsRead):
    """CudaBackend.experts_as_read: each expert put is copied to the device at once (StagingAsRead); where the
    first is one the fused kernels cannot address in place, every expert is kept as host views and
    :meth:`CudaBackend.experts_ffn` (base.py's composite) runs them at :meth:`finish`."""

    def __init__(self, be: CudaBackend, layout: Any, keys: list, weights: np.ndarray) -> None:
        self.be, self.layout, self.keys = be, layout, keys
        self.weights = np.ascontiguousarray(weights, dtype=np.float32).reshape(-1)
        self.staging = be._experts.as_read(keys)
        self.views: dict[int, Expert] = {}  # i -> expert, when not staged as they come

    def put(self, i: int, buffer: np.ndarray) -> None:
        expert = self.layout.view(buffer)
        if self.views or not self.staging.put(i, expert):
            self.views[i] = expert

    def finish(self, x: Any) -> DeviceArray:
        if self.views:
            return self.be.experts_ffn(x, [self.views.get(i) for i in range(len(self.keys))], self.weights,
                                       self.keys)
        return self.be._combine(to_device(x), self.staging.staged(), upload(self.weights), wait=False)

    def wait(self) -> None:
        self.be._experts.wait_copies()
