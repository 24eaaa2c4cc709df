"""Checkpoint tensor names and layouts per architecture family -> the canonical names of docs/formats.md.

This is the only module that knows how checkpoints differ. A family is a small table of differences:

- `renames`: regex substitutions on the layer-relative name (Mixtral's `block_sparse_moe`, `w1/w3/w2`);
- `plus_one_norms`: the family's RMSNorm computes x·(1+w) (transformers Qwen3NextRMSNorm /
  Qwen3_5MoeRMSNorm); canonical norms are plain x·w, so 1 is added to those weights at conversion.
  The gated RMSNorm of linear attention (`linear_attn.norm`) is plain x·w in transformers and is left alone.
  mlx-lm's `sanitize` already adds the 1, so MLX checkpoints are not shifted again;
- `fused_linear_attn`: Qwen3-Next's `in_proj_qkvz`/`in_proj_ba` are split into the Qwen3.5 layout
  (`in_proj_qkv`, `in_proj_z`, `in_proj_b`, `in_proj_a`) following transformers'
  `Qwen3NextGatedDeltaNet.fix_query_key_value_ordering`.

Everything else (checkpoint prefixes, the three expert storages, MLX's conv1d layout) is shared.
Splits are by rows (the output dimension), so they apply unchanged to MLX `.scales`/`.biases`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable

import numpy as np

from flashmoe.arch.config import ModelConfig
from flashmoe.errors import CheckpointError

HF = "hf"
MLX = "mlx"

# Quantisation classes (see quant_class).
QUANT_FLOAT = "float"
QUANT_8BIT = "8bit"
QUANT_DEFAULT = "default"


@dataclass(frozen=True)
class Family:
    """The differences of one architecture family from the canonical layout."""

    router: str = "softmax_topk"  # a name in reference/routing.py's ROUTERS
    renames: tuple[tuple[str, str], ...] = ()
    plus_one_norms: bool = False
    fused_linear_attn: bool = False


FAMILIES: dict[str, Family] = {
    "qwen3_5_moe": Family(plus_one_norms=True),
    "qwen3_next": Family(plus_one_norms=True, fused_linear_attn=True),
    "qwen3_moe": Family(),
    "olmoe": Family(),
    "mixtral": Family(renames=(
        (r"\.block_sparse_moe\.", ".mlp."),
        (r"\.experts\.(\d+)\.w1\.", r".experts.\1.gate_proj."),
        (r"\.experts\.(\d+)\.w3\.", r".experts.\1.up_proj."),
        (r"\.experts\.(\d+)\.w2\.", r".experts.\1.down_proj."),
    )),
}

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
_QKVZ = re.compile(r"^(layers\.\d+\.linear_attn)\.in_proj_(qkvz|ba)\.(weight|scales|biases)$")
_CONV = re.compile(r"^layers\.\d+\.linear_attn\.conv1d\.weight$")


def family_of(cfg: ModelConfig) -> Family:
    """The Family table for cfg.family."""
    return FAMILIES[cfg.family]


def detect_layout(names: Iterable[str]) -> str:
    """'mlx' when the checkpoint was written by mlx-lm (its `sanitize` stacks every MoE family's experts into
    `switch_mlp`), else 'hf'."""
    return MLX if any(".switch_mlp." in n for n in names) else HF


def drop_reason(name: str) -> str | None:
    """Why checkpoint tensor `name` is not converted (vision tower, MTP head, rotary cache), or None when it is.
    Converters print one message per reason."""
    for pattern, reason in _DROPPED:
        if pattern.search(name):
            return reason
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
    if drop_reason(name) is not None:
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
        inter = cfg.moe_intermediate_size
        return [(f"{m[1]}.gate_proj.weight", gate_up[:, :inter]), (f"{m[1]}.up_proj.weight", gate_up[:, inter:])]
    if m := _FUSED_DOWN.match(canon):
        down = _oriented(name, array, cfg, rows=cfg.hidden_size, cols=cfg.moe_intermediate_size)
        return [(f"{m[1]}.down_proj.weight", down)]
    if fam.fused_linear_attn and (m := _QKVZ.match(canon)):
        return _split_qkvz(name, m[1], m[2], m[3], array, cfg)
    if _CONV.match(canon) and array.ndim == 3 and array.shape[1] != 1:
        array = np.ascontiguousarray(array.transpose(0, 2, 1))  # MLX Conv1d [C, K, 1] -> HF [C, 1, K]
    if fam.plus_one_norms and layout == HF and _PLUS_ONE.match(canon):
        # float32 result: 1 + w rounded back to bf16 would lose w's low bits (transformers adds in float32)
        array = array.astype(np.float32) + np.float32(1.0)
    return [(canon, array)]


def is_expert_tensor(canonical_name: str) -> bool:
    """True for routed-expert tensors (per-expert or stacked `layers.{i}.mlp.experts.…`), which live in the
    expert files rather than resident.safetensors. The shared expert is resident."""
    return bool(_EXPERT.match(canonical_name))


def quant_class(canonical_name: str, shape: tuple[int, ...]) -> str:
    """How a tensor is stored when quantising, following mlx-lm's convert:

    QUANT_FLOAT for everything that is not a 2-D linear/embedding weight (norms, biases, conv1d, A_log,
    dt_bias); QUANT_8BIT for the router `mlp.gate` and `mlp.shared_expert_gate` (mlx-lm's quant_predicate for
    the Qwen3.5/Next families keeps them at 8 bits, group 64); QUANT_DEFAULT (the requested bits) otherwise.
    Whether an input width is divisible by the group size is the quantiser's check, not decided here.
    """
    is_matrix = canonical_name.endswith(".weight") and (len(shape) == 2 or (len(shape) == 3 and
                                                                           is_expert_tensor(canonical_name)))
    if not is_matrix or ".conv1d." in canonical_name:
        return QUANT_FLOAT
    if canonical_name.endswith((".mlp.gate.weight", ".mlp.shared_expert_gate.weight")):
        return QUANT_8BIT
    return QUANT_DEFAULT


def _strip_prefix(name: str) -> str:
    for p in _PREFIXES:
        if name.startswith(p):
            return name[len(p):]
    return name


def _oriented(name: str, array: np.ndarray, cfg: ModelConfig, rows: int, cols: int) -> np.ndarray:
    """A fused expert tensor as [E, rows, cols] ([E, out, in]); transformers 5 stores it so, but accept the
    transposed [E, cols, rows] too (unambiguous only when rows != cols; equal means already [E, out, in])."""
    e = cfg.num_experts
    if array.shape == (e, rows, cols):
        return array
    if array.shape == (e, cols, rows):
        return np.ascontiguousarray(array.transpose(0, 2, 1))
    raise CheckpointError(f"tensor {name!r}: shape {tuple(array.shape)} is neither {(e, rows, cols)} "
                          f"nor {(e, cols, rows)}")


def _split_qkvz(name: str, prefix: str, kind: str, suffix: str, array: np.ndarray,
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
