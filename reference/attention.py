"""Grouped-query softmax attention with a KV cache, partial rotary position embedding (reference/rope.py),
q/k norms, the Qwen3.5/Qwen3-Next output gate, sliding windows and gpt-oss's attention sinks.

Sources: Vaswani et al. 2017 (attention), Ainslie et al. 2023 (grouped-query attention), Beltagy et al. 2020
(sliding-window attention), Xiao et al. 2024 "Efficient Streaming Language Models with Attention Sinks" (a
sink absorbs attention mass; gpt-oss learns one logit per head); transformers `Qwen3MoeAttention`,
`OlmoeAttention`, `MixtralAttention`, `Qwen3_5MoeAttention`, `Qwen3NextAttention`, `GptOssAttention` with
its `eager_attention_forward`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from flashmoe.arch.config import ModelConfig
from flashmoe.reference.ops import linear, rms_norm, sigmoid, softmax
from flashmoe.reference.rope import apply_rope, rope_attention_factor, rope_cos_sin, rope_inv_freq


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
    sinks: np.ndarray | None = None  # (H,) learned sink logit per head (gpt-oss)


def softmax_attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, visible: np.ndarray, scale: float,
                      sinks: np.ndarray | None = None) -> np.ndarray:
    """softmax(scale·q·kᵀ where visible, −∞ elsewhere)·v, grouped-query: kv head h // (H/Hkv) serves query
    head h. With sinks s (H,): each head's softmax gets one more logit s_h whose share is dropped (it has
    no value), so the weights of the keys sum to less than 1 (transformers `GptOss eager_attention_forward`).

    q: (H, T, D); k, v: (Hkv, S, D); visible: (T, S) bool. Returns (H, T, D).
    """
    H, T, _ = q.shape
    S = k.shape[1]
    group = H // k.shape[0]
    keys, values = np.repeat(k, group, axis=0), np.repeat(v, group, axis=0)  # (H, S, D)
    scores = np.where(visible[None], q @ keys.transpose(0, 2, 1) * scale, -np.inf)  # (H, T, S)
    if sinks is None:
        return softmax(scores) @ values
    sink_logits = np.broadcast_to(np.asarray(sinks, scores.dtype)[:, None, None], (H, T, 1))
    return softmax(np.concatenate([scores, sink_logits], axis=-1))[..., :S] @ values


def attention(x: np.ndarray, positions: np.ndarray, w: AttentionWeights, cfg: ModelConfig,
              cache: KVCache, window: int | None = None) -> np.ndarray:
    """Causal grouped-query attention of T new tokens over the cache plus themselves; appends to `cache`.

    x: (T, hidden) normed hidden states; positions: (T,) absolute positions (cache length + arange(T));
    window: the layer's sliding window (ModelConfig.attention_window), None for all positions.
    Returns (T, hidden). Steps (transformers Qwen3_5MoeAttention.forward and friends):
      q [, gate] = split(x·Wqᵀ) per head       (Qwen3.5/Next: each head's 2D outputs are [query, gate])
      q, k = q_norm(q), k_norm(k)              (per head: Qwen3*; over the whole projection: OLMoE)
      q, k, v clamped to ±clip_qkv             (OLMoE, when set)
      q, k = RoPE(q), RoPE(k)                  (YaRN also scales both by its attention factor)
      o = softmax(q·kᵀ/√D + mask)·v            (kv head h//(H/Hkv) serves query head h; the mask is causal,
                                                and keys older than `window` positions are hidden)
      with sinks s_h: o = softmax([q·kᵀ/√D + mask, s_h])[:-1]·v   (an extra logit per head, no value)
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

    inv_freq = rope_inv_freq(cfg.rotary_dim, cfg.rope_theta, cfg.rope_yarn)  # (rd/2,)
    cos, sin = rope_cos_sin(positions, inv_freq, rope_attention_factor(cfg.rope_yarn), x.dtype)  # (T, rd)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    cache.k = np.concatenate([cache.k, k], axis=1)  # (Hkv, S, D), S = all positions so far
    cache.v = np.concatenate([cache.v, v], axis=1)

    key_pos = np.arange(cache.k.shape[1])[None, :]
    visible = key_pos <= positions[:, None]  # (T, S) causal
    if window is not None:
        visible &= key_pos > positions[:, None] - window
    o = softmax_attention(q, cache.k, cache.v, visible, 1 / np.sqrt(D).astype(x.dtype), w.sinks)  # (H, T, D)
    o = o.transpose(1, 0, 2).reshape(T, H * D)  # (T, H·D)
    if gate is not None:
        o = o * sigmoid(gate)
    return linear(o, w.o_proj, b.get("o_proj"))  # (T, hidden)
