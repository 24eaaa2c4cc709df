"""Bad input to `flashmoe convert`: one `error:` line naming the file/tensor/field, exit code 2, no DST left
behind (nor a temporary directory beside it)."""

from __future__ import annotations

import errno
import os
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file
from typer.testing import CliRunner

from flashmoe.cli import app

ARCH, VARIANT = "qwen3_moe", "no_norm_topk_k2"


@pytest.fixture(scope="module")
def source(hf_checkpoint) -> Path:
    return hf_checkpoint(ARCH, VARIANT)


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _edit_tensors(path: Path, edit) -> None:
    tensors = load_file(path / "model.safetensors")
    edit(tensors)
    save_file(tensors, str(path / "model.safetensors"))


def _edit_config(path: Path, edit) -> None:
    cfg = json.loads((path / "config.json").read_text())
    edit(cfg)
    (path / "config.json").write_text(json.dumps(cfg))


def _convert_fails(src: Path, out_root: Path, *expected: str, extra: tuple[str, ...] = ()) -> str:
    """Run `flashmoe convert src out_root/dst`; assert exit 2, one error line containing every `expected`,
    and nothing new under out_root. Returns the line."""
    before = sorted(p.name for p in out_root.iterdir())
    result = CliRunner().invoke(app, ["convert", str(src), str(out_root / "dst"), "--bits", "4", *extra])
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for text in expected:
        assert text in lines[0], (text, lines[0])
    assert sorted(p.name for p in out_root.iterdir()) == before
    return lines[0]


def test_unknown_model_type(source, tmp_path):
    src = _copy(source, tmp_path / "src")
    _edit_config(src, lambda c: c.update(model_type="llama4_moe"))
    (tmp_path / "out").mkdir()
    _convert_fails(src, tmp_path / "out", "config.json", "model_type", "llama4_moe")


def test_config_missing_a_required_field(source, tmp_path):
    src = _copy(source, tmp_path / "src")
    _edit_config(src, lambda c: c.pop("hidden_size"))
    (tmp_path / "out").mkdir()
    _convert_fails(src, tmp_path / "out", "config.json", "hidden_size")


def test_missing_resident_tensor(source, tmp_path):
    src = _copy(source, tmp_path / "src")
    _edit_tensors(src, lambda t: t.pop("model.layers.1.self_attn.k_proj.weight"))
    (tmp_path / "out").mkdir()
    _convert_fails(src, tmp_path / "out", "missing tensor", "layers.1.self_attn.k_proj.weight")


def test_missing_expert_tensor(source, tmp_path):
    src = _copy(source, tmp_path / "src")
    _edit_tensors(src, lambda t: t.pop("model.layers.2.mlp.experts.5.up_proj.weight"))
    (tmp_path / "out").mkdir()
    _convert_fails(src, tmp_path / "out", "missing tensor", "layers.2.mlp.experts.5.up_proj.weight")


def test_tensor_of_the_wrong_shape(source, tmp_path):
    src = _copy(source, tmp_path / "src")
    _edit_tensors(src, lambda t: t.update({"model.layers.0.self_attn.o_proj.weight": np.zeros((64, 32), np.float32)}))
    (tmp_path / "out").mkdir()
    _convert_fails(src, tmp_path / "out", "model.layers.0.self_attn.o_proj.weight", "shape [64, 32]",
                   "expected [64, 64]")


def test_expert_of_the_wrong_shape(source, tmp_path):
    src = _copy(source, tmp_path / "src")
    _edit_tensors(src, lambda t: t.update({"model.layers.1.mlp.experts.3.down_proj.weight":
                                           np.zeros((64, 31), np.float32)}))
    (tmp_path / "out").mkdir()
    _convert_fails(src, tmp_path / "out", "model.layers.1.mlp.experts.3.down_proj.weight", "shape [64, 31]")


def test_tensor_of_the_wrong_dtype(source, tmp_path):
    src = _copy(source, tmp_path / "src")
    name = "model.layers.0.self_attn.q_proj.weight"
    _edit_tensors(src, lambda t: t.update({name: t[name].astype(np.int32)}))
    (tmp_path / "out").mkdir()
    _convert_fails(src, tmp_path / "out", name, "dtype int32")


@pytest.mark.parametrize("name, index, value, bits", [
    ("model.layers.0.self_attn.q_proj.weight", (3, 5), np.nan, "4"),       # quantised resident
    ("model.layers.2.mlp.experts.1.gate_proj.weight", (0, 7), np.inf, "4"),  # quantised expert
    ("model.layers.1.input_layernorm.weight", (9,), np.nan, "4"),           # kept in float
    ("model.layers.2.mlp.experts.1.gate_proj.weight", (2, 0), -np.inf, "none"),  # expert kept in float
])
def test_non_finite_weight_is_refused_by_tensor_and_index(source, tmp_path, name, index, value, bits):
    src = _copy(source, tmp_path / "src")

    def poison(t):
        t[name] = t[name].copy()
        t[name][index] = value
    _edit_tensors(src, poison)
    (tmp_path / "out").mkdir()
    line = _convert_fails(src, tmp_path / "out", f"model.safetensors: tensor {name!r}: {np.float32(value)} at index "
                          f"{list(index)}", "must be finite", extra=("--bits", bits))
    assert "Traceback" not in line


def test_shard_truncated_by_one_byte(source, tmp_path):
    src = _copy(source, tmp_path / "src")
    shard = src / "model.safetensors"
    data = shard.read_bytes()
    shard.write_bytes(data[:-1])
    (tmp_path / "out").mkdir()
    _convert_fails(src, tmp_path / "out", "model.safetensors", "truncated")


def test_destination_exists_without_force(source, tmp_path):
    out = tmp_path / "out"
    (out / "dst").mkdir(parents=True)
    (out / "dst" / "keep.txt").write_text("mine")
    _convert_fails(source, out, "dst", "already exists", "--force")
    assert (out / "dst" / "keep.txt").read_text() == "mine"


def test_disk_full_during_conversion(source, tmp_path, monkeypatch):
    import flashmoe.format.writer as writer

    def full(fd, data, offset, path):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(writer, "_write_at", full)
    (tmp_path / "out").mkdir()
    _convert_fails(source, tmp_path / "out", "disk full", "layer_")


def test_bad_bits_option(source, tmp_path):
    (tmp_path / "out").mkdir()
    _convert_fails(source, tmp_path / "out", "--expert-bits", "7", extra=("--expert-bits", "7"))


def test_hub_id_that_cannot_be_downloaded(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # no network in tests: the download fails at once
    (tmp_path / "out").mkdir()
    _convert_fails("no-such-org/no-such-model", tmp_path / "out", "no-such-org/no-such-model", "Hub")


def test_source_directory_that_does_not_exist(tmp_path):
    (tmp_path / "out").mkdir()
    _convert_fails(tmp_path / "nowhere", tmp_path / "out", "nowhere", "no such directory")


def test_a_flashmoe_model_directory_as_the_source_is_named_as_one(tmp_path):
    from flashmoe.runtime.load import default_model_dir

    (tmp_path / "out").mkdir()
    _convert_fails(default_model_dir(), tmp_path / "out", f"{default_model_dir()}: is a flashmoe model directory already")


def test_an_output_directory_inside_the_source_is_refused_without_force_too(source, tmp_path):
    src = _copy(source, tmp_path / "src")
    _convert_fails(src, src, f"error: {src / 'dst'}: is inside the source {src}; choose another output directory")


def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("cwd, dst, message", [
    ("work", "precious", "not a flashmoe model directory"),  # a directory of the user's files
    ("work/precious", ".", "is the current directory"),
    ("work/precious/inner", "..", "contains the current directory"),
    ("work", "src", "is the source"),
    ("work/precious", "../src", "is the source"),
    ("work", ".", "contains the source"),
    ("work", "src/out", "error: src/out: is inside the source src; choose another output directory"),
    ("work", "src/new/out", "error: src/new/out: is inside the source src; choose another output directory"),
])
def test_force_refuses_a_destination_it_would_destroy(source, tmp_path, monkeypatch, cwd, dst, message):
    """--force replaces only an empty directory or a flashmoe model directory; it never deletes the source,
    the current directory (or a folder above it) or a folder of other files."""
    work = tmp_path / "work"
    _copy(source, work / "src")
    (work / "precious" / "inner").mkdir(parents=True)
    (work / "precious" / "thesis.txt").write_text("years of work")
    before = _tree(tmp_path)
    monkeypatch.chdir(tmp_path / cwd)
    result = CliRunner().invoke(app, ["convert", str(Path(os.path.relpath(work / "src"))), dst, "--force"])
    assert result.exit_code == 2, (result.output, result.exception)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.stderr
    assert _tree(tmp_path) == before


@pytest.mark.parametrize("dst, message", [
    ("afile/out", "error: afile/out: afile is a file, not a folder"),
    ("afile/out/deeper", "error: afile/out/deeper: afile is a file, not a folder"),
    ("a" * 300, "File name too long"),
    ("a" * 250, "the name is too long (250 bytes; at most 233 here, for the temporary name .NAME.tmp-PID-XXXXXXXX"),
    ("/proc/flashmoe-out", "error: creating /proc/flashmoe-out: "),  # no new directories in /proc
])
@pytest.mark.parametrize("command", ["convert", "synth"])
def test_an_output_directory_that_cannot_be_made_is_one_line(source, tmp_path, monkeypatch, command, dst, message):
    monkeypatch.chdir(tmp_path)
    Path("afile").write_text("")
    args = ["convert", str(source), dst] if command == "convert" else ["synth", "--config", str(source / "config.json"),
                                                                       "--layers", "1", "--group-size", "32", "--out", dst]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, (result.output, result.exception)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr
    assert sorted(os.listdir()) == ["afile"]


def test_sigterm_leaves_no_temporary_directory_and_a_killed_runs_is_removed(source, tmp_path):
    """SIGTERM (timeout, kill) takes Ctrl-C's path: the partial directory goes and the exit code is 143. A
    directory that a SIGKILLed run left is removed by the next run to the same output; one of a running
    process is kept."""
    gone, alive = tmp_path / ".m.tmp-99999999-0123abcd", tmp_path / f".m.tmp-{os.getpid()}-0123abcd"
    gone.mkdir(), alive.mkdir()
    (gone / "experts.bin").write_bytes(b"partial")
    term_while_writing = ("import os, signal, flashmoe.format.writer as w; "
                          "w.ModelDirWriter.add_resident = lambda *a: os.kill(os.getpid(), signal.SIGTERM); "
                          "from flashmoe.cli import app; app()")
    result = subprocess.run([sys.executable, "-c", term_while_writing, "convert", str(source), str(tmp_path / "m")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 143, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    assert sorted(os.listdir(tmp_path)) == [alive.name]


def test_a_tokenizer_json_that_does_not_load_is_refused_before_copying(source, tmp_path):
    src = _copy(source, tmp_path / "src")
    (src / "tokenizer.json").write_text('{"version": "1.0", "model": {"type": "BPE", "vocab": {}}')  # cut short
    (tmp_path / "out").mkdir()
    _convert_fails(src, tmp_path / "out", f"{src / 'tokenizer.json'}: cannot load tokenizer")
