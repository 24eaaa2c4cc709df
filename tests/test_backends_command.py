"""`flashmoe backends`: one row per backend with availability, device and conformance stamp."""

from __future__ import annotations

from typer.testing import CliRunner

from flashmoe.cli import app


def test_backends_lists_every_backend_with_device_and_stamp(tmp_path, monkeypatch):
    monkeypatch.setenv("FLASHMOE_CACHE_DIR", str(tmp_path))  # no stamps yet
    result = CliRunner().invoke(app, ["backends"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    rows = {line.split("│")[1].strip(): line for line in result.output.splitlines() if line.count("│") == 5}
    assert {"numpy", "numba", "mlx", "cuda"} <= set(rows)
    assert "the reference (not gated)" in rows["numpy"]
    assert "cpu (mlx " in rows["mlx"] and "not checked yet (" in rows["mlx"]
    assert "no (" in rows["cuda"] or "yes" in rows["cuda"]
    assert "mlx: checked on first use, or now with `flashmoe conformance --backend mlx`" in result.output


def test_backends_table_fits_80_columns_and_wraps_between_words(tmp_path, monkeypatch):
    monkeypatch.setenv("FLASHMOE_CACHE_DIR", str(tmp_path))
    narrow, wide = (CliRunner().invoke(app, ["backends"], env={"COLUMNS": n}) for n in ("80", "400"))
    assert narrow.exit_code == 0, narrow.output
    assert max(len(line) for line in narrow.output.splitlines()) <= 80
    assert "…" not in narrow.output

    def notes(output: str) -> str:  # the text below the table, its line breaks read as spaces
        return " ".join(output.split("└")[-1].split("\n", 1)[1].split())

    # Long reasons and hints wrap only between words: the same words as on a wide terminal.
    assert notes(narrow.output) == notes(wide.output)
    assert "mlx: checked on first use, or now with `flashmoe conformance --backend mlx`" in notes(narrow.output)


def test_unavailable_reasons_keep_their_brackets_and_say_how_to_get_cuda(tmp_path, monkeypatch):
    from flashmoe.backends import cuda_backend

    monkeypatch.setenv("FLASHMOE_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(cuda_backend, "_IMPORT_ERROR", "No module named 'cuda'")
    result = CliRunner().invoke(app, ["backends"], env={"COLUMNS": "400"})  # one line per row
    assert result.exit_code == 0, result.output
    rows = {line.split("│")[1].strip(): line for line in result.output.splitlines() if line.count("│") == 5}
    # Rich would read "[cuda]" as a markup tag and drop it
    assert rows["cuda"].split("│")[2].strip().startswith("no (")
    assert "cuda: needs numba-cuda (pip install -e '.[cuda]') and an NVIDIA GPU with its driver" in result.output
    assert "No module named 'cuda'" in result.output


def test_a_stamp_shows_its_date_and_cases_and_a_note_lists_its_formats(tmp_path, monkeypatch):
    import json

    from flashmoe.conformance.runner import stamp_path

    monkeypatch.setenv("FLASHMOE_CACHE_DIR", str(tmp_path))
    stamp_path("numba").parent.mkdir(parents=True)
    stamp_path("numba").write_text(json.dumps({"when": "2026-12-07T22:00:00Z", "cases": 49, "formats": [
        "experts 4-bit g64 bfloat16 (q8 activations)", "operations without weights"]}))
    result = CliRunner().invoke(app, ["backends"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    rows = {line.split("│")[1].strip(): line for line in result.output.splitlines() if line.count("│") == 5}
    assert "passed 2026-12-07 (49 cases) (" in rows["numba"], result.output
    assert "numba: checked for experts 4-bit g64 bfloat16 (q8 activations); operations without weights" in \
        result.output
