"""flashmoe.arch.families: checkpoint names and layouts -> canonical tensors (the end-to-end proofs are in
test_reference_hf.py and test_reference_mlx.py; these pin the edges)."""

from __future__ import annotations

import numpy as np
import pytest

from flashmoe.arch.config import ModelConfig
from flashmoe.errors import CheckpointError
from flashmoe.arch.families import HF, MLX, detect_layout, drop_reason, is_expert_tensor, to_canonical
from flashmoe.format.policy import QUANT_8BIT, QUANT_DEFAULT, QUANT_FLOAT, quant_class

TINY = dict(hidden_size=8, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=4,
            vocab_size=16, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=6, partial_rotary_factor=0.5,
            shared_expert_intermediate_size=6, linear_num_key_heads=2, linear_num_value_heads=4,
            linear_key_head_dim=3, linear_value_head_dim=2, linear_conv_kernel_dim=4,
            layer_types=["linear_attention", "full_attention"])


def cfg_of(model_type: str, **kw) -> ModelConfig:
    return ModelConfig.from_dict(dict(TINY, model_type=model_type, **kw))


def one(pairs):
    assert len(pairs) == 1, pairs
    return pairs[0]


@pytest.mark.parametrize("name,reason", [
    ("model.visual.blocks.0.attn.qkv.weight", "vision tower"),
    ("mtp.layers.0.mlp.gate.weight", "multi-token-prediction"),
    ("model.layers.0.self_attn.rotary_emb.inv_freq", "rotary cache"),
    ("model.language_model.layers.0.mlp.gate.weight", None),
])
def test_drop_reason_names_what_is_not_converted(name, reason):
    got = drop_reason(name)
    assert got is None if reason is None else reason in got
    assert (to_canonical(name, np.zeros((4, 8), np.float32), cfg_of("qwen3_5_moe")) == []) == (reason is not None)


@pytest.mark.parametrize("name,canonical", [
    ("model.language_model.layers.1.self_attn.q_proj.weight", "layers.1.self_attn.q_proj.weight"),
    ("language_model.model.layers.1.mlp.gate.weight", "layers.1.mlp.gate.weight"),
    ("language_model.lm_head.weight", "lm_head.weight"),
    ("model.embed_tokens.weight", "embed_tokens.weight"),
])
def test_text_model_prefixes_of_hf_multimodal_and_mlx_are_stripped(name, canonical):
    assert one(to_canonical(name, np.zeros((4, 8), np.float32), cfg_of("qwen3_5_moe")))[0] == canonical


def test_plus_one_applies_to_qwen_hf_norms_only_not_gated_norm_nor_mlx_nor_other_families():
    w = np.full(4, 0.25, np.float32)
    q35 = cfg_of("qwen3_5_moe")
    assert one(to_canonical("model.norm.weight", w, q35))[1][0] == 1.25
    assert one(to_canonical("model.layers.1.self_attn.k_norm.weight", w, q35))[1][0] == 1.25
    assert one(to_canonical("model.layers.0.linear_attn.norm.weight", w, q35))[1][0] == 0.25
    assert one(to_canonical("model.norm.weight", w, q35, MLX))[1][0] == 0.25
    assert one(to_canonical("model.norm.weight", w, cfg_of("qwen3_moe")))[1][0] == 0.25


def test_mixtral_block_sparse_moe_names_map_to_gate_up_down():
    cfg = cfg_of("mixtral", num_local_experts=4, intermediate_size=6)
    a = np.zeros((6, 8), np.float32)
    assert one(to_canonical("model.layers.0.block_sparse_moe.gate.weight", a, cfg))[0] == "layers.0.mlp.gate.weight"
    for src, proj in (("w1", "gate_proj"), ("w3", "up_proj"), ("w2", "down_proj")):
        name = one(to_canonical(f"model.layers.0.block_sparse_moe.experts.3.{src}.weight", a, cfg))[0]
        assert name == f"layers.0.mlp.experts.3.{proj}.weight" and is_expert_tensor(name)


def test_fused_gate_up_is_split_gate_first_and_accepted_in_either_orientation():
    cfg = cfg_of("qwen3_moe")
    E, I, H = 4, 6, 8
    gate_up = np.arange(E * 2 * I * H, dtype=np.float32).reshape(E, 2 * I, H)
    (gn, g), (un, u) = to_canonical("model.layers.0.mlp.experts.gate_up_proj", gate_up, cfg)
    assert (gn, un) == ("layers.0.mlp.experts.gate_proj.weight", "layers.0.mlp.experts.up_proj.weight")
    np.testing.assert_array_equal(g, gate_up[:, :I])
    np.testing.assert_array_equal(u, gate_up[:, I:])
    (_, g2), (_, u2) = to_canonical("model.layers.0.mlp.experts.gate_up_proj", gate_up.transpose(0, 2, 1), cfg)
    np.testing.assert_array_equal(g2, g)
    with pytest.raises(CheckpointError, match="experts.down_proj"):
        to_canonical("model.layers.0.mlp.experts.down_proj", np.zeros((E, H, I + 1), np.float32), cfg)


def test_qwen3_next_qkvz_split_follows_transformers_head_grouping():
    """Rows of in_proj_qkvz are [per key head g: q_g (Dk), k_g (Dk), v of its Hv/Hk heads, z of them]."""
    cfg = cfg_of("qwen3_next")
    hk, dk, r, dv = 2, 3, 2, 2
    per_head = 2 * dk + 2 * r * dv
    rows = np.arange(hk * per_head, dtype=np.float32)[:, None] * np.ones((1, 8), np.float32)
    out = dict(to_canonical("model.layers.0.linear_attn.in_proj_qkvz.weight", rows, cfg))
    qkv, z = out["layers.0.linear_attn.in_proj_qkv.weight"][:, 0], out["layers.0.linear_attn.in_proj_z.weight"][:, 0]
    base = [g * per_head for g in range(hk)]
    q = [b + i for b in base for i in range(dk)]
    k = [b + dk + i for b in base for i in range(dk)]
    v = [b + 2 * dk + i for b in base for i in range(r * dv)]
    zz = [b + 2 * dk + r * dv + i for b in base for i in range(r * dv)]
    assert qkv.tolist() == q + k + v and z.tolist() == zz
    ba = np.arange(hk * 2 * r, dtype=np.float32)[:, None]
    out = dict(to_canonical("model.layers.0.linear_attn.in_proj_ba.scales", ba, cfg, MLX))
    assert out["layers.0.linear_attn.in_proj_b.scales"][:, 0].tolist() == [0, 1, 4, 5]
    assert out["layers.0.linear_attn.in_proj_a.scales"][:, 0].tolist() == [2, 3, 6, 7]
    with pytest.raises(CheckpointError, match="in_proj_qkvz"):
        to_canonical("model.layers.0.linear_attn.in_proj_qkvz.weight", rows[:-1], cfg)


def test_mlx_conv1d_layout_is_transposed_to_hf():
    conv = np.arange(5 * 4, dtype=np.float32).reshape(5, 4, 1)  # MLX [C, K, 1]
    name, out = one(to_canonical("model.layers.0.linear_attn.conv1d.weight", conv, cfg_of("qwen3_next"), MLX))
    assert out.shape == (5, 1, 4) and out[2, 0].tolist() == conv[2, :, 0].tolist()


def test_empty_shared_expert_is_dropped():
    cfg = cfg_of("qwen3_5_moe", shared_expert_intermediate_size=0)
    assert not cfg.has_shared_expert
    assert to_canonical("model.layers.0.mlp.shared_expert_gate.weight", np.zeros((1, 8), np.float32), cfg) == []


def test_layout_detection_and_quantisation_classes():
    assert detect_layout(["model.layers.0.mlp.switch_mlp.up_proj.weight"]) == MLX
    assert detect_layout(["model.layers.0.mlp.experts.0.up_proj.weight"]) == HF
    assert quant_class("layers.0.mlp.gate.weight", (4, 8)) == QUANT_8BIT
    assert quant_class("layers.0.mlp.shared_expert_gate.weight", (1, 8)) == QUANT_8BIT
    assert quant_class("layers.0.mlp.experts.up_proj.weight", (4, 6, 8)) == QUANT_DEFAULT
    assert quant_class("layers.0.self_attn.q_proj.weight", (8, 8)) == QUANT_DEFAULT
    assert quant_class("embed_tokens.weight", (16, 8)) == QUANT_DEFAULT
    for name, shape in [("layers.0.linear_attn.conv1d.weight", (5, 1, 4)), ("layers.0.linear_attn.A_log", (4,)),
                        ("layers.0.input_layernorm.weight", (8,)), ("layers.0.self_attn.q_proj.bias", (8,))]:
        assert quant_class(name, shape) == QUANT_FLOAT


def test_shifted_bfloat16_norm_is_float32_so_no_bits_of_w_are_lost():
    import ml_dtypes

    w = np.array([0.0078125, -0.01171875, 0.3], dtype=ml_dtypes.bfloat16)
    _, out = one(to_canonical("model.layers.0.input_layernorm.weight", w, cfg_of("qwen3_next")))
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, w.astype(np.float32) + 1)
