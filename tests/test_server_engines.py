"""The OpenAI-compatible server on real engines: a tiny synthetic model (seeded sampling), the `flashmoe serve`
command in its own process, and the bundled demo model (streaming, prefix reuse, concurrency, context).
"""

from __future__ import annotations

import json
import threading
import time
import urllib.request

import pytest
from chat_helpers import write_model_dir
from chat_templates import QWEN3

from flashmoe.serve.server import FlashMoeServer, RunningServer
from flashmoe.serve.tokenizer import Tokenizer

openai = pytest.importorskip("openai", reason="the official client is the test's oracle of the API")


@pytest.fixture(scope="module")
def served_tiny(tmp_path_factory):
    from chat_helpers import tiny_engine

    engine, tokenizer = tiny_engine(tmp_path_factory.mktemp("tiny") / "model")
    app = FlashMoeServer(engine, tokenizer, "tiny", context=256)
    with RunningServer(app) as running:
        yield app, openai.OpenAI(base_url=running.url + "/v1", api_key="unused", max_retries=0, timeout=60)
    app.close()


def test_real_engine_seeded_sampling_is_reproducible_streamed_or_not(served_tiny):
    app, client = served_tiny
    kwargs = dict(model="tiny", messages=[{"role": "user", "content": "hello there"}], temperature=0.9, seed=7,
                  max_tokens=12)
    whole = client.chat.completions.create(**kwargs)
    streamed = list(client.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}))
    message = whole.choices[0].message
    text = "".join((c.choices[0].delta.content or "") + (c.choices[0].delta.model_extra.get("reasoning_content") or "")
                   for c in streamed if c.choices)
    assert text == (message.content or "") + (message.model_extra.get("reasoning_content") or "")
    assert streamed[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert whole.usage.completion_tokens > 0
    stats = app.worker.engine.stats.to_dict()
    assert stats["tokens"] >= 2 * whole.usage.completion_tokens and stats["totals"]["reads"] > 0


def test_stopping_a_running_server_ends_its_reply_with_an_error_and_the_live_trace_at_once(tmp_path):
    from chat_helpers import tiny_engine

    from flashmoe.serve.worker import STOPPING

    engine, tokenizer = tiny_engine(tmp_path / "model")
    app = FlashMoeServer(engine, tokenizer, "tiny", context=1024)
    running = RunningServer(app).start()
    try:
        body = {"messages": [{"role": "user", "content": "hello there"}], "max_tokens": 1000, "temperature": 0,
                "stream": True}
        request = urllib.request.Request(running.url + "/v1/chat/completions", json.dumps(body).encode(),
                                         {"Content-Type": "application/json"})
        with urllib.request.urlopen(running.url + "/v1/trace", timeout=60) as trace, \
                urllib.request.urlopen(request, timeout=60) as stream:
            events = (json.loads(line[6:]) for line in stream if line.startswith(b"data: {"))
            while not next(events)["choices"][0]["delta"].get("content"):  # the first text: it is generating
                pass
            started = time.monotonic()
            running.stop()
            stopped_s = time.monotonic() - started
            events = list(events)
            trace.read()  # to its end, not cut off
    finally:
        app.close()
    assert events[-1]["error"]["message"] == STOPPING  # not a finish_reason, as if the reply were complete
    assert stopped_s < 4  # uvicorn alone waits 5 s for the trace stream, then cuts every connection


def test_flashmoe_serve_command_serves_until_terminated(tmp_path):
    import socket
    import subprocess
    import sys

    from chat_helpers import TINY_QWEN35

    from flashmoe.convert.synth import synth_model

    model = tmp_path / "model"
    synth_model(model, TINY_QWEN35, tokenizer=None)
    write_model_dir(model, QWEN3)
    with socket.socket() as s:  # a free port; the tiny window before the server binds it is harmless here
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-c", "from flashmoe.cli import app; app()", "serve", str(model), "--port", str(port),
                             "--backend", "numpy", "--context", "2048", "--host", "0.0.0.0"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                health = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1))
                break
            except OSError:
                assert time.monotonic() < deadline, "flashmoe serve did not come up within 60 s"
                time.sleep(0.2)
        assert health == {"status": "ok", "model": "model"}
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=60)
        r = client.chat.completions.create(model="model", messages=[{"role": "user", "content": "hi"}], max_tokens=4)
        assert r.usage.completion_tokens >= 1
        with pytest.raises(openai.BadRequestError, match="context is 1024 tokens"):
            client.chat.completions.create(model="model", messages=[{"role": "user", "content": "hi"}], max_tokens=1100)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    output = proc.stdout.read()
    assert (f"flashmoe serve: {model} on the numpy backend, context 1024 tokens (--context 2048 capped by the "
            f"model's 1024), http://0.0.0.0:{port}/ (API key not required)") in output
    assert "warning: 0.0.0.0 is reachable from other machines and no --api-key is set" in output


# ---- the bundled demo model ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def demo():
    from flashmoe.runtime.load import default_model_dir, load_engine

    directory = default_model_dir()
    if not (directory / "config.json").exists():
        pytest.skip(f"the bundled demo model is not in this checkout ({directory})")
    tokenizer = Tokenizer(directory)
    # q8 activations, as numba's default: on the NumPy backend a prompt's prefill takes a third of float's time
    engine = load_engine(directory, backend="numpy", context=1024, activations="q8")
    app = FlashMoeServer(engine, tokenizer, directory.name, context=1024)
    with RunningServer(app) as running:
        yield app, openai.OpenAI(base_url=running.url + "/v1", api_key="unused", max_retries=0, timeout=120)
    app.close()


def _greedy_chat(client, messages, **kwargs):
    kwargs = {"max_tokens": 8, **kwargs}
    return client.chat.completions.create(model="demo-model", messages=messages, temperature=0, **kwargs)


def test_demo_model_streams_the_text_of_the_whole_reply(demo):
    _, client = demo
    messages = [{"role": "user", "content": "How do I install a Python package?"}]
    whole = _greedy_chat(client, messages)
    chunks = list(_greedy_chat(client, messages, stream=True, stream_options={"include_usage": True}))
    assert whole.choices[0].message.content
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert whole.choices[0].finish_reason in ("stop", "length")


def test_demo_model_second_turn_reuses_the_first_and_matches_a_fresh_prefill(demo):
    app, client = demo
    messages = [{"role": "user", "content": "What does the requests library do?"}]
    first = _greedy_chat(client, messages)
    history = len(app.worker.tokenizer.encode(app.worker.tokenizer.apply_chat_template(messages, add_generation_prompt=False)))
    messages += [{"role": "assistant", "content": first.choices[0].message.content},
                 {"role": "user", "content": "Show an example."}]
    reused = _greedy_chat(client, messages)
    # All of the first prompt and reply when the reply re-tokenises as generated, else the checkpoint.
    assert reused.usage.prompt_tokens_details.cached_tokens >= history
    _greedy_chat(client, [{"role": "user", "content": "Something unrelated."}])
    fresh = _greedy_chat(client, messages)
    assert fresh.usage.prompt_tokens_details.cached_tokens == 0
    assert fresh.choices[0].message.content == reused.choices[0].message.content


def test_demo_model_concurrent_requests_each_get_their_sequential_reply(demo):
    _, client = demo
    prompts = ["Explain pip.", "What is a wheel file?"]
    sequential = [_greedy_chat(client, [{"role": "user", "content": p}]).choices[0].message.content for p in prompts]
    results: dict[int, str] = {}
    threads = [threading.Thread(target=lambda i=i, p=p: results.__setitem__(
        i, _greedy_chat(client, [{"role": "user", "content": p}]).choices[0].message.content))
        for i, p in enumerate(prompts)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert [results.get(i) for i in range(len(prompts))] == sequential


def test_demo_model_context_overflow_is_a_400_and_the_server_keeps_serving(demo):
    _, client = demo
    with pytest.raises(openai.BadRequestError, match=r"context is \d+ tokens"):
        _greedy_chat(client, [{"role": "user", "content": "hello"}], max_tokens=2000)
    assert _greedy_chat(client, [{"role": "user", "content": "hello"}]).usage.completion_tokens >= 1


def test_serve_notes_a_capped_context_only_when_context_was_given(monkeypatch):
    """The demo model's context is 2,048: serve's default of 4,096 is capped to it without a note (nobody asked
    for 4,096); a --context 4096 that was given is noted as capped."""
    from flashmoe.runtime.load import default_model_dir
    from flashmoe.serve import server

    class NoServer:  # serve() returns once it would start serving
        def __init__(self, config, worker):
            pass

        def run(self, sockets):
            pass

    monkeypatch.setattr(server, "_StoppingServer", NoServer)
    for context, note in ((None, ""), (4096, " (--context 4096 capped by the model's 2048)")):
        lines: list[str] = []
        server.serve(None, port=0, context=context, echo=lines.append, backend="numpy")
        assert lines[0].startswith(f"flashmoe serve: {default_model_dir()} on the numpy backend, context 2048 "
                                   f"tokens{note}, http://127.0.0.1:"), lines
