"""A command stopped by a signal: SIGTERM (timeout, kill, a service manager) ends it with exit code 143 and no
output that looks complete; what a SIGKILLed run could not remove, the next run to the same output removes.
Each run is a process of its own that sends itself the signal at a known point (the bundled demo model on
the numpy backend)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

from typer.testing import CliRunner

from flashmoe.cli import app

GENERATE = ["generate", "-p", "Once upon a time", "-n", "6", "--temperature", "0", "--backend", "numpy"]


def _signalled_at_token(sig: signal.Signals, token: int) -> str:
    """`python -c` code that runs the command line, the process sending itself `sig` as generate reaches its
    token number `token` (0: the first)."""
    return ("import os, flashmoe.serve.generate as g\n"
            "steps = g.generate_steps\n"
            "def signalled(*args, **kwargs):\n"
            "    for i, step in enumerate(steps(*args, **kwargs)):\n"
            f"        if i == {token}:\n"
            f"            os.kill(os.getpid(), {int(sig)})\n"
            "        yield step\n"
            "g.generate_steps = signalled\n"
            "from flashmoe.cli import app; app()")


def test_sigterm_during_the_token_loop_exits_143_leaving_no_trace_or_stats_file(tmp_path):
    trace, stats = tmp_path / "t.jsonl", tmp_path / "s.json"
    result = subprocess.run([sys.executable, "-c", _signalled_at_token(signal.SIGTERM, 2), *GENERATE,
                             "--trace", str(trace), "--stats-json", str(stats)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 143, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    assert result.stdout.startswith("Once upon a time")  # it was generating
    assert os.listdir(tmp_path) == []  # neither output, nor a temporary file of either


def test_a_sigkilled_runs_temporary_file_is_removed_by_the_next_run_to_the_same_output(tmp_path):
    trace = tmp_path / "t.jsonl"
    killed = subprocess.Popen([sys.executable, "-c", _signalled_at_token(signal.SIGKILL, 2), *GENERATE,
                               "--trace", str(trace)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _, err = killed.communicate(timeout=120)
    assert killed.returncode == -signal.SIGKILL, err
    assert os.listdir(tmp_path) == [f".t.jsonl.tmp-{killed.pid}"]  # the partial trace, never renamed
    running = tmp_path / f".t.jsonl.tmp-{os.getppid()}"  # a run writing the same output now keeps its own
    running.write_text("")
    result = CliRunner().invoke(app, [*GENERATE, "--trace", str(trace)])
    assert result.exit_code == 0, result.output
    assert sorted(os.listdir(tmp_path)) == sorted([running.name, trace.name])


def test_sigterm_at_the_chat_prompt_ends_the_chat_with_143():
    proc = subprocess.Popen([sys.executable, "-c", "from flashmoe.cli import app; app()", "chat", "--backend", "numpy"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().startswith("flashmoe chat")  # loaded; reading the first message
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 143, proc.stderr.read()
        assert "Traceback" not in proc.stderr.read()
    finally:
        proc.kill()
        proc.wait()
