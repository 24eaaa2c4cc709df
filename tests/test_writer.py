"""The one writer of model directories: the quantisation policy, quantised tensors passing through untouched,
expert files written in either order hashing to the same SHA-256, and nothing left behind on an error."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from flashmoe.format.manifest import MANIFEST, ExpertLayout, Manifest, QuantSpec
from flashmoe.format.policy import KEEP, QuantPolicy
from flashmoe.format.quant import QuantizedTensor, quantize
from flashmoe.format.safetensors_io import SafetensorsFile
from flashmoe.format.writer import write_model_dir


def test_policy_follows_mlx_lm_router_at_8_bits_norms_float_and_indivisible_widths_float():
    policy = QuantPolicy(bits=3, group_size=32, expert_bits=6)
    assert policy.resident("layers.0.mlp.gate.weight", (16, 64)) == QuantSpec(8, 64)
    assert policy.resident("layers.0.mlp.shared_expert_gate.weight", (1, 64)) == QuantSpec(8, 64)
    assert policy.resident("layers.0.self_attn.q_proj.weight", (64, 64)) == QuantSpec(3, 32)
    assert policy.resident("layers.0.self_attn.q_proj.weight", (64, 48)) is None  # 48 % 32
    assert policy.resident("layers.0.mlp.gate.weight", (16, 96)) is None  # 96 % 64: the router's own group
    assert policy.resident("layers.0.input_layernorm.weight", (64,)) is None
    assert policy.resident("layers.0.linear_attn.conv1d.weight", (64, 1, 4)) is None
    assert policy.expert((32, 64)) == QuantSpec(6, 32) and policy.expert((64, 48)) is None
    assert KEEP.resident("embed_tokens.weight", (256, 64)) is None and KEEP.expert((32, 64)) is None


def _experts(rng, n: int) -> list[dict[str, QuantizedTensor]]:
    return [{p: quantize(rng.standard_normal((32, 64)).astype(np.float32), 4, 32)
             for p in ("gate_proj", "up_proj", "down_proj")} for _ in range(n)]


def test_writer_stores_floats_by_policy_and_quantised_tensors_untouched(tmp_path):
    rng = np.random.default_rng(0)
    q = quantize(rng.standard_normal((8, 64)).astype(np.float32), 2, 32)
    w = rng.standard_normal((8, 64)).astype(np.float32)
    norm = rng.standard_normal(64).astype(np.float32)
    experts = _experts(rng, 3)
    layout = ExpertLayout.plan(experts[0])
    with write_model_dir(tmp_path / "m", "qwen3_moe", {"test": True}, QuantPolicy(4, 64, 4)) as out:
        out.add_resident("lm_head.weight", q)
        out.add_resident("layers.0.self_attn.q_proj.weight", w)
        out.add_resident("norm.weight", norm)
        out.add_file("config.json", "{}\n")
        ew = out.open_experts(0, layout, 3)
        for e in (2, 0, 1):  # any order, one projection at a time
            for proj, part in experts[e].items():
                ew.write(e, proj, part)
        assert ew.first_missing() is None
    manifest = Manifest.from_json((tmp_path / "m" / MANIFEST).read_text())
    assert manifest.quantization == {"lm_head.weight": QuantSpec(2, 32),
                                     "layers.0.self_attn.q_proj.weight": QuantSpec(4, 64)}
    st = SafetensorsFile(tmp_path / "m" / "resident.safetensors")
    for kind in ("weight", "scales", "biases"):
        np.testing.assert_array_equal(st.get(f"lm_head.{kind}"), getattr(q, kind))
        np.testing.assert_array_equal(st.get(f"layers.0.self_attn.q_proj.{kind}"), getattr(quantize(w, 4, 64), kind))
    np.testing.assert_array_equal(st.get("norm.weight"), norm)
    data = (tmp_path / "m" / "experts" / "layer_000.bin").read_bytes()
    assert manifest.files["experts/layer_000.bin"].sha256 == hashlib.sha256(data).hexdigest()
    assert manifest.files["config.json"].size == 3 and [e.layer for e in manifest.experts] == [0]


def test_expert_blocks_in_order_hash_as_written_and_equal_the_per_projection_file(tmp_path):
    experts = _experts(np.random.default_rng(1), 5)
    layout = ExpertLayout.plan(experts[0])
    files = {}
    for how in ("blocks", "parts"):
        with write_model_dir(tmp_path / how, "qwen3_moe", {}, KEEP) as out:
            ew = out.open_experts(3, layout, 5)
            if how == "parts":
                for e in reversed(range(5)):
                    for proj, part in experts[e].items():
                        ew.write(e, proj, part)
            else:
                for first, count in ((0, 2), (2, 3)):
                    block = np.empty(count * layout.stride, np.uint8)
                    for j in range(count):
                        layout.pack(experts[first + j], block[j * layout.stride:(j + 1) * layout.stride])
                    ew.write_experts(first, block)
        files[how] = (tmp_path / how / "experts" / "layer_003.bin").read_bytes()
        entry = Manifest.from_json((tmp_path / how / MANIFEST).read_text()).files["experts/layer_003.bin"]
        assert entry.sha256 == hashlib.sha256(files[how]).hexdigest() and entry.size == 5 * layout.stride
    assert files["blocks"] == files["parts"]


def test_an_error_inside_leaves_no_directory_and_a_missing_projection_is_named(tmp_path):
    experts = _experts(np.random.default_rng(2), 2)
    with pytest.raises(RuntimeError, match="producer failed"):
        with write_model_dir(tmp_path / "m", "qwen3_moe", {}, KEEP) as out:
            ew = out.open_experts(0, ExpertLayout.plan(experts[0]), 2)
            ew.write(0, "gate_proj", experts[0]["gate_proj"])
            assert ew.first_missing() == (0, "up_proj.weight")
            raise RuntimeError("producer failed")
    assert list(tmp_path.iterdir()) == []
