"""Multi-head Latent Attention in the absorbed form: the engine's decode path for DeepSeek-V3 and Kimi K2.

The cache holds, per position, only the normalised latent c_kv (kv_lora_rank) and the RoPE key k_rope
(qk_rope_head_dim) — 576 floats for DeepSeek-V3 instead of 128 heads × (192 + 128). The key and value
up-projections, per head W_UK (qk_nope × kv_lora) and W_UV (v_head × kv_lora), are folded into the query and the
output (DeepSeek-V2 report §2.1.2, "absorbed" into W_Q and W_O); the model directory holds them as embed_q = W_UKᵀ
and unembed_out = W_UV, per head, quantised like any linear, so each is one resident linear per head:

    q_nope·k_nope = q_nope·(W_UK c_kv) = (W_UKᵀ q_nope)·c_kv          q_lat = W_UKᵀ q_nope   (T, H, kv_lora)
    Σ_s p_s (W_UV c_kv_s) = W_UV (Σ_s p_s c_kv_s)                       o = W_UV o_lat

so attention runs as multi-query attention with one shared key [c_kv | k_rope] of kv_lora + rope dims, and the
values are the same rows (whose first kv_lora dims are c_kv). The expanded form (reference/mla.py) defines the
result; the conformance suite checks the two agree.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

from flashmoe.arch.config import ModelConfig
from flashmoe.backends.base import Backend, KVCacheBuffer
from flashmoe.format.quant import QuantizedTensor
from flashmoe.reference.rope import apply_rope
from flashmoe.reference.mla import mla_rope_cos_sin, mla_softmax_scale


class AbsorbedMLA:
    """Every MLA layer's per-head up-projections as prepared backend weights.

    embed_q(i)/unembed_out(i): layer i's stored tensor (QuantizedTensor or float), [H, kv_lora, qk_nope] and
    [H, v_head, kv_lora]. `linear(x, name)` is the engine's resident linear (with bias), `weight(name)` its
    prepared weight.
    """

    def __init__(self, cfg: ModelConfig, backend: Backend, embed_q: Callable[[int], Any],
                 unembed_out: Callable[[int], Any], linear: Callable[[Any, str], Any], weight: Callable[[str], Any]):
        self.cfg, self.backend, self._linear, self._weight = cfg, backend, linear, weight
        self.uk = {i: [backend.prepare(w) for w in _heads(embed_q(i))] for i in range(cfg.num_hidden_layers)}
        self.uv = {i: [backend.prepare(w) for w in _heads(unembed_out(i))] for i in range(cfg.num_hidden_layers)}
        self.scale = mla_softmax_scale(cfg)

    def new_cache(self) -> KVCacheBuffer:
        """The latent cache of one layer: one 'head' of kv_lora_rank + qk_rope_head_dim per position, stored
        once (it is both the keys and the values)."""
        return self.backend.new_kv_cache(1, self.cfg.kv_lora_rank + self.cfg.qk_rope_head_dim, values=False)

    def __call__(self, i: int, x, positions: np.ndarray, cache: KVCacheBuffer):
        """Layer i's attention of T new tokens x (T, hidden) over the cache; appends their latents.
        Returns (T, hidden). Math: reference/mla.py `mla_attention`, rearranged as in the module doc."""
        be, cfg = self.backend, self.cfg
        T, H = x.shape[0], cfg.num_attention_heads
        n, c, r = cfg.qk_nope_head_dim, cfg.kv_lora_rank, cfg.qk_rope_head_dim
        a = f"layers.{i}.self_attn."
        if cfg.q_lora_rank is None:
            q = self._linear(x, a + "q_proj")
        else:
            c_q = be.rms_norm(self._linear(x, a + "q_a_proj"), self._weight(a + "q_a_layernorm.weight"),
                              cfg.rms_norm_eps)
            q = self._linear(c_q, a + "q_b_proj")
        q_nope, q_rope = be.split(be.reshape(q, (T, H, n + r)), [n, r])  # (T, H, n), (T, H, r)
        c_kv, k_rope = be.split(self._linear(x, a + "kv_a_proj_with_mqa"), [c, r])  # (T, c), (T, r)
        c_kv = be.rms_norm(c_kv, self._weight(a + "kv_a_layernorm.weight"), cfg.rms_norm_eps)

        cos, sin = mla_rope_cos_sin(cfg, positions, np.float32)  # YaRN tables: computed on the host
        q_rope = apply_rope(be.to_numpy(q_rope).transpose(1, 0, 2), cos, sin).transpose(1, 0, 2)  # (T, H, r)
        k_rope = apply_rope(be.to_numpy(k_rope)[None], cos, sin)[0]  # (T, r), one key for all heads

        q_lat = be.heads_linear(q_nope, self.uk[i])  # (T, H, c) = W_UKᵀ q_nope
        latent = be.reshape(be.concat([c_kv, be.asarray(k_rope)], axis=-1), (T, 1, c + r))  # what the cache keeps
        keys, values = cache.append(latent)  # (S, 1, c + r) both: the same rows
        query = be.concat([q_lat, be.asarray(q_rope)], axis=-1)  # (T, H, c + r)
        o_lat, _ = be.split(be.attention(query, keys, values, positions, self.scale), [c, r])  # (T, H, c): Σ p·c_kv
        o = be.reshape(be.heads_linear(o_lat, self.uv[i]), (T, H * cfg.v_head_dim))  # (T, H·v) = W_UV o_lat
        return self._linear(o, a + "o_proj")


def _heads(t: QuantizedTensor | np.ndarray) -> list:
    """A per-head tensor [H, out, in] as H weights [out, in] (views; a QuantizedTensor stays quantised)."""
    if isinstance(t, QuantizedTensor):
        return [QuantizedTensor(t.weight[h], t.scales[h], t.biases[h], t.bits, t.group_size)
                for h in range(t.weight.shape[0])]
    return list(t)
