"""The Backend interface: the arithmetic the streaming forward pass needs, and the registry of backends.

The engine (flashmoe/runtime/engine.py) owns the token loop and the linear-attention states; a backend owns the
arithmetic on its own arrays and the memory of the KV caches (:meth:`Backend.new_kv_cache`). Every
operation takes and returns float32 activations (``asarray`` / ``to_numpy`` convert at the edges). Weights are either float arrays ``[out, in]`` or
:class:`flashmoe.format.quant.QuantizedTensor` (MLX layout); resident weights go through :meth:`Backend.prepare`
once, routed experts arrive as zero-copy views into the expert store's read buffers, its cache entries or
(pagecache mode, :attr:`Backend.experts_in_place`) the expert files' read-only mapping, and are used as they are.

Each operation's definition is the NumPy reference (``flashmoe.reference``); the conformance suite
(``flashmoe.conformance``) checks every backend against it before flashmoe uses the backend.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Sequence, Union

import numpy as np

from flashmoe.arch.tensors import EXPERT_PROJS
from flashmoe.errors import FlashMoeError
from flashmoe.runtime.eviction import DEFAULT_POLICY
from flashmoe.format.quant import QuantizedTensor
from flashmoe.arch.config import YarnRope
from flashmoe.reference import ops as ref_ops
from flashmoe.reference.moe import clamped_swiglu
from flashmoe.reference.rope import rope_inv_freq
from flashmoe.runtime.expert_files import aligned_buffer

#: A weight as the engine hands it over: float ``[out, in]`` or quantised.
Weight = Union[QuantizedTensor, np.ndarray]
#: One routed expert: ``{"gate_proj": W [I, H], "up_proj": W [I, H], "down_proj": W [H, I]}``.
Expert = dict


@dataclass(frozen=True)
class ClampedSwiGLU:
    """gpt-oss's expert activation (flashmoe.reference.moe.clamped_swiglu): ``limit`` = swiglu_limit,
    ``alpha`` = swiglu_alpha. Passed as ``act`` to :meth:`Backend.expert_ffn` / :meth:`Backend.experts_ffn`;
    None there means plain SwiGLU."""

    limit: float
    alpha: float


@dataclass(frozen=True)
class AttentionBlock:
    """One layer's attention block in Qwen3's form, for :meth:`Backend.attention_block`: the q/k/v/o
    projections (prepared handles, no biases), per-head q/k RMSNorm weights ``[head_dim]``, RoPE on both,
    grouped-query causal attention with no output gate, clipping, sliding window or sinks. ``scale`` is the
    softmax scale (YaRN's attention factor folded in); ``theta``, ``rotary_dim`` and ``yarn`` as
    :meth:`Backend.rope` takes them."""

    q_proj: Any
    k_proj: Any
    v_proj: Any
    o_proj: Any
    q_norm: Any
    k_norm: Any
    heads: int
    kv_heads: int
    head_dim: int
    eps: float
    theta: float
    rotary_dim: int
    yarn: YarnRope | None
    scale: float


class BackendError(FlashMoeError):
    """An unknown or unavailable backend was requested, or a weight it cannot use was handed to it."""


class ExpertsAsRead:
    """One decode token's routed experts handed to a backend one at a time, as each one's read lands
    (:meth:`Backend.experts_as_read`), so that the backend can start on one (a GPU copies it to the device)
    while the store is still reading the others."""

    def put(self, i: int, buffer: np.ndarray) -> None:
        """Expert ``keys[i]``'s packed bytes (as :meth:`Backend.packed_experts_ffn` takes them) have landed in
        `buffer`, which stays unchanged until :meth:`wait` returns. Called once for each expert the backend
        does not hold (:meth:`Backend.has_expert`), in any order."""
        raise NotImplementedError

    def finish(self, x: Any) -> Any:
        """Once every missing expert was put: their weighted sum with the held ones, ``[hidden]``, for x
        ``[hidden]`` (as :meth:`Backend.experts_ffn`); the work may still be running on the device."""
        raise NotImplementedError

    def wait(self) -> None:
        """Block until the backend no longer reads the buffers given to :meth:`put` (the store may then reuse
        them)."""


@dataclass(frozen=True)
class PackedWeight:
    """A quantised weight ready for kernels: the packed words untouched, scales and biases as float32.

    words: uint32 ``[out, in * bits / 32]`` C-contiguous (the caller's buffer, never copied);
    scales, biases: float32 ``[out, in / group_size]``. Converting the small scales/biases once (bf16/f16
    -> f32 is exact) keeps every kernel on one dtype.
    """

    words: np.ndarray
    scales: np.ndarray
    biases: np.ndarray
    bits: int
    group_size: int

    @property
    def out_features(self) -> int:
        return self.words.shape[0]

    @property
    def in_features(self) -> int:
        return self.scales.shape[1] * self.group_size


def scales_to_f32(a: np.ndarray) -> np.ndarray:
    """bf16 / f16 / f32 array -> C-contiguous float32. bf16 widens by a 16-bit shift of its bit pattern
    (exact, and far faster than ml_dtypes' element-wise cast)."""
    if a.dtype == np.float32:
        return np.ascontiguousarray(a)
    if a.dtype.itemsize == 2 and a.dtype.name == "bfloat16":
        bits = np.ascontiguousarray(a).view(np.uint16).astype(np.uint32)
        return (bits << np.uint32(16)).view(np.float32)
    return np.ascontiguousarray(a, dtype=np.float32)


def check_quantized(t: QuantizedTensor | PackedWeight, name: str = "weight") -> None:
    """Raise BackendError naming ``name`` unless t is a 2-D quantised weight whose shapes agree with its bits:
    words ``[out, in*bits/32]``, scales and biases ``[out, in/group_size]``."""
    words = t.words if isinstance(t, PackedWeight) else t.weight
    if words.ndim != 2 or t.scales.shape != t.biases.shape or t.scales.shape[0] != words.shape[0]:
        raise BackendError(
            f"{name}: expected weight [out, in*bits/32] with scales/biases [out, in/group_size], got "
            f"weight {words.shape}, scales {t.scales.shape}, biases {t.biases.shape}"
        )
    if words.shape[1] * 32 != t.scales.shape[1] * t.group_size * t.bits:
        raise BackendError(
            f"{name}: weight {words.shape} does not hold {t.bits}-bit values for scales {t.scales.shape} "
            f"with group_size {t.group_size}"
        )


def pack_weight(t: QuantizedTensor | PackedWeight, name: str = "weight") -> PackedWeight:
    """View a 2-D QuantizedTensor as a PackedWeight (no copy of the words unless they are not contiguous).

    Raises BackendError naming ``name`` when the tensor is not 2-D or its shapes disagree with its bits.
    """
    if isinstance(t, PackedWeight):
        return t
    check_quantized(t, name)
    return PackedWeight(
        words=np.ascontiguousarray(t.weight, dtype=np.uint32),
        scales=scales_to_f32(t.scales),
        biases=scales_to_f32(t.biases),
        bits=int(t.bits),
        group_size=int(t.group_size),
    )


def weight_shape(w: Any) -> tuple[int, int]:
    """``(out, in)`` of a float array, QuantizedTensor or PackedWeight."""
    if isinstance(w, PackedWeight):
        return w.out_features, w.in_features
    return tuple(w.shape)  # QuantizedTensor.shape is the float shape


class KVCacheBuffer:
    """Keys and values of one full-attention layer: NumPy float32 ``[capacity, kv_heads, head_dim]`` each,
    grown by doubling. A backend with its own memory returns a subclass from :meth:`Backend.new_kv_cache`.

    ``values=False`` keeps keys only, for attention whose values are its keys (absorbed Multi-head Latent
    Attention caches one latent row per position and reads it as both): ``v`` is then None and ``append``
    returns the keys twice.

    ``length`` is the number of cached positions; lowering it cuts the cache back to its first ``length``
    positions (a chat session rewinding to a common prefix)."""

    def __init__(self, kv_heads: int, head_dim: int, capacity: int = 256, values: bool = True):
        self.k = np.zeros((capacity, kv_heads, head_dim), np.float32)
        self.v = np.zeros_like(self.k) if values else None
        self.length = 0

    @property
    def capacity(self) -> int:
        """Positions the cache holds before it grows."""
        return self.k.shape[0]

    def reserve(self, positions: int) -> None:
        """Room for `positions` cached positions without growing later (grows now, at least doubling)."""
        if positions > self.k.shape[0]:
            capacity = max(positions, 2 * self.k.shape[0])
            for name in ("k", "v") if self.v is not None else ("k",):
                grown = np.zeros((capacity, *self.k.shape[1:]), np.float32)
                grown[: self.length] = getattr(self, name)[: self.length]
                setattr(self, name, grown)

    def append(self, k: Any, v: Any = None) -> tuple[Any, Any]:
        """Store k, v ``[T, kv_heads, head_dim]`` (backend arrays; v None for a keys-only cache) after the
        cached ones; return all keys and values so far, ``[length, kv_heads, head_dim]`` each, as arrays the
        backend's ``attention`` takes."""
        end = self.length + k.shape[0]
        self.reserve(end)
        self.k[self.length : end] = k
        if self.v is not None:
            self.v[self.length : end] = v
        self.length = end
        return self.k[:end], (self.k if self.v is None else self.v)[:end]


class Backend(ABC):
    """The arithmetic of one forward pass. Subclasses set ``name`` and implement every abstract operation.

    Conventions: ``T`` tokens in this call, ``S`` cached positions, ``H`` heads, ``D`` head dim; every
    activation in and out is float32 (backend arrays; ``to_numpy`` gives NumPy). Weights may be prepared
    handles (from :meth:`prepare`), float arrays or QuantizedTensors.

    The engine touches a backend array only through this class's methods and its ``shape`` (a tuple of
    ints): the array glue (:meth:`add`, :meth:`multiply`, :meth:`reshape`, :meth:`split`, :meth:`rows`,
    :meth:`gather_rows`) defaults to the array type's own operators, which NumPy and MLX arrays have; a
    backend whose arrays have none (cuda) overrides it. Composite ops (:meth:`swiglu`, :meth:`expert_ffn`,
    :meth:`experts_ffn`, :meth:`rope_angles`, :meth:`add_rms_norm`, :meth:`rms_norm_gated`, :meth:`silu_mul`,
    :meth:`add_sigmoid_gated`, :meth:`gated_delta_net`, :meth:`qk_norm_rope`) are written once here from the
    primitives; a backend overrides
    them only to be faster. Optional capabilities (:meth:`allocate_buffer`, the expert cache of
    :meth:`has_expert` / :meth:`configure_expert_cache` / :attr:`expert_cache_stats`,
    :meth:`device_description`) have defaults for a backend without them.
    """

    name: ClassVar[str]
    #: The activation modes this backend computes (flashmoe.reference.q8.ACTIVATIONS); the instance's
    #: ``activations`` is the one it uses (get_backend sets it).
    activation_modes: ClassVar[tuple[str, ...]] = ("float",)
    activations: str = "float"
    #: Whether routed experts may reach this backend as read-only views of the expert files' mapping, so
    #: that pagecache mode computes the experts the page cache holds in place instead of copying them
    #: (flashmoe.runtime.store, ``in_place``). False for a backend that needs them in memory of its own
    #: (:meth:`allocate_buffer`: pinned host memory for cuda's copies to the device, MLX-owned memory).
    experts_in_place: ClassVar[bool] = True

    @classmethod
    def default_activations(cls) -> str:
        """The activation mode used when none is asked for: the measured faster one on this machine."""
        return "float"

    @classmethod
    def unavailable_reason(cls) -> str | None:
        """Why this backend cannot run on this machine (missing package, no device), or None if it can."""
        return None

    # -- arrays and weights ------------------------------------------------------------------------------
    @abstractmethod
    def asarray(self, x: Any) -> Any:
        """Any array-like -> this backend's float32 array (same shape)."""

    @abstractmethod
    def to_numpy(self, x: Any) -> np.ndarray:
        """This backend's array -> NumPy float32 array (same shape)."""

    @abstractmethod
    def prepare(self, t: Weight) -> Any:
        """A resident weight (float ``[out, in]`` / ``[vocab, hidden]``, or a 2-D QuantizedTensor) -> the
        handle every other operation accepts for it. Quantised words are kept as they are, never
        dequantised."""

    def new_kv_cache(self, kv_heads: int, head_dim: int, values: bool = True) -> KVCacheBuffer:
        """An empty KV cache of one full-attention layer, in this backend's memory (the NumPy
        :class:`KVCacheBuffer` unless the backend has its own); keys only when not ``values``."""
        return KVCacheBuffer(kv_heads, head_dim, values=values)

    # -- dense ops ---------------------------------------------------------------------------------------
    @abstractmethod
    def linear(self, x: Any, w: Any) -> Any:
        """``y = x @ W.T``: x ``[T, in]`` -> ``[T, out]`` (T = 1 in decode, the prompt length in prefill).

        W: float ``[out, in]``, QuantizedTensor (dequantised on the fly: ``scales * q + biases``) or a
        prepared handle."""

    def linears(self, x: Any, ws: list) -> list:
        """``[linear(x, w) for w in ws]``: several weights applied to one input (q/k/v, gate/up), which a
        backend may compute in one pass (one parallel region on the CPU). x ``[T, in]`` float32; each weight
        as :meth:`linear` takes it; returns one ``[T, out_w]`` array per weight."""
        return [self.linear(x, w) for w in ws]

    @abstractmethod
    def embed(self, ids: np.ndarray, w: Any) -> Any:
        """Rows ``ids`` (int ``[T]``) of an embedding ``[vocab, hidden]`` (float or quantised) -> ``[T, hidden]``."""

    @abstractmethod
    def rms_norm(self, x: Any, weight: Any, eps: float) -> Any:
        """``x / sqrt(mean(x², -1) + eps) * weight``: x ``[..., n]``, weight ``[n]``. The plain ``x * w``
        convention; conversion folds ``(1 + w)`` families into w. (Zhang & Sennrich 2019; HF Qwen3RMSNorm.)"""

    @abstractmethod
    def rope(self, x: Any, positions: np.ndarray, theta: float, rotary_dim: int, yarn: YarnRope | None = None) -> Any:
        """Rotary embedding, HF rotate-half layout, on the first ``rotary_dim`` features of each head.

        x ``[T, H, D]``, positions int ``[T]``; angle = position * inv_freq with the reference's
        ``rope_inv_freq(rotary_dim, theta, yarn)`` (see :meth:`rope_angles`; YaRN's attention factor is the
        caller's); features ``rotary_dim:`` pass through (partial rotary). -> ``[T, H, D]``.
        (Su et al. 2021; HF ``apply_rotary_pos_emb``.)"""

    @abstractmethod
    def attention(self, q: Any, k: Any, v: Any, q_positions: np.ndarray, scale: float, sinks: Any = None) -> Any:
        """Causal grouped-query softmax attention over a KV cache.

        q ``[T, Hq, D]``; k, v ``[S, Hkv, D]`` holding positions ``0 .. S-1``; q_positions int ``[T]``
        (each < S); query head h reads kv head ``h // (Hq // Hkv)``; query at position p sees keys
        ``0 .. p``. Scores ``scale * q·k``, softmax in float32. sinks: None, or float ``[Hq]`` logits that
        join each head's softmax denominator with no value (gpt-oss; reference/attention.py).
        -> ``[T, Hq, D]``."""

    @abstractmethod
    def causal_conv1d(self, x: Any, state: Any, weight: Any) -> tuple[Any, Any]:
        """Depthwise causal conv1d with SiLU, continuing from a state (GatedDeltaNet's short conv).

        x ``[T, C]``; state ``[K-1, C]``: the previous K-1 inputs (zeros at the start); weight ``[C, K]``.
        ``y[t, c] = silu(sum_j weight[c, j] * xs[t + j, c])`` with ``xs = concat(state, x)``.
        -> (y ``[T, C]``, new state = last K-1 rows of xs). The new state may be `state` itself, updated in
        place (the CUDA backend's, so that a recorded decode step finds it where it was).
        (HF Qwen3-Next ``causal_conv1d_fn``, bias-free.)"""

    @abstractmethod
    def gated_delta_rule(
        self, q: Any, k: Any, v: Any, g: Any, beta: Any, state: Any
    ) -> tuple[Any, Any]:
        """The gated delta rule recurrence (Yang et al. 2024, "Gated Delta Networks"), one token at a time.

        q, k ``[T, Hk, Dk]``: already L2-normalised, q already scaled by ``Dk ** -0.5``; v ``[T, H, Dv]``
        with H a multiple of Hk (value head h uses q/k head ``h // (H // Hk)``, as HF's repeat_interleave);
        g ``[T, H]`` log decay (≤ 0); beta ``[T, H]`` in (0, 1); state ``[H, Dk, Dv]``. Per token:
        ``S = exp(g) S;  S += k ⊗ (beta (v - Sᵀk));  o = Sᵀ q``. -> (o ``[T, H, Dv]``, new state), the new
        state possibly `state` updated in place (as :meth:`causal_conv1d`). (HF
        ``torch_recurrent_gated_delta_rule``.)"""

    # -- array glue: the only operations the engine applies to backend arrays besides the ops here ---------
    def add(self, a: Any, b: Any) -> Any:
        """``a + b`` with NumPy broadcasting; either may also be a NumPy array or a Python number."""
        return a + b

    def multiply(self, a: Any, b: Any) -> Any:
        """``a * b`` with NumPy broadcasting; either may also be a NumPy array or a Python number."""
        return a * b

    def reshape(self, x: Any, shape: tuple[int, ...]) -> Any:
        """x with the same elements in C order and a new ``shape`` of the same size."""
        return x.reshape(shape)

    def split(self, x: Any, sizes: Sequence[int]) -> list[Any]:
        """Consecutive pieces of the last axis: piece i has ``sizes[i]`` features (their sum is
        ``x.shape[-1]``), e.g. GatedDeltaNet's q, k, v out of one projection."""
        pieces, start = [], 0
        for n in sizes:
            pieces.append(x[..., start : start + n])
            start += n
        return pieces

    def rows(self, x: Any, start: int, stop: int) -> Any:
        """``x[start:stop]`` along the first axis (0 <= start <= stop <= len)."""
        return x[start:stop]

    def gather_rows(self, x: Any, ids: list[int]) -> Any:
        """Rows ``ids`` of x along the first axis, in that order -> ``[len(ids), *x.shape[1:]]``."""
        return x[ids]  # a list indexes NumPy and MLX arrays alike (MLX rejects NumPy index arrays)

    # -- elementwise glue between the ops above: the reference's NumPy functions on float32 arrays; a
    # backend with its own array type overrides them ------------------------------------------------------
    def sigmoid(self, x: Any) -> Any:
        """``1 / (1 + exp(-x))`` elementwise, overflow-free."""
        return ref_ops.sigmoid(np.asarray(x, np.float32))

    def silu(self, x: Any) -> Any:
        """``x * sigmoid(x)`` elementwise (Elfwing et al. 2017; SwiGLU's activation)."""
        return ref_ops.silu(np.asarray(x, np.float32))

    def softplus(self, x: Any) -> Any:
        """``log(1 + exp(x))`` elementwise, overflow-free."""
        return ref_ops.softplus(np.asarray(x, np.float32))

    def l2_normalize(self, x: Any, eps: float = 1e-6) -> Any:
        """``x / sqrt(sum(x², -1) + eps)`` over the last axis (HF ``l2norm``, GatedDeltaNet's q and k)."""
        return ref_ops.l2_normalize(np.asarray(x, np.float32), np.float32(eps))

    def clip(self, x: Any, limit: float) -> Any:
        """Clamp to ``[-limit, limit]`` (OLMoE's ``clip_qkv``)."""
        return np.clip(np.asarray(x, np.float32), np.float32(-limit), np.float32(limit))

    def clamped_swiglu(self, gate: Any, up: Any, act: ClampedSwiGLU) -> Any:
        """gpt-oss's ``(clip(up, ±limit) + 1) · g · σ(alpha · g)``, ``g = min(gate, limit)``, elementwise."""
        return clamped_swiglu(np.asarray(gate, np.float32), np.asarray(up, np.float32), act.limit, act.alpha)

    # -- composites: written once from the ops above; a backend overrides them only to be faster ----------
    @staticmethod
    def rope_angles(positions: np.ndarray, theta: float, rotary_dim: int, yarn: YarnRope | None = None) -> np.ndarray:
        """RoPE's angles ``position * inv_freq``: float64 ``[T, rotary_dim / 2]`` for int positions ``[T]``
        (inv_freq from the reference, ``flashmoe.reference.rope.rope_inv_freq``, YaRN's when given)."""
        return np.asarray(positions, np.float64)[:, None] * rope_inv_freq(rotary_dim, theta, yarn)[None, :]

    def swiglu(self, x: Any, gate: Any, up: Any, down: Any) -> Any:
        """``down(silu(gate x) * up x)``: x ``[n, hidden]``, gate and up ``[I, hidden]``, down ``[hidden, I]``
        -> ``[n, hidden]``. (Shazeer 2020, "GLU Variants Improve Transformer".)"""
        g, u = self.linears(x, [gate, up])
        return self.linear(self.silu_mul(g, u), down)

    def heads_linear(self, x: Any, weights: list) -> Any:
        """One linear per head: ``y[:, h] = x[:, h] @ weights[h].T``. x ``[T, H, in]``; weights: H prepared
        weights ``[out, in]`` -> ``[T, H, out]`` (MLA's absorbed up-projections, quantised per head)."""
        T, H, n = x.shape
        heads = self.split(self.reshape(x, (T, H * n)), [n] * H)  # H × [T, in]
        outs = [self.linear(xh, w) for xh, w in zip(heads, weights)]  # H × [T, out]
        return self.concat([self.reshape(y, (T, 1, y.shape[-1])) for y in outs], axis=1)

    def concat(self, arrays: list, axis: int = -1) -> Any:
        """Arrays joined along ``axis`` (shapes equal elsewhere)."""
        return self.asarray(np.concatenate([self.to_numpy(a) for a in arrays], axis=axis))

    def add_rms_norm(self, h: Any, delta: Any, weight: Any, eps: float) -> tuple[Any, Any]:
        """The residual add and the RMSNorm after it: ``(h + delta, rms_norm(h + delta, weight, eps))``, h and
        delta ``[T, hidden]``."""
        h = self.add(h, delta)
        return h, self.rms_norm(h, weight, eps)

    def rms_norm_gated(self, x: Any, gate: Any, weight: Any, eps: float) -> Any:
        """GatedDeltaNet's output norm: ``rms_norm(x, weight, eps) * silu(gate)``, x and gate ``[..., n]``,
        weight ``[n]`` (HF ``Qwen3NextRMSNormGated``)."""
        return self.multiply(self.rms_norm(x, weight, eps), self.silu(gate))

    def add_sigmoid_gated(self, a: Any, gate: Any, b: Any) -> Any:
        """``a + sigmoid(gate) * b``: a and b ``[T, n]``, gate ``[T, 1]`` or ``[T, n]`` (a gated shared
        expert joining the routed experts' sum: HF ``Qwen2MoeSparseMoeBlock``)."""
        return self.add(a, self.multiply(self.sigmoid(gate), b))

    def silu_mul(self, gate: Any, up: Any) -> Any:
        """SwiGLU's activation ``silu(gate) * up`` elementwise (a dense MLP's or shared expert's hidden)."""
        return self.multiply(self.silu(gate), up)

    def gated_delta_net(self, q: Any, k: Any, v: Any, b: Any, a: Any, decay_rate: Any, dt_bias: Any, state: Any
                        ) -> tuple[Any, Any]:
        """GatedDeltaNet's recurrence from its projections: q and k L2-normalised (:meth:`l2_normalize`, eps
        1e-6; q also scaled by ``Dk ** -0.5``), ``beta = sigmoid(b)``, the log decay
        ``g = decay_rate * softplus(a + dt_bias)``, then :meth:`gated_delta_rule`. q, k ``[T, Hk, Dk]``; v
        ``[T, H, Dv]``; b, a ``[T, H]``; decay_rate (``-exp(A_log)``) and dt_bias ``[H]``; state ``[H, Dk, Dv]``.
        -> (o ``[T, H, Dv]``, new state), as :meth:`gated_delta_rule`. (HF ``Qwen3NextGatedDeltaNet.forward``.)"""
        q = self.multiply(self.l2_normalize(q), q.shape[-1] ** -0.5)
        g = self.multiply(decay_rate, self.softplus(self.add(a, dt_bias)))
        return self.gated_delta_rule(q, self.l2_normalize(k), v, g, self.sigmoid(b), state)

    def qk_norm_rope(self, q: Any, k: Any, q_weight: Any, k_weight: Any, eps: float, positions: np.ndarray,
                     theta: float, rotary_dim: int, yarn: YarnRope | None = None) -> tuple[Any, Any]:
        """Per-head RMSNorm of the queries and keys, then RoPE on both: ``(rope(rms_norm(q, q_weight)),
        rope(rms_norm(k, k_weight)))`` with q ``[T, Hq, D]``, k ``[T, Hkv, D]``, weights ``[D]`` (the
        ``qk_norm == "head"`` attention of Qwen3; see :meth:`rms_norm`, :meth:`rope`)."""
        q = self.rope(self.rms_norm(q, q_weight, eps), positions, theta, rotary_dim, yarn)
        return q, self.rope(self.rms_norm(k, k_weight, eps), positions, theta, rotary_dim, yarn)

    def attention_block(self, x: Any, block: AttentionBlock, cache: KVCacheBuffer, positions: np.ndarray) -> Any:
        """A layer's attention block (:class:`AttentionBlock`) on x ``[T, hidden]`` (the normed input) at
        ``positions`` int ``[T]``, appending the tokens' keys and values to ``cache`` -> ``[T, hidden]``:
        ``o_proj(attention(qk_norm_rope(q, k), cache.append(k, v)))``. Written once here from the primitives
        (:meth:`linears`, :meth:`qk_norm_rope`, :meth:`attention`, :meth:`linear`); a backend overrides it to
        run a decode token's block as one call (numba: backends/numba_attention.py)."""
        T, H, Hkv, D = x.shape[0], block.heads, block.kv_heads, block.head_dim
        q, k, v = self.linears(x, [block.q_proj, block.k_proj, block.v_proj])
        q, k = self.qk_norm_rope(self.reshape(q, (T, H, D)), self.reshape(k, (T, Hkv, D)), block.q_norm,
                                 block.k_norm, block.eps, positions, block.theta, block.rotary_dim, block.yarn)
        keys, values = cache.append(k, self.reshape(v, (T, Hkv, D)))
        out = self.attention(q, keys, values, positions, block.scale)
        return self.linear(self.reshape(out, (T, H * D)), block.o_proj)

    def expert_ffn(self, x: Any, expert: Expert, act: ClampedSwiGLU | None = None) -> Any:
        """SwiGLU of ONE expert on the ``n`` tokens routed to it: ``down(silu(gate x) * up x)``, or with
        ``act`` gpt-oss's ``down(clamped_swiglu(gate x + b_gate, up x + b_up)) + b_down``.

        x ``[n, hidden]``; expert ``{"gate_proj": [I, hidden], "up_proj": [I, hidden], "down_proj":
        [hidden, I]}`` (QuantizedTensor or Mxfp4Tensor views, or float arrays; never copied whole), and
        ``"{proj}.bias"`` float ``[out]`` where the experts have biases. -> ``[n, hidden]``.
        The weights may be views into the store's read buffers, which are reused once this returns, or into the
        expert file's read-only mapping: never written to, never kept."""
        x = self.asarray(x)
        if act is None:
            return self.swiglu(x, *(expert[p] for p in EXPERT_PROJS))
        gate, up = (self._biased(self.linear(x, expert[p]), expert.get(f"{p}.bias")) for p in ("gate_proj", "up_proj"))
        return self._biased(self.linear(self.clamped_swiglu(gate, up, act), expert["down_proj"]),
                            expert.get("down_proj.bias"))

    def _biased(self, y: Any, bias: np.ndarray | None) -> Any:
        return y if bias is None else self.add(y, self.asarray(bias))

    def experts_ffn(self, x: Any, experts: list[Expert], weights: np.ndarray, keys: list | None = None,
                    act: ClampedSwiGLU | None = None) -> Any:
        """One decode token through its k routed experts: ``sum_e weights[e] * expert_ffn(x, experts[e], act)``.

        x ``[hidden]``; experts: k dicts as in :meth:`expert_ffn`; weights float ``[k]`` (router
        probabilities after top-k and optional renormalisation). -> ``[hidden]``.
        keys: the (layer, expert) of each expert, for a backend with an expert cache of its own (see
        :meth:`has_expert`; an expert it holds arrives as None); other backends ignore them."""
        x = self.asarray(x)
        hidden = x.shape[-1]
        x = self.reshape(x, (1, hidden))
        out = None
        for e, w in zip(experts, np.asarray(weights, np.float32)):
            y = self.multiply(self.expert_ffn(x, e, act=act), float(w))
            out = y if out is None else self.add(out, y)
        return self.reshape(out, (hidden,))

    def packed_experts_ffn(self, x: Any, buffers: list, layout: Any, weights: np.ndarray, keys: list | None = None,
                           act: ClampedSwiGLU | None = None) -> Any:
        """:meth:`experts_ffn` of experts given as their packed bytes, as the store hands them over: buffers,
        k read-only np.uint8 arrays of at least ``layout.nbytes`` (read buffers, cache entries or the expert
        file's mapping; None for an expert this backend holds, see :meth:`has_expert`), each laid out by
        ``layout`` (flashmoe.format.manifest.ExpertLayout). The default takes the layout's views of each; a
        backend whose kernels take addresses overrides it to skip building them."""
        return self.experts_ffn(x, [None if b is None else layout.view(b) for b in buffers], weights, keys, act)

    def packed_experts_prefill(self, x: Any, buffers: list, layout: Any, tokens: list, weights: list, y: np.ndarray,
                               act: ClampedSwiGLU | None = None) -> None:
        """A prompt's tokens through a batch of experts given as their packed bytes (as
        :meth:`packed_experts_ffn`, none of them None): ``y[tokens[j]] += weights[j][:, None] *
        expert_ffn(x[tokens[j]], expert j)`` for each expert j in turn.

        x ``[T, hidden]`` (this backend's array); tokens: per expert int64 ``[n_j]``, the distinct prompt
        positions routed to it; weights: per expert float32 ``[n_j]``, their router weights; y float32 NumPy
        ``[T, hidden]``, the layer's sum so far, added to in place. The default runs :meth:`expert_ffn` on the
        layout's views expert by expert; a backend that can take the batch at once overrides it."""
        for buf, t, w in zip(buffers, tokens, weights):
            contrib = self.to_numpy(self.expert_ffn(self.gather_rows(x, t.tolist()), layout.view(buf), act=act))
            y[t] += contrib * w[:, None]

    # -- optional capabilities: a backend that has one overrides its default ------------------------------
    def experts_as_read(self, layout: Any, keys: list, weights: np.ndarray, act: ClampedSwiGLU | None = None
                        ) -> ExpertsAsRead | None:
        """One decode token's k experts (their (layer, expert) `keys`, router `weights` float32 [k], laid out
        by `layout` as for :meth:`packed_experts_ffn`) taken one by one as their reads land: an
        :class:`ExpertsAsRead`, or None (the default) when this backend gains nothing from it; the engine then
        waits for every read and calls :meth:`packed_experts_ffn`."""
        return None

    def routed_experts(self, x: Any, router_weight: Any, layer: int, k: int, norm_topk_prob: bool) -> Any | None:
        """One decode token's routed experts without the host choosing them, or None (the default) when this
        backend cannot: ``sum_e w_e * expert_ffn(x, e)`` ``[1, hidden]`` over the experts and weights that
        ``flashmoe.reference.routing.softmax_topk`` picks from the router logits ``x @ router_weight.T``,
        when the backend holds every expert of `layer` itself (its expert cache, keys ``(layer, expert)``).
        x ``[1, hidden]``. The engine then routes on the host and passes the experts (:meth:`experts_ffn`)."""
        return None

    def capture_decode(self, step: Callable[[], Any]) -> Any | None:
        """One decode token's work recorded for replay, or None (the default) when this backend cannot record.

        `step` runs that token's forward pass on this backend and returns its logits ``[1, vocab]``; it runs once,
        on the host, with the token's side effects on the engine's state, which the caller restores, and the
        recording computes nothing. The returned object's ``replay(token, position)`` (ints) computes the step
        for another token at another position and returns the logits (a backend array); its ``valid()`` says
        whether what the recording fixed (weights, caches and expert slots in place) still holds. Raises
        BackendError when `step` does something a recording cannot repeat (a copy to the host, say)."""
        return None

    def device_description(self) -> str:
        """Where this backend computes, for ``flashmoe backends`` (e.g. "cpu", "gpu: NVIDIA H200, ...")."""
        return "cpu"

    def allocate_buffer(self, nbytes: int) -> np.ndarray:
        """A zeroed, writable, page-aligned np.uint8 ``[nbytes]`` for the expert store to read experts into.
        A backend overrides it when memory of its own kind saves a copy (pinned memory for cuda, memory
        MLX owns); the default is the store's own (:func:`flashmoe.runtime.expert_files.aligned_buffer`)."""
        return aligned_buffer(nbytes)

    def has_expert(self, key: tuple[int, int]) -> bool:
        """True when this backend already holds expert ``key`` = (layer, expert) in its own memory (a GPU
        expert cache), so the engine need not read it from the store."""
        return False

    def hold_experts(self, experts: list[Expert], keys: list) -> None:
        """Put `experts` (as for :meth:`experts_ffn`) into this backend's own expert cache under `keys`
        ((layer, expert) each) without computing anything; a backend without one ignores them."""

    def configure_expert_cache(self, nbytes: int, policy: str = DEFAULT_POLICY) -> None:
        """Size the backend's own expert cache (``--gpu-memory``). Raises BackendError for a backend
        without one."""
        raise BackendError(f"backend {self.name!r} has no expert cache of its own (--gpu-memory needs cuda)")

    @property
    def launches(self) -> int | None:
        """Kernels (and recorded steps) this process launched so far, where the backend counts them (the
        benchmarks' launches per token); None where it does not."""
        return None

    @property
    def expert_cache_stats(self) -> dict[str, int]:
        """Counters of the backend's own expert cache (hits, misses, bytes copied); empty without one."""
        return {}


_REGISTRY: dict[str, Callable[[], type[Backend]]] = {}


def register(name: str, loader: Callable[[], type[Backend]]) -> None:
    """Register a backend under ``name``; ``loader`` imports and returns its class only when first asked,
    so an optional dependency (numba, mlx) is not imported until that backend is chosen."""
    _REGISTRY[name] = loader


def _load(name: str) -> type[Backend]:
    if name not in _REGISTRY:
        raise BackendError(f"unknown backend {name!r}; choose one of {', '.join(sorted(_REGISTRY))}")
    try:
        return _REGISTRY[name]()
    except ImportError as e:
        raise BackendError(f"backend {name!r} is not available: {e}") from e


def available_backends() -> dict[str, str | None]:
    """Every registered backend name -> None when it can run here, else the reason it cannot."""
    out: dict[str, str | None] = {}
    for name in sorted(_REGISTRY):
        try:
            out[name] = _load(name).unavailable_reason()
        except BackendError as e:
            out[name] = str(e)
    return out


_INSTANCES: dict[tuple[str, str], Backend] = {}


def get_backend(name: str, activations: str | None = None) -> Backend:
    """The (shared) instance of backend ``name`` computing with ``activations`` ('float' or 'q8'; None: the
    backend's default, :meth:`Backend.default_activations`). Raises BackendError if the backend is unknown or
    unavailable here, or does not compute that activation mode.

    This does not run the conformance gate; ``flashmoe.conformance.runner.ensure_conformant`` does."""
    cls = _load(name)
    mode = cls.default_activations() if activations is None else activations
    if (name, mode) not in _INSTANCES:
        reason = cls.unavailable_reason()
        if reason is not None:
            raise BackendError(f"backend {name!r} is not available: {reason}")
        if mode not in cls.activation_modes:
            raise BackendError(f"--activations {mode}: backend {name!r} computes {' or '.join(cls.activation_modes)} "
                               "activations")
        instance = cls()
        instance.activations = mode
        _INSTANCES[(name, mode)] = instance
    return _INSTANCES[(name, mode)]
