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
    assert "cpu (mlx " in rows["mlx"] and "not checked yet" in rows["mlx"]
    assert "no: " in rows["cuda"] or "yes" in rows["cuda"]


def test_backends_table_fits_80_columns_and_wraps_instead_of_cutting(tmp_path, monkeypatch):
    monkeypatch.setenv("FLASHMOE_CACHE_DIR", str(tmp_path))
    result = CliRunner().invoke(app, ["backends"], env={"COLUMNS": "80"})
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert max(len(line) for line in lines) <= 80
    assert "…" not in result.output
    # the mlx row's conformance cell, folded over several lines, reads whole when its pieces are joined
    cells = "".join(line.split("│")[4].strip() for line in lines if line.count("│") == 5)
    assert "(`flashmoeconformance--backendmlx`)" in cells.replace(" ", "")


def test_unavailable_reasons_keep_their_brackets_and_say_how_to_get_cuda(tmp_path, monkeypatch):
    from flashmoe.backends import cuda_backend

    monkeypatch.setenv("FLASHMOE_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(cuda_backend, "_IMPORT_ERROR", "No module named 'cuda'")
    result = CliRunner().invoke(app, ["backends"], env={"COLUMNS": "400"})  # one line per row
    assert result.exit_code == 0, result.output
    rows = {line.split("│")[1].strip(): line for line in result.output.splitlines() if line.count("│") == 5}
    # Rich would read "[cuda]" as a markup tag and drop it
    assert "no: needs numba-cuda (pip install -e '.[cuda]') and an NVIDIA GPU with its driver" in rows["cuda"]
    assert "No module named 'cuda'" in rows["cuda"]
