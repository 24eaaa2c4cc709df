"""DeepSeek-V3, Kimi K2 and GLM-4.5 (sigmoid routing with a correction bias, expert groups, shared experts; MLA
for DeepSeek/Kimi): what test_reference_hf does not cover for every family (it checks these families' logits
against transformers at every position of a 300-token prompt, 64 decode steps and 1,040 positions): the
correction bias matters, the multi-token-prediction layer is dropped, config.json gives every dimension."""

from __future__ import annotations

import json

import numpy as np
import pytest

from checkpoints import canonical_weights, hf_logits, load_hf_model, prompt_tokens
from test_reference_hf import TOL, rel_err
from flashmoe.arch.config import ModelConfig
from flashmoe.arch.tensors import DictWeights
from flashmoe.convert.checkpoint import convert_checkpoint
from flashmoe.reference import ReferenceModel


@pytest.mark.parametrize("arch,variant", [("deepseek_v3", "groups_yarn_q_lora"),
                                          ("glm4_moe", "groups_no_norm_topk_all_moe")])
def test_correction_bias_changes_the_chosen_experts(hf_checkpoint, arch, variant):
    """The test checkpoints' bias is large enough that ignoring it routes differently: the logits then miss
    transformers' by far more than the tolerance."""
    path = hf_checkpoint(arch, variant)
    tokens = prompt_tokens(64)
    want = hf_logits(load_hf_model(arch, variant, path), tokens)
    cfg, weights = canonical_weights(path)
    unbiased = DictWeights({n: np.zeros_like(a) if n.endswith("e_score_correction_bias") else a
                            for n, a in ((n, weights.tensor(n)) for n in weights.names())})
    assert rel_err(ReferenceModel(cfg, unbiased).forward(tokens), want) > 100 * TOL


def test_multi_token_prediction_layer_is_dropped_with_a_message(hf_checkpoint, tmp_path):
    """DeepSeek-V3 stores its MTP module as layer num_hidden_layers; conversion skips it and says so."""
    from safetensors.numpy import load_file, save_file

    src = hf_checkpoint("deepseek_v3", "groups_yarn_q_lora")
    ckpt = tmp_path / "with_mtp"
    ckpt.mkdir()
    config = json.loads((src / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps(dict(config, num_nextn_predict_layers=1)))
    tensors = load_file(src / "model.safetensors")
    n = config["num_hidden_layers"]
    mtp = {k.replace(f"layers.{n - 1}.", f"layers.{n}."): v for k, v in tensors.items() if f"layers.{n - 1}." in k}
    save_file({**tensors, **mtp, f"model.layers.{n}.eh_proj.weight": np.zeros((64, 128), np.float32)},
              str(ckpt / "model.safetensors"))
    notes = []
    out = convert_checkpoint(ckpt, tmp_path / "out", bits="none", log=notes.append)
    assert any("multi-token-prediction layer" in m and f"{len(mtp) + 1} tensor" in m for m in notes), notes
    tokens = prompt_tokens(16)
    want = hf_logits(load_hf_model("deepseek_v3", "groups_yarn_q_lora", src), tokens)
    assert rel_err(ReferenceModel.from_dir(out).forward(tokens), want) <= TOL


def test_config_takes_every_dimension_from_config_json(hf_checkpoint):
    cfg = ModelConfig.from_file(hf_checkpoint("kimi_k2", "one_group_k2"))
    assert (cfg.model_type, cfg.family) == ("kimi_k2", "deepseek_v3")
    assert (cfg.kv_lora_rank, cfg.q_lora_rank, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim) == (
        32, 48, 32, 16, 20)
    assert (cfg.num_experts, cfg.n_group, cfg.topk_group, cfg.routed_scaling_factor) == (16, 1, 1, 2.827)
    assert cfg.moe_layers == [1, 2] and cfg.shared_expert_intermediate_size == 32
    assert cfg.rope_yarn.factor == 32.0 and cfg.rope_yarn.original_max_position_embeddings == 128
    glm = ModelConfig.from_file(hf_checkpoint("glm4_moe", "tied_k8_dense2_shared2"))
    assert (glm.rotary_dim, glm.qk_norm, glm.moe_layers, glm.shared_expert_intermediate_size) == (8, "none", [2], 64)
