"""The model directory: expert layout arithmetic, zero-copy views, manifest round trip, and validation of
every size and offset on open."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from flashmoe.convert.checkpoint import convert_checkpoint
from flashmoe.errors import FormatError
from flashmoe.format.manifest import MANIFEST, ExpertLayout, Manifest
from flashmoe.format.modeldir import ModelDir
from flashmoe.format.mxfp4 import Mxfp4Tensor
from flashmoe.format.quant import QuantizedTensor, quantize
from flashmoe.arch.tensors import WeightSource


@pytest.fixture(scope="module")
def model(hf_checkpoint, tmp_path_factory) -> Path:
    src = hf_checkpoint("qwen3_moe", "no_norm_topk_k2")
    return convert_checkpoint(src, tmp_path_factory.mktemp("md") / "q4", bits="4", progress=False)


def _expert_parts(seed: int, hidden: int = 256, inter: int = 128):
    rng = np.random.default_rng(seed)
    return {
        "gate_proj": quantize(rng.standard_normal((inter, hidden)).astype(np.float32), 4, 64),
        "up_proj": quantize(rng.standard_normal((inter, hidden)).astype(np.float32), 4, 64),
        "down_proj": rng.standard_normal((hidden, inter)).astype(np.float32),  # a float component
    }


def test_layout_aligns_components_and_stride():
    parts = _expert_parts(0)
    lay = ExpertLayout.plan(parts)
    assert [c.name for c in lay.components] == [
        "gate_proj.weight", "gate_proj.scales", "gate_proj.biases",
        "up_proj.weight", "up_proj.scales", "up_proj.biases", "down_proj.weight"]
    assert all(c.offset % 64 == 0 for c in lay.components)
    # gate weight 128x32 u32 = 16384 B; scales/biases 128x4 f32 = 2048 B each; down 256x128 f32 = 131072 B.
    assert [c.offset for c in lay.components] == [0, 16384, 18432, 20480, 36864, 38912, 40960]
    assert lay.nbytes == 40960 + 131072 and lay.stride == 172032 and lay.stride % 4096 == 0


def test_view_is_zero_copy_and_round_trips_pack():
    parts = _expert_parts(1)
    lay = ExpertLayout.plan(parts)
    buf = np.full(lay.stride, 0xAB, np.uint8)
    lay.pack(parts, buf)
    assert not buf[lay.nbytes:].any()  # padding is zeroed
    views = lay.view(buf)
    gate = views["gate_proj"]
    assert isinstance(gate, QuantizedTensor) and (gate.bits, gate.group_size) == (4, 64)
    for arr in (gate.weight, gate.scales, gate.biases, views["down_proj"]):
        assert np.shares_memory(arr, buf)
    np.testing.assert_array_equal(gate.weight, parts["gate_proj"].weight)
    np.testing.assert_array_equal(views["up_proj"].biases, parts["up_proj"].biases)
    np.testing.assert_array_equal(views["down_proj"], parts["down_proj"])


def test_manifest_json_round_trip(model):
    text = (model / MANIFEST).read_text()
    manifest = Manifest.from_json(text)
    assert manifest.to_json() == text
    # no groups of 16: the lowest version that holds it, so version-2 readers read it
    assert manifest.format_version == 2 and manifest.model_type == "qwen3_moe"
    assert manifest.quantization["lm_head.weight"].to_dict() == {"format": "affine", "bits": 4, "group_size": 64}


def test_format_version_1_directories_are_still_read(model, tmp_path):
    """Version 1 had no `format` key (everything affine) and no expert biases."""
    def to_v1(m):
        m["format_version"] = 1
        for q in [*m["quantization"].values(), *(q for e in m["experts"] for q in e["quantization"].values())]:
            del q["format"]
    old = _corrupt(model, tmp_path, _edit_manifest(to_v1))
    with ModelDir.open(old) as md, ModelDir.open(model) as new:
        assert md.manifest.format_version == 1 and md.quantization("lm_head.weight") == new.quantization(
            "lm_head.weight")
        np.testing.assert_array_equal(md.expert(1, 3)["down_proj"], new.expert(1, 3)["down_proj"])


def test_mxfp4_and_bias_components_round_trip_pack_and_view():
    rng = np.random.default_rng(2)
    parts = {proj: Mxfp4Tensor(rng.integers(0, 256, (out, n_in // 2), dtype=np.uint8),
                               rng.integers(120, 130, (out, n_in // 32), dtype=np.uint8))
             for proj, (out, n_in) in {"gate_proj": (64, 96), "up_proj": (64, 96), "down_proj": (96, 64)}.items()}
    parts.update({f"{p}.bias": rng.standard_normal(parts[p].shape[0]).astype(np.float32) for p in list(parts)})
    lay = ExpertLayout.plan(parts)
    assert [c.name for c in lay.components][:3] == ["gate_proj.blocks", "gate_proj.scales", "gate_proj.bias"]
    assert lay.quantization["down_proj"].to_dict() == {"format": "mxfp4", "bits": 4, "group_size": 32}
    assert ExpertLayout.from_dict(json.loads(json.dumps(lay.to_dict())), "x") == lay
    buf = np.zeros(lay.stride, np.uint8)
    lay.pack(parts, buf)
    views = lay.view(buf)
    assert isinstance(views["up_proj"], Mxfp4Tensor) and np.shares_memory(views["up_proj"].blocks, buf)
    np.testing.assert_array_equal(views["down_proj"].dequantize(), parts["down_proj"].dequantize())
    np.testing.assert_array_equal(views["gate_proj.bias"], parts["gate_proj.bias"])


def test_open_exposes_config_layers_and_weight_source(model):
    with ModelDir.open(model) as md:
        assert isinstance(md, WeightSource)
        assert md.moe_layers == md.config.moe_layers == [0, 1, 2]
        assert md.expert_path(1) == model / "experts" / "layer_001.bin"
        assert md.expert_path(1).stat().st_size == md.config.num_experts * md.layout.stride
        e = md.expert(2, 15)
        assert {k: v.shape for k, v in e.items()} == {"gate_proj": (32, 64), "up_proj": (32, 64),
                                                      "down_proj": (64, 32)}
        assert all(v.dtype == np.float32 for v in e.values())
        assert md.has("norm.weight") and not md.has("layers.0.mlp.experts.0.gate_proj.weight")
        assert "embed_tokens.scales" not in md.resident_names()
        assert md.resident_nbytes == sum(
            md.raw(n).nbytes for n in md.resident_names())


def _corrupt(model: Path, tmp_path: Path, edit) -> Path:
    bad = shutil.copytree(model, tmp_path / "bad")
    edit(bad)
    return bad


def _edit_manifest(fn):
    def edit(d: Path):
        m = json.loads((d / MANIFEST).read_text())
        fn(m)
        (d / MANIFEST).write_text(json.dumps(m))
    return edit


def _truncate(rel: str):
    def edit(d: Path):
        data = (d / rel).read_bytes()
        (d / rel).write_bytes(data[:-1])
    return edit


@pytest.mark.parametrize("edit,expected", [
    (_edit_manifest(lambda m: m.update(format_version=4)),
     "reads 1, 2, 3); it was written by a newer flashmoe: upgrade flashmoe"),
    (_edit_manifest(lambda m: m.update(format_version=0)),
     "format_version 0 is not supported (this flashmoe reads 1, 2, 3); convert the model again"),
    (_edit_manifest(lambda m: m.pop("experts")), "missing field 'experts'"),
    (_edit_manifest(lambda m: m["experts"][0].update(stride=6000)), "stride = 6000"),
    (_edit_manifest(lambda m: m["experts"][1]["components"][1].update(offset=100)), "offset 100"),
    (_edit_manifest(lambda m: m["experts"][0].update(nbytes=10)), "nbytes 10"),
    (_edit_manifest(lambda m: m["experts"][0]["components"][0].update(shape=[32, 9])), "gate_proj"),
    (_edit_manifest(lambda m: m["experts"][2].update(num_experts=8)), "num_experts = 8"),
    (_edit_manifest(lambda m: m["quantization"]["lm_head.weight"].update(bits=8)), "lm_head.weight"),
    (_edit_manifest(lambda m: m["quantization"]["lm_head.weight"].update(format="mxfp4", bits=4, group_size=32)),
     "'lm_head.weight' is mxfp4"),
    (_edit_manifest(lambda m: m["experts"][0]["quantization"]["gate_proj"].update(format="nf4")), "'nf4'"),
    # groups of 16 came with version 3: a version-2 manifest declaring them is refused by the field
    (_edit_manifest(lambda m: m["quantization"]["lm_head.weight"].update(group_size=16)),
     "quantization['lm_head.weight'].group_size = 16 needs format_version 3, the manifest says 2"),
    (_edit_manifest(lambda m: m["experts"][1]["quantization"]["gate_proj"].update(group_size=16)),
     "experts[1].quantization.gate_proj.group_size = 16 needs format_version 3, the manifest says 2"),
    (_truncate("experts/layer_001.bin"), "layer_001.bin"),
    (_truncate("resident.safetensors"), "resident.safetensors"),
], ids=["newer-version", "old-version", "no-experts", "stride", "offset", "nbytes", "shape", "num-experts", "bits", "mxfp4-resident",
        "unknown-format", "group-16-in-version-2", "expert-group-16-in-version-2", "short-expert-file", "short-resident"])
def test_open_rejects_inconsistent_directories(model, tmp_path, edit, expected):
    bad = _corrupt(model, tmp_path, edit)
    with pytest.raises(FormatError, match=None) as err:
        ModelDir.open(bad)
    assert expected in str(err.value), str(err.value)


@pytest.mark.parametrize("bad_path", ["../../../etc/passwd", "/etc/passwd", "experts/../../layer_001.bin"])
def test_open_rejects_expert_path_outside_the_directory(model, tmp_path, bad_path):
    bad = _corrupt(model, tmp_path, _edit_manifest(lambda m: m["experts"][1].update(path=bad_path)))
    with pytest.raises(FormatError) as err:
        ModelDir.open(bad)
    assert f"experts[layer 1].path = {bad_path!r} is outside the model directory" in str(err.value)


def test_open_rejects_model_type_disagreeing_with_config(model, tmp_path):
    bad = _corrupt(model, tmp_path, _edit_manifest(lambda m: m.update(model_type="mixtral")))
    with pytest.raises(FormatError) as err:
        ModelDir.open(bad)
    msg = str(err.value)
    assert "model_type 'mixtral'" in msg and "'qwen3_moe'" in msg, msg
    assert str(bad / MANIFEST) in msg and str(bad / "config.json") in msg, msg


def test_short_expert_file_names_size_even_without_files_entry(model, tmp_path):
    def edit(d: Path):
        _edit_manifest(lambda m: m["files"].pop("experts/layer_001.bin"))(d)
        _truncate("experts/layer_001.bin")(d)
    with pytest.raises(FormatError, match="layer_001.bin: .* expected num_experts 16 x stride"):
        ModelDir.open(_corrupt(model, tmp_path, edit))


def test_verify_checksums_finds_a_flipped_byte(model, tmp_path):
    def flip(d: Path):
        p = d / "experts" / "layer_002.bin"
        data = bytearray(p.read_bytes())
        data[5] ^= 1
        p.write_bytes(bytes(data))
    md = ModelDir.open(_corrupt(model, tmp_path, flip))  # sizes still agree: open succeeds
    with pytest.raises(FormatError, match="layer_002.bin: sha256"):
        md.verify_checksums()
    md.close()


def test_edited_settings_files_open_and_verify_names_them(model, tmp_path):
    """Users edit generation_config.json and config.json (EOS tokens, sampling defaults) as in Hugging Face
    models: the model still opens, and verify passes the weights and names the edited files."""
    from typer.testing import CliRunner

    from flashmoe.cli import app

    def edit(d: Path):
        gen = json.loads((d / "generation_config.json").read_text())
        (d / "generation_config.json").write_text(json.dumps(dict(gen, temperature=0.25), indent=4))
        cfg = json.loads((d / "config.json").read_text())
        (d / "config.json").write_text(json.dumps(dict(cfg, eos_token_id=[2, 3])))
    edited = _corrupt(model, tmp_path, edit)
    with ModelDir.open(edited) as md:
        assert md.verify_checksums() == ["config.json", "generation_config.json"]
    result = CliRunner().invoke(app, ["verify", str(edited)])
    assert result.exit_code == 0, result.output
    assert "config.json, generation_config.json" in result.stdout and "not weights" in result.stdout


def test_settings_file_that_is_not_json_is_named_on_open(model, tmp_path):
    bad = _corrupt(model, tmp_path, lambda d: (d / "generation_config.json").write_text('{"temperature": 0.7,'))
    with pytest.raises(FormatError, match=r"generation_config.json: not valid JSON \(.*\); fix the edit"):
        ModelDir.open(bad)
