"""flashmoe convert: every expert storage form, float and quantised, round-trips through a model directory."""

from __future__ import annotations

import json
import os
import shutil
import stat
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from checkpoints import VARIANTS, canonical_weights
from flashmoe.convert.checkpoint import convert_checkpoint
from flashmoe.errors import FlashMoeError
from flashmoe.format.manifest import MANIFEST
from flashmoe.format.modeldir import ModelDir
from flashmoe.format.quant import QuantizedTensor, quantize

ARCH, VARIANT = "qwen3_moe", "no_norm_topk_k2"


def _rewrite(src: Path, dst: Path, transform) -> Path:
    """Copy checkpoint src to dst with its tensors passed through transform(dict) -> dict."""
    dst.mkdir()
    shutil.copy(src / "config.json", dst / "config.json")
    save_file(transform(load_file(src / "model.safetensors")), str(dst / "model.safetensors"))
    return dst


def _stack_experts(tensors: dict, cfg, fused: bool) -> dict:
    """Per-expert tensors -> HF fused (`experts.gate_up_proj` [E, 2I, H], `experts.down_proj` [E, H, I]) or
    MLX stacked (`switch_mlp.{proj}.weight` [E, out, in])."""
    out = {k: v for k, v in tensors.items() if ".mlp.experts." not in k}
    for layer in cfg.moe_layers:
        p = f"model.layers.{layer}.mlp"
        stack = {proj: np.stack([tensors[f"{p}.experts.{e}.{proj}.weight"] for e in range(cfg.num_experts)])
                 for proj in ("gate_proj", "up_proj", "down_proj")}
        if fused:
            out[f"{p}.experts.gate_up_proj"] = np.concatenate([stack["gate_proj"], stack["up_proj"]], axis=1)
            out[f"{p}.experts.down_proj"] = stack["down_proj"]
        else:
            out.update({f"{p}.switch_mlp.{proj}.weight": w for proj, w in stack.items()})
    return out


@pytest.fixture(scope="module")
def per_expert(hf_checkpoint) -> Path:
    return hf_checkpoint(ARCH, VARIANT)


@pytest.fixture(scope="module")
def forms(per_expert, tmp_path_factory) -> dict[str, Path]:
    """The same weights in the three expert storage forms."""
    cfg, _ = canonical_weights(per_expert)
    root = tmp_path_factory.mktemp("forms")
    return {
        "per_expert": per_expert,
        "fused": _rewrite(per_expert, root / "fused", lambda t: _stack_experts(t, cfg, fused=True)),
        "mlx_stacked": _rewrite(per_expert, root / "stacked", lambda t: _stack_experts(t, cfg, fused=False)),
    }


@pytest.mark.parametrize("form", ["per_expert", "fused", "mlx_stacked"])
def test_bits_none_round_trips_every_tensor_exactly(forms, tmp_path, form):
    dst = convert_checkpoint(forms[form], tmp_path / "out", bits="none", progress=False)
    cfg, want = canonical_weights(forms["per_expert"])
    with ModelDir.open(dst) as md:
        assert sorted(md.resident_names()) == sorted(n for n in want.names() if ".experts." not in n)
        for name in md.resident_names():
            np.testing.assert_array_equal(md.tensor(name), want.tensor(name))
        for layer in md.moe_layers:
            for e in range(cfg.num_experts):
                got, ref = md.expert(layer, e), want.expert(layer, e)
                for proj in ("gate_proj", "up_proj", "down_proj"):
                    np.testing.assert_array_equal(got[proj], ref[proj])
        md.verify_checksums()


@pytest.mark.parametrize("form", ["fused", "mlx_stacked"])
def test_expert_files_identical_across_storage_forms(forms, tmp_path, form):
    a = convert_checkpoint(forms["per_expert"], tmp_path / "a", bits="4", progress=False)
    b = convert_checkpoint(forms[form], tmp_path / "b", bits="4", progress=False)
    for layer_file in sorted((a / "experts").iterdir()):
        assert layer_file.read_bytes() == (b / "experts" / layer_file.name).read_bytes()


def test_4bit_conversion_stores_exactly_what_quantize_gives(per_expert, tmp_path):
    dst = convert_checkpoint(per_expert, tmp_path / "q4", bits="4", group_size=64, progress=False)
    cfg, want = canonical_weights(per_expert)
    with ModelDir.open(dst) as md:
        q = md.raw("layers.0.self_attn.q_proj.weight")
        ref = quantize(want.tensor("layers.0.self_attn.q_proj.weight"), 4, 64)
        assert isinstance(q, QuantizedTensor) and (q.bits, q.group_size) == (4, 64)
        np.testing.assert_array_equal(q.weight, ref.weight)
        np.testing.assert_array_equal(q.scales, ref.scales)
        router = md.raw(f"layers.{md.moe_layers[0]}.mlp.gate.weight")
        assert (router.bits, router.group_size) == (8, 64)  # mlx-lm keeps the router at 8 bits
        norm = md.raw("layers.0.input_layernorm.weight")
        assert isinstance(norm, np.ndarray) and norm.dtype == np.float32
        layer = md.moe_layers[-1]
        views = md.layout.view(md.read_expert(layer, 3))
        expected = quantize(want.expert(layer, 3)["up_proj"], 4, 64)
        np.testing.assert_array_equal(views["up_proj"].weight, expected.weight)
        np.testing.assert_array_equal(views["up_proj"].biases, expected.biases)
        # down_proj's input (moe_intermediate_size 32) is not a multiple of 64: kept float, as mlx-lm does.
        np.testing.assert_array_equal(views["down_proj"], want.expert(layer, 3)["down_proj"])
        manifest = json.loads((dst / MANIFEST).read_text())
        assert manifest["quantization"]["lm_head.weight"] == {"format": "affine", "bits": 4, "group_size": 64}
        assert manifest["source"]["layout"] == "hf"
        for name in ("config.json", "resident.safetensors", f"experts/layer_{layer:03d}.bin"):
            assert len(manifest["files"][name]["sha256"]) == 64


def test_an_eos_id_outside_the_vocabulary_is_refused_before_writing(per_expert, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(per_expert, src)
    vocab_size = json.loads((src / "config.json").read_text())["vocab_size"]
    (src / "generation_config.json").write_text(json.dumps({"eos_token_id": [1, vocab_size]}))
    with pytest.raises(FlashMoeError) as err:
        convert_checkpoint(src, tmp_path / "out", progress=False)
    assert str(err.value) == (f"{src / 'generation_config.json'}: field 'eos_token_id' holds {vocab_size}, not a "
                              f"token of the model (vocab_size {vocab_size} in config.json): the model could never "
                              "end a reply with it")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]  # nothing written, no temporary directory


def test_expert_bits_and_group_size_apply_to_experts_only(per_expert, tmp_path):
    dst = convert_checkpoint(per_expert, tmp_path / "mixed", bits="8", group_size=32, expert_bits="2",
                             progress=False)
    with ModelDir.open(dst) as md:
        assert md.layout.quantization["gate_proj"].bits == 2
        assert md.layout.quantization["gate_proj"].group_size == 32
        assert (md.raw("embed_tokens.weight").bits, md.raw("embed_tokens.weight").group_size) == (8, 32)


def test_sharded_checkpoint_with_index_converts_like_single_file(per_expert, tmp_path):
    src = tmp_path / "sharded"
    src.mkdir()
    shutil.copy(per_expert / "config.json", src / "config.json")
    tensors = load_file(per_expert / "model.safetensors")
    names = sorted(tensors)
    halves = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    weight_map = {}
    for shard, part in halves.items():
        save_file({n: tensors[n] for n in part}, str(src / shard))
        weight_map.update({n: shard for n in part})
    (src / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    a = convert_checkpoint(per_expert, tmp_path / "a", bits="4", progress=False)
    b = convert_checkpoint(src, tmp_path / "b", bits="4", progress=False)
    assert (a / "resident.safetensors").read_bytes() == (b / "resident.safetensors").read_bytes()
    assert (a / "experts" / "layer_000.bin").read_bytes() == (b / "experts" / "layer_000.bin").read_bytes()


def test_force_replaces_a_model_directory_or_an_empty_one_and_leaves_no_temporary(per_expert, tmp_path):
    dst = tmp_path / "out"
    dst.mkdir()
    convert_checkpoint(per_expert, dst, bits="none", force=True, progress=False)
    (dst / "stale.txt").write_text("old")
    convert_checkpoint(per_expert, dst, bits="4", force=True, progress=False)
    assert not (dst / "stale.txt").exists() and (dst / MANIFEST).exists()
    assert ModelDir.open(dst).quantization("embed_tokens.weight").bits == 4
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_model_directory_and_files_get_the_umask_modes_like_any_other(per_expert, tmp_path, umask):
    old = os.umask(umask)
    try:
        dst = convert_checkpoint(per_expert, tmp_path / "out", bits="4", progress=False)
    finally:
        os.umask(old)
    modes = {p.relative_to(dst).as_posix(): stat.S_IMODE(p.stat().st_mode) for p in [dst, *dst.rglob("*")]}
    assert modes.pop(".") == modes.pop("experts") == 0o777 & ~umask
    assert set(modes.values()) == {0o666 & ~umask}, modes  # config.json, manifest, resident, expert files


def test_weights_left_float_by_the_group_size_are_named_in_one_warning(per_expert, tmp_path):
    notes: list[str] = []
    dst = convert_checkpoint(per_expert, tmp_path / "out", bits="4", group_size=128, progress=False,
                             log=notes.append)
    assert ModelDir.open(dst).quantization("embed_tokens.weight") is None  # width 64: no group of 128
    [warning] = [n for n in notes if n.startswith("warning:")]
    assert "17 weights stay float" in warning and "(--group-size 128)" in warning, warning
    assert "embed_tokens.weight (width 64)" in warning and warning.endswith("--group-size 32 fits all"), warning
    notes.clear()
    convert_checkpoint(per_expert, tmp_path / "fits", bits="4", group_size=32, progress=False, log=notes.append)
    assert not [n for n in notes if n.startswith("warning:")], notes


def test_missing_tokenizer_converts_with_a_note_naming_dst(per_expert, tmp_path, capsys):
    assert not (per_expert / "tokenizer.json").exists()
    dst = convert_checkpoint(per_expert, tmp_path / "out", bits="none", progress=False)  # default log: stderr
    assert (dst / MANIFEST).exists()
    [note] = [n for n in capsys.readouterr().err.splitlines() if "tokenizer.json" in n]
    assert "`flashmoe generate/chat/serve` need a tokenizer.json in " + str(dst) in note, note

    notes: list[str] = []

    with_tok = shutil.copytree(per_expert, tmp_path / "with_tok")
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel

    tokenizer_json = Tokenizer(WordLevel({"a": 0}, unk_token="a")).to_str()  # convert loads it to check it
    (with_tok / "tokenizer.json").write_text(tokenizer_json)
    (with_tok / "additional_chat_templates").mkdir()
    (with_tok / "additional_chat_templates" / "tool_use.jinja").write_text("{{ tools }}")
    notes.clear()
    dst = convert_checkpoint(with_tok, tmp_path / "out2", bits="none", progress=False, log=notes.append)
    assert (dst / "tokenizer.json").read_text() == tokenizer_json
    assert (dst / "additional_chat_templates" / "tool_use.jinja").read_text() == "{{ tools }}"
    with ModelDir.open(dst) as md:  # in the manifest: hashed like every side file
        assert md.manifest.files["additional_chat_templates/tool_use.jinja"].size == len("{{ tools }}")
    assert not [n for n in notes if "tokenizer.json" in n], notes


def test_bfloat16_source_keeps_bfloat16_scales_like_mlx(per_expert, tmp_path):
    import ml_dtypes

    src = _rewrite(per_expert, tmp_path / "bf16",
                   lambda t: {k: v.astype(ml_dtypes.bfloat16) for k, v in t.items()})
    dst = convert_checkpoint(src, tmp_path / "out", bits="4", progress=False)
    with ModelDir.open(dst) as md:
        q = md.raw("layers.0.self_attn.o_proj.weight")
        assert q.scales.dtype == ml_dtypes.bfloat16
        assert md.raw("norm.weight").dtype == ml_dtypes.bfloat16
        assert md.tensor("norm.weight").dtype == np.float32


@pytest.mark.parametrize("arch,variant", VARIANTS, ids=[f"{a}-{v}" for a, v in VARIANTS])
def test_every_variant_converts_losslessly_with_bits_none(hf_checkpoint, tmp_path, arch, variant):
    """Every architecture and checkpoint layout (incl. multimodal, tied, dense layers) round-trips exactly."""
    src = hf_checkpoint(arch, variant)
    cfg, want = canonical_weights(src)
    with ModelDir.open(convert_checkpoint(src, tmp_path / "out", bits="none", progress=False)) as md:
        assert sorted(md.resident_names()) == sorted(n for n in want.names() if ".experts." not in n)
        for name in md.resident_names():
            np.testing.assert_array_equal(md.tensor(name), want.tensor(name), err_msg=name)
        for layer in md.moe_layers:
            for e in (0, cfg.num_experts - 1):
                got, ref = md.expert(layer, e), want.expert(layer, e)
                for proj in ("gate_proj", "up_proj", "down_proj"):
                    np.testing.assert_array_equal(got[proj], ref[proj])


def test_conversion_streams_tensor_by_tensor(tmp_path):
    """Peak Python/NumPy allocation while converting stays far below one layer of experts: per-expert tensors
    are quantised and written one at a time (the source itself is memory-mapped, not allocated)."""
    import tracemalloc

    from flashmoe.arch.config import ModelConfig
    from flashmoe.arch.tensors import resident_shapes

    config = dict(model_type="qwen3_moe", hidden_size=128, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=32, vocab_size=256, num_experts=64, num_experts_per_tok=2,
                  moe_intermediate_size=64, intermediate_size=256, norm_topk_prob=True,
                  tie_word_embeddings=False, rope_parameters={"rope_type": "default", "rope_theta": 1e6})
    cfg = ModelConfig.from_dict(config)
    rng = np.random.default_rng(0)
    tensors = {f"model.{n}" if n != "lm_head.weight" else n: rng.standard_normal(s).astype(np.float32)
               for n, s in resident_shapes(cfg).items()}
    for layer in cfg.moe_layers:
        for e in range(cfg.num_experts):
            for proj, shape in (("gate_proj", (64, 128)), ("up_proj", (64, 128)), ("down_proj", (128, 64))):
                tensors[f"model.layers.{layer}.mlp.experts.{e}.{proj}.weight"] = rng.standard_normal(shape).astype(
                    np.float32)
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text(json.dumps(config))
    save_file(tensors, str(src / "model.safetensors"))
    layer_bytes = cfg.num_experts * 3 * 64 * 128 * 4
    del tensors
    tracemalloc.start()
    convert_checkpoint(src, tmp_path / "out", bits="4", progress=False)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < layer_bytes / 2, (peak, layer_bytes)  # ~1 MiB I/O buffer + one tensor + bookkeeping
    with ModelDir.open(tmp_path / "out") as md:
        assert md.layout.quantization["down_proj"].bits == 4
