"""GGUF export of a flashmoe model directory (bench/gguf_export.py) and llama.cpp beside flashmoe
(bench/llama_cpp.py, `flashmoe bench --peer llama.cpp`).

The llama.cpp tests run only where its build is cached (bench/llama_cpp.find_runner): CI does not build it
(about 15 minutes on 2 cores); `python -c "from flashmoe.bench.llama_cpp import build; build()"` does.
"""

from __future__ import annotations

import dataclasses
import json
import shutil

import gguf
import numpy as np
import pytest

from flashmoe.arch.gguf_names import EXPERT_NAMES, gguf_tensor_name
from flashmoe.bench import gguf_export
from flashmoe.bench.gguf_export import export_gguf, plan
from flashmoe.bench.llama_cpp import find_runner, run_llama
from flashmoe.errors import FlashMoeError
from flashmoe.format.modeldir import ModelDir
from flashmoe.convert import synth
from flashmoe.arch.presets import get_preset
from flashmoe.reference.model import ReferenceModel
from flashmoe.convert.synth import synth_model

VOCAB = 320  # 256 byte tokens, 2 merges, 2 special tokens, padding
TINY_QWEN3 = dict(model_type="qwen3_moe", hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=32, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=64,
                  intermediate_size=256, norm_topk_prob=True, vocab_size=VOCAB, bos_token_id=258, eos_token_id=259,
                  rms_norm_eps=1e-6, rope_theta=1000000.0, max_position_embeddings=4096)
TINY_QWEN35 = dict(get_preset("qwen3.5-35b-a3b").config_dict(4), hidden_size=128, num_attention_heads=4,
                   num_key_value_heads=2, head_dim=64, linear_key_head_dim=32, linear_value_head_dim=32,
                   linear_num_key_heads=2, linear_num_value_heads=4, num_experts=8, num_experts_per_tok=2,
                   moe_intermediate_size=64, shared_expert_intermediate_size=64, vocab_size=VOCAB, eos_token_id=258)
IDS = np.array([71, 11, 256, 0, 259, 42, 7, 300])

RUNNER = find_runner()
needs_llama_cpp = pytest.mark.skipif(RUNNER is None, reason="llama.cpp is not built in the cache (bench/llama_cpp.py "
                                     "builds it in ~15 min; CI does not)")


def _byte_level_tokenizer() -> dict:
    """A minimal byte-level BPE tokenizer.json (GPT-2's byte-to-character map, as Qwen's): ids 0-255 the
    bytes, 256 'Ġt' and 257 'he' from two merges, 258-259 special tokens. Real vocabularies (151,936 or
    248,320 tokens) take GGUFReader ~15 s to parse, so the tests use this one."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = {b: chr(b) for b in printable}
    chars.update({b: chr(256 + n) for n, b in enumerate(b for b in range(256) if b not in chars)})
    vocab = {chars[b]: b for b in range(256)} | {"Ġt": 256, "he": 257}
    specials = [{"id": 258, "content": "<|endoftext|>", "special": True},
                {"id": 259, "content": "<|im_start|>", "special": True}]
    return {"version": "1.0", "added_tokens": specials, "model": {"type": "BPE", "vocab": vocab,
                                                                   "merges": [["Ġ", "t"], ["h", "e"]]}}


def _tiny_model(out, config):
    """synth_model with the byte-level tokenizer, and attention and GatedDeltaNet output projections at the
    usual std, so that a wrong export of those tensors would show in the logits (synth's small ones keep
    routing uniform instead)."""
    with pytest.MonkeyPatch.context() as m:
        m.setattr(synth, "RESIDUAL_BRANCH_STD", synth.INIT_STD)
        model = synth_model(out, config, seed=2)
    (model / "tokenizer.json").write_text(json.dumps(_byte_level_tokenizer()))
    return model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("gguf")
    model = _tiny_model(root / "tiny", TINY_QWEN3)
    return model, export_gguf(model, root / "tiny.q4_0.gguf"), export_gguf(model, root / "tiny.f32.gguf", "f32")


@pytest.fixture(scope="module")
def tiny35(tmp_path_factory):
    root = tmp_path_factory.mktemp("gguf35")
    model = _tiny_model(root / "tiny35", TINY_QWEN35)
    return model, export_gguf(model, root / "tiny35.f32.gguf", "f32")


def _q4_0_bound(w: np.ndarray) -> np.ndarray:
    """Largest error Q4_0 may make on each weight: its block's max |w| / 8 (the step; the side opposite
    the block's extreme can clip by up to one step), plus float16 rounding of the scale."""
    blocks = np.abs(w.reshape(*w.shape[:-1], -1, 32)).max(-1, keepdims=True) / 8 * (1 + 2e-3)
    return np.broadcast_to(blocks, (*w.shape[:-1], w.shape[-1] // 32, 32)).reshape(w.shape) + 1e-7


def test_gguf_has_the_models_shapes_metadata_and_tokenizer(tiny):
    model, q4, _ = tiny
    md = ModelDir.open(model)
    reader = gguf.GGUFReader(q4)
    field = {k: f.contents() for k, f in reader.fields.items()}
    assert field["general.architecture"] == "qwen3moe"
    assert field["qwen3moe.block_count"] == 2 and field["qwen3moe.embedding_length"] == 128
    assert field["qwen3moe.expert_count"] == 8 and field["qwen3moe.expert_used_count"] == 2
    assert field["qwen3moe.expert_feed_forward_length"] == 64 and field["qwen3moe.attention.key_length"] == 32
    assert field["tokenizer.ggml.model"] == "gpt2" and field["tokenizer.ggml.pre"] == "qwen2"
    tokens, types = field["tokenizer.ggml.tokens"], field["tokenizer.ggml.token_type"]
    assert len(tokens) == VOCAB == len(types)
    assert tokens[ord("A")] == "A" and tokens[32] == "Ġ" and tokens[256] == "Ġt" and types[256] == 1
    assert tokens[259] == "<|im_start|>" and types[259] == 3
    assert tokens[319] == "[PAD319]" and types[319] == 5
    assert field["tokenizer.ggml.merges"] == ["Ġ t", "h e"]
    assert field["tokenizer.ggml.bos_token_id"] == 258 and field["tokenizer.ggml.eos_token_id"] == 259
    shapes = {t.name: tuple(int(x) for x in reversed(t.shape)) for t in reader.tensors}
    assert shapes["token_embd.weight"] == (VOCAB, 128) and shapes["output.weight"] == (VOCAB, 128)
    assert shapes["blk.1.ffn_gate_exps.weight"] == (8, 64, 128) and shapes["blk.1.ffn_down_exps.weight"] == (8, 128, 64)
    assert shapes["blk.0.attn_q.weight"] == (128, 128) and shapes["blk.0.ffn_gate_inp.weight"] == (8, 128)
    assert len(shapes) == 3 + 2 * 12 == len(plan(md)[1])  # 9 resident + 3 stacked expert tensors per layer


def test_q4_0_weights_are_ours_within_q4_0_error_and_f32_ones_exactly(tiny):
    model, q4, f32 = tiny
    md = ModelDir.open(model)
    exported = {t.name: t for t in gguf.GGUFReader(q4).tensors}
    exact = {t.name: t for t in gguf.GGUFReader(f32).tensors}
    ours = {"token_embd.weight": md.tensor("embed_tokens.weight"),
            "blk.0.attn_output.weight": md.tensor("layers.0.self_attn.o_proj.weight"),
            "blk.1.ffn_gate_inp.weight": md.tensor("layers.1.mlp.gate.weight"),
            "blk.1.attn_k_norm.weight": md.tensor("layers.1.self_attn.k_norm.weight"),
            "blk.1.ffn_up_exps.weight": np.stack([md.expert(1, e)["up_proj"] for e in range(8)]),
            "blk.0.ffn_down_exps.weight": np.stack([md.expert(0, e)["down_proj"] for e in range(8)])}
    for name, w in ours.items():
        t = exported[name]
        got = gguf.quants.dequantize(t.data, t.tensor_type).reshape(w.shape)
        bound = 0 if t.tensor_type == gguf.GGMLQuantizationType.F32 else _q4_0_bound(w)
        assert t.tensor_type in (gguf.GGMLQuantizationType.Q4_0, gguf.GGMLQuantizationType.Q8_0,
                                 gguf.GGMLQuantizationType.F32), name
        assert (np.abs(got - w) <= bound).all(), name
        assert np.array_equal(np.asarray(exact[name].data).reshape(w.shape), w), name
    assert exported["blk.1.ffn_up_exps.weight"].tensor_type == gguf.GGMLQuantizationType.Q4_0
    assert exported["blk.1.ffn_gate_inp.weight"].tensor_type == gguf.GGMLQuantizationType.Q8_0  # 8-bit router
    # Q4_0 and flashmoe's 4-bit group 64 (bf16 scale + bias) both spend 4.5 bits per weight
    assert exported["blk.1.ffn_up_exps.weight"].n_bytes == 8 * 64 * 128 * 4.5 / 8


def test_export_refuses_what_it_cannot_map_and_leaves_nothing(tmp_path):
    mixtral = dict(model_type="mixtral", hidden_size=128, num_hidden_layers=1, num_attention_heads=4,
                   num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, intermediate_size=64,
                   vocab_size=300)
    model = synth_model(tmp_path / "m", mixtral)
    with pytest.raises(FlashMoeError, match="'mixtral' has no GGUF export"):
        export_gguf(model, tmp_path / "m.gguf")
    no_tokenizer = synth_model(tmp_path / "n", TINY_QWEN3)
    with pytest.raises(FlashMoeError, match="tokenizer.json: missing"):
        export_gguf(no_tokenizer, tmp_path / "n.gguf")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m", "n"]



def test_export_needs_room_for_the_file_and_a_tenth_of_it_not_gigabytes(tiny, tmp_path, monkeypatch):
    """A fixture's tiny export must not fail on a machine whose disk is nearly full: the margin is
    proportionate to the file (10%, at most 1 GiB)."""
    model = tiny[0]
    total = sum(t.nbytes for t in plan(ModelDir.open(model), "q4_0")[1])
    usage = shutil.disk_usage(tmp_path)
    with_free = lambda free: lambda path: usage._replace(free=free)  # noqa: E731
    monkeypatch.setattr(gguf_export.shutil, "disk_usage", with_free(total + total // 10 + 1))
    assert export_gguf(model, tmp_path / "fits.gguf").stat().st_size > total
    monkeypatch.setattr(gguf_export.shutil, "disk_usage", with_free(total + total // 10 - 1))
    with pytest.raises(FlashMoeError, match=r"needs .* GB free"):
        export_gguf(model, tmp_path / "full.gguf")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fits.gguf"]


@needs_llama_cpp
def test_llama_cpp_runs_the_export_with_flashmoes_logits(tiny, tmp_path):
    model, q4, f32 = tiny
    ours = ReferenceModel.from_dir(model).forward(IDS)
    prompt, decode = IDS[:5], IDS[5:]
    logits = tmp_path / "logits.f32"
    run = run_llama(RUNNER, f32, 1, prompt, decode, ("cold", "warm"), logits_out=logits)
    theirs = np.fromfile(logits, np.float32).reshape(len(IDS), -1)
    # the same weights in float32: llama.cpp's forward is flashmoe's reference forward up to rounding
    np.testing.assert_allclose(theirs, ours, atol=1e-3 * np.abs(ours).max())
    assert (theirs.argmax(-1) == ours.argmax(-1)).all()  # the greedy next tokens agree
    assert set(run["passes"]) == {"cold", "warm"} and run["passes"]["warm"]["decode_tokens"] == 3
    assert run["passes"]["cold"]["tok_s"] > 0 and run["peak_rss_bytes"] > 0
    run_llama(RUNNER, q4, 1, prompt, decode, ("cold",), logits_out=logits)
    q = np.fromfile(logits, np.float32).reshape(len(IDS), -1)
    assert np.corrcoef(q.ravel(), ours.ravel())[0, 1] > 0.95  # Q4_0 requantisation: close, not equal (0.98)
    mapped = run_llama(RUNNER, q4, 1, prompt, decode, ("cold",), logits_out=logits, repack=False)
    assert mapped["repack"] is False  # weights read from the mmap'd file, not a repacked copy: the same logits
    np.testing.assert_allclose(np.fromfile(logits, np.float32).reshape(len(IDS), -1), q, atol=1e-3 * np.abs(q).max())
    run_llama(RUNNER, f32, 1, prompt, decode, ("cold",), logits_out=logits, override="qwen3moe.expert_used_count=3")
    k3 = np.fromfile(logits, np.float32).reshape(len(IDS), -1)
    md = ModelDir.open(model)
    reference_k3 = ReferenceModel(dataclasses.replace(md.config, num_experts_per_tok=3), md).forward(IDS)
    np.testing.assert_allclose(k3, reference_k3, atol=1e-3 * np.abs(ours).max())


def test_qwen35moe_export_reorders_the_value_heads_as_llama_cpp_expects(tiny35):
    model, f32 = tiny35
    md = ModelDir.open(model)
    reader = gguf.GGUFReader(f32)
    field = {k: f.contents() for k, f in reader.fields.items()}
    assert field["general.architecture"] == "qwen35moe" and field["tokenizer.ggml.pre"] == "qwen35"
    assert field["qwen35moe.ssm.group_count"] == 2 and field["qwen35moe.ssm.time_step_rank"] == 4
    assert field["qwen35moe.rope.dimension_count"] == 16 and sum(field["qwen35moe.rope.dimension_sections"]) == 8
    tensors = {t.name: np.asarray(t.data) for t in reader.tensors}
    a_log = md.tensor("layers.0.linear_attn.A_log")  # value heads [k0v0, k0v1, k1v0, k1v1] -> [k0v0, k1v0, k0v1, k1v1]
    np.testing.assert_array_equal(tensors["blk.0.ssm_a"], -np.exp(a_log[[0, 2, 1, 3]]))
    out = md.tensor("layers.0.linear_attn.out_proj.weight")  # columns of 4 value heads of 32
    tiled = out.reshape(128, 2, 2, 32).swapaxes(1, 2).reshape(128, 128)
    np.testing.assert_array_equal(tensors["blk.0.ssm_out.weight"].reshape(128, 128), tiled)
    assert tensors["blk.1.ssm_conv1d.weight"].reshape(-1).size == (2 * 2 * 32 + 4 * 32) * 4
    assert "blk.3.attn_q.weight" in tensors and "blk.3.ssm_a" not in tensors  # layer 3: full attention
    assert tensors["blk.2.ffn_gate_inp_shexp.weight"].shape == (128,)


@needs_llama_cpp
def test_llama_cpp_runs_the_qwen35moe_export_with_flashmoes_logits(tiny35, tmp_path):
    model, f32 = tiny35
    logits = tmp_path / "logits.f32"
    run_llama(RUNNER, f32, 1, IDS[:5], IDS[5:], ("cold",), logits_out=logits)
    ours = ReferenceModel.from_dir(model).forward(IDS)
    theirs = np.fromfile(logits, np.float32).reshape(len(IDS), -1)
    np.testing.assert_allclose(theirs, ours, atol=1e-3 * np.abs(ours).max())
    assert (theirs.argmax(-1) == ours.argmax(-1)).all()


@needs_llama_cpp
def test_bench_runs_llama_cpp_beside_flashmoe(tiny, tmp_path):
    from flashmoe.bench.streaming import BenchOptions, run_bench

    model, q4, _ = tiny
    out = tmp_path / "results"
    result = run_bench(BenchOptions(model_dir=model, out=out, backend="numpy", modes=("direct",), threads=(1,),
                                    budgets=("1G",), tokens=3, prompt_tokens=4, disk_repeats=1, disk_experts=8,
                                    peer="llama.cpp", peer_gguf=q4, figures=False, log=lambda line: None))
    assert [(r["max_memory"], r["k"], r["repack"]) for r in result["peer_runs"]] == [("1G", 2, False)]
    rows = {(row["max_memory"], row["pass"]): row for row in result["side_by_side"]}
    assert set(rows) == {("1G", "cold"), ("1G", "warm")}
    for row in rows.values():
        assert row["ratio"] == pytest.approx(row["flashmoe_tok_s"] / row["llama_cpp_tok_s"])
        assert row["prompt_ratio"] == pytest.approx(row["flashmoe_prompt_tok_s"] / row["llama_cpp_prompt_tok_s"])
        assert row["prompt_tokens"] == 4
    assert "| direct k=2 t=1 1G | cold |" in (out / "bench.md").read_text().split("flashmoe ÷ llama.cpp")[1]
    fits = run_bench(BenchOptions(model_dir=model, out=tmp_path / "fits", backend="numpy", modes=("pagecache",),
                                  threads=(1,), tokens=3, prompt_tokens=4, disk_repeats=1, disk_experts=8,
                                  peer="llama.cpp", peer_gguf=q4, figures=False, log=lambda line: None))
    assert [(r["max_memory"], r["repack"]) for r in fits["peer_runs"]] == [(None, True)]  # beside the reference
    assert [row["pass"] for row in fits["side_by_side"]] == ["cold", "warm"]


def test_tokenizer_metadata_carries_the_real_qwen3_vocabulary(tmp_path):
    from flashmoe.bench.gguf_export import tokenizer_metadata
    from flashmoe.convert.synth_tokenizer import write_tokenizer

    model = synth_model(tmp_path / "m", dict(TINY_QWEN3, vocab_size=151936, bos_token_id=151643, eos_token_id=151645))
    write_tokenizer("qwen3", model)
    meta = tokenizer_metadata(ModelDir.open(model))
    tokens, types = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.token_type"]
    vocab = json.loads((model / "tokenizer.json").read_text())["model"]["vocab"]
    assert len(tokens) == 151936 and tokens[vocab["Hello"]] == "Hello" and tokens[151644] == "<|im_start|>"
    assert types[151644] == 3 and tokens[151935] == "[PAD151935]" and types[151935] == 5
    assert meta["tokenizer.ggml.pre"] == "qwen2" and meta["tokenizer.ggml.eos_token_id"] == 151645
    assert len(meta["tokenizer.ggml.merges"]) > 150_000 and meta["tokenizer.ggml.merges"][0] == "Ġ Ġ"


def test_olmoe_export_without_renormalisation_round_trips(tmp_path):
    """llama.cpp's olmoe never renormalises the top-k weights (src/models/olmoe.cpp), as OLMoE's
    norm_topk_prob false: the export keeps it, the import reads it back, the logits are the same bit for bit."""
    from flashmoe.convert.gguf_model import convert_gguf

    olmoe = dict(TINY_QWEN3, model_type="olmoe", norm_topk_prob=False, intermediate_size=64)
    model = _tiny_model(tmp_path / "olmoe", olmoe)
    back = convert_gguf(export_gguf(model, tmp_path / "olmoe.gguf", "f32"), tmp_path / "back", log=lambda _: None)
    assert json.loads((back / "config.json").read_text())["norm_topk_prob"] is False
    np.testing.assert_array_equal(ReferenceModel.from_dir(back).forward(IDS), ReferenceModel.from_dir(model).forward(IDS))
    renormalising = _tiny_model(tmp_path / "olmoe-norm", dict(olmoe, norm_topk_prob=True))
    with pytest.raises(FlashMoeError, match="norm_topk_prob is true; llama.cpp's olmoe never renormalises"):
        export_gguf(renormalising, tmp_path / "n.gguf")
    assert not (tmp_path / "n.gguf").exists()


def test_export_round_trips_through_the_gguf_importer(tiny, tmp_path):
    from tokenizers import Tokenizer

    from flashmoe.convert.gguf_model import convert_gguf

    model, q4_0, f32 = tiny
    back = convert_gguf(f32, tmp_path / "back", log=lambda _: None)
    np.testing.assert_array_equal(ReferenceModel.from_dir(back).forward(IDS),
                                  ReferenceModel.from_dir(model).forward(IDS))
    # _byte_level_tokenizer's ids: the bytes, then the merges 'Ġt' (256) and 'he' (257), then <|im_start|>
    assert Tokenizer.from_file(str(back / "tokenizer.json")).encode("the the<|im_start|>").ids == \
        [ord("t"), 257, 256, 257, 259]
    # the Q4_0 export: every tensor imported equals gguf.quants' dequantisation of the exported one
    back4 = ModelDir.open(convert_gguf(q4_0, tmp_path / "back4", log=lambda _: None))
    exported = {t.name: gguf.quants.dequantize(t.data, t.tensor_type) for t in gguf.GGUFReader(q4_0).tensors}
    for name in back4.resident_names():
        np.testing.assert_array_equal(back4.tensor(name), exported.pop(gguf_tensor_name(name, "qwen3moe")), name)
    for layer in back4.moe_layers:
        for e in range(TINY_QWEN3["num_experts"]):
            for proj, got in back4.expert(layer, e).items():
                np.testing.assert_array_equal(got, exported[f"blk.{layer}.{EXPERT_NAMES[proj]}"][e])
        for proj in EXPERT_NAMES.values():
            del exported[f"blk.{layer}.{proj}"]
    assert not exported  # every exported tensor came back


def test_qwen35moe_export_round_trips_through_the_gguf_importer(tiny35, tmp_path):
    from flashmoe.convert.gguf_model import convert_gguf

    model, f32 = tiny35
    back = convert_gguf(f32, tmp_path / "back", log=lambda _: None)
    ours, theirs = ReferenceModel.from_dir(back).forward(IDS), ReferenceModel.from_dir(model).forward(IDS)
    # A_log comes back as log(-(-exp(A_log))): within an ulp, so the logits within float32 rounding
    assert np.abs(ours - theirs).max() <= 1e-5 * np.abs(theirs).max()
    src, dst = ModelDir.open(model), ModelDir.open(back)
    for name in src.resident_names():
        if not name.endswith("A_log"):
            np.testing.assert_array_equal(dst.tensor(name), src.tensor(name), err_msg=name)
