"""Multi-head Latent Attention (MLA) of DeepSeek-V2/V3 and Kimi K2, with YaRN RoPE.

Sources: DeepSeek-AI, "DeepSeek-V2: A Strong, Economical, and Efficient Mixture-of-Experts Language Model"
(2024), §2.1 (eqs. 9–19: the low-rank key-value joint compression and the decoupled RoPE key); "DeepSeek-V3
Technical Report" (2024), §2.1.1; Peng et al. 2023, "YaRN: Efficient Context Window Extension of Large
Language Models" (eqs. 17–22); transformers `DeepseekV3Attention`, `_compute_yarn_parameters`,
`yarn_apply_mscale`.

Every token is compressed into one latent c_kv (kv_lora_rank) plus one RoPE key k_rope (qk_rope_head_dim) shared
by all heads; this cache is all that a sequence keeps. This reference expands the latent into per-head keys and
values at every call (the form of the papers' equations); the engine folds the up-projections into the query and
output sides instead (the "absorbed" form) and the conformance suite checks that the two agree. The up-projection
kv_b_proj is held as its two per-head halves, embed_q = W_UKᵀ (H, kv_lora, qk_nope) and unembed_out = W_UV
(H, v_head, kv_lora) (mlx-lm's names and layout; flashmoe.arch.families splits it at conversion).

The checkpoints' RoPE pairs dimensions (x0, x1), (x2, x3), … (`rope_interleave`); conversion permutes those
rows of q_b_proj / q_proj and kv_a_proj_with_mqa into transformers' rotate-half order (flashmoe.arch.families),
so the rotation here is the one of reference/attention.py. q·k is unchanged by the permutation.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from flashmoe.arch.config import ModelConfig
from flashmoe.reference.rope import apply_rope, rope_attention_factor, rope_cos_sin, rope_inv_freq, yarn_get_mscale
from flashmoe.reference.ops import linear, rms_norm, softmax


@dataclass
class LatentKVCache:
    """What MLA keeps per position: c_kv (S, kv_lora_rank), the normalised latent, and k_rope
    (S, qk_rope_head_dim), the RoPE key after rotation."""

    c_kv: np.ndarray
    k_rope: np.ndarray

    @classmethod
    def empty(cls, cfg: ModelConfig, dtype: type = np.float32) -> "LatentKVCache":
        return cls(np.zeros((0, cfg.kv_lora_rank), dtype), np.zeros((0, cfg.qk_rope_head_dim), dtype))


@dataclass
class MLAWeights:
    """One layer's MLA tensors (canonical `layers.{i}.self_attn.*`, transformers' names)."""

    kv_a_proj_with_mqa: np.ndarray  # (kv_lora_rank + rope, hidden)
    kv_a_layernorm: np.ndarray  # (kv_lora_rank,)
    embed_q: np.ndarray  # (H, kv_lora_rank, nope): W_UKᵀ per head
    unembed_out: np.ndarray  # (H, v, kv_lora_rank): W_UV per head
    o_proj: np.ndarray  # (hidden, H·v)
    q_proj: np.ndarray | None = None  # (H·(nope + rope), hidden) when q_lora_rank is null
    q_a_proj: np.ndarray | None = None  # (q_lora_rank, hidden)
    q_a_layernorm: np.ndarray | None = None  # (q_lora_rank,)
    q_b_proj: np.ndarray | None = None  # (H·(nope + rope), q_lora_rank)
    biases: dict[str, np.ndarray] = field(default_factory=dict)  # cfg.attention_bias_projs


# ---- RoPE with YaRN (reference/rope.py) ------------------------------------------------------------

def mla_rope_cos_sin(cfg: ModelConfig, positions: np.ndarray, dtype: type) -> tuple[np.ndarray, np.ndarray]:
    """cos, sin (T, qk_rope_head_dim) in rotate-half layout for `positions` (T,), with YaRN when configured
    (reference/rope.py). Angles in float64."""
    inv_freq = rope_inv_freq(cfg.qk_rope_head_dim, cfg.rope_theta, cfg.rope_yarn)  # (dim/2,)
    return rope_cos_sin(positions, inv_freq, rope_attention_factor(cfg.rope_yarn), dtype)


def mla_softmax_scale(cfg: ModelConfig) -> float:
    """1/√(qk_nope + qk_rope), times mscale(factor, mscale_all_dim)² under YaRN: DeepSeek scales every
    dimension of q·k, not only the rotary ones (transformers `yarn_apply_mscale`)."""
    scale = (cfg.qk_nope_head_dim + cfg.qk_rope_head_dim) ** -0.5
    y = cfg.rope_yarn
    if y is not None and y.mscale_all_dim:
        scale *= yarn_get_mscale(y.factor, y.mscale_all_dim) ** 2
    return scale


# ---- the attention block -------------------------------------------------------------------------

def mla_query(x: np.ndarray, w: MLAWeights, cfg: ModelConfig) -> np.ndarray:
    """Per-head queries (T, H, nope + rope) before RoPE: x·W_qᵀ, or W_qb·RMSNorm(W_qa·x) (V2 eq. 12)."""
    T, b = x.shape[0], w.biases
    if w.q_proj is not None:
        q = linear(x, w.q_proj, b.get("q_proj"))
    else:
        c_q = rms_norm(linear(x, w.q_a_proj, b.get("q_a_proj")), w.q_a_layernorm, cfg.rms_norm_eps)  # (T, q_lora)
        q = linear(c_q, w.q_b_proj)
    return q.reshape(T, cfg.num_attention_heads, cfg.qk_nope_head_dim + cfg.qk_rope_head_dim)


def mla_latent(x: np.ndarray, positions: np.ndarray, w: MLAWeights, cfg: ModelConfig) -> tuple[np.ndarray, np.ndarray]:
    """What a token adds to the cache: c_kv = RMSNorm(x·W_dkvᵀ) (T, kv_lora_rank) (V2 eq. 9) and the shared
    RoPE key k_rope = RoPE(x·W_krᵀ) (T, qk_rope_head_dim) (V2 eq. 14)."""
    kv = linear(x, w.kv_a_proj_with_mqa, w.biases.get("kv_a_proj_with_mqa"))  # (T, kv_lora + rope)
    c_kv = rms_norm(kv[:, : cfg.kv_lora_rank], w.kv_a_layernorm, cfg.rms_norm_eps)
    cos, sin = mla_rope_cos_sin(cfg, positions, x.dtype)
    k_rope = apply_rope(kv[None, :, cfg.kv_lora_rank:], cos, sin)[0]  # one head shared by all
    return c_kv, k_rope


def mla_attention(x: np.ndarray, positions: np.ndarray, w: MLAWeights, cfg: ModelConfig,
                  cache: LatentKVCache) -> np.ndarray:
    """Causal MLA of T new tokens over the cache plus themselves; appends their latents to `cache`.

    x: (T, hidden) normed; positions: (T,) absolute. Returns (T, hidden). With H heads, n = qk_nope_head_dim,
    r = qk_rope_head_dim, v = v_head_dim (DeepSeek-V2 §2.1.2–2.1.3):
      [q_nope | q_rope] = query(x);  q_rope = RoPE(q_rope)           per head, (T, H, n | r)
      c_kv, k_rope = latent(x)                                        cached: (S, kv_lora_rank), (S, r)
      k_nope = c_kv·W_UKᵀ, v = c_kv·W_UVᵀ                             per head, (H, S, n), (H, S, v)
      score = (q_nope·k_nope + q_rope·k_rope) · softmax_scale + causal mask
      out = (softmax(score)·v)·W_oᵀ
    """
    T, H = x.shape[0], cfg.num_attention_heads
    n, v_dim = cfg.qk_nope_head_dim, cfg.v_head_dim
    q = mla_query(x, w, cfg).transpose(1, 0, 2)  # (H, T, n + r)
    cos, sin = mla_rope_cos_sin(cfg, positions, x.dtype)
    q_nope, q_rope = q[..., :n], apply_rope(q[..., n:], cos, sin)  # (H, T, n), (H, T, r)

    c_kv, k_rope = mla_latent(x, positions, w, cfg)
    cache.c_kv = np.concatenate([cache.c_kv, c_kv])  # (S, kv_lora_rank)
    cache.k_rope = np.concatenate([cache.k_rope, k_rope])  # (S, r)
    S = cache.c_kv.shape[0]

    k_nope = cache.c_kv[None] @ w.embed_q  # (H, S, n)
    values = cache.c_kv[None] @ w.unembed_out.transpose(0, 2, 1)  # (H, S, v)
    scores = q_nope @ k_nope.transpose(0, 2, 1) + q_rope @ cache.k_rope.T[None]  # (H, T, S)
    scores = scores * np.asarray(mla_softmax_scale(cfg), x.dtype)
    visible = np.arange(S)[None, :] <= positions[:, None]  # (T, S) causal
    o = softmax(np.where(visible[None], scores, -np.inf)) @ values  # (H, T, v)
    o = o.transpose(1, 0, 2).reshape(T, H * v_dim)
    return linear(o, w.o_proj, w.biases.get("o_proj"))  # (T, hidden)
