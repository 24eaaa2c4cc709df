"""The NumPy reference matches Hugging Face transformers (float32) on tiny random checkpoints of every
supported architecture: prefill of a 32-token prompt, 64 incremental decode steps, and a 1,000+ token
prompt. Tolerance: max|Δ| / max|logits| ≤ 1e-4 (issue 2)."""

from __future__ import annotations

import numpy as np
import pytest

from checkpoints import (LONG_VARIANTS, NOAUX_VARIANTS, VARIANTS, canonical_weights, hf_logits, load_hf_model,
                         prompt_tokens)
from flashmoe.arch.config import ModelConfig
from flashmoe.convert.checkpoint import convert_checkpoint
from flashmoe.arch.families import to_canonical
from flashmoe.reference import ReferenceModel
from flashmoe.arch.tensors import DictWeights

TOL = 1e-4
PROMPT = 32
DECODE_STEPS = 64

ALL = VARIANTS + NOAUX_VARIANTS
ids = [f"{a}-{v}" for a, v in ALL]
#: Issue 16 asks the sigmoid-routed families (DeepSeek-V3, Kimi K2, GLM-4.5) for a 300-token prompt.
LONG_PROMPT = 300


def rel_err(got: np.ndarray, want: np.ndarray) -> float:
    """max|got - want| / max|want| over all positions and vocabulary entries."""
    assert got.shape == want.shape, (got.shape, want.shape)
    return float(np.abs(got - want).max() / np.abs(want).max())


@pytest.mark.parametrize("arch,variant", ALL, ids=ids)
def test_prefill_logits_match_transformers_at_every_position(hf_checkpoint, tmp_path, arch, variant):
    """Both from the checkpoint mapped in memory (families.to_canonical -> DictWeights) and through
    `flashmoe convert --bits none` + ModelDir (vision tensors dropped, norms shifted, experts in files)."""
    path = hf_checkpoint(arch, variant)
    tokens = prompt_tokens(PROMPT)
    want = hf_logits(load_hf_model(arch, variant, path), tokens)
    cfg, weights = canonical_weights(path)
    got = ReferenceModel(cfg, weights).forward(tokens, None)
    assert got.dtype == np.float32 and got.shape == (PROMPT, cfg.vocab_size)
    assert rel_err(got, want) <= TOL
    model_dir = convert_checkpoint(path, tmp_path / "model", bits="none", log=lambda msg: None)
    assert rel_err(ReferenceModel.from_dir(model_dir).forward(tokens), want) <= TOL


@pytest.mark.parametrize("arch,variant", [("deepseek_v3", "groups_yarn_q_lora"), ("glm4_moe", "qk_norm_attn_bias"),
                                          ("qwen3_5_moe", "shared_k2"), ("qwen3_next", "shared_k2"),
                                          ("qwen3_moe", "norm_topk_k8_attn_bias"), ("mixtral", "k2"),
                                          ("olmoe", "no_norm_topk_k2")])
def test_fused_expert_tensors_of_the_transformers_state_dict_give_the_same_logits(hf_checkpoint, arch, variant):
    """transformers 5 holds experts fused in memory (gate_up_proj [E, 2I, H], down_proj [E, H, I]);
    mapping its state_dict gives stacked canonical experts and the same logits."""
    path = hf_checkpoint(arch, variant)
    model = load_hf_model(arch, variant, path)
    state = {n: t.detach().numpy() for n, t in model.state_dict().items()}
    assert any(n.endswith("experts.gate_up_proj") for n in state)
    cfg = ModelConfig.from_file(path)
    weights = DictWeights(dict(pair for n, a in state.items() for pair in to_canonical(n, a, cfg)))
    assert weights.has(f"layers.{cfg.moe_layers[0]}.mlp.experts.gate_proj.weight")
    tokens = prompt_tokens(PROMPT)
    assert rel_err(ReferenceModel(cfg, weights).forward(tokens), hf_logits(model, tokens)) <= TOL


@pytest.mark.parametrize("arch,variant", ALL, ids=ids)
def test_incremental_decode_matches_transformers_full_forward(hf_checkpoint, arch, variant):
    """Prefill 32 tokens (300 for NOAUX_VARIANTS), then feed 64 more one at a time through the cache; every
    step's logits equal transformers' full forward over the whole sequence at that position."""
    path = hf_checkpoint(arch, variant)
    prompt = LONG_PROMPT if (arch, variant) in NOAUX_VARIANTS else PROMPT
    tokens = prompt_tokens(prompt + DECODE_STEPS, seed=1)
    want = hf_logits(load_hf_model(arch, variant, path), tokens)
    cfg, weights = canonical_weights(path)
    model = ReferenceModel(cfg, weights)
    cache = model.new_cache()
    prefill = model.forward(tokens[:prompt], cache)
    steps = [model.forward(tokens[t:t + 1], cache)[0] for t in range(prompt, prompt + DECODE_STEPS)]
    assert cache.position == prompt + DECODE_STEPS
    assert rel_err(prefill, want[:prompt]) <= TOL
    assert rel_err(np.stack(steps), want[prompt:]) <= TOL


@pytest.mark.parametrize("arch,variant", LONG_VARIANTS, ids=[f"{a}-{v}" for a, v in LONG_VARIANTS])
def test_long_prompt_matches_transformers_past_position_1000(hf_checkpoint, arch, variant):
    """RoPE (full, partial, YaRN) mistakes hide near position 0; 1,040 positions expose them."""
    path = hf_checkpoint(arch, variant)
    tokens = prompt_tokens(1040, seed=2)
    want = hf_logits(load_hf_model(arch, variant, path), tokens)
    cfg, weights = canonical_weights(path)
    got = ReferenceModel(cfg, weights).forward(tokens)
    assert rel_err(got[1000:], want[1000:]) <= TOL
    assert rel_err(got, want) <= TOL


def test_float64_reference_agrees_with_float32(hf_checkpoint):
    path = hf_checkpoint("qwen3_next", "shared_k2")
    cfg, weights = canonical_weights(path)
    tokens = prompt_tokens(PROMPT)
    lo = ReferenceModel(cfg, weights).forward(tokens)
    hi = ReferenceModel(cfg, weights, dtype=np.float64).forward(tokens)
    assert hi.dtype == np.float32
    assert rel_err(lo, hi) <= 1e-5
