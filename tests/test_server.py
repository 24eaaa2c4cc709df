"""The OpenAI-compatible server's chat and completions, driven over loopback HTTP with the official `openai`
client: replies, streaming, tool calls (JSON, XML, MiniMax invoke), prefix reuse, stop strings, queueing and
cancellation, against a scripted FakeEngine (tests/chat_helpers.py) so that every reply is exact and fast.
Malformed requests and refusals: tests/test_server_errors.py; real engines and `flashmoe serve`:
tests/test_server_engines.py.
"""

from __future__ import annotations

import json
import threading
import time
import urllib.request

import pytest
from chat_helpers import WEATHER, fake_server
from chat_templates import MINIMAX_M2, MIXTRAL, QWEN35_XML

from openai_server import chat, client, openai, served, server_counters  # noqa: F401 (fixtures)


def test_chat_completion_returns_the_reply_with_usage(client):
    r = chat(client, "echo: Bonjour, ça va?")
    assert r.choices[0].message.content == "Bonjour, ça va?"
    assert r.choices[0].finish_reason == "stop"
    assert r.usage.completion_tokens > 1 and r.usage.prompt_tokens > 1
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_streamed_deltas_add_up_to_the_non_streamed_reply(served, client):
    before = server_counters(served)
    chunks = list(chat(client, "echo: one two three 世界", stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "one two three 世界"
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0
    after = server_counters(served)
    assert (after["completed"] - before["completed"], after["cancelled"] - before["cancelled"]) == (1, 0)


def test_json_tool_call_with_reasoning(client):
    r = chat(client, "weather json", tools=[WEATHER])
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    assert choice.message.model_extra["reasoning_content"] == "The user wants weather."
    (call,) = choice.message.tool_calls
    assert call.function.name == "get_weather" and call.id.startswith("call_")
    assert json.loads(call.function.arguments) == {"city": "Paris", "note": "</tool_call> inside"}


def test_streamed_tool_call(client):
    chunks = list(chat(client, "weather json", tools=[WEATHER], stream=True))
    deltas = [c.choices[0].delta for c in chunks]
    reasoning = "".join(d.model_extra.get("reasoning_content") or "" for d in deltas)
    calls = [tc for d in deltas for tc in d.tool_calls or []]
    assert reasoning == "The user wants weather."
    assert [(c.index, c.function.name) for c in calls] == [(0, "get_weather")]
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_tool_choice_none_keeps_tags_as_content_and_tools_out_of_the_prompt(served, client):
    r = chat(client, "weather json", tools=[WEATHER], tool_choice="none")
    assert r.choices[0].message.tool_calls is None
    assert '<tool_call>\n{"name": "get_weather"' in r.choices[0].message.content
    assert "# Tools" not in served[1].prompts[-1]


def test_named_tool_choice_forces_the_call_prefix(served, client):
    chat(client, "echo: ignored", tools=[WEATHER],
          tool_choice={"type": "function", "function": {"name": "get_weather"}})
    assert served[1].prompts[-1].endswith('<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", "arguments": ')


def test_tools_for_a_template_that_does_not_render_them_are_refused_in_both_apis(tmp_path_factory):
    """Silently dropped tools would leave `required` producing the forced call prefix and then prose."""
    import anthropic

    with fake_server(tmp_path_factory, MIXTRAL, "no-tools") as (app, engine, running):
        client = openai.OpenAI(base_url=running.url + "/v1", api_key="unused", max_retries=0, timeout=30)
        with pytest.raises(openai.BadRequestError, match="does not render tools") as e:
            chat(client, "echo: hi", tools=[WEATHER], tool_choice="required")
        assert e.value.body["param"] == "tools"
        assert chat(client, "echo: hi", tools=[WEATHER], tool_choice="none").choices[0].finish_reason == "stop"
        claude = anthropic.Anthropic(base_url=running.url, api_key="unused", max_retries=0, timeout=30)
        with pytest.raises(anthropic.BadRequestError, match="does not render tools"):
            claude.messages.create(model="fake", max_tokens=10, messages=[{"role": "user", "content": "hi"}],
                                   tools=[{"name": "f", "input_schema": {"type": "object"}}])


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
    first = chat(client, "echo: alpha beta").choices[0].message.content
    chat(client, "echo: gamma")
    again = chat(client, "echo: alpha beta")
    assert first == again.choices[0].message.content == "alpha beta"
    assert again.usage.prompt_tokens_details.cached_tokens == 0


def test_stop_strings_cut_the_reply(client):
    r = chat(client, "echo: keep this STOP not this", stop=["STOP", "zzz"])
    assert r.choices[0].message.content == "keep this "
    assert r.choices[0].finish_reason == "stop"


def test_text_held_as_a_possible_stop_string_is_released_at_the_end(client):
    r = chat(client, "echo: ends with STO", stop=["STOP"])
    assert r.choices[0].message.content == "ends with STO"


def test_a_reply_cut_inside_a_character_ends_with_u_fffd_streamed_or_not(client):
    """max_tokens stops after two of 世's three byte tokens: the bytes are printed as U+FFFD, not dropped."""
    from chat_helpers import build_tokenizer

    max_tokens = len(build_tokenizer().encode("ok 世").ids) - 1
    r = chat(client, "echo: ok 世", max_tokens=max_tokens)
    assert (r.choices[0].message.content, r.choices[0].finish_reason) == ("ok \ufffd", "length")
    chunks = list(chat(client, "echo: ok 世", max_tokens=max_tokens, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "ok \ufffd"


def test_max_tokens_ends_with_length(client):
    r = chat(client, "long", max_tokens=5)
    assert r.usage.completion_tokens == 5 and r.choices[0].finish_reason == "length"


def test_concurrent_requests_are_queued_and_each_gets_its_own_reply(served, client):
    served[1].delay_s = 0.002
    results, errors = {}, []

    def ask(i: int) -> None:
        try:
            results[i] = chat(client, f"echo: request number {i}").choices[0].message.content
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
    cancelled = server_counters(served)["cancelled"]
    with chat(client, "long", stream=True) as stream:
        for i, _ in enumerate(stream):
            if i == 3:
                break
    t0 = time.monotonic()
    r = chat(client, "echo: next in line")
    assert r.choices[0].message.content == "next in line"
    assert time.monotonic() - t0 < 1.5
    assert server_counters(served)["cancelled"] == cancelled + 1


def test_client_disconnect_while_waiting_for_a_non_streamed_reply_frees_the_slot(served, client):
    import socket

    served[1].delay_s = 0.02
    body = json.dumps({"messages": [{"role": "user", "content": "long"}]}).encode()
    with socket.create_connection((served[2].host, served[2].port)) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        time.sleep(0.3)
    t0 = time.monotonic()
    assert chat(client, "echo: after the hang-up").choices[0].message.content == "after the hang-up"
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
    replies = [chat(client, f"echo: {word} a b c d e") for word in ("one", "two", "three")]
    after = json.load(urllib.request.urlopen(served[2].url + "/v1/stats"))["engine"]
    tokens = sum(r.usage.completion_tokens for r in replies)
    assert (after["runs"] - before["runs"], after["tokens"] - before["tokens"]) == (3, tokens)
    assert len(stats.tokens) <= 6 and "per_token" not in after
    assert after["ttft_s"] > 0 and after["decode_tok_s"] > 0


@pytest.fixture(scope="module")
def served_xml(tmp_path_factory):
    with fake_server(tmp_path_factory, QWEN35_XML, "qwen35", max_position_embeddings=512) as served:
        yield served


def test_xml_tool_calls_typed_by_schema_with_reasoning_opened_by_the_prompt(served_xml):
    client = openai.OpenAI(base_url=served_xml[2].url + "/v1", api_key="unused", max_retries=0)
    r = chat(client, "weather xml", tools=[WEATHER])
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
    with fake_server(tmp_path_factory, MINIMAX_M2, "minimax", max_position_embeddings=1024) as (app, engine, running):
        client = openai.OpenAI(base_url=running.url + "/v1", api_key="unused", max_retries=0)
        r = chat(client, "weather invoke", tools=[WEATHER], stream=stream)
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
