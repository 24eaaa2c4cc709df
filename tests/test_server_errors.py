"""The OpenAI-compatible server's answers to what it cannot serve: prompts beyond the context, malformed
requests, fields of the wrong type, options it refuses rather than ignores, unknown models and routes, each an
OpenAI-shaped error and counted by status, against the scripted FakeEngine (tests/chat_helpers.py).
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import pytest
from openai_server import chat, client, openai, served, server_counters  # noqa: F401 (fixtures)


def test_prompt_plus_max_tokens_beyond_context_is_400_and_the_server_stays_up(served, client):
    with pytest.raises(openai.BadRequestError, match="context is 512 tokens") as e:
        chat(client, "echo: hi", max_tokens=600)
    assert (e.value.body["param"], e.value.body["code"]) == ("max_tokens", "context_length_exceeded")
    assert "lower max_tokens to at most" in e.value.body["message"]
    assert json.load(urllib.request.urlopen(served[2].url + "/health"))["status"] == "ok"
    assert chat(client, "echo: still here").choices[0].message.content == "still here"


@pytest.mark.parametrize("max_tokens", [None, 10])
def test_a_prompt_longer_than_the_context_is_400_naming_the_prompt_not_max_tokens(served, client, max_tokens):
    """Only a shorter prompt fits, whatever max_tokens (given or not): the error names messages (prompt)."""
    kwargs = {} if max_tokens is None else {"max_tokens": max_tokens}
    with pytest.raises(openai.BadRequestError, match="which leaves no room for a completion: shorten the prompt") as e:
        chat(client, "x " * 600, **kwargs)
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
        chat(client, "echo: hi", max_tokens=3, **{option: value})
    assert e.value.body["message"] == f"not supported by flashmoe: {option}"
    assert e.value.body["param"] == option


def test_options_that_change_nothing_in_the_output_are_accepted(client):
    r = chat(client, "echo: hi", max_tokens=3, response_format={"type": "text"}, modalities=["text"],
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

    url, before = served[2].url, server_counters(served)
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
        chat(client, "echo: hi")
    with pytest.raises(openai.APIError, match="layer_001.bin: read failed"):
        list(chat(client, "echo: hi", stream=True))

    def bug(*args, **kwargs):
        raise RuntimeError("a bug")

    monkeypatch.setattr(served[0].worker, "render", bug)
    assert _post(url + "/v1/chat/completions", hi) == (500, {"error": {
        "message": "internal error: RuntimeError: a bug", "type": "server_error", "param": None, "code": None}})
    after = server_counters(served)
    assert after["errors"] - before["errors"] == 2
    statuses = set(before["error_responses"]) | set(after["error_responses"])
    assert {s: after["error_responses"].get(s, 0) - before["error_responses"].get(s, 0) for s in statuses} == {
        "400": 1, "404": 2, "405": 1, "500": 2}
