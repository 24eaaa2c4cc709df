"""One Family record per architecture family: everything that differs between the supported MoE models.

A family is a small table of differences, not a copy of the model: the reference, the engine, convert and
the backends read these facts through ModelConfig (whose properties come from here) and never test a
family's name. `MODEL_TYPES` maps each config.json `model_type` to its family. docs/adding-an-architecture.md
says what to add for a new one.

The checkpoint differences (the second half of this module) map each checkpoint tensor to the canonical
names of docs/formats.md (flashmoe/arch/tensors.py):

- `renames`: regex substitutions on the layer-relative name (Mixtral's `block_sparse_moe`, `w1/w3/w2`);
- `plus_one_norms`: the family's RMSNorm computes x·(1+w) (transformers Qwen3NextRMSNorm /
  Qwen3_5MoeRMSNorm); canonical norms are plain x·w, so 1 is added to those weights at conversion.
  The gated RMSNorm of linear attention (`linear_attn.norm`) is plain x·w in transformers and is left alone.
  mlx-lm's `sanitize` already adds the 1, so MLX checkpoints are not shifted again;
- `fused_linear_attn`: Qwen3-Next's `in_proj_qkvz`/`in_proj_ba` are split into the Qwen3.5 layout
  (`in_proj_qkv`, `in_proj_z`, `in_proj_b`, `in_proj_a`) following transformers'
  `Qwen3NextGatedDeltaNet.fix_query_key_value_ordering`;
- `rope_deinterleave`: DeepSeek-V3's RoPE pairs dimensions (x0, x1), (x2, x3), … (config `rope_interleave`);
  the rows that produce the rotary part (of q_proj / q_b_proj per head, of kv_a_proj_with_mqa after the latent)
  are permuted to the rotate-half order (0, 2, 4, …, 1, 3, 5, …) that every backend's RoPE uses (q·k is the
  same in either order);
- `mla`: kv_b_proj [H·(qk_nope + v_head), kv_lora] is stored as the per-head matrices attention applies,
  mlx-lm's `embed_q` (W_UKᵀ, [H, kv_lora, qk_nope]) and `unembed_out` (W_UV, [H, v_head, kv_lora]), each
  quantised along its own input (mlx-lm's `sanitize` writes MLX checkpoints so; they are kept byte for byte).
The multi-token-prediction layers DeepSeek-V3 and GLM-4.5 store after the decoder (`layers.{num_hidden_layers}`)
are dropped with a message.

Everything else (checkpoint prefixes, the three expert storages, MLX's conv1d layout) is shared.
Splits are by rows (the output dimension), so they apply unchanged to MLX `.scales`/`.biases`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterable, Mapping

import numpy as np

from flashmoe.errors import CheckpointError

if TYPE_CHECKING:  # config.py imports this module for the records
    from flashmoe.arch.config import ModelConfig

HF = "hf"
MLX = "mlx"

# Family.shared_expert
NO_SHARED_EXPERT = "none"
SIGMOID_GATED = "sigmoid_gated"  # y += σ(x·W_sgᵀ)·SwiGLU_shared(x) (transformers Qwen3_5MoeSparseMoeBlock)
UNGATED = "ungated"  # y += SwiGLU_shared(x), n_shared_experts × moe_intermediate_size wide (DeepseekV3MoE)
# Family.qk_norm: RMSNorm of q and k per head ('head', Qwen3*), over the whole projection ('full', OLMoE), none
QK_NORMS = ("head", "full", "none")


@dataclass(frozen=True)
class Family:
    """What one architecture family does differently. Defaults describe a plain softmax-attention MoE.

    Config keys (ModelConfig.from_dict):
      defaults: values transformers' `configuration_<model_type>.py` (5.x) supplies when config.json omits a key.
      num_experts_keys, moe_intermediate_keys: where the expert count and width are read, first key first
        (the first names the field in errors). When "intermediate_size" is not among moe_intermediate_keys it
        is the dense MLP width.
      sparse_step_keys: transformers honours mlp_only_layers / decoder_sparse_step (else every layer is MoE).
      sliding_window_switch: a key that must be true for sliding_window to apply (None: sliding_window alone).
    Routing:
      router: a name in reference/routing.py's ROUTERS.
      always_norm_topk: the top-k weights are always renormalised (transformers has no norm_topk_prob key);
        else norm_topk_prob is read from the config.
      router_tensors: per-layer `mlp.gate.{name}` tensors [E] (DeepSeek's correction bias, gpt-oss's router bias).
      group_routing_keys: n_group, topk_group and routed_scaling_factor are read (sigmoid "noaux_tc" routing),
        and first_k_dense_replace / moe_layer_freq decide the dense layers.
    Blocks:
      shared_expert: NO_SHARED_EXPERT, SIGMOID_GATED (read from shared_expert_intermediate_size) or UNGATED
        (n_shared_experts × moe_intermediate_size).
      linear_attention: GatedDeltaNet layers (`layer_types`, or every full_attention_interval-th layer full).
      alternating_sliding: `sliding_attention` and `full_attention` layers alternate (`layer_types`, else
        even layers sliding), the window on the sliding ones only; otherwise sliding_window, when set, applies to
        every attention layer.
      attention_output_gate: q_proj also produces a per-head sigmoid gate on the attention output.
      attention_sinks: each head has a learned sink logit in its softmax denominator (`self_attn.sinks`).
      qk_norm: one of QK_NORMS; qk_norm_switch: a key that must be true for it to apply (GLM's use_qk_norm).
      attention_bias_projs: the projections attention_bias gives a bias (MLA: its own, see ModelConfig).
      mla: Multi-head Latent Attention (DeepSeek-V2/V3) instead of grouped-query attention; its config keys,
        YaRN RoPE and kv_b_proj's per-head split (module doc).
      expert_biases: the routed experts' projections have biases.
      clamped_swiglu: experts use the clamped SwiGLU (swiglu_limit, swiglu_alpha) instead of SwiGLU.
      mxfp4_experts: the experts are published in MXFP4; convert keeps them so, synth writes them so.
    Checkpoints: renames, plus_one_norms, fused_linear_attn, rope_deinterleave (module doc);
      experts_in_out: fused expert tensors are stored [E, in, out] (x·W); interleaved_gate_up: gate_up_proj
      holds gate and up in alternate rows.
    GGUF: gguf_arch is llama.cpp's architecture name (gguf-py MODEL_ARCH_NAMES; flashmoe/arch/gguf_names.py
      holds the tensor names), gguf_pre_tokenizer its `tokenizer.ggml.pre` for the family's vocabulary.
    """

    name: str
    defaults: Mapping[str, Any] = field(default_factory=dict)
    num_experts_keys: tuple[str, ...] = ("num_experts", "num_local_experts")
    moe_intermediate_keys: tuple[str, ...] = ("moe_intermediate_size",)
    sparse_step_keys: bool = False
    sliding_window_switch: str | None = None
    router: str = "softmax_topk"
    always_norm_topk: bool = False
    router_tensors: tuple[str, ...] = ()
    group_routing_keys: bool = False
    shared_expert: str = NO_SHARED_EXPERT
    linear_attention: bool = False
    alternating_sliding: bool = False
    attention_output_gate: bool = False
    attention_sinks: bool = False
    qk_norm: str = "head"
    qk_norm_switch: str | None = None
    attention_bias_projs: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
    mla: bool = False
    mxfp4_experts: bool = False
    renames: tuple[tuple[str, str], ...] = ()
    plus_one_norms: bool = False
    fused_linear_attn: bool = False
    rope_deinterleave: bool = False
    expert_biases: bool = False
    clamped_swiglu: bool = False
    experts_in_out: bool = False
    interleaved_gate_up: bool = False
    gguf_arch: str | None = None
    gguf_pre_tokenizer: str | None = None


_QWEN3_NEXT_DEFAULTS = dict(rms_norm_eps=1e-6, tie_word_embeddings=False, attention_bias=False,
                            partial_rotary_factor=0.25, rope_theta=10000.0, linear_conv_kernel_dim=4,
                            full_attention_interval=4, max_position_embeddings=32768)
# Mixtral and OLMoE: every layer is MoE and intermediate_size is the expert width (moe_intermediate_size is
# the name transformers' to_dict writes); transformers 5 writes Qwen3-MoE's num_experts as num_local_experts.
_EXPERT_WIDTH_IS_INTERMEDIATE = ("intermediate_size", "moe_intermediate_size")
_SHARED_EXPERTS = ((r"\.mlp\.shared_experts\.", ".mlp.shared_expert."),)  # DeepSeek's plural

# Mixtral's checkpoint names (block_sparse_moe, w1/w3/w2), which MiniMax-M2's published checkpoint uses too.
_MIXTRAL_NAMES = (
    (r"\.block_sparse_moe\.", ".mlp."),
    (r"\.experts\.(\d+)\.w1\.", r".experts.\1.gate_proj."),
    (r"\.experts\.(\d+)\.w3\.", r".experts.\1.up_proj."),
    (r"\.experts\.(\d+)\.w2\.", r".experts.\1.down_proj."),
)

FAMILIES: dict[str, Family] = {f.name: f for f in (
    Family("qwen3_5_moe", _QWEN3_NEXT_DEFAULTS, always_norm_topk=True, shared_expert=SIGMOID_GATED,
           linear_attention=True, attention_output_gate=True, plus_one_norms=True,
           gguf_arch="qwen35moe", gguf_pre_tokenizer="qwen35"),
    Family("qwen3_next", dict(_QWEN3_NEXT_DEFAULTS, decoder_sparse_step=1, norm_topk_prob=True),
           sparse_step_keys=True, shared_expert=SIGMOID_GATED, linear_attention=True,
           attention_output_gate=True, plus_one_norms=True, fused_linear_attn=True, gguf_arch="qwen3next",
           gguf_pre_tokenizer="qwen2"),
    Family("qwen3_moe", dict(rms_norm_eps=1e-6, tie_word_embeddings=False, attention_bias=False,
                             rope_theta=10000.0, decoder_sparse_step=1, norm_topk_prob=False,
                             max_position_embeddings=32768),
           sparse_step_keys=True, sliding_window_switch="use_sliding_window", gguf_arch="qwen3moe",
           gguf_pre_tokenizer="qwen2"),
    Family("mixtral", dict(rms_norm_eps=1e-5, tie_word_embeddings=False, rope_theta=1e6,
                           max_position_embeddings=4096 * 32),
           num_experts_keys=("num_local_experts", "num_experts"), moe_intermediate_keys=_EXPERT_WIDTH_IS_INTERMEDIATE,
           always_norm_topk=True, qk_norm="none", gguf_arch="llama", renames=_MIXTRAL_NAMES),
    Family("olmoe", dict(rms_norm_eps=1e-5, tie_word_embeddings=False, attention_bias=False, rope_theta=10000.0,
                         norm_topk_prob=False, max_position_embeddings=4096),
           num_experts_keys=("num_local_experts", "num_experts"), moe_intermediate_keys=_EXPERT_WIDTH_IS_INTERMEDIATE,
           qk_norm="full", gguf_arch="olmoe"),
    # transformers DeepseekV3Config / Glm4MoeConfig defaults (DeepSeek-V3 671B; GLM-4.5-Air)
    Family("deepseek_v3", dict(rms_norm_eps=1e-6, tie_word_embeddings=False, attention_bias=False, rope_theta=10000.0,
                               norm_topk_prob=True, max_position_embeddings=4096, n_group=8, topk_group=4,
                               routed_scaling_factor=2.5, n_shared_experts=1, first_k_dense_replace=3,
                               moe_layer_freq=1, kv_lora_rank=512, q_lora_rank=1536, qk_rope_head_dim=64,
                               qk_nope_head_dim=128, v_head_dim=128, rope_interleave=True),
           num_experts_keys=("n_routed_experts", "num_local_experts", "num_experts"), router="noaux_tc",
           router_tensors=("e_score_correction_bias",), group_routing_keys=True, shared_expert=UNGATED,
           qk_norm="none", mla=True, rope_deinterleave=True, renames=_SHARED_EXPERTS, gguf_arch="deepseek2"),
    Family("glm4_moe", dict(rms_norm_eps=1e-5, tie_word_embeddings=False, attention_bias=False, rope_theta=10000.0,
                            partial_rotary_factor=0.5, norm_topk_prob=True, max_position_embeddings=131072,
                            n_group=1, topk_group=1, routed_scaling_factor=1.0, n_shared_experts=1,
                            first_k_dense_replace=1, moe_layer_freq=1, use_qk_norm=False),
           num_experts_keys=("n_routed_experts", "num_local_experts", "num_experts"), router="noaux_tc",
           router_tensors=("e_score_correction_bias",), group_routing_keys=True, shared_expert=UNGATED,
           qk_norm_switch="use_qk_norm", attention_bias_projs=("q_proj", "k_proj", "v_proj"),
           renames=_SHARED_EXPERTS, gguf_arch="glm4moe"),
    # transformers GptOssConfig: its rope default is YaRN (factor 32 over 4096), the window 128
    Family("gpt_oss", dict(rms_norm_eps=1e-5, tie_word_embeddings=False, attention_bias=True, rope_theta=150000.0,
                           max_position_embeddings=131072, sliding_window=128, swiglu_alpha=1.702,
                           swiglu_limit=7.0, rope_scaling=dict(rope_type="yarn", factor=32.0, beta_fast=32.0,
                                                               beta_slow=1.0, truncate=False,
                                                               original_max_position_embeddings=4096)),
           num_experts_keys=("num_local_experts", "num_experts"), moe_intermediate_keys=_EXPERT_WIDTH_IS_INTERMEDIATE,
           router="topk_softmax", always_norm_topk=True, alternating_sliding=True, attention_sinks=True,
           qk_norm="none", router_tensors=("bias",), expert_biases=True, clamped_swiglu=True, mxfp4_experts=True,
           experts_in_out=True, interleaved_gate_up=True, renames=((r"\.mlp\.router\.", ".mlp.gate."),),
           gguf_arch="gpt-oss"),
    # transformers MiniMaxM2Config (MiniMax-M2 230B-A10B): sigmoid routing with a correction bias and no groups,
    # q/k RMSNorm over the whole projection, partial rotary from the legacy `rotary_dim` key
    Family("minimax_m2", dict(rms_norm_eps=1e-6, tie_word_embeddings=False, attention_bias=False, rope_theta=5e6,
                              max_position_embeddings=196608, n_group=1, topk_group=1, routed_scaling_factor=1.0,
                              first_k_dense_replace=0, moe_layer_freq=1),
           num_experts_keys=("num_local_experts", "num_experts"), moe_intermediate_keys=_EXPERT_WIDTH_IS_INTERMEDIATE,
           router="noaux_tc", always_norm_topk=True, router_tensors=("e_score_correction_bias",),
           group_routing_keys=True, qk_norm="full", renames=_MIXTRAL_NAMES + (  # the published checkpoint's
               (r"\.mlp\.e_score_correction_bias$", ".mlp.gate.e_score_correction_bias"),), gguf_arch="minimax-m2"),
)}

#: config.json model_type -> family name (the text model type of a multimodal checkpoint maps to the same family).
MODEL_TYPES = {
    "qwen3_5_moe": "qwen3_5_moe",
    "qwen3_5_moe_text": "qwen3_5_moe",
    "qwen3_next": "qwen3_next",
    "qwen3_moe": "qwen3_moe",
    "mixtral": "mixtral",
    "olmoe": "olmoe",
    "deepseek_v3": "deepseek_v3",
    "kimi_k2": "deepseek_v3",  # Kimi K2 declares its own model_type and runs DeepSeek-V3's code
    "glm4_moe": "glm4_moe",
    "gpt_oss": "gpt_oss",
    "minimax_m2": "minimax_m2",
}


def family_of(cfg: ModelConfig) -> Family:
    """The Family record of cfg (cfg.family is its name)."""
    return FAMILIES[cfg.family]


# Prefixes of the text model in HF (plain and multimodal) and MLX checkpoints, longest first.
_PREFIXES = ("model.language_model.", "language_model.model.", "language_model.", "model.")
# Tensors that are not part of the text model, with the reason given when they are dropped.
_DROPPED = (
    (re.compile(r"^(model\.)?(visual|vision_tower)\."), "vision tower (flashmoe runs the text model only)"),
    (re.compile(r"^(model\.)?mtp\."), "multi-token-prediction head (not used for decoding)"),
    (re.compile(r"rotary_emb\.inv_freq$"), "rotary cache (recomputed from the config)"),
)
# Norms a plus_one_norms family computes as x·(1+w).
_PLUS_ONE = re.compile(r"^(norm\.weight|layers\.\d+\.(input_layernorm|post_attention_layernorm|"
                       r"self_attn\.q_norm|self_attn\.k_norm)\.weight)$")
_EXPERT = re.compile(r"^layers\.\d+\.mlp\.experts\.")
_SWITCH = re.compile(r"^(layers\.\d+\.mlp)\.switch_mlp\.(gate_proj|up_proj|down_proj)\.(weight|scales|biases)$")
_FUSED_GATE_UP = re.compile(r"^(layers\.\d+\.mlp\.experts)\.gate_up_proj(\.weight)?$")
_FUSED_DOWN = re.compile(r"^(layers\.\d+\.mlp\.experts)\.down_proj$")
# gpt-oss's expert biases [E, out] and MXFP4 `_blocks` [E, out, in/32, 16] / `_scales` [E, out, in/32]
_FUSED_EXTRA = re.compile(r"^(layers\.\d+\.mlp\.experts)\.(gate_up_proj|down_proj)_(bias|blocks|scales)$")
_QKVZ = re.compile(r"^(layers\.\d+\.linear_attn)\.in_proj_(qkvz|ba)\.(weight|scales|biases)$")
_CONV = re.compile(r"^layers\.\d+\.linear_attn\.conv1d\.weight$")
_ROPE_ROWS = re.compile(r"^layers\.\d+\.self_attn\.(q_proj|q_b_proj|kv_a_proj_with_mqa)\.(weight|scales|biases|bias)$")
_LAYER_INDEX = re.compile(r"(?:^|\.)layers\.(\d+)\.")
_KV_B = re.compile(r"^(layers\.\d+\.self_attn)\.kv_b_proj\.weight$")
#: MLA's per-head matrices [H, out, in] (quantised along `in` like any linear weight).
PER_HEAD = re.compile(r"^layers\.\d+\.self_attn\.(embed_q|unembed_out)\.weight$")


def detect_layout(names: Iterable[str]) -> str:
    """'mlx' when the checkpoint was written by mlx-lm: its `sanitize` stacks the experts into `switch_mlp`
    (gpt-oss's into `experts.{gate,up,down}_proj`, the canonical names), and its affine quantisation writes
    `.biases` beside `.scales`, a name no HF checkpoint uses; else 'hf'."""
    return MLX if any(".switch_mlp." in n or n.endswith(".biases") for n in names) else HF


def drop_reason(name: str, cfg: ModelConfig | None = None) -> str | None:
    """Why checkpoint tensor `name` is not converted (vision tower, MTP head, rotary cache), or None when it is.
    With cfg, the num_nextn_predict_layers layers stored after the decoder (`model.layers.{num_hidden_layers}.…`,
    DeepSeek-V3, GLM-4.5) are multi-token-prediction layers too. Converters print one message per reason."""
    for pattern, reason in _DROPPED:
        if pattern.search(name):
            return reason
    if cfg is not None and cfg.num_nextn_predict_layers and (m := _LAYER_INDEX.search(name)):
        if cfg.num_hidden_layers <= int(m[1]) < cfg.num_hidden_layers + cfg.num_nextn_predict_layers:
            return "multi-token-prediction layer (not used for decoding)"
    return None


def to_canonical(name: str, array: np.ndarray, cfg: ModelConfig,
                 layout: str = HF) -> list[tuple[str, np.ndarray]]:
    """Map one checkpoint tensor to its canonical (name, array) pairs; [] when the tensor is dropped.

    name: as stored in the checkpoint (HF, multimodal HF or MLX naming, including `.scales`/`.biases`).
    array: its data, returned unchanged in dtype except the x·(1+w) norms of HF checkpoints, which become
    float32 w + 1. layout: 'hf' or 'mlx' (see detect_layout).
    Per-expert tensors keep their expert index (`layers.{i}.mlp.experts.{e}.{proj}.weight`, [out, in]);
    fused HF (`experts.gate_up_proj` [E, 2I, H], `experts.down_proj` [E, H, I]) and MLX stacked
    (`switch_mlp.*` [E, out, …]) become stacked `layers.{i}.mlp.experts.{proj}.{weight,scales,biases}`.
    Raises CheckpointError naming the tensor when its shape does not fit the config. See drop_reason.
    """
    if drop_reason(name, cfg) is not None:
        return []
    fam = family_of(cfg)
    canon = _strip_prefix(name)
    for pattern, repl in fam.renames:
        canon = re.sub(pattern, repl, "." + canon)[1:]

    if cfg.tie_word_embeddings and canon.startswith("lm_head."):
        return []  # tied: the head is embed_tokens (docs/formats.md: absent when tie_word_embeddings)
    if not cfg.has_shared_expert and ".mlp.shared_expert" in canon:
        return []  # shared_expert_intermediate_size 0: transformers still writes empty tensors and a gate
    if m := _SWITCH.match(canon):
        return [(f"{m[1]}.experts.{m[2]}.{m[3]}", array)]
    if m := _FUSED_GATE_UP.match(canon):
        gate_up = _oriented(name, array, cfg, rows=2 * cfg.moe_intermediate_size, cols=cfg.hidden_size)
        gate, up = _split_gate_up(name, gate_up, cfg)
        return [(f"{m[1]}.gate_proj.weight", gate), (f"{m[1]}.up_proj.weight", up)]
    if m := _FUSED_DOWN.match(canon):
        down = _oriented(name, array, cfg, rows=cfg.hidden_size, cols=cfg.moe_intermediate_size)
        return [(f"{m[1]}.down_proj.weight", down)]
    if m := _FUSED_EXTRA.match(canon):  # already [E, out, ...]: only gate_up's rows are split
        if m[2] == "down_proj":
            return [(f"{m[1]}.down_proj.{m[3]}", array)]
        gate, up = _split_gate_up(name, array, cfg)
        return [(f"{m[1]}.gate_proj.{m[3]}", gate), (f"{m[1]}.up_proj.{m[3]}", up)]
    if fam.fused_linear_attn and (m := _QKVZ.match(canon)):
        return split_qkvz(name, m[1], m[2], m[3], array, cfg)
    if _CONV.match(canon) and array.ndim == 3 and array.shape[1] != 1:
        array = np.ascontiguousarray(array.transpose(0, 2, 1))  # MLX Conv1d [C, K, 1] -> HF [C, 1, K]
    if fam.mla and (m := _KV_B.match(canon)):
        return _split_kv_b(name, m[1], array, cfg)
    if rope_deinterleave_rows(canon, cfg) is not None:
        array = _deinterleave_rope_rows(name, canon, array, cfg)
    if fam.plus_one_norms and layout == HF and _PLUS_ONE.match(canon):
        # float32 result: 1 + w rounded back to bf16 would lose w's low bits (transformers adds in float32)
        array = array.astype(np.float32) + np.float32(1.0)
    return [(canon, array)]


def is_expert_tensor(canonical_name: str) -> bool:
    """True for routed-expert tensors (per-expert or stacked `layers.{i}.mlp.experts.…`), which live in the
    expert files rather than resident.safetensors. The shared expert is resident."""
    return bool(_EXPERT.match(canonical_name))


def rope_deinterleave_rows(canonical_name: str, cfg: ModelConfig) -> np.ndarray | None:
    """For a tensor whose rows produce interleaved RoPE dimensions (Family.rope_deinterleave with config
    rope_interleave: q_proj, q_b_proj, kv_a_proj_with_mqa), the row order that takes pairs (2j, 2j+1) to
    (j, j + r/2): transformers' `apply_rotary_pos_emb_interleave`, done once on the weights. q_proj/q_b_proj:
    the last qk_rope_head_dim rows of each head; kv_a_proj_with_mqa: the qk_rope_head_dim rows after the
    latent. None for every other tensor (a row permutation: exact for quantised tensors too)."""
    m = _ROPE_ROWS.match(canonical_name)
    if not (family_of(cfg).rope_deinterleave and cfg.rope_interleave and m):
        return None
    r = cfg.qk_rope_head_dim
    order = np.concatenate([np.arange(0, r, 2), np.arange(1, r, 2)])  # (r,)
    if m[1] == "kv_a_proj_with_mqa":
        return np.concatenate([np.arange(cfg.kv_lora_rank), cfg.kv_lora_rank + order])
    head = cfg.qk_nope_head_dim + r
    one = np.concatenate([np.arange(cfg.qk_nope_head_dim), cfg.qk_nope_head_dim + order])
    return (np.arange(cfg.num_attention_heads)[:, None] * head + one[None, :]).reshape(-1)


def _deinterleave_rope_rows(name: str, canon: str, array: np.ndarray, cfg: ModelConfig) -> np.ndarray:
    """`array` (checkpoint tensor `name`, canonical `canon`) with rope_deinterleave_rows' order. Raises
    CheckpointError naming the tensor when its row count disagrees with the config."""
    rows = rope_deinterleave_rows(canon, cfg)
    if array.shape[0] != rows.size:
        raise CheckpointError(f"tensor {name!r}: {array.shape[0]} rows, expected {rows.size} from the MLA fields "
                              "of the config")
    return np.ascontiguousarray(array[rows])


def _split_kv_b(name: str, prefix: str, array: np.ndarray, cfg: ModelConfig) -> list[tuple[str, np.ndarray]]:
    """kv_b_proj [H·(n + v), c] -> embed_q = W_UKᵀ [H, c, n] and unembed_out = W_UV [H, v, c] (mlx-lm's
    DeepseekV3Model.sanitize; n = qk_nope_head_dim, v = v_head_dim, c = kv_lora_rank)."""
    H, n, v, c = cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank
    if array.shape != (H * (n + v), c):
        raise CheckpointError(f"tensor {name!r}: shape {list(array.shape)}, expected {[H * (n + v), c]} from the "
                              "MLA fields of the config")
    w = array.reshape(H, n + v, c)
    return [(f"{prefix}.embed_q.weight", np.ascontiguousarray(w[:, :n].transpose(0, 2, 1))),
            (f"{prefix}.unembed_out.weight", np.ascontiguousarray(w[:, n:]))]


def _strip_prefix(name: str) -> str:
    for p in _PREFIXES:
        if name.startswith(p):
            return name[len(p):]
    return name


def _split_gate_up(name: str, array: np.ndarray, cfg: ModelConfig) -> tuple[np.ndarray, np.ndarray]:
    """(gate, up) rows of a fused [E, 2I, ...] tensor: the two halves, or the even and odd rows when the
    family interleaves them (gpt-oss). Raises CheckpointError naming the tensor for another row count."""
    e, inter = cfg.num_experts, cfg.moe_intermediate_size
    if array.shape[:2] != (e, 2 * inter):
        raise CheckpointError(f"tensor {name!r}: shape {tuple(array.shape)} does not start with {(e, 2 * inter)}")
    if family_of(cfg).interleaved_gate_up:
        return np.ascontiguousarray(array[:, 0::2]), np.ascontiguousarray(array[:, 1::2])
    return array[:, :inter], array[:, inter:]


def _oriented(name: str, array: np.ndarray, cfg: ModelConfig, rows: int, cols: int) -> np.ndarray:
    """A fused expert tensor as [E, rows, cols] ([E, out, in]); transformers 5 stores it so, but accept the
    transposed [E, cols, rows] too (unambiguous only when rows != cols; equal means already [E, out, in]).
    A family whose experts are stored [E, in, out] (Family.experts_in_out) is always transposed."""
    e = cfg.num_experts
    if family_of(cfg).experts_in_out:
        if array.shape != (e, cols, rows):
            raise CheckpointError(f"tensor {name!r}: shape {tuple(array.shape)}, expected {(e, cols, rows)}")
        return np.ascontiguousarray(array.transpose(0, 2, 1))
    if array.shape == (e, rows, cols):
        return array
    if array.shape == (e, cols, rows):
        return np.ascontiguousarray(array.transpose(0, 2, 1))
    raise CheckpointError(f"tensor {name!r}: shape {tuple(array.shape)} is neither {(e, rows, cols)} "
                          f"nor {(e, cols, rows)}")


def split_qkvz(name: str, prefix: str, kind: str, suffix: str, array: np.ndarray,
               cfg: ModelConfig) -> list[tuple[str, np.ndarray]]:
    """Split Qwen3-Next's fused projections by rows into the Qwen3.5 layout.

    transformers' fix_query_key_value_ordering views the qkvz output as [Hk, 2·Dk + 2·(Hv/Hk)·Dv] (per key
    head: q, k, then the value and z rows of its Hv/Hk value heads) and ba as [Hk, 2·(Hv/Hk)]; the
    flattened q, k, v (and z, b, a) keep head order, which is the Qwen3.5 row order.
    """
    hk, dk = cfg.linear_num_key_heads, cfg.linear_key_head_dim
    r, dv = cfg.linear_num_value_heads // hk, cfg.linear_value_head_dim
    per_head = [dk, dk, r * dv, r * dv] if kind == "qkvz" else [r, r]
    if array.shape[0] != hk * sum(per_head):
        raise CheckpointError(f"tensor {name!r}: {array.shape[0]} rows, expected {hk * sum(per_head)} "
                              f"from the linear_* fields of the config")
    grouped = array.reshape(hk, sum(per_head), *array.shape[1:])
    bounds = np.cumsum(per_head)[:-1]
    parts = [p.reshape(-1, *array.shape[1:]) for p in np.split(grouped, bounds, axis=1)]
    if kind == "qkvz":
        q, k, v, z = parts
        return [(f"{prefix}.in_proj_qkv.{suffix}", np.concatenate([q, k, v], axis=0)),
                (f"{prefix}.in_proj_z.{suffix}", z)]
    b, a = parts
    return [(f"{prefix}.in_proj_b.{suffix}", b), (f"{prefix}.in_proj_a.{suffix}", a)]
