"""Grouped-query softmax attention with a KV cache, partial rotary position embedding, q/k norms and the
Qwen3.5/Qwen3-Next output gate.

Sources: Vaswani et al. 2017 (attention), Su et al. 2021 (RoPE, in transformers' rotate-half convention),
Ainslie et al. 2023 (grouped-query attention); transformers `Qwen3MoeAttention`, `OlmoeAttention`,
`MixtralAttention`, `Qwen3_5MoeAttention`, `Qwen3NextAttention`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from flashmoe.arch.config import ModelConfig
from flashmoe.reference.ops import linear, rms_norm, sigmoid, softmax


@dataclass
class KVCache:
    """Keys and values of every position seen so far, after RoPE. k, v: (kv_heads, S, head_dim)."""

    k: np.ndarray
    v: np.ndarray

    @classmethod
    def empty(cls, cfg: ModelConfig, dtype: type = np.float32) -> "KVCache":
        shape = (cfg.num_key_value_heads, 0, cfg.head_dim)
        return cls(np.zeros(shape, dtype), np.zeros(shape, dtype))


@dataclass
class AttentionWeights:
    """One layer's attention tensors (canonical `layers.{i}.self_attn.*`); optional ones are None."""

    q_proj: np.ndarray  # (H·D, hidden), or (H·2D, hidden) with the output gate
    k_proj: np.ndarray  # (Hkv·D, hidden)
    v_proj: np.ndarray  # (Hkv·D, hidden)
    o_proj: np.ndarray  # (hidden, H·D)
    q_norm: np.ndarray | None = None  # (D,) per head, or (H·D,) OLMoE
    k_norm: np.ndarray | None = None
    biases: dict[str, np.ndarray] = field(default_factory=dict)  # q_proj/k_proj/v_proj/o_proj when attention_bias


def rope_inv_freq(rotary_dim: int, theta: float) -> np.ndarray:
    """RoPE's inverse frequencies, float64 (rotary_dim/2,): inv_freq_j = theta^(-2j / rotary_dim)
    (Su et al. 2021; transformers' `compute_default_rope_parameters`)."""
    return 1.0 / theta ** (np.arange(0, rotary_dim, 2, dtype=np.float64) / rotary_dim)


def rope_cos_sin(positions: np.ndarray, rotary_dim: int, theta: float, dtype: type) -> tuple[np.ndarray, np.ndarray]:
    """cos, sin tables (T, rotary_dim) for absolute `positions` (T,).

    angle = position * inv_freq_j (rope_inv_freq), j < rotary_dim/2; angles are duplicated to both halves
    (transformers' `rotate_half` layout). Angles are computed in float64.
    """
    angles = positions.astype(np.float64)[:, None] * rope_inv_freq(rotary_dim, theta)[None, :]  # (T, rd/2)
    angles = np.concatenate([angles, angles], axis=-1)  # (T, rd)
    return np.cos(angles).astype(dtype), np.sin(angles).astype(dtype)


def apply_rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """Rotate the first rotary_dim = cos.shape[-1] features of each head; the rest pass through
    (partial rotary: Qwen3.5/Qwen3-Next `partial_rotary_factor`).

    x: (heads, T, D); cos, sin: (T, rotary_dim). x_rot·cos + rotate_half(x_rot)·sin, where
    rotate_half([a, b]) = [-b, a] on the two halves of x_rot.
    """
    rd = cos.shape[-1]
    x_rot, x_pass = x[..., :rd], x[..., rd:]
    half = rd // 2
    rotated = np.concatenate([-x_rot[..., half:], x_rot[..., :half]], axis=-1)
    return np.concatenate([x_rot * cos + rotated * sin, x_pass], axis=-1)


def attention(x: np.ndarray, positions: np.ndarray, w: AttentionWeights, cfg: ModelConfig,
              cache: KVCache) -> np.ndarray:
    """Causal grouped-query attention of T new tokens over the cache plus themselves; appends to `cache`.

    x: (T, hidden) normed hidden states; positions: (T,) absolute positions (cache length + arange(T)).
    Returns (T, hidden). Steps (transformers Qwen3_5MoeAttention.forward and friends):
      q [, gate] = split(x·Wqᵀ) per head       (Qwen3.5/Next: each head's 2D outputs are [query, gate])
      q, k = q_norm(q), k_norm(k)              (per head: Qwen3*; over the whole projection: OLMoE)
      q, k, v clamped to ±clip_qkv             (OLMoE, when set)
      q, k = RoPE(q), RoPE(k)
      o = softmax(q·kᵀ/√D + causal mask)·v     (kv head h//(H/Hkv) serves query head h)
      o = o·σ(gate)                            (output gate, Qwen3.5/Next)
      out = o·Woᵀ
    """
    T = x.shape[0]
    H, Hkv, D = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    b = w.biases
    q = linear(x, w.q_proj, b.get("q_proj"))  # (T, H·D) or (T, H·2D)
    k = linear(x, w.k_proj, b.get("k_proj"))  # (T, Hkv·D)
    v = linear(x, w.v_proj, b.get("v_proj"))  # (T, Hkv·D)

    gate = None
    if cfg.has_attention_output_gate:
        q, gate = np.split(q.reshape(T, H, 2 * D), 2, axis=-1)  # (T, H, D) each
        gate = gate.reshape(T, H * D)
    if cfg.qk_norm == "full":
        q, k = rms_norm(q, w.q_norm, cfg.rms_norm_eps), rms_norm(k, w.k_norm, cfg.rms_norm_eps)
    if cfg.clip_qkv is not None:
        q, k, v = (np.clip(t, -cfg.clip_qkv, cfg.clip_qkv) for t in (q, k, v))
    q = q.reshape(T, H, D).transpose(1, 0, 2)  # (H, T, D)
    k = k.reshape(T, Hkv, D).transpose(1, 0, 2)  # (Hkv, T, D)
    v = v.reshape(T, Hkv, D).transpose(1, 0, 2)  # (Hkv, T, D)
    if cfg.qk_norm == "head":
        q, k = rms_norm(q, w.q_norm, cfg.rms_norm_eps), rms_norm(k, w.k_norm, cfg.rms_norm_eps)

    cos, sin = rope_cos_sin(positions, cfg.rotary_dim, cfg.rope_theta, x.dtype)  # (T, rd)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    cache.k = np.concatenate([cache.k, k], axis=1)  # (Hkv, S, D), S = all positions so far
    cache.v = np.concatenate([cache.v, v], axis=1)
    S = cache.k.shape[1]

    group = H // Hkv
    keys = np.repeat(cache.k, group, axis=0)  # (H, S, D)
    values = np.repeat(cache.v, group, axis=0)  # (H, S, D)
    scores = q @ keys.transpose(0, 2, 1) / np.sqrt(D).astype(x.dtype)  # (H, T, S)
    key_pos = np.arange(S)[None, :]
    visible = key_pos <= positions[:, None]  # (T, S) causal
    if cfg.sliding_window is not None:
        visible &= key_pos > positions[:, None] - cfg.sliding_window
    scores = np.where(visible[None], scores, -np.inf)
    o = softmax(scores) @ values  # (H, T, D)
    o = o.transpose(1, 0, 2).reshape(T, H * D)  # (T, H·D)
    if gate is not None:
        o = o * sigmoid(gate)
    return linear(o, w.o_proj, b.get("o_proj"))  # (T, hidden)
