"""The model configuration: Hugging Face config.json keys, validated, with each family's defaults.

Every dimension and flag of a model comes from here; nothing about a model is hard-coded elsewhere.
Field names are the config.json keys of the text model (`text_config` of a multimodal checkpoint).
Family defaults are those of transformers' `configuration_<model_type>.py` (5.x) — where transformers
ignores a key (Mixtral and Qwen3.5-MoE always renormalise the top-k weights), the fixed behaviour is used.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flashmoe.errors import ConfigError

FULL_ATTENTION = "full_attention"
LINEAR_ATTENTION = "linear_attention"

#: model_type -> family name (the text model type of a multimodal checkpoint maps to the same family).
MODEL_TYPES = {
    "qwen3_5_moe": "qwen3_5_moe",
    "qwen3_5_moe_text": "qwen3_5_moe",
    "qwen3_next": "qwen3_next",
    "qwen3_moe": "qwen3_moe",
    "mixtral": "mixtral",
    "olmoe": "olmoe",
}

#: Per family: keys whose value transformers supplies when config.json omits them.
_DEFAULTS: dict[str, dict[str, Any]] = {
    "qwen3_5_moe": dict(rms_norm_eps=1e-6, tie_word_embeddings=False, attention_bias=False,
                        partial_rotary_factor=0.25, rope_theta=10000.0, linear_conv_kernel_dim=4,
                        full_attention_interval=4, max_position_embeddings=32768),
    "qwen3_next": dict(rms_norm_eps=1e-6, tie_word_embeddings=False, attention_bias=False,
                       partial_rotary_factor=0.25, rope_theta=10000.0, linear_conv_kernel_dim=4,
                       full_attention_interval=4, decoder_sparse_step=1, norm_topk_prob=True,
                       max_position_embeddings=32768),
    "qwen3_moe": dict(rms_norm_eps=1e-6, tie_word_embeddings=False, attention_bias=False,
                      rope_theta=10000.0, decoder_sparse_step=1, norm_topk_prob=False,
                      max_position_embeddings=32768),
    "mixtral": dict(rms_norm_eps=1e-5, tie_word_embeddings=False, rope_theta=1e6,
                    max_position_embeddings=4096 * 32),
    "olmoe": dict(rms_norm_eps=1e-5, tie_word_embeddings=False, attention_bias=False, rope_theta=10000.0,
                  norm_topk_prob=False, max_position_embeddings=4096),
}

#: Families whose transformers router always renormalises the top-k weights (no config key).
_ALWAYS_NORM_TOPK = {"qwen3_5_moe", "mixtral"}
#: Families with a shared expert scaled by a sigmoid gate.
_SHARED_EXPERT = {"qwen3_5_moe", "qwen3_next"}
#: Families with GatedDeltaNet linear-attention layers (`layer_types`).
_HYBRID = {"qwen3_5_moe", "qwen3_next"}

#: Families whose transformers code honours mlp_only_layers / decoder_sparse_step.
_SPARSE_STEP = {"qwen3_moe", "qwen3_next"}

_REQUIRED = ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size", "num_experts_per_tok")


def _first(*values: Any) -> Any:
    """The first value that is not None (a 0 given in config.json is kept, not replaced by a default)."""
    return next(v for v in values if v is not None)


@dataclass(frozen=True)
class ModelConfig:
    """A validated text-model config. Field names are config.json keys.

    `family` is the architecture family (see MODEL_TYPES); `model_type` is the key as written.
    `num_experts` and `moe_intermediate_size` are normalised across families (Mixtral's
    `num_local_experts`/`intermediate_size`, OLMoE's `intermediate_size`).
    """

    model_type: str
    family: str
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int
    rms_norm_eps: float
    rope_theta: float
    partial_rotary_factor: float
    num_experts: int
    num_experts_per_tok: int
    moe_intermediate_size: int
    norm_topk_prob: bool
    tie_word_embeddings: bool
    layer_types: tuple[str, ...]
    max_position_embeddings: int
    intermediate_size: int | None = None  # dense MLP width (mlp_only_layers / decoder_sparse_step)
    shared_expert_intermediate_size: int = 0
    attention_bias: bool = False
    mlp_only_layers: tuple[int, ...] = ()
    decoder_sparse_step: int = 1
    linear_conv_kernel_dim: int = 0
    linear_key_head_dim: int = 0
    linear_value_head_dim: int = 0
    linear_num_key_heads: int = 0
    linear_num_value_heads: int = 0
    clip_qkv: float | None = None  # olmoe: clamp q, k, v projections to [-clip_qkv, clip_qkv]
    sliding_window: int | None = None
    hidden_act: str = "silu"
    eos_token_id: tuple[int, ...] = ()
    bos_token_id: int | None = None
    source: str = field(default="", compare=False)  # file the config was read from, for messages

    # ---- construction -------------------------------------------------------------------------

    @classmethod
    def from_file(cls, path: str | Path) -> "ModelConfig":
        """Read a config.json (or a model directory containing one).

        Raises ConfigError naming the file for unreadable JSON, a missing field or an unknown model_type.
        """
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        try:
            d = json.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"{path}: config file not found") from None
        except (OSError, ValueError) as e:
            raise ConfigError(f"{path}: cannot read config JSON: {e}") from None
        if not isinstance(d, dict):
            raise ConfigError(f"{path}: config JSON is not an object")
        return cls.from_dict(d, source=str(path))

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "config") -> "ModelConfig":
        """Build from a config.json dict (a multimodal config is read through its `text_config`).

        Raises ConfigError("<source>: ...") naming the field for a missing/invalid field or unknown model_type.
        """
        if "text_config" in d and isinstance(d["text_config"], dict):
            outer = d
            d = dict(d["text_config"])
            if d.get("model_type") is None and outer.get("model_type") is not None:
                d["model_type"] = f"{outer['model_type']}_text"
            if "tie_word_embeddings" in outer:  # the multimodal model owns the lm_head, so its flag governs
                d["tie_word_embeddings"] = outer["tie_word_embeddings"]
        model_type = d.get("model_type")
        if model_type is None:
            raise ConfigError(f"{source}: missing required field 'model_type'")
        family = MODEL_TYPES.get(model_type) if isinstance(model_type, str) else None
        if family is None:
            raise ConfigError(f"{source}: unknown model_type {model_type!r} "
                              f"(supported: {', '.join(sorted(MODEL_TYPES))})")
        defaults = _DEFAULTS[family]

        def get(key: str, *alts: str, required: bool = True) -> Any:
            for k in (key, *alts):
                if d.get(k) is not None:
                    return d[k]
            if key in defaults:
                return defaults[key]
            if required:
                raise ConfigError(f"{source}: missing required field {key!r} (model_type {model_type})")
            return None

        def integer(key: str, value: Any, minimum: int = 1) -> int:
            # JSON has one number type: 4096.0 is 4096, but a string, a bool or 4096.5 is no size.
            whole = isinstance(value, int) or isinstance(value, float) and value.is_integer()
            if isinstance(value, bool) or not whole:
                raise ConfigError(f"{source}: field {key!r} must be an integer, got {value!r}")
            if value < minimum:
                raise ConfigError(f"{source}: field {key!r} must be "
                                  f"{'positive' if minimum == 1 else f'at least {minimum}'}, got {value!r}")
            return int(value)

        def number(key: str, value: Any, positive: bool = False) -> float:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ConfigError(f"{source}: field {key!r} must be a number, got {value!r}")
            if positive and not value > 0:
                raise ConfigError(f"{source}: field {key!r} must be positive, got {value!r}")
            return float(value)

        def flag(key: str, value: Any) -> bool:
            if not isinstance(value, bool):
                raise ConfigError(f"{source}: field {key!r} must be true or false, got {value!r}")
            return value

        def integers(key: str, value: Any, minimum: int = 0) -> tuple[int, ...]:
            """A list of integers (a single one for eos_token_id, as transformers allows)."""
            if not isinstance(value, list):
                value = [value]
            return tuple(integer(key, v, minimum) for v in value)

        for key in _REQUIRED:
            get(key)
        hidden = integer("hidden_size", get("hidden_size"))
        n_layers = integer("num_hidden_layers", get("num_hidden_layers"))
        n_heads = integer("num_attention_heads", get("num_attention_heads"))
        n_kv = integer("num_key_value_heads", get("num_key_value_heads", required=False) or n_heads)
        head_dim = integer("head_dim", get("head_dim", required=False) or hidden // n_heads)

        rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
        if not isinstance(rope, dict):
            raise ConfigError(f"{source}: field 'rope_parameters' must be an object, got {rope!r}")
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type != "default":
            raise ConfigError(f"{source}: field 'rope_parameters.rope_type' = {rope_type!r} is not supported "
                              "(only 'default')")
        rope_theta = number("rope_theta", _first(rope.get("rope_theta"), d.get("rope_theta"), defaults["rope_theta"]),
                            positive=True)
        prf = number("partial_rotary_factor", _first(rope.get("partial_rotary_factor"), d.get("partial_rotary_factor"),
                                                     defaults.get("partial_rotary_factor", 1.0)))

        if family in ("mixtral", "olmoe"):
            # every layer is MoE and intermediate_size is the expert width (moe_intermediate_size: to_dict's)
            num_experts = integer("num_local_experts", get("num_local_experts", "num_experts"))
            moe_inter = integer("intermediate_size", get("intermediate_size", "moe_intermediate_size"))
            dense_inter = None
        else:
            # transformers 5 writes Qwen3-MoE's num_experts as num_local_experts (attribute_map)
            num_experts = integer("num_experts", get("num_experts", "num_local_experts"))
            moe_inter = integer("moe_intermediate_size", get("moe_intermediate_size"))
            dense_inter = d.get("intermediate_size")

        if family in _ALWAYS_NORM_TOPK:
            norm_topk = True
        else:
            norm_topk = flag("norm_topk_prob", get("norm_topk_prob"))

        if family in _HYBRID:
            layer_types = d.get("layer_types")
            if layer_types is None:
                interval = integer("full_attention_interval", get("full_attention_interval"))
                layer_types = [LINEAR_ATTENTION if (i + 1) % interval else FULL_ATTENTION
                               for i in range(n_layers)]
            elif not isinstance(layer_types, list):
                raise ConfigError(f"{source}: field 'layer_types' must be a list, got {layer_types!r}")
            linear = {k: integer(k, get(k), minimum=0) for k in (
                "linear_conv_kernel_dim", "linear_key_head_dim", "linear_value_head_dim", "linear_num_key_heads",
                "linear_num_value_heads")}
            shared = integer("shared_expert_intermediate_size", get("shared_expert_intermediate_size"), minimum=0)
        else:
            layer_types = [FULL_ATTENTION] * n_layers
            linear = {}
            shared = 0

        sparse_keys = family in _SPARSE_STEP  # other families' transformers code ignores these keys
        sliding = d.get("sliding_window")
        if family == "qwen3_moe" and not d.get("use_sliding_window", False):
            sliding = None  # transformers' Qwen3MoeConfig ignores sliding_window unless use_sliding_window
        eos, bos = d.get("eos_token_id"), d.get("bos_token_id")

        cfg = cls(
            model_type=model_type, family=family, hidden_size=hidden, num_hidden_layers=n_layers,
            num_attention_heads=n_heads, num_key_value_heads=n_kv, head_dim=head_dim,
            vocab_size=integer("vocab_size", get("vocab_size")),
            rms_norm_eps=number("rms_norm_eps", get("rms_norm_eps")),
            rope_theta=rope_theta, partial_rotary_factor=prf, num_experts=num_experts,
            num_experts_per_tok=integer("num_experts_per_tok", get("num_experts_per_tok")),
            moe_intermediate_size=moe_inter, norm_topk_prob=norm_topk,
            tie_word_embeddings=flag("tie_word_embeddings", get("tie_word_embeddings")),
            layer_types=tuple(layer_types),
            max_position_embeddings=integer("max_position_embeddings", get("max_position_embeddings")),
            intermediate_size=None if dense_inter is None else integer("intermediate_size", dense_inter),
            shared_expert_intermediate_size=shared,
            attention_bias=flag("attention_bias", d.get("attention_bias", defaults.get("attention_bias", False))),
            mlp_only_layers=integers("mlp_only_layers", d.get("mlp_only_layers") or []) if sparse_keys else (),
            decoder_sparse_step=integer("decoder_sparse_step", get("decoder_sparse_step")) if sparse_keys else 1,
            clip_qkv=None if d.get("clip_qkv") is None else number("clip_qkv", d["clip_qkv"], positive=True),
            sliding_window=None if sliding is None else integer("sliding_window", sliding),
            hidden_act=str(d.get("hidden_act", "silu")),
            eos_token_id=() if eos is None else integers("eos_token_id", eos),
            bos_token_id=None if bos is None else integer("bos_token_id", bos, minimum=0),
            source=source, **linear,
        )
        cfg._validate()
        return cfg

    def _validate(self) -> None:
        """Raise ConfigError naming the first inconsistent field."""
        src = self.source

        def need(ok: bool, fieldname: str, why: str) -> None:
            if not ok:
                raise ConfigError(f"{src}: field {fieldname!r} {why}")

        for name in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                     "head_dim", "vocab_size", "num_experts", "num_experts_per_tok", "moe_intermediate_size",
                     "max_position_embeddings"):
            need(getattr(self, name) > 0, name, f"must be positive, got {getattr(self, name)}")
        need(self.num_attention_heads % self.num_key_value_heads == 0, "num_key_value_heads",
             f"({self.num_key_value_heads}) must divide num_attention_heads ({self.num_attention_heads})")
        need(self.num_experts_per_tok <= self.num_experts, "num_experts_per_tok",
             f"({self.num_experts_per_tok}) exceeds num_experts ({self.num_experts})")
        need(0.0 < self.partial_rotary_factor <= 1.0, "partial_rotary_factor",
             f"must be in (0, 1], got {self.partial_rotary_factor}")
        need(self.rotary_dim % 2 == 0, "partial_rotary_factor", f"gives an odd rotary dim {self.rotary_dim}")
        need(self.hidden_act == "silu", "hidden_act", f"must be 'silu', got {self.hidden_act!r}")
        need(len(self.layer_types) == self.num_hidden_layers, "layer_types",
             f"has {len(self.layer_types)} entries for {self.num_hidden_layers} layers")
        for t in self.layer_types:
            need(t in (FULL_ATTENTION, LINEAR_ATTENTION), "layer_types", f"has unknown entry {t!r}")
        if LINEAR_ATTENTION in self.layer_types:
            for name in ("linear_conv_kernel_dim", "linear_key_head_dim", "linear_value_head_dim",
                         "linear_num_key_heads", "linear_num_value_heads"):
                need(getattr(self, name) > 0, name, f"must be positive, got {getattr(self, name)}")
            need(self.linear_num_value_heads % self.linear_num_key_heads == 0, "linear_num_key_heads",
                 "must divide linear_num_value_heads")
        need(self.decoder_sparse_step > 0, "decoder_sparse_step", "must be positive")
        dense = [i for i in range(self.num_hidden_layers) if not self.is_moe_layer(i)]
        need(not dense or (self.intermediate_size or 0) > 0, "intermediate_size",
             f"is required for the dense MLP layers {dense}")

    # ---- helpers ------------------------------------------------------------------------------

    @property
    def rotary_dim(self) -> int:
        """Number of leading head dimensions that RoPE rotates: int(head_dim * partial_rotary_factor)."""
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def linear_conv_dim(self) -> int:
        """Channels of GatedDeltaNet's causal conv: q and k (2·Hk·Dk) and v (Hv·Dv), the width of in_proj_qkv."""
        return 2 * self.linear_num_key_heads * self.linear_key_head_dim + (
            self.linear_num_value_heads * self.linear_value_head_dim)

    @property
    def has_shared_expert(self) -> bool:
        """True when MoE layers add a sigmoid-gated shared expert (Qwen3.5-MoE, Qwen3-Next)."""
        return self.family in _SHARED_EXPERT and self.shared_expert_intermediate_size > 0

    @property
    def has_attention_output_gate(self) -> bool:
        """True when q_proj also produces a per-head sigmoid output gate (Qwen3.5-MoE, Qwen3-Next)."""
        return self.family in _HYBRID

    @property
    def qk_norm(self) -> str:
        """Where q/k RMSNorm applies: 'head' (per head, Qwen3*), 'full' (whole projection, OLMoE), 'none'."""
        return {"olmoe": "full", "mixtral": "none"}.get(self.family, "head")

    def layer_type(self, i: int) -> str:
        """'full_attention' or 'linear_attention' for decoder layer i."""
        return self.layer_types[i]

    def is_moe_layer(self, i: int) -> bool:
        """True when decoder layer i has routed experts (else a dense SwiGLU MLP of intermediate_size).

        Source: transformers Qwen3MoeDecoderLayer / Qwen3NextDecoderLayer (mlp_only_layers, decoder_sparse_step).
        """
        if i in self.mlp_only_layers:
            return False
        return (i + 1) % self.decoder_sparse_step == 0

    @property
    def moe_layers(self) -> list[int]:
        """Indices of the decoder layers that have routed experts."""
        return [i for i in range(self.num_hidden_layers) if self.is_moe_layer(i)]

    def to_dict(self) -> dict[str, Any]:
        """The normalised fields as a JSON-serialisable dict (tuples become lists; `source` omitted);
        from_dict(to_dict()) gives an equal config."""
        d = dataclasses.asdict(self)
        d.pop("source")
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}
