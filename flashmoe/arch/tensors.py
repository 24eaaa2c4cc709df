"""The canonical tensor names of docs/formats.md, their shapes, and the weight sources that hold them.

resident_shapes is the table of every resident tensor a model has (name -> logical shape); the routed experts
are `layers.{i}.mlp.experts.{e}.{proj}.weight` per expert (expert_tensor_name) or stacked `[E, out, in]`
(stacked_expert_name), proj in EXPERT_PROJS. Checkpoint names become these at conversion
(flashmoe/arch/families.py); llama.cpp's names for them are in flashmoe/arch/gguf_names.py.

A WeightSource returns float arrays (dequantised when stored quantised); routed experts are fetched one at a
time through `expert(layer, e)`, so a source backed by disk reads only the experts a token routes to.
"""

from __future__ import annotations

from typing import Mapping, Protocol, runtime_checkable

import numpy as np

from flashmoe.arch.config import ModelConfig
from flashmoe.errors import CheckpointError

EMBED_TOKENS = "embed_tokens.weight"
FINAL_NORM = "norm.weight"
LM_HEAD = "lm_head.weight"  # absent when tie_word_embeddings (the head is EMBED_TOKENS)
#: The routed (and shared) expert's projections, in the order an expert file stores them.
EXPERT_PROJS = ("gate_proj", "up_proj", "down_proj")


def expert_tensor_name(layer: int, expert: int, proj: str) -> str:
    """Canonical name of one routed expert's projection: `layers.{i}.mlp.experts.{e}.{proj}.weight`."""
    return f"layers.{layer}.mlp.experts.{expert}.{proj}.weight"


def stacked_expert_name(layer: int, proj: str) -> str:
    """Canonical name of one projection of all routed experts of a layer, [E, out, in]:
    `layers.{i}.mlp.experts.{proj}.weight`."""
    return f"layers.{layer}.mlp.experts.{proj}.weight"


def resident_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Canonical name -> logical shape of every resident tensor a `cfg` model has (docs/formats.md table).

    Linear weights are [out, in] (quantised ones are stored packed; this is their float shape).
    """
    h, v = cfg.hidden_size, cfg.vocab_size
    nh, nkv, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    shapes: dict[str, tuple[int, ...]] = {EMBED_TOKENS: (v, h), FINAL_NORM: (h,)}
    if not cfg.tie_word_embeddings:
        shapes[LM_HEAD] = (v, h)
    for i in range(cfg.num_hidden_layers):
        p = f"layers.{i}."
        shapes[p + "input_layernorm.weight"] = (h,)
        shapes[p + "post_attention_layernorm.weight"] = (h,)
        if not cfg.is_attention_layer(i):
            hv, dv = cfg.linear_num_value_heads, cfg.linear_value_head_dim
            conv_dim = cfg.linear_conv_dim
            a = p + "linear_attn."
            shapes.update({
                a + "in_proj_qkv.weight": (conv_dim, h), a + "in_proj_z.weight": (hv * dv, h),
                a + "in_proj_b.weight": (hv, h), a + "in_proj_a.weight": (hv, h),
                a + "conv1d.weight": (conv_dim, 1, cfg.linear_conv_kernel_dim),
                a + "dt_bias": (hv,), a + "A_log": (hv,), a + "norm.weight": (dv,),
                a + "out_proj.weight": (h, hv * dv),
            })
        elif cfg.is_mla:
            shapes.update(_mla_shapes(cfg, p + "self_attn."))
        else:
            a = p + "self_attn."
            outs = {**{proj: (rows, h) for proj, rows in attention_rows(cfg).items()}, "o_proj": (h, nh * hd)}
            for name, shape in outs.items():
                shapes[f"{a}{name}.weight"] = shape
                if name in cfg.attention_bias_projs:
                    shapes[f"{a}{name}.bias"] = (shape[0],)
            if cfg.has_attention_sinks:
                shapes[a + "sinks"] = (nh,)
            if cfg.qk_norm == "head":
                shapes[a + "q_norm.weight"] = (hd,)
                shapes[a + "k_norm.weight"] = (hd,)
            elif cfg.qk_norm == "full":
                shapes[a + "q_norm.weight"] = (nh * hd,)
                shapes[a + "k_norm.weight"] = (nkv * hd,)
        m = p + "mlp."
        if cfg.is_moe_layer(i):
            shapes[m + "gate.weight"] = (cfg.num_experts, h)
            for name in cfg.router_tensors:
                shapes[m + f"gate.{name}"] = (cfg.num_experts,)
            if cfg.has_shared_expert:
                s = cfg.shared_expert_intermediate_size
                shapes.update({m + "shared_expert.gate_proj.weight": (s, h), m + "shared_expert.up_proj.weight": (s, h),
                               m + "shared_expert.down_proj.weight": (h, s)})
                if cfg.has_shared_expert_gate:
                    shapes[m + "shared_expert_gate.weight"] = (1, h)
        else:
            d = cfg.intermediate_size
            shapes.update({m + "gate_proj.weight": (d, h), m + "up_proj.weight": (d, h), m + "down_proj.weight": (h, d)})
    return shapes


def attention_rows(cfg: ModelConfig) -> dict[str, int]:
    """Outputs (rows) of a softmax-attention layer's q_proj, k_proj and v_proj, in that order; q_proj's include
    the per-head output gate where the family has one."""
    nh, nkv, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    return {"q_proj": nh * hd * (2 if cfg.has_attention_output_gate else 1), "k_proj": nkv * hd, "v_proj": nkv * hd}


def _mla_shapes(cfg: ModelConfig, a: str) -> dict[str, tuple[int, ...]]:
    """Multi-head Latent Attention's tensors under prefix `a` (transformers DeepseekV3Attention; kv_b_proj as
    its per-head halves embed_q = W_UKᵀ and unembed_out = W_UV, mlx-lm's names and layout)."""
    h, nh = cfg.hidden_size, cfg.num_attention_heads
    qk = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim
    shapes = {a + "kv_a_proj_with_mqa.weight": (cfg.kv_lora_rank + cfg.qk_rope_head_dim, h),
              a + "kv_a_layernorm.weight": (cfg.kv_lora_rank,),
              a + "embed_q.weight": (nh, cfg.kv_lora_rank, cfg.qk_nope_head_dim),
              a + "unembed_out.weight": (nh, cfg.v_head_dim, cfg.kv_lora_rank),
              a + "o_proj.weight": (h, nh * cfg.v_head_dim)}
    if cfg.q_lora_rank is None:
        shapes[a + "q_proj.weight"] = (nh * qk, h)
    else:
        shapes.update({a + "q_a_proj.weight": (cfg.q_lora_rank, h), a + "q_a_layernorm.weight": (cfg.q_lora_rank,),
                       a + "q_b_proj.weight": (nh * qk, cfg.q_lora_rank)})
    for name in cfg.attention_bias_projs:
        shapes[f"{a}{name}.bias"] = (shapes[f"{a}{name}.weight"][0],)
    return shapes


@runtime_checkable
class WeightSource(Protocol):
    """What the reference (and backends' loaders) read weights through."""

    def tensor(self, name: str) -> np.ndarray:
        """The float (dequantised) tensor with canonical `name`; raises CheckpointError if absent."""
        ...

    def has(self, name: str) -> bool:
        """True when a non-expert tensor `name` exists."""
        ...

    def expert(self, layer: int, e: int) -> dict[str, np.ndarray]:
        """Routed expert e of decoder layer `layer`: float [out, in] arrays under keys
        'gate_proj' [I, H], 'up_proj' [I, H], 'down_proj' [H, I], and, when the experts have biases (gpt-oss),
        'gate_proj.bias' [I], 'up_proj.bias' [I], 'down_proj.bias' [H]."""
        ...


class DictWeights:
    """A WeightSource over an in-memory dict of canonical float tensors.

    Experts may be given per expert (`layers.{i}.mlp.experts.{e}.{proj}.weight`, [out, in]) or stacked
    (`layers.{i}.mlp.experts.{proj}.weight`, [E, out, in]); `expert()` reads either.
    """

    def __init__(self, tensors: Mapping[str, np.ndarray]):
        self._t = dict(tensors)

    def tensor(self, name: str) -> np.ndarray:
        """The tensor `name` as stored; raises CheckpointError naming it when absent."""
        try:
            return self._t[name]
        except KeyError:
            raise CheckpointError(f"missing tensor {name!r}") from None

    def has(self, name: str) -> bool:
        """True when `name` is present."""
        return name in self._t

    def expert(self, layer: int, e: int) -> dict[str, np.ndarray]:
        """Expert e of `layer` as {'gate_proj', 'up_proj', 'down_proj'} -> [out, in], plus '{proj}.bias' where
        present; CheckpointError if a weight is absent."""
        out = {}
        for proj in EXPERT_PROJS:
            weight = self._expert_part(layer, e, proj, "weight")
            if weight is None:
                raise CheckpointError(f"missing tensor {expert_tensor_name(layer, e, proj)!r} (nor stacked "
                                      f"{stacked_expert_name(layer, proj)!r})")
            out[proj] = weight
            bias = self._expert_part(layer, e, proj, "bias")
            if bias is not None:
                out[f"{proj}.bias"] = bias
        return out

    def _expert_part(self, layer: int, e: int, proj: str, kind: str) -> np.ndarray | None:
        """`layers.{layer}.mlp.experts.{e}.{proj}.{kind}`, or row e of the stacked tensor, or None."""
        name = f"layers.{layer}.mlp.experts.{e}.{proj}.{kind}"
        if name in self._t:
            return self._t[name]
        stacked = self._t.get(f"layers.{layer}.mlp.experts.{proj}.{kind}")
        return None if stacked is None else stacked[e]

    def names(self) -> list[str]:
        """All tensor names held."""
        return list(self._t)
