"""gpt_oss: the reference matches transformers' GptOss classes (float32) at every position of a 300-token
prompt and along 64 decode steps (issue 17: ≤ 1e-4 relative), on variants that exercise what differs from
the other families — a sliding window shorter than the prompt, sinks of both signs, gate pre-activations
beyond the SwiGLU clamp, YaRN — and on a checkpoint whose experts are MXFP4 as OpenAI publishes them."""

from __future__ import annotations

import json

import numpy as np
import pytest

import flashmoe.reference.moe as ref_moe
from checkpoints import (GPT_OSS_VARIANTS, build_mxfp4_checkpoint, canonical_weights, hf_logits,
                         load_hf_model, load_mxfp4_hf_model, prompt_tokens)
from flashmoe.arch.config import SLIDING_ATTENTION, ModelConfig
from flashmoe.reference import ReferenceModel

TOL = 1e-4
PROMPT = 300
DECODE_STEPS = 64


def rel_err(got: np.ndarray, want: np.ndarray) -> float:
    """max|got - want| / max|want| over all positions and vocabulary entries."""
    assert got.shape == want.shape, (got.shape, want.shape)
    return float(np.abs(got - want).max() / np.abs(want).max())


def prefill_then_decode(model: ReferenceModel, tokens: np.ndarray) -> np.ndarray:
    """Logits (T, vocab): the first PROMPT tokens as one prefill, the rest one at a time through the cache."""
    cache = model.new_cache()
    steps = [model.forward(tokens[:PROMPT], cache)]
    steps += [model.forward(tokens[t:t + 1], cache) for t in range(PROMPT, len(tokens))]
    return np.concatenate(steps)


@pytest.mark.parametrize("arch,variant", GPT_OSS_VARIANTS, ids=[v for _, v in GPT_OSS_VARIANTS])
def test_prefill_and_decode_logits_match_transformers_at_every_position(hf_checkpoint, arch, variant):
    path = hf_checkpoint(arch, variant)
    tokens = prompt_tokens(PROMPT + DECODE_STEPS, seed=3)
    want = hf_logits(load_hf_model(arch, variant, path), tokens)
    cfg, weights = canonical_weights(path)
    got = prefill_then_decode(ReferenceModel(cfg, weights), tokens)
    assert rel_err(got[:PROMPT], want[:PROMPT]) <= TOL
    assert rel_err(got[PROMPT:], want[PROMPT:]) <= TOL


def test_the_variants_exercise_window_sinks_clamp_and_yarn(hf_checkpoint, monkeypatch):
    """What the comparisons above rely on: a window shorter than the prompt on the sliding layers, sinks
    of both signs, gate pre-activations beyond swiglu_limit, YaRN with and without truncation."""
    cfg, weights = canonical_weights(hf_checkpoint("gpt_oss", "window8_k2"))
    assert cfg.layer_types[:2] == (SLIDING_ATTENTION, "full_attention") and cfg.attention_window(0) == 8
    assert cfg.attention_window(1) is None and cfg.rope_yarn.truncate is False
    sinks = np.concatenate([weights.tensor(f"layers.{i}.self_attn.sinks") for i in range(cfg.num_hidden_layers)])
    assert sinks.min() < -1 and sinks.max() > 1

    cfg, weights = canonical_weights(hf_checkpoint("gpt_oss", "clamp1_k4_yarn_truncate"))
    assert cfg.swiglu_limit == 1.0 and cfg.rope_yarn.truncate is True
    gates = []
    clamp = ref_moe.clamped_swiglu
    monkeypatch.setattr(ref_moe, "clamped_swiglu", lambda g, u, *a: gates.append(g) or clamp(g, u, *a))
    ReferenceModel(cfg, weights).forward(prompt_tokens(64))
    gates = np.concatenate([g.ravel() for g in gates])
    assert (gates > cfg.swiglu_limit).mean() > 0.05  # the clamp is active on many gate values

    cfg, _ = canonical_weights(hf_checkpoint("gpt_oss", "full_k1_tied_plain_rope"))
    assert cfg.rope_yarn is None and all(cfg.attention_window(i) is None for i in range(cfg.num_hidden_layers))


@pytest.mark.parametrize("arch,variant", GPT_OSS_VARIANTS, ids=[v for _, v in GPT_OSS_VARIANTS])
def test_configs_round_trip_through_to_dict(hf_checkpoint, arch, variant):
    cfg = ModelConfig.from_file(hf_checkpoint(arch, variant))
    assert ModelConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


def test_mxfp4_checkpoint_matches_transformers_dequantised_model(tmp_path):
    """Experts as published (random E2M1 codes and E8M0 scales written by the test); transformers loads
    them through its own MXFP4 dequantisation."""
    path = build_mxfp4_checkpoint("window8_k2", tmp_path / "mxfp4")
    tokens = prompt_tokens(96, seed=4)
    want = hf_logits(load_mxfp4_hf_model(path), tokens)
    cfg, weights = canonical_weights(path)
    assert rel_err(ReferenceModel(cfg, weights).forward(tokens), want) <= TOL


def test_mxfp4_experts_are_converted_byte_for_byte_and_give_transformers_logits(tmp_path):
    """`flashmoe convert --bits none` keeps the published MXFP4 bytes (gate = the even rows of gate_up, up =
    the odd ones) and the expert biases; the reference over the model directory matches transformers."""
    from safetensors.numpy import load_file

    from flashmoe.convert.checkpoint import convert_checkpoint
    from flashmoe.format.modeldir import ModelDir
    from flashmoe.format.mxfp4 import Mxfp4Tensor

    src = build_mxfp4_checkpoint("window8_k2", tmp_path / "hf")
    dst = convert_checkpoint(src, tmp_path / "model", bits="none", log=lambda msg: None)
    published = load_file(src / "model.safetensors")
    with ModelDir.open(dst) as md:
        assert md.manifest.format_version == 2
        expert = md.layout.view(md.read_expert(3, 5))
        gate_up = published["model.layers.3.mlp.experts.gate_up_proj_blocks"][5]  # (2I, H/32, 16)
        assert isinstance(expert["up_proj"], Mxfp4Tensor)
        assert expert["up_proj"].blocks.tobytes() == gate_up[1::2].tobytes()
        assert expert["down_proj"].scales.tobytes() == published["model.layers.3.mlp.experts.down_proj_scales"][5].tobytes()
        np.testing.assert_array_equal(expert["gate_proj.bias"],
                                      published["model.layers.3.mlp.experts.gate_up_proj_bias"][5, 0::2])
    tokens = prompt_tokens(48, seed=5)
    want = hf_logits(load_mxfp4_hf_model(src), tokens)
    assert rel_err(ReferenceModel.from_dir(dst).forward(tokens), want) <= TOL


def test_expert_bits_requantises_mxfp4_experts_to_affine(tmp_path):
    from flashmoe.convert.checkpoint import convert_checkpoint
    from flashmoe.format.modeldir import ModelDir

    src = build_mxfp4_checkpoint("window8_k2", tmp_path / "hf")
    dst = convert_checkpoint(src, tmp_path / "model", bits="8", expert_bits="4", group_size=32,
                             log=lambda msg: None)
    with ModelDir.open(dst) as md:
        assert {q.format for q in md.layout.quantization.values()} == {"affine"}
        assert md.layout.quantization["gate_proj"].bits == 4
