"""The model configuration: Hugging Face config.json keys, validated, with each family's defaults.

Every dimension and flag of a model comes from here; nothing about a model is hard-coded elsewhere.
Field names are the config.json keys of the text model (`text_config` of a multimodal checkpoint).
What differs between families (defaults, which keys hold the expert count and width, which keys a family
honours or ignores, its fixed behaviours) is its Family record (flashmoe/arch/families.py); the properties
below (has_shared_expert, qk_norm, ...) read it, so no other module needs a family's name.
"""

from __future__ import annotations

import dataclasses
import math
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, NoReturn

from flashmoe.arch.families import FAMILIES, MODEL_TYPES, NO_SHARED_EXPERT, SIGMOID_GATED, UNGATED, Family, family_of
from flashmoe.errors import ConfigError

FULL_ATTENTION = "full_attention"
SLIDING_ATTENTION = "sliding_attention"  # softmax attention over the last `sliding_window` positions
LINEAR_ATTENTION = "linear_attention"

_REQUIRED = ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size", "num_experts_per_tok")
_LINEAR_KEYS = ("linear_conv_kernel_dim", "linear_key_head_dim", "linear_value_head_dim", "linear_num_key_heads",
                "linear_num_value_heads")


@dataclass(frozen=True)
class YarnRope:
    """YaRN's RoPE scaling (Peng et al. 2023, "YaRN: Efficient Context Window Extension"), as config.json's
    `rope_scaling` / `rope_parameters` with rope_type "yarn" gives it (DeepSeek-V3: factor 40 over 4096;
    gpt-oss: factor 32 over 4096). The arithmetic is reference/rope.py's; field names are the config keys."""

    factor: float
    original_max_position_embeddings: int
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float | None = None
    mscale_all_dim: float | None = None
    attention_factor: float | None = None
    truncate: bool = True


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
    sliding_window: int | None = None  # on the layers whose layer_types entry is 'sliding_attention'
    # sigmoid routing with a correction bias ("noaux_tc", DeepSeek-V3 / GLM-4.5): expert groups and scaling
    n_group: int = 1
    topk_group: int = 1
    routed_scaling_factor: float = 1.0
    use_qk_norm: bool = False  # read where the family's q/k norm has a switch (GLM-4.5)
    num_nextn_predict_layers: int = 0  # multi-token-prediction layers after the decoder (dropped at conversion)
    # Multi-head Latent Attention (DeepSeek-V2/V3); head_dim is then qk_rope_head_dim, the part RoPE rotates
    q_lora_rank: int | None = None  # None: q_proj straight from the hidden state
    kv_lora_rank: int = 0
    qk_nope_head_dim: int = 0
    qk_rope_head_dim: int = 0
    v_head_dim: int = 0
    rope_interleave: bool = False  # checkpoint's RoPE pairs (x0, x1), (x2, x3)…; de-interleaved at conversion
    rope_yarn: YarnRope | None = None
    swiglu_limit: float | None = None  # the clamped SwiGLU's limit and gain (Family.clamped_swiglu, gpt-oss)
    swiglu_alpha: float | None = None
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
        if path.is_dir() and path.name != "config.json":  # a directory named config.json is refused as one
            path = path / "config.json"
        return cls.from_dict(read_config_json(path), source=str(path))

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "config") -> "ModelConfig":
        """Build from a config.json dict (a multimodal config is read through its `text_config`).

        Each family's keys and defaults come from its Family record (flashmoe/arch/families.py).
        Raises ConfigError("<source>: ...") naming the field for a missing/invalid field or unknown model_type.
        """
        d = text_config(d, source)
        fam = _family(d.get("model_type"), source)
        r = _Reader(d, source, fam.defaults)
        for key in _REQUIRED:
            r.get(key)
        n_layers = r.integer("num_hidden_layers", r.get("num_hidden_layers"))
        mla = _mla_fields(r) if fam.mla else {}
        cfg = cls(model_type=d["model_type"], family=fam.name, num_hidden_layers=n_layers,
                  **_attention_fields(r, fam, mla), **_rope_fields(r, fam), **_expert_fields(r, fam),
                  **_layer_fields(r, fam, n_layers), **_token_fields(r), **mla, source=source)
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
            need(t in (FULL_ATTENTION, SLIDING_ATTENTION, LINEAR_ATTENTION), "layer_types",
                 f"has unknown entry {t!r}")
        need(SLIDING_ATTENTION not in self.layer_types or self.sliding_window is not None, "sliding_window",
             "is required by the 'sliding_attention' layers")
        if LINEAR_ATTENTION in self.layer_types:
            for name in _LINEAR_KEYS:
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
        """True when MoE layers add a shared expert (Qwen3.5-MoE, Qwen3-Next, DeepSeek-V3, GLM-4.5)."""
        return family_of(self).shared_expert != NO_SHARED_EXPERT and self.shared_expert_intermediate_size > 0

    @property
    def has_shared_expert_gate(self) -> bool:
        """True when the shared expert is scaled by a sigmoid gate (Family.shared_expert SIGMOID_GATED)."""
        return self.has_shared_expert and family_of(self).shared_expert == SIGMOID_GATED

    @property
    def router_tensors(self) -> tuple[str, ...]:
        """The per-layer `mlp.gate.{name}` tensors [num_experts] the family's router takes."""
        return family_of(self).router_tensors

    @property
    def is_mla(self) -> bool:
        """True for Multi-head Latent Attention (DeepSeek-V3, Kimi K2): reference/mla.py."""
        return family_of(self).mla

    @property
    def attention_bias_projs(self) -> tuple[str, ...]:
        """The attention projections with a bias: none without attention_bias; MLA's down-projections and
        o_proj (transformers DeepseekV3Attention); else the family's (all four in Qwen3*, q/k/v in GLM-4.5)."""
        if not self.attention_bias:
            return ()
        if self.is_mla:
            return ("q_proj" if self.q_lora_rank is None else "q_a_proj", "kv_a_proj_with_mqa", "o_proj")
        return family_of(self).attention_bias_projs

    @property
    def has_attention_output_gate(self) -> bool:
        """True when q_proj also produces a per-head sigmoid output gate (Qwen3.5-MoE, Qwen3-Next)."""
        return family_of(self).attention_output_gate

    @property
    def qk_norm(self) -> str:
        """Where q/k RMSNorm applies: 'head' (per head, Qwen3*; GLM-4.5 with use_qk_norm), 'full' (whole
        projection, OLMoE), 'none'."""
        fam = family_of(self)
        return fam.qk_norm if fam.qk_norm_switch is None or self.use_qk_norm else "none"

    @property
    def has_attention_sinks(self) -> bool:
        """True when each attention head has a learned sink logit in its softmax denominator (gpt-oss)."""
        return family_of(self).attention_sinks

    @property
    def mxfp4_experts(self) -> bool:
        """True when the family publishes its routed experts in MXFP4 (gpt-oss): kept so by convert and synth."""
        return family_of(self).mxfp4_experts

    @property
    def has_expert_biases(self) -> bool:
        """True when the routed experts' projections have biases (gpt-oss)."""
        return family_of(self).expert_biases

    def layer_type(self, i: int) -> str:
        """'full_attention', 'sliding_attention' or 'linear_attention' for decoder layer i."""
        return self.layer_types[i]

    def is_attention_layer(self, i: int) -> bool:
        """True when decoder layer i mixes tokens by softmax attention over a KV cache (full or sliding)."""
        return self.layer_types[i] != LINEAR_ATTENTION

    def attention_window(self, i: int) -> int | None:
        """How many positions (the query's own included) attention layer i sees: `sliding_window` for a
        'sliding_attention' layer (every attention layer of Mixtral with a window; gpt-oss's alternate
        layers), None (all) otherwise. Source: transformers' `sliding_window_overlay`."""
        return self.sliding_window if self.layer_types[i] == SLIDING_ATTENTION else None

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
        yarn = d.pop("rope_yarn")  # back to the config.json key (no key would mean the family's default)
        d["rope_parameters"] = {"rope_type": "yarn", **yarn} if yarn else {"rope_type": "default"}
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


# ---- reading config.json (ModelConfig.from_dict's parts) ---------------------------------------------------


def read_config_json(path: Path) -> dict[str, Any]:
    """The JSON object of config.json file `path`.

    Raises ConfigError naming the file when it is missing, a directory, unreadable or not a JSON object.
    """
    try:
        d = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: a directory, not a config.json file") from None
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path}: cannot read config JSON: {e}") from None
    if not isinstance(d, dict):
        raise ConfigError(f"{path}: config JSON is not an object")
    return d


def text_config(d: dict[str, Any], source: str) -> dict[str, Any]:
    """The text model's keys: `text_config` of a multimodal config (model_type `<outer>_text`, the outer
    tie_word_embeddings), else d itself. ConfigError naming the field when text_config is not an object."""
    if d.get("text_config") is None:
        return d
    if not isinstance(d["text_config"], dict):
        raise ConfigError(f"{source}: field 'text_config' must be an object, got {d['text_config']!r}")
    outer, d = d, dict(d["text_config"])
    if d.get("model_type") is None and outer.get("model_type") is not None:
        d["model_type"] = f"{outer['model_type']}_text"
    if "tie_word_embeddings" in outer:  # the multimodal model owns the lm_head, so its flag governs
        d["tie_word_embeddings"] = outer["tie_word_embeddings"]
    return d


def _family(model_type: Any, source: str) -> Family:
    """The Family record of a model_type; ConfigError when it is missing or unknown."""
    if model_type is None:
        raise ConfigError(f"{source}: missing required field 'model_type'")
    family = MODEL_TYPES.get(model_type) if isinstance(model_type, str) else None
    if family is None:
        raise ConfigError(f"{source}: unknown model_type {model_type!r} "
                          f"(supported: {', '.join(sorted(MODEL_TYPES))})")
    return FAMILIES[family]


class _Reader:
    """Typed reads of one config dict, falling back to the family's defaults; every error names the file
    (`source`) and the field."""

    def __init__(self, d: dict[str, Any], source: str, defaults: Mapping[str, Any]):
        self.d, self.source, self.defaults = d, source, defaults

    def get(self, key: str, *alts: str, required: bool = True) -> Any:
        """The first of key, *alts that config.json sets, else the family default of key, else None (or a
        ConfigError when required)."""
        for k in (key, *alts):
            if self.d.get(k) is not None:
                return self.d[k]
        if key in self.defaults:
            return self.defaults[key]
        if required:
            raise ConfigError(f"{self.source}: missing required field {key!r} (model_type {self.d['model_type']})")
        return None

    def fail(self, key: str, why: str) -> NoReturn:
        raise ConfigError(f"{self.source}: field {key!r} {why}")

    def integer(self, key: str, value: Any, minimum: int = 1) -> int:
        # JSON has one number type: 4096.0 is 4096, but a string, a bool or 4096.5 is no size.
        whole = isinstance(value, int) or isinstance(value, float) and value.is_integer()
        if isinstance(value, bool) or not whole:
            self.fail(key, f"must be an integer, got {value!r}")
        if value < minimum:
            self.fail(key, f"must be {'positive' if minimum == 1 else f'at least {minimum}'}, got {value!r}")
        return int(value)

    def integers(self, key: str, value: Any, minimum: int = 0) -> tuple[int, ...]:
        """A list of integers (a single one for eos_token_id, as transformers allows)."""
        return tuple(self.integer(key, v, minimum) for v in (value if isinstance(value, list) else [value]))

    def number(self, key: str, value: Any, positive: bool = False) -> float:
        # Python's json reads NaN and Infinity, which no field means (an infinite rope_theta rotates nothing)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            self.fail(key, f"must be a finite number, got {value!r}")
        if positive and not value > 0:
            self.fail(key, f"must be positive, got {value!r}")
        return float(value)

    def flag(self, key: str, value: Any) -> bool:
        if not isinstance(value, bool):
            self.fail(key, f"must be true or false, got {value!r}")
        return value


def _attention_fields(r: _Reader, fam: Family, mla: dict[str, Any]) -> dict[str, Any]:
    """Widths, heads and the attention options shared by every family (MLA's head_dim is its RoPE part, as in
    transformers' DeepseekV3Config)."""
    d, hidden = r.d, r.integer("hidden_size", r.get("hidden_size"))
    n_heads = r.integer("num_attention_heads", r.get("num_attention_heads"))
    given_head_dim = r.get("head_dim", required=False)  # an explicit 0 is refused, not replaced
    head_dim = mla.get("qk_rope_head_dim") or r.integer(
        "head_dim", hidden // n_heads if given_head_dim is None else given_head_dim)
    return dict(
        hidden_size=hidden, num_attention_heads=n_heads,
        num_key_value_heads=r.integer("num_key_value_heads", r.get("num_key_value_heads", required=False) or n_heads),
        head_dim=head_dim,
        use_qk_norm=bool(fam.qk_norm_switch) and r.flag(fam.qk_norm_switch, r.get(fam.qk_norm_switch)),
        vocab_size=r.integer("vocab_size", r.get("vocab_size")),
        rms_norm_eps=r.number("rms_norm_eps", r.get("rms_norm_eps"), positive=True),
        max_position_embeddings=r.integer("max_position_embeddings", r.get("max_position_embeddings")),
        attention_bias=r.flag("attention_bias", d.get("attention_bias", r.defaults.get("attention_bias", False))),
        clip_qkv=None if d.get("clip_qkv") is None else r.number("clip_qkv", d["clip_qkv"], positive=True),
        hidden_act=str(d.get("hidden_act", "silu")),
    )


def _rope_fields(r: _Reader, fam: Family) -> dict[str, Any]:
    """rope_theta and partial_rotary_factor, from rope_parameters (transformers 5), rope_scaling or the top level;
    YaRN's parameters where the family supports it (MLA)."""
    d = r.d
    rope = d.get("rope_parameters") or d.get("rope_scaling") or r.defaults.get("rope_scaling") or {}
    if not isinstance(rope, dict):
        r.fail("rope_parameters", f"must be an object, got {rope!r}")
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", "yarn"):
        raise ConfigError(f"{r.source}: field 'rope_parameters.rope_type' = {rope_type!r} is not supported "
                          "(only 'default' and 'yarn')")
    yarn = _yarn(r, rope) if rope_type == "yarn" else None
    theta = _first(rope.get("rope_theta"), d.get("rope_theta"), r.defaults["rope_theta"])
    rotary_dim = d.get("rotary_dim")  # MiniMax-M2's legacy key, read as transformers does
    head_dim = r.get("head_dim", required=False) or r.get("hidden_size") // r.get("num_attention_heads")
    legacy = None if rotary_dim is None else r.number("rotary_dim", rotary_dim, positive=True) / head_dim
    prf = _first(rope.get("partial_rotary_factor"), d.get("partial_rotary_factor"), legacy,
                 r.defaults.get("partial_rotary_factor", 1.0))
    return dict(rope_theta=r.number("rope_theta", theta, positive=True),
                partial_rotary_factor=r.number("partial_rotary_factor", prf), rope_yarn=yarn)


def _yarn(r: _Reader, rope: dict[str, Any]) -> YarnRope:
    """YaRN's keys of the rope dict (transformers `_compute_yarn_parameters`: a missing factor is the ratio of
    max_position_embeddings to original_max_position_embeddings)."""
    def num(key: str, default: float | None = None) -> float | None:
        return default if rope.get(key) is None else r.number(f"rope_scaling.{key}", rope[key], positive=True)

    original = r.integer("rope_scaling.original_max_position_embeddings", rope.get("original_max_position_embeddings"))
    factor = num("factor") or r.number("max_position_embeddings", r.get("max_position_embeddings")) / original
    return YarnRope(factor=factor, original_max_position_embeddings=original, beta_fast=num("beta_fast", 32.0),
                    beta_slow=num("beta_slow", 1.0), mscale=num("mscale"), mscale_all_dim=num("mscale_all_dim"),
                    attention_factor=num("attention_factor"), truncate=bool(rope.get("truncate", True)))


def _mla_fields(r: _Reader) -> dict[str, Any]:
    """Multi-head Latent Attention's keys (transformers DeepseekV3Config). q_lora_rank null (written as such)
    means no query compression; absent, the family default applies."""
    q_lora = r.d["q_lora_rank"] if "q_lora_rank" in r.d else r.get("q_lora_rank")
    return dict(q_lora_rank=None if q_lora is None else r.integer("q_lora_rank", q_lora),
                **{k: r.integer(k, r.get(k)) for k in ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim",
                                                        "v_head_dim")},
                rope_interleave=r.flag("rope_interleave", r.get("rope_interleave")))


def _expert_fields(r: _Reader, fam: Family) -> dict[str, Any]:
    """Expert count and widths under the family's key names, top-k normalisation, the shared expert."""
    # Errors name the key config.json sets (Mixtral's num_local_experts, not the canonical name).
    experts_key, width_key = (next((k for k in keys if r.d.get(k) is not None), keys[0])
                              for keys in (fam.num_experts_keys, fam.moe_intermediate_keys))
    dense = None if "intermediate_size" in fam.moe_intermediate_keys else r.d.get("intermediate_size")
    shared, moe_width = 0, r.integer(width_key, r.get(*fam.moe_intermediate_keys))
    if fam.shared_expert == UNGATED:  # n_shared_experts experts of the routed width, as one wider MLP
        shared = moe_width * r.integer("n_shared_experts", r.get("n_shared_experts"), minimum=0)
    elif fam.shared_expert != NO_SHARED_EXPERT:  # whatever else the family has
        shared = r.integer("shared_expert_intermediate_size", r.get("shared_expert_intermediate_size"), minimum=0)
    routing = {}
    if fam.group_routing_keys:
        routing = dict(n_group=r.integer("n_group", r.get("n_group")),
                       topk_group=r.integer("topk_group", r.get("topk_group")),
                       routed_scaling_factor=r.number("routed_scaling_factor", r.get("routed_scaling_factor"),
                                                      positive=True))
    return dict(**routing,
        num_experts=r.integer(experts_key, r.get(*fam.num_experts_keys)),
        moe_intermediate_size=moe_width,
        intermediate_size=None if dense is None else r.integer("intermediate_size", dense),
        num_experts_per_tok=r.integer("num_experts_per_tok", r.get("num_experts_per_tok")),
        norm_topk_prob=fam.always_norm_topk or r.flag("norm_topk_prob", r.get("norm_topk_prob")),
        shared_expert_intermediate_size=shared,
    )


def _layer_fields(r: _Reader, fam: Family, n_layers: int) -> dict[str, Any]:
    """Which layers are linear attention (and its sizes), which are dense, and the sliding window."""
    d, out = r.d, {}
    layer_types = [FULL_ATTENTION] * n_layers
    if fam.linear_attention:
        layer_types = d.get("layer_types")
        if layer_types is None:
            interval = r.integer("full_attention_interval", r.get("full_attention_interval"))
            layer_types = [LINEAR_ATTENTION if (i + 1) % interval else FULL_ATTENTION for i in range(n_layers)]
        elif not isinstance(layer_types, list):
            r.fail("layer_types", f"must be a list, got {layer_types!r}")
        out.update({k: r.integer(k, r.get(k), minimum=0) for k in _LINEAR_KEYS})
    if fam.sparse_step_keys:  # other families' transformers code ignores these keys
        out.update(mlp_only_layers=r.integers("mlp_only_layers", d.get("mlp_only_layers") or []),
                   decoder_sparse_step=r.integer("decoder_sparse_step", r.get("decoder_sparse_step")))
    if fam.group_routing_keys:  # DeepSeek: MoE where layer >= first_k_dense_replace and layer % moe_layer_freq == 0
        first = r.integer("first_k_dense_replace", r.get("first_k_dense_replace"), minimum=0)
        freq = r.integer("moe_layer_freq", r.get("moe_layer_freq"))
        out.update(mlp_only_layers=tuple(i for i in range(n_layers) if i < first or i % freq))
    mtp = r.get("num_nextn_predict_layers", "num_mtp_layers", required=False)
    if mtp is not None:
        out.update(num_nextn_predict_layers=r.integer("num_nextn_predict_layers", mtp, minimum=0))
    sliding = d["sliding_window"] if "sliding_window" in d else r.defaults.get("sliding_window")
    if fam.sliding_window_switch and not d.get(fam.sliding_window_switch, False):
        sliding = None  # e.g. transformers' Qwen3MoeConfig ignores sliding_window unless use_sliding_window
    if fam.alternating_sliding:
        layer_types = d.get("layer_types") or [SLIDING_ATTENTION if (i + 1) % 2 else FULL_ATTENTION
                                               for i in range(n_layers)]
    elif sliding is not None:  # the window applies to every attention layer (Mixtral)
        layer_types = [SLIDING_ATTENTION if t == FULL_ATTENTION else t for t in layer_types]
    if fam.clamped_swiglu:
        out.update({k: r.number(k, r.get(k), positive=True) for k in ("swiglu_limit", "swiglu_alpha")})
    return dict(out, layer_types=tuple(layer_types),
                sliding_window=None if sliding is None else r.integer("sliding_window", sliding))


def _token_fields(r: _Reader) -> dict[str, Any]:
    """Special token ids and the tied embedding flag."""
    eos, bos = r.d.get("eos_token_id"), r.d.get("bos_token_id")
    return dict(tie_word_embeddings=r.flag("tie_word_embeddings", r.get("tie_word_embeddings")),
                eos_token_id=() if eos is None else r.integers("eos_token_id", eos),
                bos_token_id=None if bos is None else r.integer("bos_token_id", bos, minimum=0))
