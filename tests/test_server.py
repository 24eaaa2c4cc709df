"""The OpenAI-compatible server, driven over loopback HTTP with the official `openai` client.

Most tests serve a scripted FakeEngine (tests/chat_helpers.py) so that replies, tool calls, prefix reuse,
queueing and cancellation are exact and fast; the last ones serve the bundled demo model.
"""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request

import pytest
from chat_helpers import LONG_REPLY, MINIMAX_M2, MIXTRAL, QWEN3, QWEN35_XML, WEATHER, fake_server, write_model_dir

from flashmoe.serve.server import FlashMoeServer, RunningServer
from flashmoe.serve.tokenizer import Tokenizer

openai = pytest.importorskip("openai", reason="the official client is the test's oracle of the API")

@pytest.fixture(scope="module")
def served(tmp_path_factory):
    app, engine, running = fake_server(tmp_path_factory, QWEN3, "qwen3", max_position_embeddings=512)
    yield app, engine, running
    running.stop()
    app.close()


@pytest.fixture
def client(served):
    served[1].delay_s = 0.0
    return openai.OpenAI(base_url=served[2].url + "/v1", api_key="unused", max_retries=0, timeout=30)


def _chat(client, content, **kwargs):
    return client.chat.completions.create(model="fake", messages=[{"role": "user", "content": content}], **kwargs)


def test_chat_completion_returns_the_reply_with_usage(client):
    r = _chat(client, "echo: Bonjour, ça va?")
    assert r.choices[0].message.content == "Bonjour, ça va?"
    assert r.choices[0].finish_reason == "stop"
    assert r.usage.completion_tokens > 1 and r.usage.prompt_tokens > 1
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def _server_counters(served) -> dict:
    return json.load(urllib.request.urlopen(served[2].url + "/v1/stats"))["server"]


def test_streamed_deltas_add_up_to_the_non_streamed_reply(served, client):
    before = _server_counters(served)
    chunks = list(_chat(client, "echo: one two three 世界", stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "one two three 世界"
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0
    after = _server_counters(served)
    assert (after["completed"] - before["completed"], after["cancelled"] - before["cancelled"]) == (1, 0)


def test_json_tool_call_with_reasoning(client):
    r = _chat(client, "weather json", tools=[WEATHER])
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    assert choice.message.model_extra["reasoning_content"] == "The user wants weather."
    (call,) = choice.message.tool_calls
    assert call.function.name == "get_weather" and call.id.startswith("call_")
    assert json.loads(call.function.arguments) == {"city": "Paris", "note": "</tool_call> inside"}


def test_streamed_tool_call(client):
    chunks = list(_chat(client, "weather json", tools=[WEATHER], stream=True))
    deltas = [c.choices[0].delta for c in chunks]
    reasoning = "".join(d.model_extra.get("reasoning_content") or "" for d in deltas)
    calls = [tc for d in deltas for tc in d.tool_calls or []]
    assert reasoning == "The user wants weather."
    assert [(c.index, c.function.name) for c in calls] == [(0, "get_weather")]
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_tool_choice_none_keeps_tags_as_content_and_tools_out_of_the_prompt(served, client):
    r = _chat(client, "weather json", tools=[WEATHER], tool_choice="none")
    assert r.choices[0].message.tool_calls is None
    assert '<tool_call>\n{"name": "get_weather"' in r.choices[0].message.content
    assert "# Tools" not in served[1].prompts[-1]


def test_named_tool_choice_forces_the_call_prefix(served, client):
    _chat(client, "echo: ignored", tools=[WEATHER],
          tool_choice={"type": "function", "function": {"name": "get_weather"}})
    assert served[1].prompts[-1].endswith('<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", "arguments": ')


def test_tools_for_a_template_that_does_not_render_them_are_refused_in_both_apis(tmp_path_factory):
    """Silently dropped tools would leave `required` producing the forced call prefix and then prose."""
    import anthropic

    app, engine, running = fake_server(tmp_path_factory, MIXTRAL, "no-tools")
    try:
        client = openai.OpenAI(base_url=running.url + "/v1", api_key="unused", max_retries=0, timeout=30)
        with pytest.raises(openai.BadRequestError, match="does not render tools") as e:
            _chat(client, "echo: hi", tools=[WEATHER], tool_choice="required")
        assert e.value.body["param"] == "tools"
        assert _chat(client, "echo: hi", tools=[WEATHER], tool_choice="none").choices[0].finish_reason == "stop"
        claude = anthropic.Anthropic(base_url=running.url, api_key="unused", max_retries=0, timeout=30)
        with pytest.raises(anthropic.BadRequestError, match="does not render tools"):
            claude.messages.create(model="fake", max_tokens=10, messages=[{"role": "user", "content": "hi"}],
                                   tools=[{"name": "f", "input_schema": {"type": "object"}}])
    finally:
        running.stop()
        app.close()


def test_a_conversation_that_extends_the_last_one_prefills_only_the_new_tokens(served, client):
    engine = served[1]
    messages = [{"role": "user", "content": "echo: first answer"}]
    r1 = client.chat.completions.create(model="fake", messages=messages)
    messages += [{"role": "assistant", "content": r1.choices[0].message.content},
                 {"role": "user", "content": "echo: second answer"}]
    n_before = len(engine.forward_lengths)
    r2 = client.chat.completions.create(model="fake", messages=messages)
    assert r2.choices[0].message.content == "second answer"
    prefill = engine.forward_lengths[n_before]
    cached = r2.usage.prompt_tokens_details.cached_tokens
    assert cached > r1.usage.prompt_tokens  # prompt 1 and reply 1 were reused
    assert prefill == r2.usage.prompt_tokens - cached
    stats = json.load(urllib.request.urlopen(served[2].url + "/v1/stats"))
    assert stats["server"]["prefix_reuse_hits"] >= 1 and stats["server"]["last_run"]["reused_tokens"] == cached


@pytest.mark.parametrize("stream", [False, True])
def test_an_agent_loop_reuses_the_prefix_although_the_client_drops_the_reasoning(served, client, stream):
    """Qwen3's template renders the current turn's reasoning; the server restores it from the call id."""
    messages = [{"role": "user", "content": "weather json"}]
    if stream:
        chunks = list(client.chat.completions.create(model="fake", messages=messages, tools=[WEATHER], stream=True))
        calls = [tc for c in chunks for tc in c.choices[0].delta.tool_calls or []]
        tool_calls = [{"id": c.id, "type": "function", "function": {"name": c.function.name,
                                                                    "arguments": c.function.arguments}} for c in calls]
    else:
        first = client.chat.completions.create(model="fake", messages=messages, tools=[WEATHER])
        tool_calls = [tc.model_dump() for tc in first.choices[0].message.tool_calls]
    messages += [{"role": "assistant", "content": None, "tool_calls": tool_calls},
                 {"role": "tool", "tool_call_id": tool_calls[0]["id"], "content": "sunny"}]
    engine = served[1]
    n_before = len(engine.forward_lengths)
    second = client.chat.completions.create(model="fake", messages=messages, tools=[WEATHER])
    assert "<think>\nThe user wants weather.\n</think>" in engine.prompts[-1]
    assert second.usage.prompt_tokens_details.cached_tokens > 0
    assert engine.forward_lengths[n_before] == second.usage.prompt_tokens - second.usage.prompt_tokens_details.cached_tokens
    assert engine.forward_lengths[n_before] < 20  # <|im_end|>, the tool response and the generation prompt


def test_unrelated_requests_do_not_share_state(client):
    first = _chat(client, "echo: alpha beta").choices[0].message.content
    _chat(client, "echo: gamma")
    again = _chat(client, "echo: alpha beta")
    assert first == again.choices[0].message.content == "alpha beta"
    assert again.usage.prompt_tokens_details.cached_tokens == 0


def test_stop_strings_cut_the_reply(client):
    r = _chat(client, "echo: keep this STOP not this", stop=["STOP", "zzz"])
    assert r.choices[0].message.content == "keep this "
    assert r.choices[0].finish_reason == "stop"


def test_text_held_as_a_possible_stop_string_is_released_at_the_end(client):
    r = _chat(client, "echo: ends with STO", stop=["STOP"])
    assert r.choices[0].message.content == "ends with STO"


def test_a_reply_cut_inside_a_character_ends_with_u_fffd_streamed_or_not(client):
    """max_tokens stops after two of 世's three byte tokens: the bytes are printed as U+FFFD, not dropped."""
    from chat_helpers import build_tokenizer

    max_tokens = len(build_tokenizer().encode("ok 世").ids) - 1
    r = _chat(client, "echo: ok 世", max_tokens=max_tokens)
    assert (r.choices[0].message.content, r.choices[0].finish_reason) == ("ok \ufffd", "length")
    chunks = list(_chat(client, "echo: ok 世", max_tokens=max_tokens, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "ok \ufffd"


def test_max_tokens_ends_with_length(client):
    r = _chat(client, "long", max_tokens=5)
    assert r.usage.completion_tokens == 5 and r.choices[0].finish_reason == "length"


def test_prompt_plus_max_tokens_beyond_context_is_400_and_the_server_stays_up(served, client):
    with pytest.raises(openai.BadRequestError, match="context is 512 tokens") as e:
        _chat(client, "echo: hi", max_tokens=600)
    assert (e.value.body["param"], e.value.body["code"]) == ("max_tokens", "context_length_exceeded")
    assert "lower max_tokens to at most" in e.value.body["message"]
    assert json.load(urllib.request.urlopen(served[2].url + "/health"))["status"] == "ok"
    assert _chat(client, "echo: still here").choices[0].message.content == "still here"


@pytest.mark.parametrize("max_tokens", [None, 10])
def test_a_prompt_longer_than_the_context_is_400_naming_the_prompt_not_max_tokens(served, client, max_tokens):
    """Only a shorter prompt fits, whatever max_tokens (given or not): the error names messages (prompt)."""
    kwargs = {} if max_tokens is None else {"max_tokens": max_tokens}
    with pytest.raises(openai.BadRequestError, match="which leaves no room for a completion: shorten the prompt") as e:
        _chat(client, "x " * 600, **kwargs)
    assert (e.value.body["param"], e.value.body["code"]) == ("messages", "context_length_exceeded")
    body = json.dumps({"prompt": "x " * 600, **kwargs}).encode()
    code, payload = _post(served[2].url + "/v1/completions", body)
    assert (code, payload["error"]["param"], payload["error"]["code"]) == (400, "prompt", "context_length_exceeded")


def _post(url: str, body: bytes) -> tuple[int, dict]:
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as e:
        return e.code, json.load(e)


@pytest.mark.parametrize("body,status,fragment", [
    (b"{not json", 400, "not valid JSON"),
    (b"[1, 2]", 400, "JSON object"),
    (b'{"messages": []}', 400, "messages"),  # OpenAI's API and vLLM: 400 for a field of the wrong type or range
    (b'{"messages": [{"role": "wizard", "content": "x"}]}', 400, "role"),
    (b'{"messages": [{"role": "user", "content": "x"}], "temperature": "hot"}', 400, "temperature"),
    (b'{"messages": [{"role": "user", "content": "x"}], "temperature": NaN}', 400,
     "temperature: Input should be a finite number"),
    (b'{"messages": [{"role": "user", "content": "x"}], "top_p": -Infinity}', 400, "top_p: Input should be a finite"),
    (b'{"messages": [{"role": "user", "content": "x"}], "n": 2}', 400, "n"),
    (b'{"messages": [{"role": "user", "content": "x"}], "max_tokens": 0}', 400, "max_tokens"),
    (b'{"messages": [{"role": "user", "content": "x"}], "stop": ["a", "b", "c", "d", "e"]}', 400, "stop"),
    (b'{"messages": [{"role": "user", "content": "x"}], "tool_choice": "required"}', 400, "tool_choice"),
    (b'{"messages": [{"role": "user", "content": "x"}], "logprobs": true, "presence_penalty": 0}', 400, "logprobs"),
    (b'{"messages": [{"role": "user", "content": "x"}], "frequency_penalty": 0.5}', 400, "frequency_penalty"),
    (b'{"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}', 400,
     "only text"),
    (b'{"messages": [{"role": "user", "content": "\\udcff hi"}], "max_tokens": 3}', 400,
     "not valid UTF-8 text: a lone surrogate U+DCFF"),
])
def test_malformed_requests_get_openai_shaped_errors(served, body, status, fragment):
    code, payload = _post(served[2].url + "/v1/chat/completions", body)
    assert code == status
    assert fragment in payload["error"]["message"]
    assert set(payload["error"]) == {"message", "type", "param", "code"}
    assert payload["error"]["type"] == "invalid_request_error"


def test_seed_minus_one_is_a_random_seed_and_below_it_a_400_naming_seed(served):
    """llama.cpp's server convention; numpy's generator takes no negative seed, which was a plain-text 500."""
    url = served[2].url
    code, payload = _post(url + "/v1/completions", b'{"prompt": "echo: hi", "max_tokens": 3, "seed": -1}')
    unseeded = _post(url + "/v1/completions", b'{"prompt": "echo: hi", "max_tokens": 3}')[1]
    assert (code, payload["choices"][0]["text"]) == (200, unseeded["choices"][0]["text"])
    request = urllib.request.Request(url + "/v1/chat/completions", method="POST", data=json.dumps(
        {"messages": [{"role": "user", "content": "echo: hi"}], "seed": -1, "stream": True}).encode())
    with urllib.request.urlopen(request, timeout=30) as response:
        stream = response.read().replace(b" ", b"")
    assert response.status == 200 and stream.endswith(b'"finish_reason":"stop"}]}\n\ndata:[DONE]\n\n')
    for path, body in (("/v1/completions", b'{"prompt": "echo: hi", "seed": -2}'),
                       ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "x"}], "stream": true, '
                                                b'"seed": -5}')):
        code, payload = _post(url + path, body)
        assert (code, payload["error"]["param"]) == (400, "seed")
        assert payload["error"]["message"].startswith("seed: Input should be greater than or equal to -1")


def test_a_field_of_the_wrong_type_is_the_clients_bad_request_naming_the_field(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="fake", messages=[{"role": "user", "content": "x"}], temperature="hot")
    assert e.value.status_code == 400
    assert e.value.body == {"message": "temperature: Input should be a valid number, unable to parse string as a "
                                       "number (1 error(s) in the request)",
                            "type": "invalid_request_error", "param": "temperature", "code": None}


def test_an_unknown_model_is_404_as_vllm_answers_and_no_model_means_the_one_served(served, client):
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "echo: hi"}])
    assert e.value.body == {"message": "The model `gpt-4o` does not exist: this server serves `fake` (GET /v1/models)",
                            "type": "invalid_request_error", "param": "model", "code": "model_not_found"}
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="fake2", prompt="echo: hi", max_tokens=3)
    code, payload = _post(served[2].url + "/v1/chat/completions",
                          b'{"messages": [{"role": "user", "content": "echo: hi"}], "max_tokens": 3}')
    assert (code, payload["model"], payload["choices"][0]["message"]["content"]) == (200, "fake", "hi")


@pytest.mark.parametrize("option, value", [
    ("response_format", {"type": "json_object"}),
    ("response_format", {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}}),
    ("logit_bias", {"1": -100}),
    ("top_logprobs", 2),
    ("modalities", ["text", "audio"]),
    ("prediction", {"type": "content", "content": "x"}),
    ("functions", [{"name": "f", "parameters": {"type": "object"}}]),
])
def test_openai_options_that_shape_the_output_are_refused_not_ignored(client, option, value):
    with pytest.raises(openai.BadRequestError) as e:
        _chat(client, "echo: hi", max_tokens=3, **{option: value})
    assert e.value.body["message"] == f"not supported by flashmoe: {option}"
    assert e.value.body["param"] == option


def test_options_that_change_nothing_in_the_output_are_accepted(client):
    r = _chat(client, "echo: hi", max_tokens=3, response_format={"type": "text"}, modalities=["text"],
              user="u-1", metadata={"k": "v"}, store=False, service_tier="auto", logit_bias={})
    assert r.choices[0].message.content == "hi"
    assert client.completions.create(model="fake", prompt="echo: hi", max_tokens=3, user="u-1").choices


def test_refusals_name_the_right_field_and_hint_only_where_it_helps(served):
    url = served[2].url
    code, payload = _post(url + "/v1/chat/completions",
                          b'{"messages": [{"role": "user", "content": "x"}], "logprobs": true}')
    assert (code, payload["error"]["message"], payload["error"]["param"]) == (
        400, "not supported by flashmoe: logprobs", "logprobs")
    code, payload = _post(url + "/v1/chat/completions",
                          b'{"messages": [{"role": "user", "content": "x"}], "presence_penalty": 1}')
    assert payload["error"]["message"] == ("not supported by flashmoe: presence_penalty "
                                           "(for repetition use repetition_penalty)")
    code, payload = _post(url + "/v1/completions", b'{"prompt": ""}')
    assert (code, payload["error"]["param"]) == (400, "prompt")
    assert "the prompt is empty" in payload["error"]["message"]
    code, payload = _post(url + "/v1/completions", b'{"prompt": "caf\\udce9"}')  # the escape of byte 0xe9
    assert (code, payload["error"]["param"]) == (400, "prompt")
    assert payload["error"]["message"] == ("the prompt is not valid UTF-8 text: a lone surrogate U+DCE9, Python's "
                                           "stand-in for the undecodable byte 0xe9 (character 3, after 'caf')")


def test_unknown_route_and_wrong_method_get_openai_shaped_errors(served):
    url = served[2].url
    code, payload = _post(url + "/v1/nope", b"{}")
    assert code == 404
    assert payload == {"error": {"message": "Not Found: POST /v1/nope", "type": "invalid_request_error",
                                 "param": None, "code": None}}
    try:
        urllib.request.urlopen(url + "/v1/chat/completions", timeout=10)
    except urllib.error.HTTPError as e:
        assert (e.code, e.headers["Allow"]) == (405, "POST")
        assert json.load(e)["error"]["message"] == "Method Not Allowed: GET /v1/chat/completions"
    else:
        raise AssertionError("GET /v1/chat/completions did not fail")
    assert json.load(urllib.request.urlopen(url + "/health"))["status"] == "ok"


def test_every_error_response_is_counted_by_status_in_v1_stats(served, client, monkeypatch):
    """/v1/stats counts each response of status 400 and above by status, whatever produced it: the API's
    checks (400, 404), routing (404, 405), a failed run (500) and an exception nothing expected (500, in
    OpenAI's shape); `errors` counts the failed runs, the streamed one (status 200) too."""
    from flashmoe.errors import FlashMoeError

    url, before = served[2].url, _server_counters(served)
    hi = json.dumps({"messages": [{"role": "user", "content": "echo: hi"}]}).encode()
    assert _post(url + "/v1/chat/completions", b"{not json")[0] == 400
    assert _post(url + "/v1/chat/completions", json.dumps({"model": "other", **json.loads(hi)}).encode())[0] == 404
    assert _post(url + "/v1/nope", b"{}")[0] == 404
    with pytest.raises(urllib.error.HTTPError, match="405"):
        urllib.request.urlopen(url + "/v1/completions", timeout=10)

    def disk_gone(prompt: str) -> str:
        raise FlashMoeError("experts/layer_001.bin: read failed")

    monkeypatch.setattr(served[1], "reply", disk_gone)
    with pytest.raises(openai.InternalServerError, match="layer_001.bin: read failed"):
        _chat(client, "echo: hi")
    with pytest.raises(openai.APIError, match="layer_001.bin: read failed"):
        list(_chat(client, "echo: hi", stream=True))

    def bug(*args, **kwargs):
        raise RuntimeError("a bug")

    monkeypatch.setattr(served[0].worker, "render", bug)
    assert _post(url + "/v1/chat/completions", hi) == (500, {"error": {
        "message": "internal error: RuntimeError: a bug", "type": "server_error", "param": None, "code": None}})
    after = _server_counters(served)
    assert after["errors"] - before["errors"] == 2
    statuses = set(before["error_responses"]) | set(after["error_responses"])
    assert {s: after["error_responses"].get(s, 0) - before["error_responses"].get(s, 0) for s in statuses} == {
        "400": 1, "404": 2, "405": 1, "500": 2}


def test_concurrent_requests_are_queued_and_each_gets_its_own_reply(served, client):
    served[1].delay_s = 0.002
    results, errors = {}, []

    def ask(i: int) -> None:
        try:
            results[i] = _chat(client, f"echo: request number {i}").choices[0].message.content
        except Exception as e:  # surfaced by the assertion below
            errors.append(e)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors
    assert results == {i: f"request number {i}" for i in range(5)}
    assert served[1].max_active == 1


def test_client_disconnect_mid_stream_frees_the_slot(served, client):
    engine = served[1]
    engine.delay_s = 0.02  # LONG_REPLY would take > 3 s
    cancelled = _server_counters(served)["cancelled"]
    with _chat(client, "long", stream=True) as stream:
        for i, _ in enumerate(stream):
            if i == 3:
                break
    t0 = time.monotonic()
    r = _chat(client, "echo: next in line")
    assert r.choices[0].message.content == "next in line"
    assert time.monotonic() - t0 < 1.5
    assert _server_counters(served)["cancelled"] == cancelled + 1


def test_client_disconnect_while_waiting_for_a_non_streamed_reply_frees_the_slot(served, client):
    import socket

    served[1].delay_s = 0.02
    body = json.dumps({"messages": [{"role": "user", "content": "long"}]}).encode()
    with socket.create_connection((served[2].host, served[2].port)) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        time.sleep(0.3)
    t0 = time.monotonic()
    assert _chat(client, "echo: after the hang-up").choices[0].message.content == "after the hang-up"
    assert time.monotonic() - t0 < 2.0


def test_completions_models_and_health(served, client):
    r = client.completions.create(model="fake", prompt="Once upon a time", max_tokens=50)
    assert r.choices[0].text == " and that is the completion."
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="fake", prompt="Once upon a time", max_tokens=50, stream=True) if c.choices)
    assert streamed == r.choices[0].text
    assert [m.id for m in client.models.list()] == ["fake"]


def test_engine_stats_cover_every_request_and_keep_a_bounded_window_of_token_records(served, client, monkeypatch):
    stats = served[1].stats
    monkeypatch.setattr(stats, "window", 3)
    before = json.load(urllib.request.urlopen(served[2].url + "/v1/stats"))["engine"]
    replies = [_chat(client, f"echo: {word} a b c d e") for word in ("one", "two", "three")]
    after = json.load(urllib.request.urlopen(served[2].url + "/v1/stats"))["engine"]
    tokens = sum(r.usage.completion_tokens for r in replies)
    assert (after["runs"] - before["runs"], after["tokens"] - before["tokens"]) == (3, tokens)
    assert len(stats.tokens) <= 6 and "per_token" not in after
    assert after["ttft_s"] > 0 and after["decode_tok_s"] > 0


@pytest.fixture(scope="module")
def served_xml(tmp_path_factory):
    app, engine, running = fake_server(tmp_path_factory, QWEN35_XML, "qwen35", max_position_embeddings=512)
    yield app, engine, running
    running.stop()
    app.close()


def test_xml_tool_calls_typed_by_schema_with_reasoning_opened_by_the_prompt(served_xml):
    client = openai.OpenAI(base_url=served_xml[2].url + "/v1", api_key="unused", max_retries=0)
    r = _chat(client, "weather xml", tools=[WEATHER])
    message = r.choices[0].message
    assert served_xml[1].prompts[-1].endswith("<|im_start|>assistant\n<think>\n")
    assert message.model_extra["reasoning_content"] == "Checking."
    assert message.content == "Let me look."
    assert json.loads(message.tool_calls[0].function.arguments) == {"city": "Oslo", "days": 3}
    # The tool result goes back in; the template renders the call from the client's JSON-string arguments.
    follow = client.chat.completions.create(model="fake", tools=[WEATHER], messages=[
        {"role": "user", "content": "weather xml"},
        {"role": "assistant", "content": message.content, "tool_calls": [tc.model_dump() for tc in message.tool_calls]},
        {"role": "tool", "tool_call_id": message.tool_calls[0].id, "content": "cold"},
        {"role": "user", "content": "echo: thanks"}], extra_body={"chat_template_kwargs": {"enable_thinking": False}})
    assert follow.choices[0].message.content == "thanks"
    assert served_xml[1].prompts[-1].endswith("<think>\n\n</think>\n\n")
    assert "<parameter=days>\n3\n</parameter>" in served_xml[1].prompts[-1]


@pytest.mark.parametrize("stream", [False, True])
def test_minimax_m2_invoke_calls_with_reasoning_opened_by_the_prompt(tmp_path_factory, stream):
    app, engine, running = fake_server(tmp_path_factory, MINIMAX_M2, "minimax", max_position_embeddings=1024)
    try:
        client = openai.OpenAI(base_url=running.url + "/v1", api_key="unused", max_retries=0)
        r = _chat(client, "weather invoke", tools=[WEATHER], stream=stream)
        if stream:
            deltas = [c.choices[0].delta for c in r]
            reasoning = "".join(d.model_extra.get("reasoning_content") or "" for d in deltas)
            content = "".join(d.content or "" for d in deltas)
            calls = [(tc.function.name, json.loads(tc.function.arguments)) for d in deltas for tc in d.tool_calls or []]
        else:
            message = r.choices[0].message
            reasoning, content = message.model_extra["reasoning_content"], message.content
            calls = [(tc.function.name, json.loads(tc.function.arguments)) for tc in message.tool_calls]
        assert engine.prompts[-1].endswith("]~b]ai\n<think>\n")
        assert (reasoning, content, calls) == ("Checking.", "Let me look.", [("get_weather", {"city": "Oslo", "days": 3})])
    finally:
        running.stop()
        app.close()


@pytest.fixture(scope="module")
def served_tiny(tmp_path_factory):
    from chat_helpers import tiny_engine

    engine, tokenizer = tiny_engine(tmp_path_factory.mktemp("tiny") / "model")
    app = FlashMoeServer(engine, tokenizer, "tiny", context=256)
    with RunningServer(app.app) as running:
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
    engine = load_engine(directory, backend="numpy", context=1024)
    app = FlashMoeServer(engine, tokenizer, directory.name, context=1024)
    with RunningServer(app.app) as running:
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
