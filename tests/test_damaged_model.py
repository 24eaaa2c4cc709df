"""A model directory whose files pass the size checks but hold damaged bytes."""

from __future__ import annotations


def test_damaged_expert_bytes_give_one_line_naming_verify_not_nan_text(tmp_path):
    """An expert file of the right size but damaged content (0xFF bytes decode to NaN bf16 scales) must not
    print text or write NaN logits: one error line pointing at `flashmoe verify`."""
    import shutil

    from typer.testing import CliRunner

    from flashmoe.cli import app
    from flashmoe.runtime.load import default_model_dir

    model = tmp_path / "damaged"
    shutil.copytree(default_model_dir(), model)
    expert_file = sorted((model / "experts").iterdir())[2]
    data = bytearray(expert_file.read_bytes())
    data[: 700_000] = b"\xff" * 700_000
    expert_file.write_bytes(bytes(data))
    runner = CliRunner()
    for args in (["generate", str(model), "--prompt", "The old house stood", "-n", "4", "--temperature", "0",
                  "--backend", "numpy"],
                 ["logits", str(model), "--tokens", "1,2,3", "--out", str(tmp_path / "x.npy")]):
        result = runner.invoke(app, args)
        assert result.exit_code == 2, result.output
        assert "non-finite logits at position" in result.output and "flashmoe verify" in result.output
        assert "intact but their activations overflow float32" in result.output  # the other cause, named too
        assert "Warning" not in result.output  # the one error line, not NumPy's warnings before it
    assert not (tmp_path / "x.npy").exists()
