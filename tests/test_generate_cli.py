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
    assert stats["tokens"] == 12 and stats["stop_reason"] == "length"
    # 8 MoE layers x 4 experts per decode token, each one read of a whole expert
    per_token = stats["per_decode_token"]
    assert per_token["hits"] + per_token["misses"] == pytest.approx(32)
    assert "time to first token" in result.stderr and "stop: length" in result.stderr


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
    (["--max-memory", "1000T"], "error: --max-memory 1000.00 TiB is more than this machine's memory ("),
    (["--backend", "fortran"], "unknown backend"),
    (["--top-p", "0"], "top_p"),
    (["--seed", "-2"], "error: seed (--seed) must be >= 0, or -1 for a random seed, got -2\n"),
    (["--io", "bogus"], "--io"),
    (["--cache-policy", "random"], "--cache-policy"),
    (["--gpu-memory", "1G"], "no expert cache of its own"),
    (["--expert-device", "cpu"], "computes them in host memory already"),
    (["--expert-device", "npu"], "--expert-device 'npu' is not one of gpu, cpu, auto"),
    (["--experts-per-token", "0"], "experts-per-token"),
    (["--max-tokens", "0"], "max-tokens"),
    (["--stats-json", "/nonexistent-folder/s.json"], "does not exist"),
    (["--trace", "/tmp"], "is a directory"),
])
def test_bad_options_give_one_clear_error_line_and_exit_code_2(args, message):
    result = runner.invoke(app, ["generate", "--prompt", "hi", *GREEDY, *args])  # a later --backend wins
    assert result.exit_code == 2, result.output
    assert message in result.stderr
    assert "Traceback" not in result.output


@pytest.mark.parametrize("option, path", [("--stats-json", "/proc/s.json"), ("--trace", "/sys/t.jsonl")])
def test_an_output_file_that_cannot_be_written_is_refused_before_generating(option, path):
    result = runner.invoke(app, ["generate", "--prompt", "hi", *GREEDY, option, path])
    assert (result.exit_code, result.stdout) == (2, ""), result.output  # no text: nothing was generated
    assert result.stderr.startswith(f"error: {path}: cannot write ("), result.stderr


def test_seed_minus_one_samples_with_a_random_seed():
    result = runner.invoke(app, ["generate", "-p", "hi", "-n", "3", "--seed", "-1", "--backend", "numpy"])
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("hi") and result.stderr == ""


@pytest.mark.parametrize("args, stdin", [
    (["--prompt", "caf\udce9"], None),  # how Python hands over the undecodable byte 0xe9 of an argument
    (["--prompt", "-"], b"caf\xe9 \xff\xfe\n"),
    (["--prompt", "caf\udce9", "--chat"], None),
])
def test_a_prompt_that_is_not_utf8_is_one_error_line_naming_the_byte_and_exit_code_2(args, stdin):
    result = runner.invoke(app, ["generate", *args, "--max-tokens", "5", *GREEDY], input=stdin)
    assert result.exit_code == 2, result.output
    assert "error: the prompt is not valid UTF-8 text: a lone surrogate U+DCE9, Python's stand-in for the " \
           "undecodable byte 0xe9 (character " in result.stderr
    assert "Traceback" not in result.output


def test_missing_model_directory_is_named(tmp_path):
    result = runner.invoke(app, ["generate", str(tmp_path / "nope"), "--prompt", "hi"])
    assert result.exit_code == 2
    assert "nope" in result.stderr


def test_a_directory_that_is_not_a_converted_model_points_to_convert(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    result = runner.invoke(app, ["generate", str(tmp_path), "--prompt", "hi"])
    assert result.exit_code == 2
    assert "flashmoe.json" in result.stderr


def test_sampling_defaults_come_from_generation_config(tmp_path):
    from flashmoe.runtime.load import default_model_dir
    from flashmoe.serve.sampling import sampler_for

    sampler = sampler_for(default_model_dir(), temperature=0.0)
    # the demo model's generation_config.json sets top-k 40 and top-p 0.95; repetition penalty falls back to 1
    assert (sampler.temperature, sampler.top_k, sampler.top_p, sampler.repetition_penalty) == (0.0, 40, 0.95, 1.0)


def _prompt_of(n_tokens: int) -> str:
    """A prompt of exactly n_tokens tokens in the demo model's tokenizer."""
    return "the" + " the" * (n_tokens - 1)


@pytest.mark.parametrize("n_prompt, message", [(3000, "is longer than the model's context of 2048"),
                                               (2048, "fills the model's context of 2048")])
def test_prompt_that_leaves_no_room_is_refused_before_anything_is_printed(n_prompt, message):
    result = runner.invoke(app, ["generate", "--prompt", _prompt_of(n_prompt), *GREEDY])
    assert result.exit_code == 2
    assert result.stdout == ""
    assert message in result.stderr and "leaves no room to generate" in result.stderr, result.stderr


def test_generation_that_reaches_the_end_of_the_context_says_so(tmp_path):
    stats_file = tmp_path / "stats.json"
    result = runner.invoke(app, ["generate", "--prompt", _prompt_of(2045), "-n", "10", *GREEDY, "--stats",
                                 "--stats-json", str(stats_file)])
    assert result.exit_code == 0, result.output
    stats = json.loads(stats_file.read_text())
    assert (stats["tokens"], stats["stop_reason"]) == (3, "context")
    assert "[stopped: the model's context of 2048 tokens is full]" in result.stderr
    assert "stop: context" in result.stderr


def test_every_boolean_option_is_a_flag_and_help_shows_no_value_for_it():
    import typer

    from flashmoe.cli import app as cli_app

    group = typer.main.get_command(cli_app)
    for name, command in group.commands.items():
        ctx = command.make_context(name, [], resilient_parsing=True)
        bools = [p for p in command.get_params(ctx) if p.type_descriptor.annotation is bool]
        assert all(p.is_flag for p in bools), (name, [p.name for p in bools if not p.is_flag])
        result = runner.invoke(cli_app, [name, "--help"], env={"COLUMNS": "200"})
        assert result.exit_code == 0, result.output
        assert "<bool>" not in result.output, name
    help_text = runner.invoke(cli_app, ["bench", "--help"], env={"COLUMNS": "200"}).output
    assert "--figures" in help_text and "--no-figures" in help_text


def test_prompt_dash_reads_the_prompt_from_standard_input():
    result = runner.invoke(app, ["generate", "--prompt", "-", "--max-tokens", "12", *GREEDY], input=PIN_PROMPT + "\n")
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith(PIN_PROMPT + PIN_GREEDY_TEXT[:20])
