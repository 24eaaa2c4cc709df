"""GGUF export of a flashmoe model directory (bench/gguf_export.py) and llama.cpp beside flashmoe
(bench/llama_cpp.py, `flashmoe bench --peer llama.cpp`).

The llama.cpp tests run only where its build is cached (bench/llama_cpp.find_runner): CI does not build it
(about 15 minutes on 2 cores); `python -c "from flashmoe.bench.llama_cpp import build; build()"` does.
"""

from __future__ import annotations

import dataclasses
import json

import gguf
import numpy as np
import pytest

from flashmoe.bench.gguf_export import export_gguf, plan
from flashmoe.bench.llama_cpp import find_runner, run_llama
from flashmoe.errors import FlashMoeError
from flashmoe.modeldir import ModelDir
from flashmoe.reference.model import ReferenceModel
from flashmoe.synth import synth_model

# Qwen3-MoE shapes, tiny except for the real Qwen3 vocabulary (the GGUF carries the real tokenizer)
TINY_QWEN3 = dict(model_type="qwen3_moe", hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=32, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=64,
                  intermediate_size=256, norm_topk_prob=True, vocab_size=151936, bos_token_id=151643,
                  eos_token_id=151645, rms_norm_eps=1e-6, rope_theta=1000000.0, max_position_embeddings=4096)
IDS = np.array([9707, 11, 1879, 0, 151644, 42, 7, 100000])

RUNNER = find_runner()
needs_llama_cpp = pytest.mark.skipif(RUNNER is None, reason="llama.cpp is not built in the cache (bench/llama_cpp.py "
                                     "builds it in ~15 min; CI does not)")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("gguf")
    model = synth_model(root / "tiny", TINY_QWEN3, tokenizer="qwen3", seed=2)
    return model, export_gguf(model, root / "tiny.q4_0.gguf"), export_gguf(model, root / "tiny.f32.gguf", "f32")


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
    assert len(tokens) == 151936 == len(types)
    vocab = json.loads((model / "tokenizer.json").read_text())["model"]["vocab"]
    assert tokens[vocab["Hello"]] == "Hello" and tokens[151644] == "<|im_start|>" and types[151644] == 3
    assert tokens[151935] == "[PAD151935]" and types[151935] == 5
    assert field["tokenizer.ggml.eos_token_id"] == 151645
    shapes = {t.name: tuple(int(x) for x in reversed(t.shape)) for t in reader.tensors}
    assert shapes["token_embd.weight"] == (151936, 128) and shapes["output.weight"] == (151936, 128)
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
    qwen35 = dict(model_type="qwen3_5_moe_text", hidden_size=128, num_hidden_layers=1, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=64, linear_conv_kernel_dim=4, linear_key_head_dim=32,
                  linear_value_head_dim=32, linear_num_key_heads=2, linear_num_value_heads=4, num_experts=4,
                  num_experts_per_tok=2, moe_intermediate_size=64, shared_expert_intermediate_size=64, vocab_size=300)
    model = synth_model(tmp_path / "m", qwen35)
    with pytest.raises(FlashMoeError, match="'qwen3_5_moe_text' has no GGUF export"):
        export_gguf(model, tmp_path / "m.gguf")
    no_tokenizer = synth_model(tmp_path / "n", dict(TINY_QWEN3, vocab_size=512))
    with pytest.raises(FlashMoeError, match="tokenizer.json: missing"):
        export_gguf(no_tokenizer, tmp_path / "n.gguf")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m", "n"]


@needs_llama_cpp
def test_llama_cpp_runs_the_export_with_flashmoes_logits(tiny, tmp_path):
    model, q4, f32 = tiny
    ours = ReferenceModel.from_dir(model).forward(IDS)
    prompt, decode = IDS[:5], IDS[5:]
    logits = tmp_path / "logits.f32"
    run = run_llama(RUNNER, f32, 1, prompt, decode, ("cold", "warm"), logits_out=logits)
    theirs = np.fromfile(logits, np.float32).reshape(len(IDS), -1)
    # the same weights in float32: llama.cpp's forward is flashmoe's reference forward up to rounding
    np.testing.assert_allclose(theirs, ours, atol=2e-4 * np.abs(ours).max())
    assert (theirs.argmax(-1) == ours.argmax(-1)).all()  # the greedy next tokens agree
    assert set(run["passes"]) == {"cold", "warm"} and run["passes"]["warm"]["decode_tokens"] == 3
    assert run["passes"]["cold"]["tok_s"] > 0 and run["peak_rss_bytes"] > 0
    run_llama(RUNNER, q4, 1, prompt, decode, ("cold",), logits_out=logits)
    q = np.fromfile(logits, np.float32).reshape(len(IDS), -1)
    assert np.corrcoef(q.ravel(), ours.ravel())[0, 1] > 0.98  # Q4_0 requantisation: close, not equal
    mapped = run_llama(RUNNER, q4, 1, prompt, decode, ("cold",), logits_out=logits, repack=False)
    assert mapped["repack"] is False  # weights read from the mmap'd file, not a repacked copy: the same logits
    np.testing.assert_allclose(np.fromfile(logits, np.float32).reshape(len(IDS), -1), q, atol=1e-3 * np.abs(q).max())
    run_llama(RUNNER, f32, 1, prompt, decode, ("cold",), logits_out=logits, override="qwen3moe.expert_used_count=3")
    k3 = np.fromfile(logits, np.float32).reshape(len(IDS), -1)
    md = ModelDir.open(model)
    reference_k3 = ReferenceModel(dataclasses.replace(md.config, num_experts_per_tok=3), md).forward(IDS)
    np.testing.assert_allclose(k3, reference_k3, atol=2e-4 * np.abs(ours).max())


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
    assert "| direct k=2 t=1 1G | cold |" in (out / "bench.md").read_text().split("flashmoe ÷ llama.cpp")[1]
    fits = run_bench(BenchOptions(model_dir=model, out=tmp_path / "fits", backend="numpy", modes=("pagecache",),
                                  threads=(1,), tokens=3, prompt_tokens=4, disk_repeats=1, disk_experts=8,
                                  peer="llama.cpp", peer_gguf=q4, figures=False, log=lambda line: None))
    assert [(r["max_memory"], r["repack"]) for r in fits["peer_runs"]] == [(None, True)]  # beside the reference
    assert [row["pass"] for row in fits["side_by_side"]] == ["cold", "warm"]
