"""The reference model: embedding, decoder layers (token mixer + feed-forward, pre-norm residuals), final
norm and LM head, with a cache so that prefill and token-by-token decode give the same logits.

One code path serves every family; ModelConfig says which blocks a layer has (transformers
`Qwen3_5MoeDecoderLayer`, `Qwen3NextDecoderLayer`, `Qwen3MoeDecoderLayer`, `MixtralDecoderLayer`,
`OlmoeDecoderLayer`: h = h + mixer(norm(h)); h = h + ffn(norm(h))).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Union

import numpy as np

from flashmoe.arch.config import ModelConfig
from flashmoe.reference.attention import AttentionWeights, KVCache, attention
from flashmoe.reference.linear_attention import LinearAttentionState, LinearAttentionWeights, gated_delta_net
from flashmoe.reference.mla import LatentKVCache, MLAWeights, mla_attention
from flashmoe.reference.moe import dense_mlp, moe_block
from flashmoe.reference.ops import linear, rms_norm
from flashmoe.arch.tensors import WeightSource

LayerCache = Union[KVCache, LinearAttentionState, LatentKVCache]


@dataclass
class Cache:
    """Per-layer state (a KVCache for full attention, a LinearAttentionState for linear attention) and the
    number of positions consumed so far."""

    layers: list[LayerCache]
    position: int = 0


class ReferenceModel:
    """The NumPy reference forward pass of any supported MoE model.

    cfg: the model config; weights: canonical tensors (flashmoe.arch.tensors.WeightSource: a DictWeights, or a
    ModelDir that dequantises on read); dtype: np.float32 (default) or np.float64 for all arithmetic.
    Routed experts are read through weights.expert() on every forward; token-mixer weights are kept.
    """

    def __init__(self, cfg: ModelConfig, weights: WeightSource, dtype: type = np.float32):
        self.cfg = cfg
        self.weights = weights
        self.dtype = dtype
        self._mixers: dict[int, AttentionWeights | LinearAttentionWeights] = {}

    @classmethod
    def from_dir(cls, path: str | Path, dtype: type = np.float32) -> "ReferenceModel":
        """A reference model over a flashmoe model directory (quantised tensors are dequantised on read).
        Raises FormatError/ConfigError from flashmoe.format.modeldir for an invalid directory."""
        from flashmoe.format.modeldir import ModelDir

        md = ModelDir.open(path)
        return cls(md.config, md, dtype)

    def new_cache(self) -> Cache:
        """An empty cache: position 0, empty KV (or MLA latent) caches, zero conv and recurrent states."""
        if self.cfg.is_mla:
            return Cache([LatentKVCache.empty(self.cfg, self.dtype) for _ in self.cfg.layer_types])
        return Cache([KVCache.empty(self.cfg, self.dtype) if self.cfg.is_attention_layer(i)
                      else LinearAttentionState.empty(self.cfg, self.dtype) for i in range(self.cfg.num_hidden_layers)])

    def forward(self, token_ids: np.ndarray, cache: Cache | None = None) -> np.ndarray:
        """Logits for T new tokens following what `cache` has seen; appends them to `cache`.

        token_ids: (T,) int64, each in [0, vocab_size). Returns float32 (T, vocab_size).
        Raises ValueError for an out-of-range token id. With cache None, a fresh cache is used.
        """
        cfg = self.cfg
        token_ids = np.asarray(token_ids, dtype=np.int64).reshape(-1)
        if token_ids.size and (token_ids.min() < 0 or token_ids.max() >= cfg.vocab_size):
            raise ValueError(f"token ids must be in [0, {cfg.vocab_size}), got [{token_ids.min()}, "
                             f"{token_ids.max()}]")
        cache = self.new_cache() if cache is None else cache
        positions = cache.position + np.arange(token_ids.size)  # (T,)
        embed = self._w("embed_tokens.weight")  # (vocab, hidden)
        h = embed[token_ids]  # (T, hidden)
        for i in range(cfg.num_hidden_layers):
            h = h + self._mixer(i, rms_norm(h, self._w(f"layers.{i}.input_layernorm.weight"), cfg.rms_norm_eps),
                                positions, cache.layers[i])
            x = rms_norm(h, self._w(f"layers.{i}.post_attention_layernorm.weight"), cfg.rms_norm_eps)
            h = h + (moe_block(x, i, self.weights, cfg, self.dtype) if cfg.is_moe_layer(i)
                     else dense_mlp(x, i, self.weights, self.dtype))
        cache.position += token_ids.size
        h = rms_norm(h, self._w("norm.weight"), cfg.rms_norm_eps)
        head = embed if cfg.tie_word_embeddings else self._w("lm_head.weight")  # (vocab, hidden)
        return linear(h, head).astype(np.float32)  # (T, vocab)

    def _mixer(self, i: int, x: np.ndarray, positions: np.ndarray, state: LayerCache) -> np.ndarray:
        """Layer i's token mixer: softmax attention, MLA or GatedDeltaNet. x: (T, hidden) -> (T, hidden)."""
        w = self._mixer_weights(i)
        if isinstance(w, AttentionWeights):
            return attention(x, positions, w, self.cfg, state, self.cfg.attention_window(i))
        if isinstance(w, MLAWeights):
            return mla_attention(x, positions, w, self.cfg, state)
        return gated_delta_net(x, w, self.cfg, state)

    def _mixer_weights(self, i: int) -> AttentionWeights | LinearAttentionWeights | MLAWeights:
        if i not in self._mixers:
            if self.cfg.is_mla:
                p = f"layers.{i}.self_attn."
                names = ("kv_a_proj_with_mqa", "kv_a_layernorm", "embed_q", "unembed_out", "o_proj") + (
                    ("q_proj",) if self.cfg.q_lora_rank is None else ("q_a_proj", "q_a_layernorm", "q_b_proj"))
                self._mixers[i] = MLAWeights(**{n: self._w(f"{p}{n}.weight") for n in names},
                                             biases={n: self._w(f"{p}{n}.bias") for n in self.cfg.attention_bias_projs})
            elif self.cfg.is_attention_layer(i):
                p = f"layers.{i}.self_attn."
                opt = lambda n: self._w(p + n) if self.weights.has(p + n) else None  # noqa: E731
                projs = ("q_proj", "k_proj", "v_proj", "o_proj")
                self._mixers[i] = AttentionWeights(
                    *(self._w(f"{p}{n}.weight") for n in projs),
                    q_norm=opt("q_norm.weight"), k_norm=opt("k_norm.weight"), sinks=opt("sinks"),
                    biases={n: self._w(f"{p}{n}.bias") for n in self.cfg.attention_bias_projs})
            else:
                p = f"layers.{i}.linear_attn."
                self._mixers[i] = LinearAttentionWeights(
                    in_proj_qkv=self._w(p + "in_proj_qkv.weight"), in_proj_z=self._w(p + "in_proj_z.weight"),
                    in_proj_b=self._w(p + "in_proj_b.weight"), in_proj_a=self._w(p + "in_proj_a.weight"),
                    conv1d=self._w(p + "conv1d.weight"), A_log=self._w(p + "A_log"),
                    dt_bias=self._w(p + "dt_bias"), norm=self._w(p + "norm.weight"),
                    out_proj=self._w(p + "out_proj.weight"))
        return self._mixers[i]

    def _w(self, name: str) -> np.ndarray:
        """Canonical tensor `name` in the model's dtype (CheckpointError when missing)."""
        return np.asarray(self.weights.tensor(name), self.dtype)
