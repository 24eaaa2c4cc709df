"""ModelConfig reads Hugging Face config.json files of every supported family, applies each family's
transformers defaults, and rejects bad configs with a ConfigError naming the field and file."""

from __future__ import annotations

import json

import pytest

from checkpoints import VARIANTS
from flashmoe.arch.config import FULL_ATTENTION, LINEAR_ATTENTION, ModelConfig
from flashmoe.errors import ConfigError

QWEN35_397B = {  # the published Qwen3.5-397B-A17B text config, abridged to the keys flashmoe reads
    "model_type": "qwen3_5_moe_text", "hidden_size": 4096, "num_hidden_layers": 60, "num_attention_heads": 32,
    "num_key_value_heads": 2, "head_dim": 256, "vocab_size": 248320, "rms_norm_eps": 1e-6,
    "num_experts": 512, "num_experts_per_tok": 10, "moe_intermediate_size": 1024,
    "shared_expert_intermediate_size": 1024, "linear_conv_kernel_dim": 4, "linear_key_head_dim": 128,
    "linear_value_head_dim": 128, "linear_num_key_heads": 16, "linear_num_value_heads": 64,
    "full_attention_interval": 4, "max_position_embeddings": 262144, "tie_word_embeddings": False,
    "rope_parameters": {"rope_type": "default", "rope_theta": 10000000, "partial_rotary_factor": 0.25,
                        "mrope_interleaved": True, "mrope_section": [11, 11, 10]},
    "eos_token_id": 248044,
}
MIXTRAL = {"model_type": "mixtral", "hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32,
           "num_key_value_heads": 8, "vocab_size": 32000, "num_local_experts": 8, "num_experts_per_tok": 2,
           "intermediate_size": 14336, "rope_theta": 1e6, "rms_norm_eps": 1e-5}


def test_qwen35_reads_every_dimension_and_derives_layer_types_from_the_interval():
    cfg = ModelConfig.from_dict(QWEN35_397B)
    assert cfg.family == "qwen3_5_moe"
    dims = (cfg.hidden_size, cfg.num_experts, cfg.num_experts_per_tok, cfg.moe_intermediate_size)
    assert dims == (4096, 512, 10, 1024)
    assert cfg.rope_theta == 1e7 and cfg.partial_rotary_factor == 0.25 and cfg.rotary_dim == 64
    assert [i for i in range(60) if cfg.layer_type(i) == FULL_ATTENTION] == list(range(3, 60, 4))
    assert cfg.layer_type(0) == LINEAR_ATTENTION
    assert cfg.has_shared_expert and cfg.has_attention_output_gate and cfg.norm_topk_prob
    assert all(cfg.is_moe_layer(i) for i in range(60))
    assert cfg.eos_token_id == (248044,)


def test_multimodal_config_is_read_through_text_config_with_the_outer_tie_flag():
    outer = {"model_type": "qwen3_5_moe", "tie_word_embeddings": True, "vision_config": {"depth": 27},
             "text_config": {k: v for k, v in QWEN35_397B.items() if k != "model_type"}}
    cfg = ModelConfig.from_dict(outer)
    assert cfg.model_type == "qwen3_5_moe_text" and cfg.family == "qwen3_5_moe"
    assert cfg.tie_word_embeddings is True and cfg.num_experts == 512


def test_mixtral_local_experts_and_intermediate_size_become_num_experts_and_moe_width():
    cfg = ModelConfig.from_dict(MIXTRAL)
    assert (cfg.num_experts, cfg.moe_intermediate_size, cfg.head_dim) == (8, 14336, 128)
    assert cfg.rope_theta == 1e6 and cfg.rotary_dim == 128 and cfg.qk_norm == "none"
    assert cfg.norm_topk_prob is True  # transformers' MixtralTopKRouter always renormalises
    assert not cfg.has_shared_expert and cfg.layer_types == (FULL_ATTENTION,) * 32


@pytest.mark.parametrize("model_type,absent_default", [("qwen3_moe", False), ("qwen3_next", True),
                                                       ("olmoe", False), ("qwen3_5_moe", True),
                                                       ("mixtral", True)])
def test_norm_topk_prob_defaults_to_the_family_value_when_absent(model_type, absent_default):
    d = dict(QWEN35_397B, model_type=model_type, intermediate_size=1024)
    assert ModelConfig.from_dict(d).norm_topk_prob is absent_default


def test_norm_topk_prob_is_read_where_the_family_honours_it():
    d = dict(QWEN35_397B, model_type="qwen3_moe", norm_topk_prob=True)
    assert ModelConfig.from_dict(d).norm_topk_prob is True
    assert ModelConfig.from_dict(dict(d, model_type="qwen3_5_moe", norm_topk_prob=False)).norm_topk_prob is True


def test_rope_theta_is_read_from_legacy_key_and_from_rope_parameters():
    base = {k: v for k, v in MIXTRAL.items() if k != "rope_theta"}
    assert ModelConfig.from_dict(dict(base, rope_theta=5e5)).rope_theta == 5e5
    rope = {"rope_type": "default", "rope_theta": 7e5}
    assert ModelConfig.from_dict(dict(base, rope_parameters=rope)).rope_theta == 7e5


def test_dense_layers_follow_mlp_only_layers_and_decoder_sparse_step():
    d = dict(QWEN35_397B, model_type="qwen3_moe", num_hidden_layers=6, intermediate_size=3072,
             decoder_sparse_step=2, mlp_only_layers=[3])
    cfg = ModelConfig.from_dict(d)
    assert cfg.moe_layers == [1, 5]


def test_unknown_model_type_names_the_type_and_file(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(dict(MIXTRAL, model_type="llama")))
    with pytest.raises(ConfigError, match=r"config\.json.*unknown model_type 'llama'"):
        ModelConfig.from_file(tmp_path)


@pytest.mark.parametrize("field", ["hidden_size", "num_hidden_layers", "vocab_size", "num_experts_per_tok",
                                   "num_local_experts", "model_type"])
def test_missing_required_field_is_named_with_the_file(tmp_path, field):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({k: v for k, v in MIXTRAL.items() if k != field}))
    with pytest.raises(ConfigError, match=rf"{path}.*missing required field '{field}'"):
        ModelConfig.from_file(path)


@pytest.mark.parametrize("field,value,why", [
    ("hidden_size", "big", "must be an integer, got 'big'"),
    ("hidden_size", 4096.5, "must be an integer"),
    ("num_key_value_heads", True, "must be an integer"),
    ("eos_token_id", "", "must be an integer, got ''"),
    ("eos_token_id", [2, "x"], "must be an integer, got 'x'"),
    ("bos_token_id", -1, "must be at least 0"),
    ("rms_norm_eps", "abc", "must be a finite number, got 'abc'"),
    ("rms_norm_eps", -1e-6, "must be positive, got -1e-06"),
    ("rms_norm_eps", float("nan"), "must be a finite number, got nan"),
    ("rope_theta", float("inf"), "must be a finite number, got inf"),
    ("rope_theta", 0.0, "must be positive"),
    ("tie_word_embeddings", "false", "must be true or false"),
    ("max_position_embeddings", -100, "must be positive, got -100"),
    ("max_position_embeddings", 0, "must be positive"),
    ("num_attention_heads", 0, "must be positive"),
    ("head_dim", 0, "must be positive"),
    ("num_local_experts", [8], "must be an integer"),
    ("text_config", "x", "must be an object, got 'x'"),  # was ignored, then a traceback reading eos_token_id
])
def test_a_value_of_the_wrong_type_or_range_names_the_file_and_field(tmp_path, field, value, why):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(dict(MIXTRAL, **{field: value})))
    with pytest.raises(ConfigError, match=rf"^{path}: field '{field}' {why}"):
        ModelConfig.from_file(path)


def test_an_expert_count_under_its_other_spelling_is_named_as_written(tmp_path):
    """Qwen3-MoE reads num_experts, else num_local_experts (Mixtral's): a bad value names the key the file has."""
    path = tmp_path / "config.json"
    qwen = dict(MIXTRAL, model_type="qwen3_moe", moe_intermediate_size=64)
    path.write_text(json.dumps(dict(qwen, num_local_experts=0)))
    with pytest.raises(ConfigError, match=rf"^{path}: field 'num_local_experts' must be positive, got 0"):
        ModelConfig.from_file(path)


def test_whole_floats_are_sizes_and_one_eos_id_is_a_tuple():
    cfg = ModelConfig.from_dict(dict(MIXTRAL, hidden_size=4096.0, eos_token_id=2))
    assert cfg.hidden_size == 4096 and isinstance(cfg.hidden_size, int) and cfg.eos_token_id == (2,)


def test_missing_linear_attention_field_is_named():
    d = {k: v for k, v in QWEN35_397B.items() if k != "linear_value_head_dim"}
    with pytest.raises(ConfigError, match="'linear_value_head_dim'"):
        ModelConfig.from_dict(d)


@pytest.mark.parametrize("change,field", [
    (dict(num_experts_per_tok=600), "num_experts_per_tok"),
    (dict(num_key_value_heads=3), "num_key_value_heads"),
    (dict(layer_types=["full_attention"] * 59), "layer_types"),
    (dict(layer_types=["chunked_attention"] * 60), "layer_types"),
    (dict(layer_types=["sliding_attention"] * 60), "sliding_window"),
    (dict(hidden_act="gelu"), "hidden_act"),
    (dict(rope_parameters={"rope_type": "longrope", "factor": 4.0}), "rope_parameters.rope_type"),
    (dict(rope_parameters={"rope_type": "yarn", "factor": 4.0}), "rope_scaling.original_max_position_embeddings"),
])
def test_inconsistent_values_are_rejected_naming_the_field(change, field):
    with pytest.raises(ConfigError, match=f"'{field}'"):
        ModelConfig.from_dict(dict(QWEN35_397B, **change), source="x/config.json")


def test_dense_layer_without_intermediate_size_is_rejected():
    d = dict(QWEN35_397B, model_type="qwen3_next", mlp_only_layers=[0])
    with pytest.raises(ConfigError, match="'intermediate_size'"):
        ModelConfig.from_dict(d)


def test_unreadable_json_and_missing_file_name_the_path(tmp_path):
    bad = tmp_path / "config.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="cannot read config JSON"):
        ModelConfig.from_file(bad)
    with pytest.raises(ConfigError, match="not found"):
        ModelConfig.from_file(tmp_path / "nope" / "config.json")


def test_a_config_json_that_is_a_directory_is_named_as_one(tmp_path):
    folder = tmp_path / "model" / "config.json"
    folder.mkdir(parents=True)
    for given in (folder, tmp_path / "model"):  # the file, or the model directory holding it
        with pytest.raises(ConfigError) as refused:
            ModelConfig.from_file(given)
        assert str(refused.value) == f"{folder}: a directory, not a config.json file"


@pytest.mark.parametrize("arch,variant", VARIANTS, ids=[f"{a}-{v}" for a, v in VARIANTS])
def test_transformers_written_configs_load_and_round_trip_through_to_dict(hf_checkpoint, arch, variant):
    cfg = ModelConfig.from_file(hf_checkpoint(arch, variant))
    assert cfg.family == arch and cfg.vocab_size == 256
    assert ModelConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


def test_a_shared_expert_is_read_for_any_family_whose_record_has_one(monkeypatch):
    """The shared expert is its own Family fact, not a consequence of linear-attention layers."""
    import dataclasses

    from flashmoe.arch.families import FAMILIES, SIGMOID_GATED

    d = dict(QWEN35_397B, model_type="qwen3_moe", shared_expert_intermediate_size=768)
    assert ModelConfig.from_dict(d).shared_expert_intermediate_size == 0  # the record has none
    monkeypatch.setitem(FAMILIES, "qwen3_moe", dataclasses.replace(FAMILIES["qwen3_moe"], shared_expert=SIGMOID_GATED))
    cfg = ModelConfig.from_dict(d)
    assert cfg.has_shared_expert and cfg.shared_expert_intermediate_size == 768
    assert cfg.layer_types == (FULL_ATTENTION,) * 60 and not cfg.has_attention_output_gate


def test_every_model_type_maps_to_a_family_record_with_its_defaults():
    from flashmoe.arch.families import FAMILIES, MODEL_TYPES, QK_NORMS

    assert set(MODEL_TYPES.values()) == set(FAMILIES)
    for name, fam in FAMILIES.items():
        assert fam.name == name and fam.qk_norm in QK_NORMS and "rope_theta" in fam.defaults


def test_minimax_m2_reads_its_legacy_rotary_dim_as_transformers_does():
    """MiniMax-M2's config.json gives partial rotary as `rotary_dim` (64 of head_dim 128)."""
    from flashmoe.arch.presets import get_preset

    cfg = ModelConfig.from_dict(get_preset("minimax-m2").config_dict())
    assert cfg.partial_rotary_factor == 0.5 and cfg.rotary_dim == 64 and cfg.qk_norm == "full"
    assert cfg.router_tensors == ("e_score_correction_bias",) and cfg.num_experts == 256
