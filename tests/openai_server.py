"""The OpenAI-compatible server on the scripted FakeEngine (chat_helpers.fake_server, the qwen3 template), and
the official `openai` client pointed at it: the fixtures of tests/test_server.py and tests/test_server_errors.py
(`from openai_server import served, client`)."""

from __future__ import annotations

import json
import urllib.request

import pytest
from chat_helpers import fake_server
from chat_templates import QWEN3

openai = pytest.importorskip("openai", reason="the official client is the test's oracle of the API")


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(FlashMoeServer, FakeEngine, RunningServer) of a 512-token context, for the tests of one module."""
    with fake_server(tmp_path_factory, QWEN3, "qwen3", max_position_embeddings=512) as served:
        yield served


@pytest.fixture
def client(served):
    served[1].delay_s = 0.0
    return openai.OpenAI(base_url=served[2].url + "/v1", api_key="unused", max_retries=0, timeout=30)


def chat(client, content, **kwargs):
    """One user message to /v1/chat/completions."""
    return client.chat.completions.create(model="fake", messages=[{"role": "user", "content": content}], **kwargs)


def server_counters(served) -> dict:
    """The server's request counters from /v1/stats."""
    return json.load(urllib.request.urlopen(served[2].url + "/v1/stats"))["server"]
