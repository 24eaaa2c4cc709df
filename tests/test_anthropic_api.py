"""The Anthropic Messages API, driven over loopback HTTP with the official `anthropic` client, on the scripted
FakeEngine of tests/chat_helpers.py (so replies, tool calls and prefix reuse are exact and fast)."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import pytest
from chat_helpers import fake_server
from chat_templates import QWEN3

anthropic = pytest.importorskip("anthropic", reason="the official client is the test's oracle of the API")

WEATHER = {"name": "get_weather", "description": "Weather in a city.",
           "input_schema": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}}}}


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    with fake_server(tmp_path_factory, QWEN3, "anthropic", max_position_embeddings=512) as served:
        yield served


@pytest.fixture
def client(served):
    return anthropic.Anthropic(base_url=served[2].url, api_key="unused", max_retries=0, timeout=30)


def _ask(client, content, **kwargs):
    return client.messages.create(model="fake", max_tokens=kwargs.pop("max_tokens", 100),
                                  messages=[{"role": "user", "content": content}], **kwargs)


def test_a_plain_message_returns_its_text_stop_reason_and_usage(served, client):
    r = _ask(client, "echo: Bonjour, ça va?", system="Be brief.")
    assert r.type == "message" and r.role == "assistant" and r.id.startswith("msg_") and r.model == "fake"
    assert [(b.type, b.text) for b in r.content] == [("text", "Bonjour, ça va?")]
    assert (r.stop_reason, r.stop_sequence) == ("end_turn", None)
    prompt = served[1].prompts[-1]
    assert prompt.startswith("<|im_start|>system\nBe brief.<|im_end|>") and "<think>\n\n</think>" in prompt
    assert r.usage.output_tokens > 1 and r.usage.input_tokens + r.usage.cache_read_input_tokens > 10


def test_the_stream_has_the_documented_event_order_and_adds_up_to_the_message(client):
    with client.messages.stream(model="fake", max_tokens=100,
                                messages=[{"role": "user", "content": "echo: one two three 世界"}]) as stream:
        events = list(stream)
        final = stream.get_final_message()
    kinds = [e.type for e in events if e.type in ("message_start", "content_block_start", "content_block_delta",
                                                  "content_block_stop", "message_delta", "message_stop")]
    assert kinds[:2] == ["message_start", "content_block_start"] and kinds[-3:] == [
        "content_block_stop", "message_delta", "message_stop"]
    assert set(kinds[2:-3]) == {"content_block_delta"}
    text = "".join(e.delta.text for e in events if e.type == "content_block_delta")
    assert text == "one two three 世界" == final.content[0].text
    assert final.stop_reason == "end_turn" and final.usage.output_tokens > 1


def test_stop_sequences_and_max_tokens_give_their_stop_reasons(client):
    r = _ask(client, "echo: alpha beta gamma", stop_sequences=["gamma", "zeta"])
    assert (r.content[0].text, r.stop_reason, r.stop_sequence) == ("alpha beta ", "stop_sequence", "gamma")
    r = _ask(client, "long", max_tokens=3)
    assert r.stop_reason == "max_tokens" and r.usage.output_tokens == 3


@pytest.mark.parametrize("stream", [False, True])
def test_a_tool_round_trip_with_thinking(served, client, stream):
    """tool_use with its thinking, then the tool_result sent back: the prefix is reused and the reply uses it."""
    request = dict(model="fake", max_tokens=100, tools=[WEATHER], thinking={"type": "enabled", "budget_tokens": 100},
                   messages=[{"role": "user", "content": "weather json"}])
    if stream:
        with client.messages.stream(**request) as s:
            first = s.get_final_message()
    else:
        first = client.messages.create(**request)
    assert first.stop_reason == "tool_use"
    thinking, use = first.content
    assert (thinking.type, thinking.thinking) == ("thinking", "The user wants weather.")
    assert (use.type, use.name, use.input) == ("tool_use", "get_weather", {"city": "Paris", "note": "</tool_call> inside"})
    assert use.id.startswith("toolu_")
    request["messages"] += [{"role": "assistant", "content": [b.model_dump() for b in first.content]},
                            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id,
                                                          "content": [{"type": "text", "text": "sunny"}]}]}]
    second = client.messages.create(**request)
    assert [(b.type, b.text) for b in second.content] == [("text", "The tool said: sunny")]
    assert "<tool_response>\nsunny\n</tool_response>" in served[1].prompts[-1]
    assert second.usage.cache_read_input_tokens > 0 and second.usage.input_tokens < 20


def test_tool_choice_any_and_tool_force_a_call_and_none_keeps_tools_out(served, client):
    _ask(client, "echo: hi", tools=[WEATHER], tool_choice={"type": "tool", "name": "get_weather"})
    assert served[1].prompts[-1].endswith('<tool_call>\n{"name": "get_weather", "arguments": ')
    _ask(client, "echo: hi", tools=[WEATHER], tool_choice={"type": "any"})
    assert served[1].prompts[-1].endswith("<tool_call>\n")
    r = _ask(client, "weather json", tools=[WEATHER], tool_choice={"type": "none"})
    assert r.stop_reason == "end_turn" and "# Tools" not in served[1].prompts[-1]


def test_count_tokens_counts_the_prompt_that_messages_prefills(served, client):
    messages = [{"role": "user", "content": "echo: count me"}]
    n = client.messages.count_tokens(model="fake", messages=messages, system="sys", tools=[WEATHER]).input_tokens
    r = client.messages.create(model="fake", max_tokens=10, messages=messages, system="sys", tools=[WEATHER])
    assert n == r.usage.input_tokens + r.usage.cache_read_input_tokens


def test_an_unknown_model_is_anthropics_not_found_error(client):
    with pytest.raises(anthropic.NotFoundError) as e:
        client.messages.create(model="claude-sonnet-4-5", max_tokens=10, messages=[{"role": "user", "content": "hi"}])
    assert e.value.status_code == 404
    assert e.value.body == {"type": "error", "error": {"type": "not_found_error", "message":
                            "The model `claude-sonnet-4-5` does not exist: this server serves `fake` (GET /v1/models)"}}
    with pytest.raises(anthropic.NotFoundError):
        client.messages.count_tokens(model="other", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(anthropic.BadRequestError) as e:  # a field of the wrong type: 400, Anthropic's type
        client.messages.create(model="fake", max_tokens=10, messages=[{"role": "user", "content": "hi"}],
                               extra_body={"temperature": "hot"})
    assert e.value.status_code == 400 and e.value.body["error"]["type"] == "invalid_request_error"


def test_server_side_tools_are_refused_not_ignored(client):
    with pytest.raises(anthropic.BadRequestError) as e:
        _ask(client, "echo: hi", extra_body={"mcp_servers": [{"type": "url", "url": "http://x", "name": "x"}]})
    assert e.value.body["error"]["message"] == "not supported by flashmoe: mcp_servers"
    assert _ask(client, "echo: hi", metadata={"user_id": "u-1"}, service_tier="auto").content[0].text == "hi"


def test_errors_come_in_anthropic_shape_and_the_server_keeps_serving(served, client):
    with pytest.raises(anthropic.BadRequestError) as e:
        client.messages.create(model="fake", max_tokens=10, messages=[
            {"role": "user", "content": [{"type": "image", "source": {"type": "url", "url": "http://x/y.png"}}]}])
    assert e.value.body == {"type": "error", "error": {"type": "invalid_request_error", "message":
                            "messages.0.content.0: content of type 'image' is not supported here "
                            "(supported: text, tool_result)"}}
    with pytest.raises(anthropic.BadRequestError, match="the context is 512 tokens"):
        _ask(client, "echo: hi", max_tokens=600)
    body = json.dumps({"messages": [{"role": "user", "content": "hi"}]}).encode()  # no max_tokens
    request = urllib.request.Request(served[2].url + "/v1/messages", data=body, method="POST",
                                     headers={"content-type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(request)
    assert e.value.code == 400
    assert json.loads(e.value.read())["error"] == {"type": "invalid_request_error",
                                                    "message": "max_tokens: Field required (1 error(s) in the request)"}
    # JSON's escape of a lone surrogate, which no UTF-8 text holds (the client refuses to send one)
    body = b'{"messages": [{"role": "user", "content": "\\ud800 hi"}], "max_tokens": 3}'
    request = urllib.request.Request(served[2].url + "/v1/messages", data=body, method="POST",
                                     headers={"content-type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(request)
    assert e.value.code == 400
    error = json.loads(e.value.read())["error"]
    assert error["type"] == "invalid_request_error"
    assert error["message"].startswith("the prompt is not valid UTF-8 text: a lone surrogate U+D800 (character ")
    assert _ask(client, "echo: still here").content[0].text == "still here"
