"""GatedDeltaNet linear attention (the `linear_attention` layers of Qwen3.5-MoE and Qwen3-Next).

Source: Yang, Kautz & Hatamizadeh, "Gated Delta Networks: Improving Mamba2 with Delta Rule" (ICLR 2025),
eq. for S_t below; matched to transformers `Qwen3_5MoeGatedDeltaNet.forward`, `causal_conv1d_update` and
`torch_recurrent_gated_delta_rule` (the per-token recurrence, the definition; chunked forms are backends').
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from flashmoe.arch.config import ModelConfig
from flashmoe.reference.ops import l2_normalize, linear, rms_norm, sigmoid, silu, softplus


@dataclass
class LinearAttentionState:
    """The recurrent state of one linear-attention layer.

    conv: (conv_dim, conv_kernel - 1), the last inputs of the causal convolution (zeros at start);
    recurrent: (Hv, Dk, Dv), the delta-rule memory S.
    """

    conv: np.ndarray
    recurrent: np.ndarray

    @classmethod
    def empty(cls, cfg: ModelConfig, dtype: type = np.float32) -> "LinearAttentionState":
        return cls(np.zeros((cfg.linear_conv_dim, cfg.linear_conv_kernel_dim - 1), dtype),
                   np.zeros((cfg.linear_num_value_heads, cfg.linear_key_head_dim, cfg.linear_value_head_dim),
                            dtype))


@dataclass
class LinearAttentionWeights:
    """One layer's tensors (canonical `layers.{i}.linear_attn.*`)."""

    in_proj_qkv: np.ndarray  # (2·Hk·Dk + Hv·Dv, hidden)
    in_proj_z: np.ndarray  # (Hv·Dv, hidden)
    in_proj_b: np.ndarray  # (Hv, hidden)
    in_proj_a: np.ndarray  # (Hv, hidden)
    conv1d: np.ndarray  # (conv_dim, 1, K) depthwise kernel
    A_log: np.ndarray  # (Hv,)
    dt_bias: np.ndarray  # (Hv,)
    norm: np.ndarray  # (Dv,) gated RMSNorm weight (plain x·w)
    out_proj: np.ndarray  # (hidden, Hv·Dv)


def causal_conv1d(x: np.ndarray, state: np.ndarray, kernel: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Depthwise causal convolution over time followed by SiLU, continuing from `state`.

    x: (T, C) new inputs; state: (C, K-1) previous inputs (oldest first); kernel: (C, 1, K).
    y_t[c] = SiLU(Σ_j kernel[c, 0, j] · u_{t+j}[c]) over u = [state; x] (transformers `causal_conv1d_fn` /
    `causal_conv1d_update`, which pad with K-1 zeros on the left at the first token).
    Returns y (T, C) and the new state (C, K-1) = the last K-1 inputs.
    """
    K = kernel.shape[-1]
    T = x.shape[0]
    u = np.concatenate([state.T, x], axis=0)  # (K-1+T, C)
    w = kernel[:, 0, :]  # (C, K)
    y = sum(u[j:j + T] * w[:, j] for j in range(K))  # (T, C)
    return silu(y), u[T:].T.copy()


def gated_delta_rule(q: np.ndarray, k: np.ndarray, v: np.ndarray, g: np.ndarray, beta: np.ndarray,
                     S: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The gated delta rule, one token at a time (Gated DeltaNet eq. 10; transformers
    `torch_recurrent_gated_delta_rule`).

    q, k: (T, Hv, Dk), already L2-normalised and q scaled by 1/√Dk; v: (T, Hv, Dv);
    g: (T, Hv) log-decay (≤ 0); beta: (T, Hv) write strength in (0, 1); S: (Hv, Dk, Dv) initial memory.
    For each t:   S ← exp(g_t)·S
                  S ← S + k_t ⊗ β_t (v_t − Sᵀk_t)        (delta rule: replace what k_t retrieves)
                  o_t = Sᵀ q_t
    Returns o (T, Hv, Dv) and the final S.
    """
    o = np.empty_like(v)
    for t in range(q.shape[0]):
        S = S * np.exp(g[t])[:, None, None]  # (Hv, Dk, Dv) decay
        retrieved = np.einsum("hkv,hk->hv", S, k[t])  # (Hv, Dv)
        delta = (v[t] - retrieved) * beta[t][:, None]  # (Hv, Dv)
        S = S + k[t][:, :, None] * delta[:, None, :]  # rank-1 write
        o[t] = np.einsum("hkv,hk->hv", S, q[t])  # (Hv, Dv) read
    return o, S


def gated_rms_norm(x: np.ndarray, z: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    """RMSNorm(x)·w·SiLU(z) per value head (transformers `Qwen3_5MoeRMSNormGated`: norm before gate).
    x, z: (..., Dv); w: (Dv,)."""
    return rms_norm(x, w, eps) * silu(z)


def gated_delta_net(x: np.ndarray, w: LinearAttentionWeights, cfg: ModelConfig,
                    state: LinearAttentionState) -> np.ndarray:
    """One GatedDeltaNet token mixer over T new tokens; updates `state` in place.

    x: (T, hidden) normed hidden states -> (T, hidden). Steps (transformers Qwen3_5MoeGatedDeltaNet.forward):
      [q; k; v] = SiLU(causal_conv1d(x·W_qkvᵀ))         q, k: Hk heads × Dk; v: Hv heads × Dv
      q, k = l2norm(q), l2norm(k); q /= √Dk; each k-head serves Hv/Hk consecutive v-heads
      β = σ(x·W_bᵀ);  g = −exp(A_log)·softplus(x·W_aᵀ + dt_bias)
      o = gated_delta_rule(q, k, v, g, β)
      out = (gated_rms_norm(o, z = x·W_zᵀ))·W_outᵀ
    """
    T = x.shape[0]
    Hk, Dk = cfg.linear_num_key_heads, cfg.linear_key_head_dim
    Hv, Dv = cfg.linear_num_value_heads, cfg.linear_value_head_dim
    mixed, state.conv = causal_conv1d(linear(x, w.in_proj_qkv), state.conv, w.conv1d)  # (T, 2·Hk·Dk + Hv·Dv)
    q, k, v = np.split(mixed, [Hk * Dk, 2 * Hk * Dk], axis=-1)
    q = np.repeat(l2_normalize(q.reshape(T, Hk, Dk)), Hv // Hk, axis=1)  # (T, Hv, Dk)
    k = np.repeat(l2_normalize(k.reshape(T, Hk, Dk)), Hv // Hk, axis=1)  # (T, Hv, Dk)
    q = q / np.sqrt(Dk).astype(x.dtype)
    v = v.reshape(T, Hv, Dv)

    beta = sigmoid(linear(x, w.in_proj_b))  # (T, Hv)
    g = -np.exp(w.A_log) * softplus(linear(x, w.in_proj_a) + w.dt_bias)  # (T, Hv)
    o, state.recurrent = gated_delta_rule(q, k, v, g, beta, state.recurrent)  # (T, Hv, Dv)

    z = linear(x, w.in_proj_z).reshape(T, Hv, Dv)
    o = gated_rms_norm(o, z, w.norm, cfg.rms_norm_eps).reshape(T, Hv * Dv)
    return linear(o, w.out_proj)  # (T, hidden)
