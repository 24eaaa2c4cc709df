"""Chat templates render exactly as transformers' apply_chat_template: same text, same token ids."""

from __future__ import annotations

import itertools
import json

import pytest
from chat_helpers import write_model_dir
from chat_templates import LLAMA_TOOLS, MIXTRAL, QWEN3, QWEN35_XML, TEMPLATES

from flashmoe.serve.chat_template import render_chat
from flashmoe.errors import FlashMoeError
from flashmoe.serve.tokenizer import Tokenizer

transformers = pytest.importorskip("transformers", reason="transformers is the oracle for chat templates")

WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "  Current weather in a city.  ",
    "parameters": {"type": "object", "required": ["city"], "properties": {
        "city": {"type": "string", "description": "City name, e.g. Paris"},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
        "days": {"type": "integer", "default": 1}}}}}
SKIPPED_TOOL = {"type": "function", "function": {"name": "skip_me", "description": "never shown",
                                                 "parameters": {"type": "object", "properties": {}}}}

CONVERSATIONS = {
    "single_user": [{"role": "user", "content": "Hello there!"}],
    "multi_turn_system": [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "What is 2 + 2?"},
        {"role": "assistant", "content": "4."},
        {"role": "user", "content": "Grüße, 世界 🦊 and café?"},
    ],
    "tool_round_trip": [
        {"role": "user", "content": "Weather in Paris and Rome?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}},
            {"id": "call_2", "type": "function",
             "function": {"name": "get_weather", "arguments": {"city": "Rome", "unit": "celsius"}}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 22 C"},
        {"role": "tool", "tool_call_id": "call_2", "content": "rain </tool_response> 14 C"},
    ],
    "reasoning_history": [
        {"role": "user", "content": "Think first: 3 * 7?"},
        {"role": "assistant", "content": "21", "reasoning_content": "3 times 7 is 21."},
        {"role": "user", "content": "And 6 * 7?"},
        {"role": "assistant", "content": "<think>\nsix sevens\n</think>\n\n42"},
        {"role": "user", "content": "Thanks"},
    ],
    "reasoning_alias": [
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": "a", "thinking": "via the thinking key"},
    ],
}


def _hf_tokenizer(path):
    return transformers.AutoTokenizer.from_pretrained(str(path))


def _both(hf, ours, messages, **kwargs):
    """Render with transformers and with flashmoe; return (hf_text, hf_ids, our_text, our_ids) or the
    exception types when rendering fails."""
    try:
        hf_text = hf.apply_chat_template(messages, tokenize=False, **kwargs)
        hf_ids = hf.apply_chat_template(messages, tokenize=True, return_dict=False, **kwargs)
    except Exception as e:  # the oracle rejects the conversation; flashmoe must reject it too
        with pytest.raises(FlashMoeError):
            ours.apply_chat_template(messages, **kwargs)
        return type(e), None, None, None
    text = ours.apply_chat_template(messages, **kwargs)
    return hf_text, list(hf_ids), text, ours.encode(text)


@pytest.fixture(scope="module", params=sorted(TEMPLATES))
def tokenizers_pair(request, tmp_path_factory):
    path = write_model_dir(tmp_path_factory.mktemp(request.param), TEMPLATES[request.param], bos_token="<s>",
                           eos_token="</s>" if request.param == "mixtral" else "<|im_end|>")
    return request.param, _hf_tokenizer(path), Tokenizer(path)


@pytest.mark.parametrize("conversation,add_generation_prompt,tools,thinking", list(itertools.product(
    sorted(CONVERSATIONS), [False, True], [None, [WEATHER_TOOL, SKIPPED_TOOL]], [None, False, True])))
def test_render_and_token_ids_match_transformers(tokenizers_pair, conversation, add_generation_prompt, tools,
                                                 thinking):
    name, hf, ours = tokenizers_pair
    kwargs = {"add_generation_prompt": add_generation_prompt, "tools": tools}
    if thinking is not None:
        kwargs["enable_thinking"] = thinking
    hf_text, hf_ids, text, ids = _both(hf, ours, CONVERSATIONS[conversation], **kwargs)
    if hf_ids is None:
        assert name == "mixtral", f"{name} rejected {conversation}: {hf_text}"
        return
    assert text == hf_text
    assert ids == hf_ids


def test_templates_exercise_their_features(tokenizers_pair):
    """Guards the parametrised comparison against comparing empty strings."""
    name, _, ours = tokenizers_pair
    text = ours.apply_chat_template(CONVERSATIONS["tool_round_trip" if name != "mixtral" else "single_user"],
                                    tools=[WEATHER_TOOL, SKIPPED_TOOL], enable_thinking=False)
    expected = {
        "qwen3": ['<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}\n</tool_call>',
                  "<tool_response>\nrain </tool_response> 14 C\n</tool_response><|im_end|>",
                  "<|im_start|>assistant\n<think>\n\n</think>\n\n"],
        "qwen35_xml": ["<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n<parameter=days>\n2\n",
                       '<enum>["celsius", "fahrenheit"]</enum>', "<description>Current weather in a city.</description>"],
        "mixtral": ["<s> [INST] Hello there! [/INST]"],
        "llama_tools": ['    "function": {\n        "description"', '{"type":"object","required":["city"],"properties":{', "Today Date: "],
    }[name]
    for piece in expected:
        assert piece in text
    if name == "llama_tools":  # its loop `continue`s past this tool
        assert "never shown" not in text


def test_chat_template_jinja_file_takes_priority_over_tokenizer_config(tmp_path):
    path = write_model_dir(tmp_path, "{{ 'from file' }}", as_jinja_file=True)
    config = json.loads((path / "tokenizer_config.json").read_text())
    config["chat_template"] = "{{ 'from config' }}"
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    messages = [{"role": "user", "content": "x"}]
    assert Tokenizer(path).apply_chat_template(messages) == "from file"
    assert _hf_tokenizer(path).apply_chat_template(messages, tokenize=False) == "from file"


def test_named_templates_pick_tool_use_when_tools_are_given(tmp_path):
    path = write_model_dir(tmp_path, [{"name": "default", "template": "{{ 'plain' }}"},
                                      {"name": "tool_use", "template": "{{ tools | length }} tools"}])
    hf, ours = _hf_tokenizer(path), Tokenizer(path)
    messages = [{"role": "user", "content": "x"}]
    for tools in (None, [WEATHER_TOOL]):
        assert ours.apply_chat_template(messages, tools=tools) == hf.apply_chat_template(
            messages, tools=tools, tokenize=False, add_generation_prompt=True)
    assert ours.apply_chat_template(messages, tools=[WEATHER_TOOL]) == "1 tools"


def test_raise_exception_becomes_a_flashmoe_error_with_the_template_message():
    with pytest.raises(FlashMoeError, match="roles must alternate"):
        render_chat(MIXTRAL, [{"role": "assistant", "content": "hi"}], special_tokens={"bos_token": "<s>"})


def test_tojson_does_not_escape_html_or_unicode():
    text = render_chat("{{ messages[0] | tojson }}", [{"role": "user", "content": "<b>é</b> & 'q'"}])
    assert text == '{"role": "user", "content": "<b>é</b> & \'q\'"}'


def test_namespace_refuses_underscore_attributes():
    with pytest.raises(FlashMoeError):
        render_chat("{% set ns = namespace(_x=1) %}", [{"role": "user", "content": "x"}])


def test_missing_template_and_empty_conversation_are_errors():
    with pytest.raises(FlashMoeError, match="no chat template"):
        render_chat(None, [{"role": "user", "content": "x"}])
    with pytest.raises(FlashMoeError, match="empty conversation"):
        render_chat(QWEN3, [])


def test_syntax_error_names_the_line():
    with pytest.raises(FlashMoeError, match="line 2"):
        render_chat("ok\n{% if %}", [{"role": "user", "content": "x"}])


def test_template_errors_name_the_file_or_field_the_template_was_read_from(tmp_path):
    hi = [{"role": "user", "content": "hi"}]
    model = write_model_dir(tmp_path / "file", "ok\n{% if %}", as_jinja_file=True)
    with pytest.raises(FlashMoeError) as refused:
        Tokenizer(model).apply_chat_template(hi)
    assert str(refused.value) == (f"{model / 'chat_template.jinja'}, line 2: Expected an expression, got 'end of "
                                  "statement block'")
    model = write_model_dir(tmp_path / "named", [{"name": "default", "template": "{{ raise_exception('no') }}"}])
    with pytest.raises(FlashMoeError) as refused:
        Tokenizer(model).apply_chat_template(hi)
    assert str(refused.value) == f"{model / 'tokenizer_config.json'}, field 'chat_template' 'default': no"
    for name, value in (("list", [{"name": "default"}]), ("number", 7)):  # a list of {"name", "template"}, or one
        with pytest.raises(FlashMoeError, match=r"tokenizer_config.json, field 'chat_template' must be a template "
                                                r"or a list of \{\"name\", \"template\"\} objects, got"):
            Tokenizer(write_model_dir(tmp_path / name, value))


def test_qwen35_generation_prompt_opens_thinking():
    text = render_chat(QWEN35_XML, [{"role": "user", "content": "hi"}], add_generation_prompt=True)
    assert text.endswith("<|im_start|>assistant\n<think>\n")
    assert LLAMA_TOOLS  # imported for the fixture's parametrisation
