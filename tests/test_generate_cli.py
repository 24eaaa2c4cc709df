"""`flashmoe generate` end to end on the bundled demo model: the README's main job."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from flashmoe.cli import app

from test_demo_model import PIN_GREEDY_TEXT, PIN_PROMPT

runner = CliRunner()
GREEDY = ["--temperature", "0", "--repetition-penalty", "1.0", "--backend", "numpy"]


def test_generate_with_no_model_runs_the_bundled_model_and_prints_its_greedy_text(tmp_path):
    stats_file = tmp_path / "stats.json"
    result = runner.invoke(app, ["generate", "--prompt", PIN_PROMPT, "--max-tokens", "12", *GREEDY, "--stats",
                                 "--stats-json", str(stats_file)])
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith(PIN_PROMPT + PIN_GREEDY_TEXT[:20])
    stats = json.loads(stats_file.read_text())
    assert stats["tokens"] == 12
    # 8 MoE layers x 4 experts per decode token, each one read of a whole expert
    per_token = stats["per_decode_token"]
    assert per_token["hits"] + per_token["misses"] == pytest.approx(32)
    assert "time to first token" in result.stderr


def test_experts_per_token_changes_the_experts_read_per_token(tmp_path):
    stats_file = tmp_path / "stats.json"
    result = runner.invoke(app, ["generate", "--prompt", PIN_PROMPT, "--max-tokens", "4", *GREEDY,
                                 "--experts-per-token", "2", "--stats-json", str(stats_file)])
    assert result.exit_code == 0, result.output
    per_token = json.loads(stats_file.read_text())["per_decode_token"]
    assert per_token["hits"] + per_token["misses"] == pytest.approx(16)


@pytest.mark.parametrize("args, message", [
    (["--experts-per-token", "33"], "experts-per-token"),
    (["--max-memory", "1M"], "max-memory"),
    (["--max-memory", "lots"], "invalid memory size"),
    (["--backend", "fortran"], "unknown backend"),
    (["--top-p", "0"], "top_p"),
    (["--io", "bogus"], "--io"),
    (["--cache-policy", "random"], "--cache-policy"),
    (["--gpu-memory", "1G"], "no expert cache of its own"),
])
def test_bad_options_give_one_clear_error_line_and_exit_code_2(args, message):
    result = runner.invoke(app, ["generate", "--prompt", "hi", *GREEDY[:4], *args])
    assert result.exit_code == 2, result.output
    assert message in result.stderr
    assert "Traceback" not in result.output


def test_missing_model_directory_is_named(tmp_path):
    result = runner.invoke(app, ["generate", str(tmp_path / "nope"), "--prompt", "hi"])
    assert result.exit_code == 2
    assert "nope" in result.stderr


def test_prompt_longer_than_the_context_is_refused(tmp_path):
    result = runner.invoke(app, ["generate", "--prompt", "the " * 3000, *GREEDY])
    assert result.exit_code == 2
    assert "context" in result.stderr
