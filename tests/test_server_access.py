"""Who may call the server and how much they may send (flashmoe.serve.access), with both official clients."""

from __future__ import annotations

import json
import socket
import urllib.error
import urllib.request

import pytest
from typer.testing import CliRunner
from chat_helpers import FakeEngine, scripted_reply, write_model_dir
from chat_templates import QWEN3

from flashmoe.cli import app as cli
from flashmoe.serve.access import is_loopback
from flashmoe.serve.server import FlashMoeServer, RunningServer
from flashmoe.serve.tokenizer import Tokenizer

openai = pytest.importorskip("openai", reason="the official clients are the test's oracles of the APIs")
anthropic = pytest.importorskip("anthropic", reason="the official clients are the test's oracles of the APIs")

KEY, LIMIT = "sk-test-0123456789", 4096
HI = [{"role": "user", "content": "echo: hi"}]


@pytest.fixture(scope="module")
def url(tmp_path_factory):
    tokenizer = Tokenizer(write_model_dir(tmp_path_factory.mktemp("access"), QWEN3))
    app = FlashMoeServer(FakeEngine(tokenizer, scripted_reply), tokenizer, "fake", api_key=KEY,
                         max_request_bytes=LIMIT)
    with RunningServer(app) as running:
        yield running.url
    app.close()


def _openai(url, key):
    return openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=30)


def _anthropic(url, key):
    return anthropic.Anthropic(base_url=url, api_key=key, max_retries=0, timeout=30)


def test_both_clients_succeed_with_the_key(url):
    assert _openai(url, KEY).chat.completions.create(model="fake", messages=HI).choices[0].message.content == "hi"
    assert _anthropic(url, KEY).messages.create(model="fake", max_tokens=20, messages=HI).content[0].text == "hi"


@pytest.mark.parametrize("key", ["wrong", KEY[:-1], KEY + "0"])
def test_a_wrong_key_is_401_in_each_apis_shape(url, key):
    with pytest.raises(openai.AuthenticationError) as e:
        _openai(url, key).chat.completions.create(model="fake", messages=HI)
    assert e.value.body == {"message": "incorrect API key provided: send it as 'Authorization: Bearer KEY' or "
                                       "'x-api-key: KEY'", "type": "invalid_request_error", "param": None,
                            "code": "invalid_api_key"}  # OpenAI's own code for a wrong key
    with pytest.raises(anthropic.AuthenticationError) as e:
        _anthropic(url, key).messages.create(model="fake", max_tokens=20, messages=HI)
    assert e.value.body["error"]["type"] == "authentication_error"


@pytest.mark.parametrize("path", ["/v1/models", "/v1/stats", "/v1/trace"])
def test_a_missing_key_is_401_while_health_and_the_pages_files_stay_open(url, path):
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(url + path)
    assert e.value.code == 401 and e.value.headers["WWW-Authenticate"] == "Bearer"
    assert json.load(e.value)["error"] == {"message": "no API key provided: this server requires one; send it as "
                                                      "'Authorization: Bearer KEY' or 'x-api-key: KEY'",
                                           "type": "invalid_request_error", "param": None, "code": None}
    assert json.load(urllib.request.urlopen(url + "/health"))["status"] == "ok"
    page = urllib.request.urlopen(url + "/").read().decode()
    assert '<script src="/static/app.js">' in page
    assert b"readEvents" in urllib.request.urlopen(url + "/static/app.js").read()


def _error_responses(url) -> dict[str, int]:
    request = urllib.request.Request(url + "/v1/stats", headers={"Authorization": f"Bearer {KEY}"})
    return json.load(urllib.request.urlopen(request))["server"]["error_responses"]


def test_the_guards_refusals_are_counted_in_v1_stats(url):
    """401 and 413 come from the access guard, in front of the routes: /v1/stats counts them too."""
    before = _error_responses(url)
    for key in (None, "wrong"):
        with pytest.raises(urllib.error.HTTPError, match="401"):
            urllib.request.urlopen(urllib.request.Request(url + "/v1/models", headers={"x-api-key": key} if key else {}))
    with pytest.raises(urllib.error.HTTPError, match="413"):
        urllib.request.urlopen(urllib.request.Request(url + "/v1/chat/completions", data=b"x" * (LIMIT + 1),
                                                      headers={"Authorization": f"Bearer {KEY}"}))
    after = _error_responses(url)
    assert (after.get("401", 0) - before.get("401", 0), after.get("413", 0) - before.get("413", 0)) == (2, 1)


def test_a_body_over_the_limit_is_413_before_it_is_read_and_the_server_keeps_serving(url):
    big = [{"role": "user", "content": "x" * LIMIT}]
    with pytest.raises(openai.APIStatusError) as e:
        _openai(url, KEY).chat.completions.create(model="fake", messages=big)
    assert e.value.status_code == 413 and "limit of 4096 bytes" in e.value.body["message"]
    with pytest.raises(anthropic.APIStatusError) as e:
        _anthropic(url, KEY).messages.create(model="fake", max_tokens=20, messages=big)
    assert e.value.status_code == 413 and e.value.body["error"]["type"] == "request_too_large"
    # A chunked body (no Content-Length) is cut off once it passes the limit, not buffered whole.
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
                  "Transfer-Encoding: chunked\r\nContent-Type: application/json\r\n\r\n".encode())
        chunk = b"x" * 1000
        for _ in range(5):
            s.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        assert s.recv(4096).startswith(b"HTTP/1.1 413")
    assert _openai(url, KEY).chat.completions.create(model="fake", messages=HI).choices[0].message.content == "hi"


def test_loopback_addresses():
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.2") and not is_loopback("example.org")


def test_serve_refuses_a_taken_port_or_an_unknown_host_in_one_line_before_loading_anything(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        missing = str(tmp_path / "no-model")  # loading it would fail; the address is refused first
        result = CliRunner().invoke(cli, ["serve", missing, "--port", str(port)])
        assert result.exit_code == 2, result.output
        assert f"cannot listen on 127.0.0.1:{port}" in result.output and "no-model" not in result.output
    result = CliRunner().invoke(cli, ["serve", missing, "--host", "no-such-host.invalid"])
    assert result.exit_code == 2 and "--host 'no-such-host.invalid' is not an address" in result.output
