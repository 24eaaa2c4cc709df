"""Tiny random Hugging Face checkpoints, built with transformers (CPU torch, float32, seeded).

Every architecture has at least three variants covering: shared expert on/off (where the family allows),
norm_topk_prob true/false (where the family reads it), tied/untied embeddings, k = 1, 2 and 8, dense
layers (mlp_only_layers / decoder_sparse_step), attention biases, Mixtral's sliding window, OLMoE's
clip_qkv, for qwen3_5_moe the multimodal checkpoint layout, and for gpt_oss sliding/full layers with a window
shorter than the test prompts, sinks of both signs, a clamp the gate pre-activations exceed, YaRN (with and
without truncation) and plain RoPE.
Weights are redrawn with a larger std than transformers' default so that routing, gates and logits are
far from uniform (a wrong router or norm then changes the logits visibly).
"""

from __future__ import annotations

import copy
import functools
import json
from pathlib import Path
from typing import Any

import numpy as np

VOCAB = 256
SEED = 1234
WEIGHT_STD = 0.15  # matrices and embeddings
NORM_STD = 0.1  # perturbation of norm weights, A_log, dt_bias (so x·w vs x·(1+w) mistakes show)
BIAS_STD = 0.3  # DeepSeek-V3's e_score_correction_bias: large enough to change which experts are chosen
SINK_STD = 2.0  # gpt-oss attention sinks: logits of both signs, large enough to take a visible share

_COMMON = dict(vocab_size=VOCAB, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
               max_position_embeddings=4096, rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2,
               pad_token_id=0)
_HYBRID = dict(_COMMON, head_dim=32, num_hidden_layers=4,
               layer_types=["linear_attention", "full_attention", "linear_attention", "full_attention"],
               linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=16,
               linear_value_head_dim=16, linear_conv_kernel_dim=4, moe_intermediate_size=32,
               shared_expert_intermediate_size=48, num_experts=16, rope_parameters=dict(
                   rope_type="default", rope_theta=10000.0, partial_rotary_factor=0.25))
_QWEN3_MOE = dict(_COMMON, head_dim=16, num_hidden_layers=3, moe_intermediate_size=32, num_experts=16,
                  intermediate_size=96, rope_parameters=dict(rope_type="default", rope_theta=1e6))
_MIXTRAL = dict(_COMMON, num_hidden_layers=3, intermediate_size=32, num_local_experts=8,
                rope_parameters=dict(rope_type="default", rope_theta=1e6))
_OLMOE = dict(_COMMON, num_hidden_layers=3, intermediate_size=32, num_experts=16,
              rope_parameters=dict(rope_type="default", rope_theta=10000.0))
# DeepSeek-V3 / GLM-4.5: 16 experts in 4 groups, dense first layer(s), shared experts; MLA ranks unequal so a
# transposed or swapped projection fails on shape
_YARN = dict(rope_type="yarn", rope_theta=10000.0, factor=32.0, original_max_position_embeddings=128,
             beta_fast=32.0, beta_slow=1.0, mscale=1.0, mscale_all_dim=1.0)
_DEEPSEEK = dict(_COMMON, num_key_value_heads=4, num_hidden_layers=3, intermediate_size=96, moe_intermediate_size=32,
                 n_routed_experts=16, num_experts_per_tok=4, n_group=4, topk_group=2, routed_scaling_factor=2.5,
                 kv_lora_rank=32, q_lora_rank=48, qk_rope_head_dim=16, qk_nope_head_dim=32, v_head_dim=20,
                 first_k_dense_replace=1, n_shared_experts=1, num_nextn_predict_layers=0,
                 rope_parameters=dict(rope_type="default", rope_theta=10000.0))
_GLM = dict(_COMMON, head_dim=16, num_hidden_layers=3, intermediate_size=96, moe_intermediate_size=32,
            n_routed_experts=16, num_experts_per_tok=4, n_group=1, topk_group=1, routed_scaling_factor=2.5,
            first_k_dense_replace=1, n_shared_experts=1, num_nextn_predict_layers=0,
            rope_parameters=dict(rope_type="default", rope_theta=10000.0, partial_rotary_factor=0.5))
_MINIMAX = dict(_COMMON, head_dim=16, num_hidden_layers=3, intermediate_size=32, num_local_experts=16,
                rope_parameters=dict(rope_type="default", rope_theta=5e6))
# hidden = intermediate (as gpt-oss-120b's 2880): square down_proj, whose [E, in, out] storage only the family
# flag can tell apart; both multiples of 32 for MXFP4 blocks. Four layers: sliding, full, sliding, full.
_GPT_OSS = dict(_COMMON, head_dim=16, num_hidden_layers=4, intermediate_size=64, num_local_experts=8,
                sliding_window=8)

#: (arch, variant) -> (transformers config class name, model class name, config kwargs)
_SPECS: dict[tuple[str, str], tuple[str, str, dict[str, Any]]] = {
    ("qwen3_5_moe", "shared_k2"): ("Qwen3_5MoeTextConfig", "Qwen3_5MoeForCausalLM",
                                   dict(_HYBRID, num_experts_per_tok=2)),
    ("qwen3_5_moe", "tied_k1_attn_bias"): ("Qwen3_5MoeTextConfig", "Qwen3_5MoeForCausalLM",
                                           dict(_HYBRID, num_experts_per_tok=1, tie_word_embeddings=True,
                                                attention_bias=True)),
    ("qwen3_5_moe", "no_shared_k8"): ("Qwen3_5MoeTextConfig", "Qwen3_5MoeForCausalLM",
                                      dict(_HYBRID, num_experts_per_tok=8, shared_expert_intermediate_size=0)),
    ("qwen3_5_moe", "multimodal"): ("Qwen3_5MoeConfig", "Qwen3_5MoeForConditionalGeneration",
                                    dict(text_config=dict(_HYBRID, num_experts_per_tok=2),
                                         vision_config=dict(depth=1, hidden_size=32, intermediate_size=64,
                                                            num_heads=2, out_hidden_size=64, patch_size=4,
                                                            temporal_patch_size=1, spatial_merge_size=1,
                                                            num_position_embeddings=16),
                                         image_token_id=250, video_token_id=251, vision_start_token_id=252,
                                         vision_end_token_id=253)),
    ("qwen3_next", "shared_k2"): ("Qwen3NextConfig", "Qwen3NextForCausalLM",
                                  dict(_HYBRID, num_experts_per_tok=2, norm_topk_prob=True)),
    ("qwen3_next", "no_norm_topk_k8_tied"): ("Qwen3NextConfig", "Qwen3NextForCausalLM",
                                             dict(_HYBRID, num_experts_per_tok=8, norm_topk_prob=False,
                                                  tie_word_embeddings=True)),
    ("qwen3_next", "dense_layer0_k1"): ("Qwen3NextConfig", "Qwen3NextForCausalLM",
                                        dict(_HYBRID, num_experts_per_tok=1, mlp_only_layers=[0],
                                             intermediate_size=96)),
    ("qwen3_moe", "no_norm_topk_k2"): ("Qwen3MoeConfig", "Qwen3MoeForCausalLM",
                                       dict(_QWEN3_MOE, num_experts_per_tok=2, norm_topk_prob=False)),
    ("qwen3_moe", "norm_topk_k8_attn_bias"): ("Qwen3MoeConfig", "Qwen3MoeForCausalLM",
                                              dict(_QWEN3_MOE, num_experts_per_tok=8, norm_topk_prob=True,
                                                   attention_bias=True)),
    ("qwen3_moe", "tied_k1_sparse_step2"): ("Qwen3MoeConfig", "Qwen3MoeForCausalLM",
                                            dict(_QWEN3_MOE, num_experts_per_tok=1, tie_word_embeddings=True,
                                                 decoder_sparse_step=2)),
    ("mixtral", "k2"): ("MixtralConfig", "MixtralForCausalLM", dict(_MIXTRAL, num_experts_per_tok=2)),
    ("mixtral", "tied_k1_window16"): ("MixtralConfig", "MixtralForCausalLM",
                                      dict(_MIXTRAL, num_experts_per_tok=1, tie_word_embeddings=True,
                                           sliding_window=16)),
    ("mixtral", "k8_of_16"): ("MixtralConfig", "MixtralForCausalLM",
                              dict(_MIXTRAL, num_experts_per_tok=8, num_local_experts=16)),
    ("olmoe", "no_norm_topk_k2"): ("OlmoeConfig", "OlmoeForCausalLM",
                                   dict(_OLMOE, num_experts_per_tok=2, norm_topk_prob=False)),
    ("olmoe", "norm_topk_k8"): ("OlmoeConfig", "OlmoeForCausalLM",
                                dict(_OLMOE, num_experts_per_tok=8, norm_topk_prob=True)),
    ("olmoe", "tied_k1_clip_qkv"): ("OlmoeConfig", "OlmoeForCausalLM",
                                    dict(_OLMOE, num_experts_per_tok=1, tie_word_embeddings=True, clip_qkv=2.0)),
    ("deepseek_v3", "groups_yarn_q_lora"): ("DeepseekV3Config", "DeepseekV3ForCausalLM",
                                             dict(_DEEPSEEK, rope_parameters=_YARN)),
    ("deepseek_v3", "no_q_lora_no_norm_topk_all_moe"): ("DeepseekV3Config", "DeepseekV3ForCausalLM",
                                                        dict(_DEEPSEEK, q_lora_rank=None, norm_topk_prob=False,
                                                             first_k_dense_replace=0, n_group=1, topk_group=1,
                                                             rope_interleave=False)),
    ("deepseek_v3", "tied_attn_bias_k8_shared2"): ("DeepseekV3Config", "DeepseekV3ForCausalLM",
                                                   dict(_DEEPSEEK, tie_word_embeddings=True, attention_bias=True,
                                                        num_experts_per_tok=8, n_group=2, topk_group=1,
                                                        n_shared_experts=2, routed_scaling_factor=1.0)),
    ("kimi_k2", "one_group_k2"): ("DeepseekV3Config", "DeepseekV3ForCausalLM",
                                  dict(_DEEPSEEK, num_experts_per_tok=2, n_group=1, topk_group=1,
                                       routed_scaling_factor=2.827, rope_parameters=_YARN)),
    ("glm4_moe", "qk_norm_attn_bias"): ("Glm4MoeConfig", "Glm4MoeForCausalLM",
                                        dict(_GLM, use_qk_norm=True, attention_bias=True)),
    ("glm4_moe", "groups_no_norm_topk_all_moe"): ("Glm4MoeConfig", "Glm4MoeForCausalLM",
                                                  dict(_GLM, n_group=4, topk_group=2, norm_topk_prob=False,
                                                       first_k_dense_replace=0)),
    ("glm4_moe", "tied_k8_dense2_shared2"): ("Glm4MoeConfig", "Glm4MoeForCausalLM",
                                             dict(_GLM, tie_word_embeddings=True, num_experts_per_tok=8,
                                                  first_k_dense_replace=2, n_shared_experts=2,
                                                  routed_scaling_factor=1.0)),
    # a fourth GLM config (issue 16 asks four per family): k = 1 in 2 groups (one chosen), a quarter of each
    # head rotated, attention biases without the q/k norm
    ("glm4_moe", "k1_groups2_rotary_quarter_bias"): ("Glm4MoeConfig", "Glm4MoeForCausalLM",
                                                     dict(_GLM, num_experts_per_tok=1, n_group=2, topk_group=1,
                                                          attention_bias=True, routed_scaling_factor=1.5,
                                                          rope_parameters=dict(rope_type="default",
                                                                               rope_theta=10000.0,
                                                                               partial_rotary_factor=0.25))),
    ("gpt_oss", "window8_k2"): ("GptOssConfig", "GptOssForCausalLM", dict(_GPT_OSS, num_experts_per_tok=2)),
    ("gpt_oss", "clamp1_k4_yarn_truncate"): ("GptOssConfig", "GptOssForCausalLM",
                                              dict(_GPT_OSS, num_experts_per_tok=4, swiglu_limit=1.0,
                                                   sliding_window=40, rope_parameters=dict(
                                                       rope_type="yarn", rope_theta=150000.0, factor=4.0,
                                                       original_max_position_embeddings=64, beta_fast=8.0,
                                                       beta_slow=0.5, truncate=True))),
    ("gpt_oss", "full_k1_tied_plain_rope"): ("GptOssConfig", "GptOssForCausalLM",
                                              dict(_GPT_OSS, num_experts_per_tok=1, tie_word_embeddings=True,
                                                   layer_types=["full_attention"] * 4, rope_parameters=dict(
                                                       rope_type="default", rope_theta=10000.0))),
    # MiniMax-M2: sigmoid routing with a correction bias (BIAS_STD changes the choice), full-projection q/k norm,
    # partial rotary from rotary_dim
    ("minimax_m2", "rotary8_k2"): ("MiniMaxM2Config", "MiniMaxM2ForCausalLM",
                                   dict(_MINIMAX, num_experts_per_tok=2, rotary_dim=8)),
    ("minimax_m2", "k4_tied"): ("MiniMaxM2Config", "MiniMaxM2ForCausalLM",
                                dict(_MINIMAX, num_experts_per_tok=4, rotary_dim=8, tie_word_embeddings=True)),
    ("minimax_m2", "full_rotary_k8_mha"): ("MiniMaxM2Config", "MiniMaxM2ForCausalLM",
                                           dict(_MINIMAX, num_experts_per_tok=8, rotary_dim=16, num_key_value_heads=4)),
}

#: Architectures routed by sigmoid scores with a correction bias (not yet run by the engine and backends).
NOAUX_ARCHS = ("deepseek_v3", "kimi_k2", "glm4_moe", "minimax_m2")
#: Every (arch, variant) that build_hf_checkpoint accepts, except the sigmoid-routed families.
VARIANTS: list[tuple[str, str]] = [key for key in _SPECS if key[0] not in NOAUX_ARCHS]
#: The sigmoid-routed families' variants (DeepSeek-V3, Kimi K2, GLM-4.5).
NOAUX_VARIANTS: list[tuple[str, str]] = [key for key in _SPECS if key[0] in NOAUX_ARCHS]
#: gpt_oss's variants: tests/test_gpt_oss.py also holds them to a 300-token prompt and 64 decode steps.
GPT_OSS_VARIANTS: list[tuple[str, str]] = [v for v in VARIANTS if v[0] == "gpt_oss"]

#: A tiny config per arch for long-position tests (same shapes as the first variant).
LONG_VARIANTS: list[tuple[str, str]] = [("qwen3_5_moe", "shared_k2"), ("qwen3_moe", "no_norm_topk_k2"),
                                        ("mixtral", "k2"), ("deepseek_v3", "groups_yarn_q_lora"),
                                        ("glm4_moe", "qk_norm_attn_bias")]


def _torch():
    """torch on one thread. The tiny models' ops are far smaller than a thread pool's hand-off, and where the
    other core is busy (the suite's numba gate compiling beside the tests, a loaded machine) torch's two OpenMP
    threads wait on each other at every op: a 364-token forward took 2-20 s on two threads, 0.15-0.35 s on one
    (on this 2-core machine, loaded)."""
    import torch

    torch.set_num_threads(1)
    return torch


def make_hf_model(arch: str, variant: str, seed: int = SEED):
    """The transformers model (float32, eval mode) for (arch, variant), with seeded large-std weights.

    Raises KeyError for an unknown pair (see VARIANTS).
    """
    import transformers

    torch = _torch()
    cfg_cls, model_cls, kwargs = _SPECS[(arch, variant)]
    # a copy: config classes write into nested dicts (MiniMax-M2's rope_parameters gets partial_rotary_factor
    # from rotary_dim), which the variants share
    config = getattr(transformers, cfg_cls)(**copy.deepcopy(kwargs))
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(config).to(torch.float32).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".sinks"):
                p.copy_(torch.randn(p.shape, generator=gen) * SINK_STD)
            elif p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=gen) * WEIGHT_STD)
            else:
                p.add_(torch.randn(p.shape, generator=gen) * NORM_STD)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(torch.randn(b.shape, generator=gen) * BIAS_STD)
    return model


def build_hf_checkpoint(arch: str, variant: str, out_dir: str | Path) -> Path:
    """Write config.json + model.safetensors of (arch, variant) to out_dir via save_pretrained; return out_dir.
    Kimi K2 runs DeepSeek-V3's code under its own model_type, which its config.json declares."""
    import json

    out = Path(out_dir)
    make_hf_model(arch, variant).save_pretrained(out)
    if arch == "kimi_k2":
        config = json.loads((out / "config.json").read_text())
        (out / "config.json").write_text(json.dumps(dict(config, model_type="kimi_k2"), indent=2))
    return out


def prompt_tokens(n: int, seed: int = 0) -> np.ndarray:
    """A deterministic int64 prompt [n] of token ids in [3, VOCAB) (avoids pad/bos/eos)."""
    return np.random.default_rng(seed).integers(3, VOCAB, size=n, dtype=np.int64)


@functools.cache
def load_hf_model(arch: str, variant: str, path: str | Path):
    """The transformers model saved at `path` by build_hf_checkpoint, float32, eval mode; loaded once per
    process (the tests only run it, under no_grad)."""
    import transformers

    torch = _torch()
    cfg_cls, model_cls, _ = _SPECS[(arch, variant)]
    config = getattr(transformers, cfg_cls).from_pretrained(path)
    config.model_type = config.__class__.model_type  # Kimi K2's is not transformers' (it picks the key mapping)
    return getattr(transformers, model_cls).from_pretrained(path, config=config, dtype=torch.float32).eval()


def hf_logits(model, tokens: np.ndarray) -> np.ndarray:
    """Full-sequence transformers logits, float32 (T, vocab), for int64 tokens (T,), without a cache."""
    torch = _torch()
    with torch.no_grad():
        out = model(input_ids=torch.from_numpy(tokens)[None], use_cache=False)
    return out.logits[0].float().numpy()


def canonical_weights(path: str | Path):
    """(ModelConfig, DictWeights) of an HF checkpoint directory, every tensor mapped through
    flashmoe.arch.families.to_canonical (the in-memory equivalent of `flashmoe convert --bits none`); MXFP4
    experts (`.blocks` + `.scales`) are dequantised to `.weight` as a model directory's reader does."""
    from safetensors.numpy import load_file

    from flashmoe.arch.config import ModelConfig
    from flashmoe.arch.families import detect_layout, to_canonical
    from flashmoe.arch.tensors import DictWeights
    from flashmoe.format.mxfp4 import Mxfp4Tensor

    path = Path(path)
    cfg = ModelConfig.from_file(path / "config.json")
    source = {}
    for shard in sorted(path.glob("*.safetensors")):
        source.update(load_file(shard))
    layout = detect_layout(source)
    canonical = dict(pair for name, array in source.items() for pair in to_canonical(name, array, cfg, layout))
    for name in [n for n in canonical if n.endswith(".blocks")]:
        base = name[: -len(".blocks")]
        mx = Mxfp4Tensor.from_checkpoint(canonical.pop(name), canonical.pop(base + ".scales"), base)
        canonical[base + ".weight"] = mx.dequantize()
    return cfg, DictWeights(canonical)


def _mlx_lm_config(hf_dir: Path) -> dict[str, Any]:
    """The HF config.json with the keys mlx-lm reads but transformers 5 no longer writes: top-level
    rope_theta / partial_rotary_factor (from rope_parameters), Qwen3-MoE's num_experts (transformers writes
    num_local_experts), MiniMax-M2's shared_intermediate_size, full_attention_interval (mlx-lm ignores
    layer_types), and `qwen3_5_moe` for the text-only `qwen3_5_moe_text` model type (mlx-lm has no module of
    that name)."""
    import json

    config = json.loads((hf_dir / "config.json").read_text())
    text = config.get("text_config", config)
    rope = text.get("rope_parameters") or {}
    for key in ("rope_theta", "partial_rotary_factor"):
        if key in rope:
            text.setdefault(key, rope[key])
    if "num_local_experts" in text and text["model_type"] != "mixtral":
        text.setdefault("num_experts", text["num_local_experts"])
    if text["model_type"] == "minimax_m2":  # a required field of mlx-lm's ModelArgs; MiniMax-M2 publishes 0
        text.setdefault("shared_intermediate_size", 0)
    # mlx-lm reads YaRN's parameters from rope_scaling (and some of its ModelArgs require the key)
    text.setdefault("rope_scaling", dict(rope, type=rope["rope_type"]) if rope.get("rope_type", "default")
                    != "default" else None)
    if "layer_types" in text:
        text["full_attention_interval"] = text["layer_types"].index("full_attention") + 1
    if config["model_type"] == "qwen3_5_moe_text":
        config["model_type"] = "qwen3_5_moe"
    return config


def mlx_lm_model(hf_dir: str | Path):
    """(mlx-lm model, config dict) holding the float weights of the HF checkpoint at hf_dir, loaded through
    mlx-lm's own `sanitize` (which stacks experts into switch_mlp, moves conv1d to [C, K, 1] and adds 1 to
    the x·(1+w) norms of the Qwen3.5/Next families). Qwen3.5's per-expert tensors, which mlx-lm does not
    read, are first fused into `experts.gate_up_proj` / `experts.down_proj` as Qwen publishes them; gpt-oss's
    expert tensors are given in OpenAI's published orientation, which its sanitize splits."""
    import mlx.core as mx
    from mlx_lm.utils import _get_classes

    hf_dir = Path(hf_dir)
    config = _mlx_lm_config(hf_dir)
    model_cls, args_cls = _get_classes(config)
    model = model_cls(args_cls.from_dict(config))
    weights = dict(mx.load(str(hf_dir / "model.safetensors")))
    if config["model_type"] == "qwen3_5_moe":
        text = config.get("text_config", config)
        prefix = "model.language_model." if "text_config" in config else "model."
        for layer in range(text["num_hidden_layers"]):
            p = f"{prefix}layers.{layer}.mlp.experts"
            stack = lambda proj: mx.stack([weights.pop(f"{p}.{e}.{proj}.weight")  # noqa: E731
                                           for e in range(text["num_experts"])])
            weights[f"{p}.gate_up_proj"] = mx.concatenate([stack("gate_proj"), stack("up_proj")], axis=1)
            weights[f"{p}.down_proj"] = stack("down_proj")
    if config["model_type"] == "gpt_oss":  # sanitize reads OpenAI's [E, out, in] `.weight`; transformers: [E, in, out]
        for name in [n for n in weights if n.endswith(("experts.gate_up_proj", "experts.down_proj"))]:
            weights[f"{name}.weight"] = weights.pop(name).swapaxes(-1, -2)
    model.load_weights(list(model.sanitize(weights).items()), strict=True)
    return model, config


def build_mlx_checkpoint(hf_dir: str | Path, out_dir: str | Path, bits: int | None = 4,
                         group_size: int = 64) -> Path:
    """Write an mlx-lm checkpoint (model.safetensors + config.json) of the HF checkpoint at hf_dir,
    quantised by mlx-lm's own quantize_model (its predicates: router/shared-expert gate at 8 bits, inputs
    not divisible by group_size left float) when bits is set; float when bits is None. Returns out_dir."""
    from mlx_lm.utils import quantize_model, save_config, save_model

    model, config = mlx_lm_model(hf_dir)
    if bits is not None:
        model, config = quantize_model(model, config, group_size=group_size, bits=bits)
    out = Path(out_dir)
    save_model(out, model)
    save_config(config, out / "config.json")
    return out


def mlx_lm_logits(mlx_dir: str | Path, tokens: np.ndarray) -> np.ndarray:
    """mlx-lm's logits, float32 (T, vocab), for the checkpoint at mlx_dir and int64 tokens (T,)."""
    import mlx.core as mx
    from mlx_lm.utils import load_model

    model, _ = load_model(Path(mlx_dir))
    return np.array(model(mx.array(tokens)[None]).astype(mx.float32))[0]


def build_mxfp4_checkpoint(variant: str, out_dir: str | Path, seed: int = SEED) -> Path:
    """A gpt_oss checkpoint as OpenAI publishes it: the float checkpoint of ("gpt_oss", variant) with each
    layer's `experts.gate_up_proj` / `experts.down_proj` replaced by MXFP4 `_blocks` (uint8 [E, out, in/32, 16],
    random E2M1 codes) and `_scales` (uint8 E8M0 [E, out, in/32], 2^-6 .. 2^-2 so activations stay moderate),
    and `quantization_config: {"quant_method": "mxfp4"}` in config.json. Returns out_dir."""
    import json

    from safetensors.numpy import load_file, save_file

    out = build_hf_checkpoint("gpt_oss", variant, out_dir)
    tensors = load_file(out / "model.safetensors")
    rng = np.random.default_rng(seed)
    for name in [n for n in tensors if n.endswith(("experts.gate_up_proj", "experts.down_proj"))]:
        e, n_in, n_out = tensors.pop(name).shape  # transformers stores gpt-oss experts [E, in, out]
        tensors[name + "_blocks"] = rng.integers(0, 256, size=(e, n_out, n_in // 32, 16), dtype=np.uint8)
        tensors[name + "_scales"] = rng.integers(127 - 6, 127 - 1, size=(e, n_out, n_in // 32), dtype=np.uint8)
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((out / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "mxfp4"}
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return out


def load_mxfp4_hf_model(path: str | Path):
    """transformers' own float32 model of an MXFP4 checkpoint: its loader dequantises the experts
    (`Mxfp4Config(dequantize=True)`, integrations/mxfp4.py)."""
    import transformers

    torch = _torch()
    return transformers.GptOssForCausalLM.from_pretrained(
        path, dtype=torch.float32, quantization_config=transformers.Mxfp4Config(dequantize=True)).eval()


def byte_level_tokens() -> list[str]:
    """The 256 tokens of a byte-level vocabulary, byte b's at index b: GPT-2's printable bytes as themselves,
    the others as the characters 256, 257, ... in byte order (GPT-2's bytes_to_unicode)."""
    printable = {*range(33, 127), *range(161, 173), *range(174, 256)}
    others = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(others)) for b in range(256)]


def hf_model_from_canonical(model_dir: Path, weights):
    """The transformers model (float32, eval mode) of the config.json of flashmoe's model directory `model_dir`,
    as transformers' AutoConfig reads it, holding the canonical tensors of `weights` (a DictWeights; routed experts
    per expert, `.weight` and `.bias`).

    Each transformers tensor is taken back through flashmoe.arch.families.to_canonical, which moves a tensor's
    entries without arithmetic except adding 1 to the x·(1+w) norms: mapped as an index array (and as zeros,
    for that offset) it says where each entry lives among the canonical tensors. Raises AssertionError when a
    transformers tensor is not covered entry for entry.
    """
    import re

    import torch
    import transformers

    from flashmoe.arch.config import ModelConfig
    from flashmoe.arch.families import detect_layout, to_canonical

    config = json.loads((Path(model_dir) / "config.json").read_text())
    hf_config = transformers.AutoConfig.from_pretrained(model_dir)
    cfg = ModelConfig.from_dict(config)
    # a config that transformers reads as another model fails here, not by building that one (a full-size default)
    text = hf_config.get_text_config()
    assert (text.hidden_size, text.num_hidden_layers) == (cfg.hidden_size, cfg.num_hidden_layers), \
        f"transformers reads {model_dir}/config.json as {hf_config}"
    model = transformers.AutoModelForCausalLM.from_config(hf_config).to(torch.float32).eval()
    state = model.state_dict()
    layout = detect_layout(state)

    def canonical(name: str) -> np.ndarray:
        if m := re.fullmatch(r"(layers\.\d+\.mlp\.experts)\.(\w+_proj)\.(weight|bias)", name):
            return np.stack([weights.tensor(f"{m[1]}.{e}.{m[2]}.{m[3]}") for e in range(cfg.num_experts)])
        return weights.tensor(name)

    with torch.no_grad():
        for name, p in state.items():
            shape = tuple(p.shape)
            offsets = dict(to_canonical(name, np.zeros(shape), cfg, layout))
            flat = np.full(p.numel(), np.nan)
            for cname, index in to_canonical(name, np.arange(p.numel(), dtype=np.float64).reshape(shape), cfg,
                                             layout):
                at = (index - offsets[cname]).astype(np.int64).ravel()
                flat[at] = (canonical(cname).astype(np.float64) - offsets[cname]).ravel()
            if offsets:  # a tensor that to_canonical drops (an empty shared expert) stays as built
                assert not np.isnan(flat).any(), name
                p.copy_(torch.from_numpy(flat.reshape(shape)))
    return model
