"""MLX checkpoints written by mlx-lm's own model classes map to the same canonical tensors as the Hugging
Face checkpoint they came from, and a 4-bit mlx-lm checkpoint converted to a flashmoe model directory gives
mlx-lm's logits in the reference (issue 2: within 1e-3 relative)."""

from __future__ import annotations

import numpy as np
import pytest

from checkpoints import (NOAUX_VARIANTS, VARIANTS, build_mlx_checkpoint, canonical_weights, mlx_lm_logits, mlx_lm_model,
                         prompt_tokens)
from flashmoe.arch.config import MODEL_TYPES, ModelConfig
from flashmoe.convert.checkpoint import convert_checkpoint
from flashmoe.arch.families import MLX, detect_layout, is_expert_tensor, to_canonical
from flashmoe.reference import ReferenceModel
from flashmoe.arch.tensors import DictWeights

pytest.importorskip("mlx_lm", reason="mlx-lm is needed to write MLX checkpoints (pip install 'mlx[cpu]' mlx-lm)")

# Variants using what mlx-lm's model classes lack: Qwen3.5 with shared_expert_intermediate_size 0 (its MLP
# init divides by the width), Qwen3-MoE attention biases (its q/k/v/o have none) and DeepSeek-V3 or GLM-4.5
# with tied embeddings (their lm_head is always separate) cannot be built at all.
# mlx-lm writes gpt_oss's experts as `experts.{proj}`, not `switch_mlp` (its own test below). mlx-lm's minimax reads the published tensor names, which transformers
# 5 saves too, and config keys (rotary_dim; shared_intermediate_size, which _mlx_lm_config supplies).
MLX_VARIANTS = [v for v in VARIANTS + NOAUX_VARIANTS if v not in {("qwen3_5_moe", "no_shared_k8"),
                                                                  ("qwen3_moe", "norm_topk_k8_attn_bias"),
                                                                  ("deepseek_v3", "tied_attn_bias_k8_shared2"),
                                                                  ("glm4_moe", "tied_k8_dense2_shared2")}
                and v[0] != "gpt_oss"]
# mlx-lm's OLMoE ignores clip_qkv and its Mixtral the sliding window; transformers and the reference apply
# them, so only the tensor mapping is compared for those.
# mlx-lm's DeepSeek-V3 always pairs RoPE dimensions interleaved, ignoring rope_interleave false.
# mlx-lm's GLM-4.5 renormalises the top-k weights only when k > 1 (`top_k > 1 and norm_topk_prob`, as
# DeepSeek-V2's code did); transformers' Glm4MoeTopkRouter does for k = 1 too (weight 1), and so does the reference.
MLX_LOGIT_VARIANTS = [v for v in MLX_VARIANTS if v not in {("olmoe", "tied_k1_clip_qkv"),
                                                           ("mixtral", "tied_k1_window16"),
                                                           ("deepseek_v3", "no_q_lora_no_norm_topk_all_moe"),
                                                           ("glm4_moe", "k1_groups2_rotary_quarter_bias")}]


def _ids(variants):
    return [f"{a}-{v}" for a, v in variants]


@pytest.mark.parametrize("arch,variant", MLX_VARIANTS, ids=_ids(MLX_VARIANTS))
def test_mlx_lm_float_weights_map_to_the_hf_canonical_tensors(hf_checkpoint, arch, variant):
    """switch_mlp stacking, [C, K, 1] conv1d, already-shifted norms and Qwen3-Next's fused in_proj_qkvz
    all land on exactly the tensors the HF checkpoint gives."""
    from mlx.utils import tree_flatten

    path = hf_checkpoint(arch, variant)
    cfg, hf = canonical_weights(path)
    model, _ = mlx_lm_model(path)
    source = {name: np.array(a) for name, a in tree_flatten(model.parameters())}
    assert detect_layout(source) == MLX
    mlx = DictWeights(dict(pair for name, a in source.items() for pair in to_canonical(name, a, cfg, MLX)))

    resident = sorted(n for n in hf.names() if not is_expert_tensor(n))
    assert sorted(n for n in mlx.names() if not is_expert_tensor(n)) == resident
    for name in resident:
        np.testing.assert_array_equal(mlx.tensor(name), hf.tensor(name), err_msg=name)
    for layer in cfg.moe_layers:
        for e in range(cfg.num_experts):
            got, want = mlx.expert(layer, e), hf.expert(layer, e)
            for proj in want:
                np.testing.assert_array_equal(got[proj], want[proj], err_msg=f"layer {layer} expert {e} {proj}")


@pytest.mark.parametrize("arch,variant,group_size",
                         [(a, v, 32) for a, v in MLX_LOGIT_VARIANTS] + [("qwen3_5_moe", "shared_k2", 64)],
                         ids=_ids(MLX_LOGIT_VARIANTS) + ["qwen3_5_moe-shared_k2-group64"])
def test_mlx_4bit_checkpoint_in_the_reference_matches_mlx_lm(hf_checkpoint, tmp_path, arch, variant, group_size):
    """mlx-lm quantises (router and shared-expert gate at 8 bits; group 64 leaves the 32-wide down_proj
    float); convert repacks it; the reference dequantises and must give mlx-lm's logits."""
    mlx_dir = build_mlx_checkpoint(hf_checkpoint(arch, variant), tmp_path / "mlx", bits=4, group_size=group_size)
    model_dir = convert_checkpoint(mlx_dir, tmp_path / "flashmoe", bits="none", log=lambda msg: None)
    tokens = prompt_tokens(32)
    want = mlx_lm_logits(mlx_dir, tokens)
    got = ReferenceModel.from_dir(model_dir).forward(tokens)
    assert ModelConfig.from_file(mlx_dir).family == MODEL_TYPES[arch]
    assert np.abs(got - want).max() / np.abs(want).max() <= 1e-3


def test_gpt_oss_4bit_mlx_checkpoint_in_the_reference_matches_mlx_lm(hf_checkpoint, tmp_path):
    """gpt-oss through mlx-lm's own model class (its sanitize splits the interleaved gate_up of OpenAI's
    layout, mlx_lm_model; SwitchGLU with biases; the router at 8 bits), quantised to 4 bits, converted, in the
    reference. mlx-lm's YaRN always rounds its correction range (transformers' `truncate: false` does not) and
    its SwigluOAI keeps the default limit 7, so the checkpoint is window8_k2 (limit 7) with truncate set."""
    import json
    import shutil

    hf_dir = tmp_path / "hf"
    shutil.copytree(hf_checkpoint("gpt_oss", "window8_k2"), hf_dir)
    config = json.loads((hf_dir / "config.json").read_text())
    config["rope_parameters"]["truncate"] = True
    (hf_dir / "config.json").write_text(json.dumps(config))
    mlx_dir = build_mlx_checkpoint(hf_dir, tmp_path / "mlx", bits=4, group_size=32)
    model_dir = convert_checkpoint(mlx_dir, tmp_path / "flashmoe", bits="none", log=lambda msg: None)
    tokens = prompt_tokens(32)  # longer than the window of 8
    want = mlx_lm_logits(mlx_dir, tokens)
    got = ReferenceModel.from_dir(model_dir).forward(tokens)
    assert np.abs(got - want).max() / np.abs(want).max() <= 1e-3
