"""A command stopped by a signal: SIGTERM (timeout, kill, a service manager) ends it with exit code 143 and no
output that looks complete (a file, or a server's reply); what a SIGKILLed run could not remove, the next run to
the same output removes. Each run is a process of its own, signalled at a known point (the bundled demo model on
the numpy backend)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request

from typer.testing import CliRunner

from flashmoe.cli import app
from flashmoe.serve.worker import STOPPING

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


def test_sigterm_under_serve_ends_the_reply_with_an_error_and_the_live_trace_and_exits_143():
    proc = subprocess.Popen([sys.executable, "-c", "from flashmoe.cli import app; app()", "serve", "--backend", "numpy",
                             "--port", "0"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        ready = proc.stderr.readline()
        assert ready.startswith("flashmoe serve:"), ready + proc.stderr.read()
        url = ready.split("http://")[1].split("/ ")[0]
        for _ in range(300):  # the address is printed before uvicorn listens on it
            try:
                urllib.request.urlopen(f"http://{url}/health", timeout=5).close()
                break
            except urllib.error.URLError:
                time.sleep(0.1)
        body = {"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 1500, "temperature": 0,
                "stream": True}  # greedy: text before any end of sequence
        request = urllib.request.Request(f"http://{url}/v1/chat/completions", json.dumps(body).encode(),
                                         {"Content-Type": "application/json"})
        with urllib.request.urlopen(f"http://{url}/v1/trace", timeout=60) as trace, \
                urllib.request.urlopen(request, timeout=60) as stream:  # the page's live view, which never ends
            events = (json.loads(line[6:]) for line in stream if line.startswith(b"data: {"))
            while not next(events)["choices"][0]["delta"].get("content"):  # the first text: it is generating
                pass
            proc.send_signal(signal.SIGTERM)
            events = list(events)
            trace.read()  # to its end
        assert proc.wait(timeout=60) == 143  # without waiting for the 1,500 tokens
        assert events[-1]["error"]["message"] == STOPPING  # not a finish_reason, as if the reply were complete
        err = proc.stderr.read()
        assert "Traceback" not in err and "ERROR" not in err, err
    finally:
        proc.kill()
        proc.wait()
