"""DeepSeek-V3, Kimi K2 and GLM-4.5 (sigmoid routing with a correction bias, expert groups, shared experts; MLA
for DeepSeek/Kimi): the NumPy reference matches transformers float32 at every position of a 300-token prompt,
along 64 decode steps and past position 1,000, in memory and through `flashmoe convert --bits none`.
Tolerance: max|Δ| / max|logits| ≤ 1e-4 (issue 16)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from checkpoints import NOAUX_VARIANTS, canonical_weights, hf_logits, load_hf_model, prompt_tokens
from flashmoe.arch.config import ModelConfig
from flashmoe.arch.families import to_canonical
from flashmoe.arch.tensors import DictWeights
from flashmoe.convert.checkpoint import convert_checkpoint
from flashmoe.reference import ReferenceModel

TOL = 1e-4
PROMPT = 300
DECODE_STEPS = 64
LONG = [("deepseek_v3", "groups_yarn_q_lora"), ("glm4_moe", "qk_norm_attn_bias")]

ids = [f"{a}-{v}" for a, v in NOAUX_VARIANTS]


def rel_err(got: np.ndarray, want: np.ndarray) -> float:
    """max|got - want| / max|want| over all positions and vocabulary entries."""
    assert got.shape == want.shape, (got.shape, want.shape)
    return float(np.abs(got - want).max() / np.abs(want).max())


@pytest.mark.parametrize("arch,variant", NOAUX_VARIANTS, ids=ids)
def test_prefill_and_decode_match_transformers_at_every_position(hf_checkpoint, tmp_path, arch, variant):
    path = hf_checkpoint(arch, variant)
    tokens = prompt_tokens(PROMPT + DECODE_STEPS, seed=3)
    want = hf_logits(load_hf_model(arch, variant, path), tokens)
    cfg, weights = canonical_weights(path)
    model = ReferenceModel(cfg, weights)
    cache = model.new_cache()
    assert rel_err(model.forward(tokens[:PROMPT], cache), want[:PROMPT]) <= TOL
    steps = [model.forward(tokens[t:t + 1], cache)[0] for t in range(PROMPT, PROMPT + DECODE_STEPS)]
    assert rel_err(np.stack(steps), want[PROMPT:]) <= TOL
    model_dir = convert_checkpoint(path, tmp_path / "model", bits="none", log=lambda msg: None)
    assert rel_err(ReferenceModel.from_dir(model_dir).forward(tokens[:PROMPT]), want[:PROMPT]) <= TOL


@pytest.mark.parametrize("arch,variant", LONG, ids=[f"{a}-{v}" for a, v in LONG])
def test_long_prompt_matches_transformers_past_position_1000(hf_checkpoint, arch, variant):
    """YaRN (DeepSeek) and partial rotary (GLM) mistakes hide near position 0."""
    path = hf_checkpoint(arch, variant)
    tokens = prompt_tokens(1040, seed=2)
    want = hf_logits(load_hf_model(arch, variant, path), tokens)
    cfg, weights = canonical_weights(path)
    got = ReferenceModel(cfg, weights).forward(tokens)
    assert rel_err(got[1000:], want[1000:]) <= TOL


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


@pytest.mark.parametrize("arch,variant", [("deepseek_v3", "groups_yarn_q_lora"), ("glm4_moe", "qk_norm_attn_bias")])
def test_fused_expert_tensors_of_the_transformers_state_dict_give_the_same_logits(hf_checkpoint, arch, variant):
    path = hf_checkpoint(arch, variant)
    model = load_hf_model(arch, variant, path)
    state = {n: t.detach().numpy() for n, t in model.state_dict().items()}
    assert any(n.endswith("experts.gate_up_proj") for n in state)
    cfg = ModelConfig.from_file(path)
    weights = DictWeights(dict(pair for n, a in state.items() for pair in to_canonical(n, a, cfg)))
    tokens = prompt_tokens(32)
    assert rel_err(ReferenceModel(cfg, weights).forward(tokens), hf_logits(model, tokens)) <= TOL


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
