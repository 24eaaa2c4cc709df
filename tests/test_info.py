"""`flashmoe info` numbers and `flashmoe logits` output, through the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from flashmoe.cli import app
from flashmoe.convert.checkpoint import convert_checkpoint
from flashmoe.info import model_stats
from flashmoe.format.modeldir import ModelDir


@pytest.fixture(scope="module")
def model(hf_checkpoint, tmp_path_factory) -> Path:
    src = hf_checkpoint("qwen3_5_moe", "shared_k2")
    return convert_checkpoint(src, tmp_path_factory.mktemp("info") / "q4", bits="4", group_size=32,
                              progress=False)


def test_info_reports_expert_bytes_per_token_and_decode_ceiling(model):
    with ModelDir.open(model) as md:
        nbytes = md.layout.nbytes
        stats = model_stats(md)
        cfg = md.config
    # 16 experts of 3 projections 32x64 per MoE layer, 4 MoE layers.
    assert stats["expert_params"] == 3 * 64 * 32
    assert stats["total_params"] == stats["resident_params"] + 4 * 16 * 3 * 64 * 32
    assert stats["active_params"] == stats["resident_params"] + 4 * 2 * 3 * 64 * 32
    per_token = cfg.num_experts_per_tok * nbytes * len(cfg.moe_layers)
    assert stats["expert_bytes_per_token"] == per_token
    result = CliRunner().invoke(app, ["info", str(model), "--disk-gbps", "5"])
    assert result.exit_code == 0, result.output
    assert f"{per_token:,} B" in result.stdout
    assert f"{5e9 / per_token:.3g} tok/s at 5 GB/s" in result.stdout
    assert f"{nbytes:,} B" in result.stdout and "qwen3_5_moe" in result.stdout


def test_info_like_a_preset_gives_the_full_depth_figures_without_files():
    """shared/model-shapes.md: DeepSeek-V3 671B with 37B active, 368 GB of experts, 11.5 GB read per token."""
    result = CliRunner().invoke(app, ["info", "--like", "deepseek-v3", "--disk-gbps", "7"])
    assert result.exit_code == 0, result.output
    assert "671.03B) total, 37,552,297,472 (37.55B) active" in result.stdout
    assert "367,823,683,584 B" in result.stdout and "11,494,490,112 B" in result.stdout
    assert "0.609 tok/s at 7 GB/s" in result.stdout and "multi-head latent attention; 3 dense" in result.stdout
    assert "unknown preset 'nope'" in CliRunner().invoke(app, ["info", "--like", "nope"]).output


def test_info_like_gpt_oss_names_its_mxfp4_experts_and_their_bytes():
    """An MXFP4 expert of gpt-oss-20b: 3 projections of 2880 x 2880 at 4.25 bits (codes + one E8M0 scale per 32)
    and bfloat16 biases."""
    result = CliRunner().invoke(app, ["info", "--like", "gpt-oss-20b"])
    assert result.exit_code == 0, result.output
    assert "(MXFP4 experts, other tensors 4-bit, group 64," in result.stdout
    mxfp4 = 3 * (2880 * 2880 // 2 + 2880 * 2880 // 32 + 2 * 2880)
    assert f"per expert:       {mxfp4:,} B" in result.stdout


def test_logits_command_writes_reference_logits(model, tmp_path):
    from flashmoe.reference import ReferenceModel

    out = tmp_path / "logits.npy"
    result = CliRunner().invoke(app, ["logits", str(model), "--tokens", "5, 17,200", "--out", str(out)])
    assert result.exit_code == 0, result.output
    got = np.load(out)
    assert got.dtype == np.float32 and got.shape == (3, 256)
    np.testing.assert_array_equal(got, ReferenceModel.from_dir(model).forward(np.array([5, 17, 200])))
    assert [p.name for p in tmp_path.iterdir()] == ["logits.npy"]


@pytest.mark.parametrize("args,expected", [
    (["--tokens", "1,x"], "'x' is not an integer"),
    (["--tokens", "1,256"], "outside 0..255"),
    (["--tokens", "1,2", "--backend", "no-such-backend"], "no-such-backend"),
])
def test_logits_bad_input_is_one_line_and_no_file(model, tmp_path, args, expected):
    out = tmp_path / "x.npy"
    result = CliRunner().invoke(app, ["logits", str(model), "--out", str(out), *args])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0], result.stderr
    assert not any(tmp_path.iterdir())


def test_logits_command_runs_an_engine_backend(model, tmp_path):
    """`--backend numpy` goes through the engine (streamed experts) and agrees with the reference."""
    ref, eng = tmp_path / "ref.npy", tmp_path / "numpy.npy"
    for out, backend in ((ref, "reference"), (eng, "numpy")):
        result = CliRunner().invoke(app, ["logits", str(model), "--tokens", "3,9,27,81", "--out", str(out),
                                          "--backend", backend])
        assert result.exit_code == 0, result.output
    want, got = np.load(ref), np.load(eng)
    assert got.shape == want.shape == (4, 256)
    assert np.abs(got - want).max() / np.abs(want).max() <= 1e-4


def test_verify_checks_every_file_and_reports_the_bytes_hashed(model):
    with ModelDir.open(model) as md:
        total = sum(e.size for e in md.manifest.files.values())
        hashed = []
        md.verify_checksums(progress=hashed.append)
    assert sum(hashed) == total
    result = CliRunner().invoke(app, ["verify", str(model)])
    assert result.exit_code == 0, result.output
    assert f"ok: {len(md.manifest.files)} files" in result.stdout


def test_verify_names_a_corrupted_expert_file_and_exits_2(model, tmp_path):
    import shutil

    copy = Path(shutil.copytree(model, tmp_path / "copy"))
    expert = sorted((copy / "experts").iterdir())[0]
    data = bytearray(expert.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size: opening the model still succeeds
    expert.write_bytes(bytes(data))
    result = CliRunner().invoke(app, ["verify", str(copy)])
    assert result.exit_code == 2
    assert f"{expert}: sha256" in result.stderr and "does not match flashmoe.json" in result.stderr


def test_info_and_verify_default_to_the_bundled_model():
    from typer.testing import CliRunner

    from flashmoe.cli import app

    runner = CliRunner()
    info = runner.invoke(app, ["info"])
    assert info.exit_code == 0 and "demo-model" in info.output and "k = 4" in info.output
    verify = runner.invoke(app, ["verify"])
    assert verify.exit_code == 0 and verify.output.startswith("ok: ")


def test_info_describes_a_hugging_face_checkpoint_as_convert_would_write_it(hf_checkpoint, tmp_path):
    """A checkpoint directory (config.json + safetensors): its tensors by dtype, and the resident bytes, bytes per
    expert, experts on disk and read per token that `flashmoe info` then gives the converted directory."""
    src = hf_checkpoint("qwen3_5_moe", "shared_k2")  # float32; down_proj's width 32 stays float at group 64
    result = CliRunner().invoke(app, ["info", str(src), "--disk-gbps", "5"])
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith(f"checkpoint:       {src} (1 safetensors file; not a flashmoe model directory: "
                                    f"`flashmoe convert {src} OUT` makes one)\narchitecture:     qwen3_5_moe_text (4 ")
    assert "once converted:   4-bit, group 64: `flashmoe convert`'s defaults" in result.stdout
    with open(src / "model.safetensors", "rb") as f:  # every tensor is float32: the data after the header
        header_bytes = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(header_bytes))
    data = (src / "model.safetensors").stat().st_size - 8 - header_bytes
    n = len(header) - ("__metadata__" in header)
    assert f"  float32           {n} tensors        {data:,} B" in result.stdout
    converted = CliRunner().invoke(app, ["info", str(convert_checkpoint(src, tmp_path / "m", progress=False,
                                                                            log=lambda _: None))])

    def figures(text: str) -> list[str]:
        return [line.split(" (")[0] for line in text.splitlines()
                if line.split(":")[0] in ("parameters", "resident", "per expert", "experts on disk", "read per token")]

    assert figures(result.stdout) == figures(converted.stdout) and len(figures(result.stdout)) == 5


def test_info_on_a_directory_that_is_neither_model_nor_checkpoint_is_one_line(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "qwen3_moe"}')
    result = CliRunner().invoke(app, ["info", str(tmp_path)])
    assert result.exit_code == 2 and result.stdout == "" and result.stderr.count("\n") == 1, result.output
    damaged = tmp_path / "damaged"  # a flashmoe model directory that lost flashmoe.json is not a checkpoint
    damaged.mkdir()
    (damaged / "config.json").write_text("{}")
    (damaged / "resident.safetensors").write_bytes(b"")
    result = CliRunner().invoke(app, ["info", str(damaged)])
    assert (result.exit_code, result.stderr) == (2, f"error: {damaged / 'flashmoe.json'}: missing (not a flashmoe "
                                                    "model directory; run `flashmoe convert`)\n")
