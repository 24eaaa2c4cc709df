"""`flashmoe plot`: every figure renders from a small trace; the numbers behind them."""

from __future__ import annotations

import re

import numpy as np
import pytest
from typer.testing import CliRunner

from flashmoe.cli import app
from flashmoe.errors import FormatError
from flashmoe.plot import FIGURES, expert_shares, plot_trace, reuse_shares, uniform_reuse
from flashmoe.runtime.trace import TraceHeader, TraceWriter

PNG = b"\x89PNG\r\n\x1a\n"


def _write_trace(path, store_side: bool, tokens: int = 12):
    """Tokens over 3 MoE layers, 8 experts, k=2: the first 4 are a prompt; token t routes to experts
    (t % 8, (t + 1) % 8) in every layer, so consecutive tokens share one expert."""
    with TraceWriter(path, TraceHeader(8, 2, (0, 2, 3), "tiny")) as w:
        for t in range(tokens):
            experts = [[t % 8, (t + 1) % 8]] * 3
            side = {}
            if store_side:
                side = dict(hit=[[t > 0, True]] * 3, bytes_read=[4096 * (t == 0)] * 3, disk_bytes=[0] * 3,
                            io_wait_ms=[0.5, 0.25, 0.0], compute_ms=[1.0, 2.0, 3.0])
            w.write(experts, [[0.7, 0.3]] * 3, token=t, prefill=t < 4, **side)
    return path


@pytest.mark.parametrize("store_side", [True, False])
def test_every_figure_renders_from_a_small_trace(tmp_path, store_side):
    trace = _write_trace(tmp_path / "t.jsonl", store_side)
    done = plot_trace(trace, tmp_path / "figs", max_tokens=8)
    assert list(done) == list(FIGURES)
    drawn = {name: p for name, p in done.items() if not isinstance(p, str)}
    assert set(drawn) == set(FIGURES) - (set() if store_side else {"ms_per_layer"})
    for path in drawn.values():
        data = path.read_bytes()
        assert data[:8] == PNG and 5_000 < len(data) < 300_000
    if not store_side:
        assert done["ms_per_layer"] == "the trace has no timings (recorded without the engine's tracer)"


def test_plot_command_lists_what_it_wrote_and_refuses_a_bad_trace(tmp_path):
    trace = _write_trace(tmp_path / "t.jsonl", store_side=True)
    result = CliRunner().invoke(app, ["plot", str(trace), "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert result.output.splitlines() == [f"{name}: {tmp_path / 'out' / name}.png" for name in FIGURES]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"format": "other"}\n')
    result = CliRunner().invoke(app, ["plot", str(bad), "--out", str(tmp_path / "f2")])
    assert result.exit_code == 2 and "bad.jsonl:1: not a flashmoe-routing-trace version 1 header" in result.output
    assert not (tmp_path / "f2").exists()  # no empty output directory left behind


def test_a_trace_without_tokens_is_refused(tmp_path):
    path = tmp_path / "empty.jsonl"
    TraceWriter(path, TraceHeader(8, 2, (0,))).close()
    with pytest.raises(FormatError, match="empty.jsonl: the trace has a header but no tokens"):
        plot_trace(path, tmp_path / "figs")


def test_expert_shares_count_tokens_per_expert_per_layer():
    experts = np.array([[[0, 1], [2, 3]], [[0, 2], [2, 3]]])  # (N=2, L=2, k=2)
    np.testing.assert_allclose(expert_shares(experts, 4), [[1.0, 0.5, 0.5, 0.0], [0.0, 0.0, 1.0, 1.0]])


def test_reuse_share_is_the_overlap_with_the_previous_tokens():
    # one layer, k=2: token 1 shares 1 of 2 experts with token 0; token 2 shares none with token 1 but
    # both of its experts appeared within the last 2 tokens
    experts = np.array([[[0, 1]], [[1, 2]], [[0, 3]], [[3, 0]]])
    np.testing.assert_allclose(reuse_shares(experts, 1), [(0.5 + 0.0 + 1.0) / 3])
    np.testing.assert_allclose(reuse_shares(experts, 2), [(0.5 + 0.5 + 1.0) / 3])
    assert uniform_reuse(8, 2, 1) == pytest.approx(0.25)
    assert uniform_reuse(8, 2, 2) == pytest.approx(1 - 0.75**2)


def test_token_labels_decode_each_token_with_visible_whitespace(tmp_path):
    from chat_helpers import write_model_dir
    from flashmoe.plot import token_labels
    from flashmoe.serve.tokenizer import Tokenizer

    model_dir = write_model_dir(tmp_path / "tok", None)
    ids = Tokenizer(model_dir).encode("a b\n")
    labels = token_labels([*ids, None], model_dir)
    assert "".join(labels[:-1]) == "a\u2423b\u23ce" and labels[-1] == "?"


def test_make_figures_records_a_run_and_renders_the_document(tmp_path):
    """tools/make_figures.py end to end on a tiny random model: every figure and number of the template."""
    import importlib.util
    from pathlib import Path

    from chat_helpers import TINY_QWEN35, write_model_dir
    from flashmoe.convert.synth import synth_model

    script = Path(__file__).parents[1] / "tools" / "make_figures.py"
    spec = importlib.util.spec_from_file_location("make_figures", script)
    make_figures = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_figures)
    model = tmp_path / "tiny"
    synth_model(model, TINY_QWEN35, tokenizer=None)
    write_model_dir(model, None)
    docs = tmp_path / "docs"
    make_figures.main(["--model", str(model), "--figures", str(docs / "figures"), "--doc", str(docs / "how.md"),
                       "--backend", "numpy", "--tokens", "6", "--prompt", "hello world"])
    text = (docs / "how.md").read_text()
    for name in FIGURES:
        assert f"(figures/{name}.png)" in text and (docs / "figures" / f"{name}.png").is_file()
    assert "hello world" in text and "| 3 | full attention |" in text
    links = re.findall(r"\[`([\w.]+)`\]\(([^)#]+)#L(\d+)\)", text)
    assert {name for name, _, _ in links} >= {"ReferenceModel.forward", "gated_delta_rule", "route", "swiglu"}
    for name, path, line in links:  # each link lands on the definition it names
        source = (docs / path).resolve().read_text().splitlines()
        assert f"def {name.split('.')[-1]}(" in source[int(line) - 1]


def test_without_matplotlib_the_error_says_what_to_install(tmp_path, monkeypatch):
    import sys

    from flashmoe.errors import FlashMoeError

    trace = _write_trace(tmp_path / "t.jsonl", store_side=True)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` raise ImportError
    with pytest.raises(FlashMoeError, match=r"flashmoe plot needs matplotlib: pip install 'flashmoe\[bench\]'"):
        plot_trace(trace, tmp_path / "figs")
