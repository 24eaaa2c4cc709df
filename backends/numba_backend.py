"""The numba CPU backend: dequantising kernels that read the packed uint32 words directly.

The quantised mat-vec (decode) never materialises a dequantised weight. It uses the bias factoring of an
affine-quantised dot product (docs/design.md, "Speed"): for one output row,

    y = sum_g scale_g * (q_g . x_g) + bias_g * sum(x_g)

so only the integer codes q meet x, and the group sums of x are computed once per input vector. The input is
first permuted to match the packing: a *unit* is one uint32 word when ``bits`` divides 32 (2/4/8 bits: 16/8/4
codes per word), or a 32-code block of ``bits`` words otherwise (3/5/6 bits pack codes across words, MLX
layout). ``xp[j, u] = x[u * codes_per_unit + j]``, so for each code position j the loop over units is
contiguous and LLVM vectorises it across words (shift, mask, int->float, fused multiply-add).
Per row: pass 1 writes one partial dot per unit into a small scratch (L1); pass 2 folds units into groups
with their scale and bias. The mat-mat (prefill) dequantises one block of rows at a time into a per-thread
tile in the same permuted layout and reuses it for every token. Scales and biases are read where they lie:
bfloat16 ones through a uint16 view, widened in the kernel (float16 ones are converted per call, float32
ones used as they are). The fused k-expert kernels receive the experts' arrays as an address table, so one
compiled kernel serves every k.

fastmath: kernels use only ``contract`` (fused multiply-add) and ``reassoc`` (reordering float sums so
reductions vectorise), which change results only by float32 rounding; NaN and inf propagate and exp/division
are exact libm/IEEE.

Threads: a call of at least ``PARALLEL_MIN_WORK`` multiply-adds runs on numba's pool (one thread per core;
``NUMBA_NUM_THREADS`` overrides), a smaller one on the calling thread alone (the same compiled kernel under
``numba.set_num_threads(1)``), since a parallel region's start-up outweighs splitting a small call. On a
machine busy with other work, ``NUMBA_NUM_THREADS=1`` avoids waiting for descheduled workers. The pool's idle
workers sleep instead of spinning (``OMP_WAIT_POLICY=PASSIVE``, set on import unless the environment sets
it): numba's OpenMP layer (GNU libgomp) otherwise spins each worker for milliseconds after every region,
which took the cores the store's reader threads and the Python thread need between regions (decode at 16
threads on 16 cores: 38 tok/s spinning, 70 passive; docs/benchmarks.md, "Every core"). A bounded spin
(``GOMP_SPINCOUNT=10000`` in the environment: tens of microseconds, the gaps between a layer's regions) was
faster at 16 threads on warm experts; it is not the default while its effect on cold reads (the store's
reader threads against spinning workers) is unmeasured (docs/benchmarks.md, "sixth pass"). A decode layer has
few regions: q/k/v and o_proj within one attention block call (numba_attention), one for all k experts'
gate/up and one for their down projections and weighted sum. Measurements, and the variants that lost:
docs/benchmarks.md, "numba kernels".
"""

from __future__ import annotations

import functools
import os
import weakref
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import ml_dtypes
import numpy as np

# Read by the OpenMP runtime when it loads (numba's first parallel call), so set before anything of numba
# runs; a value the user exported wins (module docstring: why passive).
if "OMP_WAIT_POLICY" not in os.environ and "GOMP_SPINCOUNT" not in os.environ:
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"

try:
    import numba
    from numba import njit, prange
    from llvmlite import ir as llvm_ir
    from numba.core import types
    from numba.extending import intrinsic, overload
except ImportError as _e:  # the registry reports this through unavailable_reason
    numba = None
    _IMPORT_ERROR = str(_e)
else:
    _IMPORT_ERROR = None

from flashmoe.arch.tensors import EXPERT_PROJS
from flashmoe.arch.config import YarnRope
from flashmoe.backends.base import (AttentionBlock, Backend, BackendError, ClampedSwiGLU, Expert, KVCacheBuffer,
                                   PackedWeight, check_quantized)
from flashmoe.backends import numba_attention, numba_experts, numba_norms, numba_prefill, numba_q8
from flashmoe.backends.numba_float import kernels
from flashmoe.backends.numba_cache import cached_njit
from flashmoe.backends.numba_packed import FASTMATH, SCALE_KINDS, codes_per_unit, permute_input, stacked_biases
from flashmoe.format.mxfp4 import BLOCK as MXFP4_BLOCK, Mxfp4Tensor
from flashmoe.format.quant import QuantizedTensor
from flashmoe.reference.q8 import ACTIVATIONS, q8_block, uses_q8

_BF16 = np.dtype(ml_dtypes.bfloat16)

# Up to this many tokens, unpacking the codes once per token (mat-vec) beats dequantising rows once into a
# tile and then taking float dot products (mat-mat); measured crossover 2-4 tokens (docs/benchmarks.md).
_MATVEC_TOKENS = 3
# Multiply-adds (or comparable inner-loop steps) per kernel call below which the call runs on one thread:
# a parallel region's start-up (waking the pool's workers, ~20-50 us on an idle core and milliseconds on a
# busy machine) outweighs halving such a call. Measured crossover: docs/benchmarks.md, numba experiments.
PARALLEL_MIN_WORK = 1 << 21
# Plans of q8 calls kept per backend (NumbaBackend._q8_plan): a model's resident linears are a few hundred
_MAX_PLANS = 4096


if numba is not None:

    @cached_njit(fastmath=FASTMATH)
    def _causal_conv1d(xs, weight, y):
        T, C = y.shape
        K = weight.shape[1]
        for t in range(T):
            for c in range(C):
                acc = np.float32(0.0)
                for j in range(K):
                    acc += weight[c, j] * xs[t + j, c]
                y[t, c] = acc / (np.float32(1.0) + np.exp(-acc))

    @cached_njit(parallel=True, fastmath=FASTMATH)
    def _gated_delta_rule(q, k, v, g, beta, state, o):
        T, H, Dv = v.shape
        Dk = q.shape[2]
        rep = H // q.shape[1]
        for h in prange(H):
            kh = h // rep
            S = state[h]
            kv = np.empty(Dv, np.float32)
            for t in range(T):
                decay = np.exp(g[t, h])
                kv[:] = 0.0
                for i in range(Dk):
                    ki = k[t, kh, i]
                    for j in range(Dv):
                        S[i, j] *= decay
                        kv[j] += S[i, j] * ki
                for j in range(Dv):
                    kv[j] = (v[t, h, j] - kv[j]) * beta[t, h]  # now the delta
                for j in range(Dv):
                    o[t, h, j] = 0.0
                for i in range(Dk):
                    ki = k[t, kh, i]
                    qi = q[t, kh, i]
                    for j in range(Dv):
                        S[i, j] += ki * kv[j]
                        o[t, h, j] += S[i, j] * qi


def _call(kernel: Any, work: int, *args: Any) -> None:
    """kernel(*args) on numba's pool, or on the calling thread alone when ``work`` (multiply-adds, or
    comparable inner-loop steps) is below PARALLEL_MIN_WORK. numba's thread count is per calling thread,
    so a server's worker thread changing it affects no other thread."""
    if work >= PARALLEL_MIN_WORK:  # first: numba.get_num_threads takes a lock (microseconds per call)
        kernel(*args)
        return
    threads = numba.get_num_threads()
    if threads == 1:
        kernel(*args)
        return
    numba.set_num_threads(1)
    try:
        kernel(*args)
    finally:
        numba.set_num_threads(threads)


def _f32(x: Any) -> np.ndarray:
    return np.ascontiguousarray(x, dtype=np.float32)


@dataclass(frozen=True)
class KernelWeight(PackedWeight):
    """A quantised weight as the kernels read it: the caller's packed words untouched, and scales/biases
    either float32 or, for bfloat16 ones, their bits as uint16 (a zero-copy view, widened inside the
    kernels), so a streamed expert is used without copying or converting anything but float16 scales. An
    MXFP4 weight is one too: its blocks' bytes as uint32 words (4-bit codes, bits 4, group_size 32), its E8M0
    scale bytes as they are (uint8) and no biases (an empty [out, 0] view)."""

    @property
    def scale(self) -> str:
        """The scale kind (numba_packed.SCALE_KINDS): 'f32', 'bf16' or 'e8m0' (MXFP4)."""
        return SCALE_KINDS[self.scales.dtype]

    @property
    def kernels(self) -> SimpleNamespace:
        return kernels(self.bits, self.scale)

    @functools.cached_property
    def addresses(self) -> tuple[int, int, int]:
        """Where its words, scales and biases start: read once per weight (a resident weight is used every
        token; an address costs a dict from ``__array_interface__``, cheaper than ``ndarray.ctypes``)."""
        return tuple(a.__array_interface__["data"][0] for a in (self.words, self.scales, self.biases))


def _readonly(a: np.ndarray) -> np.ndarray:
    """A read-only view: numba compiles separately for writable and read-only arrays, and resident weights
    are read-only (memory-mapped) while streamed experts sit in writable buffers, so every weight is handed
    to the kernels read-only and each kernel is compiled once."""
    if a.flags.writeable:
        a = a.view()
        a.flags.writeable = False
    return a


def _scales_for_kernels(a: np.ndarray) -> np.ndarray:
    if a.dtype == _BF16:  # comparing dtypes: dtype.name builds a string each call (per expert, per token)
        return np.ascontiguousarray(a).view(np.uint16)
    return np.ascontiguousarray(a, dtype=np.float32)


def _as_weight(w: Any, name: str, readonly: bool = True) -> KernelWeight | np.ndarray:
    """A float32 [out, in] array, or a KernelWeight for any quantised form (QuantizedTensor, PackedWeight,
    Mxfp4Tensor).
    readonly=False leaves the arrays as they are, for kernels that take addresses (the fused experts), where
    making three read-only views per weight would be most of the cost of this call."""
    if isinstance(w, KernelWeight):
        return w
    if isinstance(w, Mxfp4Tensor):
        if w.blocks.ndim != 2:
            raise BackendError(f"{name}: expected a 2-D MXFP4 weight, got blocks {w.blocks.shape}")
        words, scales = np.ascontiguousarray(w.blocks).view("<u4"), np.ascontiguousarray(w.scales)
        if readonly:
            words, scales = _readonly(words), _readonly(scales)
        return KernelWeight(words, scales, scales[:, :0], 4, MXFP4_BLOCK)
    if isinstance(w, (QuantizedTensor, PackedWeight)):
        check_quantized(w, name)
        words = w.words if isinstance(w, PackedWeight) else w.weight
        arrays = (np.ascontiguousarray(words, dtype=np.uint32), _scales_for_kernels(w.scales),
                  _scales_for_kernels(w.biases))
        if readonly:
            arrays = tuple(_readonly(a) for a in arrays)
        return KernelWeight(*arrays, int(w.bits), int(w.group_size))
    if isinstance(w, np.ndarray):
        return _f32(w)
    raise BackendError(f"{name}: expected a float array, QuantizedTensor or Mxfp4Tensor, got {type(w).__name__}")


class NumbaBackend(Backend):
    """numba ``@njit(parallel=True)`` kernels on NumPy float32 arrays (handles: KernelWeight / float32)."""

    name = "numba"
    activation_modes = ACTIVATIONS
    #: (key, cos, sin) of the last RoPE tables (_rope_tables)
    _last_rope: tuple | None = None

    @classmethod
    def default_activations(cls) -> str:
        """q8 where the CPU has the int8 multiply-add instructions of its row kernel (numba_q8), else float."""
        return "q8" if _IMPORT_ERROR is None and numba_q8.INT8_INSTRUCTIONS is not None else "float"

    @classmethod
    def unavailable_reason(cls) -> str | None:
        return None if _IMPORT_ERROR is None else f"numba cannot be imported: {_IMPORT_ERROR}"

    def asarray(self, x: Any) -> np.ndarray:
        return _f32(x)

    def to_numpy(self, x: Any) -> np.ndarray:
        return _f32(x)

    def prepare(self, t: Any) -> KernelWeight | np.ndarray:
        return _as_weight(t, "weight")

    def linear(self, x: Any, w: Any) -> np.ndarray:
        x = _f32(x)
        plan = self._q8_plan([w])
        if plan is not None and x.shape[1] == plan.in_features:
            return numba_q8.linears(x, plan, _call)[0]
        p = _as_weight(w, "linear weight")
        if isinstance(p, np.ndarray):
            return x @ p.T
        if x.shape[1] != p.in_features:
            raise BackendError(f"linear: input has {x.shape[1]} features, weight expects {p.in_features}")
        xp, xsum = permute_input(x, p.bits, p.group_size)
        out = np.empty((x.shape[0], p.out_features), np.float32)
        work = x.shape[0] * p.out_features * p.in_features
        if x.shape[0] <= _MATVEC_TOKENS:
            _call(p.kernels.qmatvec, work, p.words, p.scales, p.biases, xp, xsum, out)
        else:
            _call(p.kernels.qmatmat, work, p.words, p.scales, p.biases, xp, out)
        return out

    def linears(self, x: Any, ws: list) -> list[np.ndarray]:
        """One parallel region for all of ``ws`` when q8 applies to weights of one format (bits, group size,
        in_features, scale dtype: q/k/v, gate/up, an expert's gate/up in prefill); otherwise one linear each."""
        x = _f32(x)
        plan = self._q8_plan(ws)
        if plan is None or x.shape[1] != plan.in_features:
            return super().linears(x, ws)
        return numba_q8.linears(x, plan, _call)

    def _q8_plan(self, ws: list) -> numba_q8.LinearsPlan | None:
        """numba_q8's plan of one q8 call for all of ``ws`` (numba_q8.linears_plan), or None where q8 does not
        take them together (not all quantised, formats differ, float activations). Kept for prepared weights
        (KernelWeight: the engine's resident ones; a decode layer spent ~15 us a call on it), found again by
        identity: a weight freed and its id reused makes a new plan."""
        key = (self.activations, *map(id, ws))
        plans = self.__dict__.setdefault("_plans", {})
        known = plans.get(key)
        if known is not None and all(ref() is w for ref, w in zip(known[0], ws)):
            return known[1]
        # the q8 kernels take addresses: no read-only views
        quantised = (KernelWeight, QuantizedTensor, PackedWeight, Mxfp4Tensor)
        ps = [_as_weight(w, "linear weight", readonly=False) if isinstance(w, quantised) else None for w in ws]
        formats = {(p.bits, p.group_size, p.in_features, p.scale) if p is not None else None for p in ps}
        plan = None
        if len(formats) == 1 and None not in formats and self._q8(ps[0]):
            plan = numba_q8.linears_plan(ps, _addresses)
        if all(isinstance(w, KernelWeight) for w in ws):
            if len(plans) >= _MAX_PLANS:
                plans.clear()
            # no strong references: the shared backend would keep a closed model's weights alive; a plan found
            # again is used with these very weights (checked above), which the caller holds for the call
            plans[key] = ([weakref.ref(w) for w in ws], plan and plan._replace(weights=()))
        return plan

    def embed(self, ids: np.ndarray, w: Any) -> np.ndarray:
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        p = _as_weight(w, "embedding")
        if isinstance(p, np.ndarray):
            return p[ids]
        if len(ids) and not 0 <= ids.min() <= ids.max() < p.out_features:  # the kernel does not bounds-check
            raise BackendError(f"embed: token ids {ids.min()}..{ids.max()} outside 0..{p.out_features - 1}")
        cpu = codes_per_unit(p.bits)
        rows = np.empty((len(ids), cpu, p.in_features // cpu), np.float32)
        _call(p.kernels.qrows, len(ids) * p.in_features, p.words, p.scales, p.biases, ids, rows)
        return np.ascontiguousarray(rows.transpose(0, 2, 1)).reshape(len(ids), p.in_features)

    def rms_norm(self, x: Any, weight: Any, eps: float) -> np.ndarray:
        x = _f32(x)
        flat = x.reshape(-1, x.shape[-1])
        out = np.empty_like(flat)
        numba_norms.rms_norm(flat, _readonly(_f32(weight)), np.float32(eps), out)
        return out.reshape(x.shape)

    def add_rms_norm(self, h: Any, delta: Any, weight: Any, eps: float) -> tuple[np.ndarray, np.ndarray]:
        """As Backend.add_rms_norm, in one kernel call (numba_norms)."""
        h, delta = _f32(h), _f32(delta)
        if h.ndim != 2 or h.shape != delta.shape:
            return super().add_rms_norm(h, delta, weight, eps)
        total, out = np.empty_like(h), np.empty_like(h)
        numba_norms.add_rms_norm(h, delta, _readonly(_f32(weight)), np.float32(eps), total, out)
        return total, out

    def rope(self, x: Any, positions: np.ndarray, theta: float, rotary_dim: int, yarn: YarnRope | None = None
             ) -> np.ndarray:
        x = _f32(x)
        cos, sin = self._rope_tables(positions, theta, rotary_dim, yarn)
        out = x.copy()
        numba_norms.rope(x, cos, sin, out)
        return out

    def qk_norm_rope(self, q: Any, k: Any, q_weight: Any, k_weight: Any, eps: float, positions: np.ndarray,
                     theta: float, rotary_dim: int, yarn: YarnRope | None = None) -> tuple[np.ndarray, np.ndarray]:
        """As Backend.qk_norm_rope, in one kernel call with one set of angles for q and k (numba_norms)."""
        q, k = _f32(q), _f32(k)
        cos, sin = self._rope_tables(positions, theta, rotary_dim, yarn)
        q_out, k_out = np.empty_like(q), np.empty_like(k)
        numba_norms.qk_norm_rope(q, k, _readonly(_f32(q_weight)), _readonly(_f32(k_weight)), np.float32(eps), cos,
                                 sin, q_out, k_out)
        return q_out, k_out

    def _rope_tables(self, positions: np.ndarray, theta: float, rotary_dim: int, yarn: YarnRope | None
                     ) -> tuple[np.ndarray, np.ndarray]:
        """cos and sin of RoPE's angles (Backend.rope_angles), float32 [T, rotary_dim / 2] each. The last
        tables are kept: every attention layer of a forward pass asks for the same positions (a decode layer
        spent ~70 us on them; docs/benchmarks.md, "fourth pass"); the kernels only read them."""
        key = (np.asarray(positions, np.float64).tobytes(), theta, rotary_dim, yarn)  # rope_angles's input
        last = self._last_rope
        if last is not None and last[0] == key:
            return last[1], last[2]
        angles = self.rope_angles(positions, theta, rotary_dim, yarn)
        cos, sin = _f32(np.cos(angles)), _f32(np.sin(angles))
        self._last_rope = (key, cos, sin)  # one assignment: a server's other threads see old or new, whole
        return cos, sin

    def attention(self, q: Any, k: Any, v: Any, q_positions: np.ndarray, scale: float, sinks: Any = None
                  ) -> np.ndarray:
        q, k, v = _f32(q), _f32(k), _f32(v)
        sinks = _no_sinks(q.shape[1]) if sinks is None else _f32(sinks)
        q_positions = np.ascontiguousarray(q_positions, dtype=np.int64)
        first, last = (int(q_positions.min()), int(q_positions.max())) if len(q_positions) else (0, -1)
        if not (0 <= first and last < k.shape[0]):
            raise BackendError(f"attention: query positions {first}..{last} outside the {k.shape[0]} cached "
                               "keys")  # the kernel does not bounds-check
        out = np.empty_like(q)
        work = q.shape[0] * q.shape[1] * q.shape[2] * (last + 1)
        _call(numba_attention.attention, 2 * work, q, k, v, q_positions, np.float32(scale), sinks, out)
        return out

    def attention_block(self, x: Any, block: AttentionBlock, cache: KVCacheBuffer, positions: np.ndarray) -> Any:
        """As Backend.attention_block; one token with q8 activations, where q/k/v are of one format and o_proj of
        the same bits, group size and scale kind, in one kernel call (numba_attention.block_kernel)."""
        x = _f32(x)
        qkv = self._q8_plan([block.q_proj, block.k_proj, block.v_proj]) if x.shape[0] == 1 else None
        o = self._q8_plan([block.o_proj]) if qkv is not None else None
        position = int(positions[0]) if len(positions) == 1 else -1
        if (o is None or (o.bits, o.group_size, o.scale) != (qkv.bits, qkv.group_size, qkv.scale)
                or x.shape[1] != qkv.in_features or cache.v is None or not 0 <= position <= cache.length):
            return super().attention_block(x, block, cache, positions)  # (an out-of-range position raises there)
        cos, sin = self._rope_tables(positions, block.theta, block.rotary_dim, block.yarn)
        slot = cache.length
        cache.reserve(slot + 1)
        out = np.empty((1, int(o.first_row[-1])), np.float32)
        heads_work = 2 * block.heads * block.head_dim * (position + 1)
        work = int(qkv.first_row[-1]) * qkv.in_features + int(o.first_row[-1]) * o.in_features + heads_work
        _call(numba_attention.block_kernel(qkv.bits, qkv.scale, qkv.row, o.row), work, x, qkv.addr, qkv.first_row,
              o.addr, o.first_row, q8_block(qkv.group_size), qkv.group_size, _readonly(_f32(block.q_norm)),
              _readonly(_f32(block.k_norm)), np.float32(block.eps), cos[0], sin[0], cache.k, cache.v, slot,
              position + 1, np.float32(block.scale), _no_sinks(block.heads), heads_work >= PARALLEL_MIN_WORK, out)
        cache.length = slot + 1
        return out

    def causal_conv1d(self, x: Any, state: Any, weight: Any) -> tuple[np.ndarray, np.ndarray]:
        x = _f32(x)
        xs = np.concatenate([_f32(state), x], axis=0)
        y = np.empty_like(x)
        _causal_conv1d(xs, _readonly(_f32(weight)), y)
        return y, xs[x.shape[0] :].copy()

    def gated_delta_rule(
        self, q: Any, k: Any, v: Any, g: Any, beta: Any, state: Any
    ) -> tuple[np.ndarray, np.ndarray]:
        v = _f32(v)
        new_state = np.array(state, dtype=np.float32, order="C", copy=True)
        o = np.empty_like(v)
        _call(_gated_delta_rule, 4 * new_state.size * v.shape[0], _f32(q), _f32(k), v, _f32(g), _f32(beta),
              new_state, o)
        return o, new_state

    def experts_ffn(self, x: Any, experts: list[Expert], weights: np.ndarray, keys: list | None = None,
                    act: ClampedSwiGLU | None = None) -> np.ndarray:
        """As :meth:`Backend.experts_ffn`; experts of one format (numba_experts.fusable: affine or MXFP4) take
        the fused kernels (_fused_experts), with their biases and ``act``."""
        x = _f32(x).reshape(1, -1)
        weights = _f32(weights)
        packed = [{name: _as_weight(e[name], f"expert {i} {name}", readonly=False) for name in EXPERT_PROJS}
                  for i, e in enumerate(experts)]
        if not numba_experts.fusable(packed):
            return super().experts_ffn(x[0], experts, weights, keys, act)
        tables = np.stack([_addresses([e[name] for e in packed]) for name in EXPERT_PROJS])
        biases = [stacked_biases(experts, name, packed[0][name].out_features) for name in EXPERT_PROJS]
        return self._fused_experts(x, packed[0]["gate_proj"], packed[0]["down_proj"], tables, weights, biases, act)

    def packed_experts_ffn(self, x: Any, buffers: list, layout: Any, weights: np.ndarray, keys: list | None = None,
                           act: ClampedSwiGLU | None = None) -> np.ndarray:
        """As Backend.packed_experts_ffn; a layout the fused kernels take (numba_experts.layout_plan) goes
        to them as the experts' base addresses plus the layout's offsets, with no view per expert."""
        found = _layout_tables(buffers, layout)
        if found is None:
            return super().packed_experts_ffn(x, buffers, layout, weights, keys, act)
        plan, tables = found
        return self._fused_experts(_f32(x).reshape(1, -1), plan.gate_up, plan.down, tables, _f32(weights),
                                   plan.stacked_biases(buffers), act)

    def packed_experts_prefill(self, x: Any, buffers: list, layout: Any, tokens: list, weights: list, y: np.ndarray,
                               act: ClampedSwiGLU | None = None) -> None:
        """As Backend.packed_experts_prefill; with q8 activations and a layout the fused kernels take
        (numba_experts.layout_plan), x quantised once and three parallel regions per call (numba_prefill)."""
        found = _layout_tables(buffers, layout)
        if found is None or not (self._q8(found[0].gate_up) and self._q8(found[0].down)):
            return super().packed_experts_prefill(x, buffers, layout, tokens, weights, y, act)
        plan, tables = found
        numba_prefill.experts_prefill(_f32(x), plan.gate_up, plan.down, tables, plan.stacked_biases(buffers), tokens,
                                      weights, _act_array(act), y, _call)

    def _fused_experts(self, x: np.ndarray, gate_up, down, tables: np.ndarray, weights: np.ndarray, biases: list,
                       act: ClampedSwiGLU | None = None) -> np.ndarray:
        """sum_e weights[e] * (down_e(gated(gate_e x + b, up_e x + b)) + b) float32 [hidden] for one token x
        float32 [1, hidden] (numba_packed.gated: SwiGLU, or with ``act`` the clamped one): one parallel region
        for the k experts' gate/up, one for their down projections and the weighted sum. gate_up, down: the
        projections' formats (numba_experts.FusedFormat or a KernelWeight); tables int64 [3, k, 3]: the gate,
        up and down address tables (words, scales, biases), their memory alive meanwhile; biases: gate's, up's
        and down's float32 [k, out] ([k, 0]: none)."""
        k = tables.shape[1]
        act = _act_array(act)
        work = k * gate_up.out_features * gate_up.in_features  # per projection: gate, up and down alike
        if self._q8(gate_up):
            h = numba_q8.experts_gate_up(x, gate_up, tables[0], tables[1], biases[0], biases[1], act, _call)
        else:
            xp, xsum = permute_input(x, gate_up.bits, gate_up.group_size)
            h = np.empty((k, gate_up.out_features), np.float32)
            _call(kernels(gate_up.bits, gate_up.scale).experts_gate_up, 2 * work, tables[0], tables[1], xp, xsum,
                  biases[0], biases[1], act, h)
        if self._q8(down):
            return numba_q8.experts_down(h, down, tables[2], biases[2], weights, _call)
        hp, hsum = permute_input(h, down.bits, down.group_size)
        out = np.empty(down.out_features, np.float32)
        _call(kernels(down.bits, down.scale).experts_down, work, tables[2], hp, hsum, biases[2], weights, out)
        return out

    def _q8(self, p) -> bool:
        """Whether weight p (a KernelWeight or numba_experts.FusedFormat) takes q8 activations (q8 mode, and
        flashmoe.reference.q8.uses_q8)."""
        return self.activations == "q8" and uses_q8(p.bits, p.group_size)


def _layout_tables(buffers: list, layout: Any) -> tuple[numba_experts.LayoutPlan, np.ndarray] | None:
    """The LayoutPlan of experts packed by `layout` and their gate, up and down address tables int64
    [3, k, 3] (the experts' base addresses plus the layout's offsets: no view per expert), or None when the
    fused kernels cannot take them by address (numba_experts.layout_plan, base_addresses) or one is held
    elsewhere (None)."""
    plan = numba_experts.layout_plan(layout) if all(b is not None for b in buffers) else None
    base = numba_experts.base_addresses(buffers, layout.nbytes) if plan is not None else None
    if base is None:
        return None
    return plan, np.ascontiguousarray((base[:, None, None] + plan.offsets[None]).transpose(1, 0, 2))


def _act_array(act: ClampedSwiGLU | None) -> np.ndarray:
    """The kernels' form of the gated activation (numba_packed.gated): float32 [0] for SwiGLU (one array, made
    once: the kernels read nothing of it), [limit, alpha]."""
    return _SWIGLU if act is None else np.array([act.limit, act.alpha], np.float32)


_SWIGLU = np.empty(0, np.float32)


@functools.lru_cache(maxsize=None)
def _no_sinks(heads: int) -> np.ndarray:
    """-inf per head: attention without sink logits (they add nothing to the softmax's denominator); one
    array per head count, made once (the kernel only reads it)."""
    return np.full(heads, -np.inf, np.float32)


def _addresses(ws: list[KernelWeight]) -> np.ndarray:
    """int64 [k, 3]: addresses of each weight's words, scales and biases. The fused kernels take addresses
    rather than a tuple of k arrays because numba compiles one specialisation per tuple length (and a
    k-way branch per access); the caller keeps the arrays alive for the call."""
    return np.array([w.addresses for w in ws], np.int64)
