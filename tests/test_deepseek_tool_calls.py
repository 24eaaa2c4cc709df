"""DeepSeek-V3.1's chat template and tool-call tokens through the chat-template renderer, the output parser
and the OpenAI server: reasoning apart from content, calls parsed streamed and not, calls sent back
rendered as the template writes them (it joins the arguments as text), and forced calls.

The template is DeepSeek-V3.1's own (deepseek-ai/DeepSeek-V3.1 tokenizer_config.json, as llama.cpp keeps it
in models/templates/deepseek-ai-DeepSeek-V3.1.jinja). It does not render `tools`: the model card puts the
tool description in the system prompt, so TOOL_USE (a `tool_use` template, picked when tools are given)
is the same template with that description added, in the model card's words.
"""

from __future__ import annotations

import json

import pytest
from chat_helpers import WEATHER, serve_scripted, streamed_reply, write_special_tokens_dir

from flashmoe.serve.chat_template import render_chat
from flashmoe.serve.toolcalls import (DS_CALL_CLOSE, DS_CALL_OPEN, DS_CALLS_CLOSE, DS_CALLS_OPEN, DS_SEP,
                                      OutputParser, ParsedOutput, ToolCall, forced_call_prefix, parse_output,
                                      tool_call_format)
from flashmoe.serve.tokenizer import Tokenizer as FlashMoeTokenizer

openai = pytest.importorskip("openai", reason="the official client is the test's oracle of the API")

BOS, EOS, USER, ASSISTANT = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>"
OUTPUT_OPEN, OUTPUT_CLOSE = "<｜tool▁output▁begin｜>", "<｜tool▁output▁end｜>"

V31 = """{% if not add_generation_prompt is defined -%}
  {%- set add_generation_prompt = false -%}
{%- endif -%}
{%- if not thinking is defined -%}
  {%- if enable_thinking is defined -%}
    {%- set thinking = enable_thinking -%}
    {%- else -%}
    {%- set thinking = false -%}
  {%- endif -%}
{%- endif -%}
{%- set ns = namespace(is_first=false, is_tool=false, system_prompt='', is_first_sp=true, is_last_user=false) -%}
{%- for message in messages -%}
  {%- if message['role'] == 'system' -%}
    {%- if ns.is_first_sp -%}
      {%- set ns.system_prompt = ns.system_prompt + message['content'] -%}
      {%- set ns.is_first_sp = false -%}
      {%- else -%}
      {%- set ns.system_prompt = ns.system_prompt + '\n\n' + message['content'] -%}
    {%- endif -%}
  {%- endif -%}
{%- endfor -%}{{ bos_token }}{{ ns.system_prompt }}
{%- for message in messages -%}
  {%- if message['role'] == 'user' -%}
    {%- set ns.is_tool = false -%}
    {%- set ns.is_first = false -%}
    {%- set ns.is_last_user = true -%}{{'<｜User｜>' + message['content']}}
  {%- endif -%}
  {%- if message['role'] == 'assistant' and message['tool_calls'] is defined and message['tool_calls'] is not none -%}
    {%- if ns.is_last_user -%}{{'<｜Assistant｜></think>'}}
    {%- endif -%}
    {%- set ns.is_last_user = false -%}
    {%- set ns.is_first = false -%}
    {%- set ns.is_tool = false -%}
    {%- for tool in message['tool_calls'] -%}
      {%- if not ns.is_first -%}
        {%- if message['content'] is none -%}{{'<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>'+ tool['function']['name'] + '<｜tool▁sep｜>' + tool['function']['arguments'] + '<｜tool▁call▁end｜>'}}
          {%- else -%}{{message['content'] + '<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>' + tool['function']['name'] + '<｜tool▁sep｜>' + tool['function']['arguments'] + '<｜tool▁call▁end｜>'}}
        {%- endif -%}
        {%- set ns.is_first = true -%}
        {%- else -%}{{'<｜tool▁call▁begin｜>'+ tool['function']['name'] + '<｜tool▁sep｜>' + tool['function']['arguments'] + '<｜tool▁call▁end｜>'}}
      {%- endif -%}
    {%- endfor -%}{{'<｜tool▁calls▁end｜><｜end▁of▁sentence｜>'}}
  {%- endif -%}
  {%- if message['role'] == 'assistant' and (message['tool_calls'] is not defined or message['tool_calls'] is none) -%}
    {%- if ns.is_last_user -%}{{'<｜Assistant｜>'}}
      {%- if message['prefix'] is defined and message['prefix'] and thinking -%}{{'<think>'}}
        {%- else -%}{{'</think>'}}
      {%- endif -%}
    {%- endif -%}
    {%- set ns.is_last_user = false -%}
    {%- if ns.is_tool -%}{{message['content'] + '<｜end▁of▁sentence｜>'}}
      {%- set ns.is_tool = false -%}
      {%- else -%}
      {%- set content = message['content'] -%}
      {%- if '</think>' in content -%}
        {%- set content = content.split('</think>', 1)[1] -%}
      {%- endif -%}{{content + '<｜end▁of▁sentence｜>'}}
    {%- endif -%}
  {%- endif -%}
  {%- if message['role'] == 'tool' -%}
    {%- set ns.is_last_user = false -%}
    {%- set ns.is_tool = true -%}{{'<｜tool▁output▁begin｜>' + message['content'] + '<｜tool▁output▁end｜>'}}
  {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt and ns.is_last_user and not ns.is_tool -%}{{'<｜Assistant｜>'}}
  {%- if not thinking -%}{{'</think>'}}
    {%- else -%}{{'<think>'}}
  {%- endif -%}
{%- endif %}"""

# The model card's tool description ("## Tools" ... the format line ... "Where:" ...), after the system prompt.
_TOOLS_TEXT = """{%- if tools -%}
  {%- set tool_ns = namespace(text='\n\n## Tools\nYou have access to the following tools:\n') -%}
  {%- for tool in tools -%}
    {%- set tool_ns.text = tool_ns.text + '\n### ' + tool['function']['name'] + '\nDescription: '
        + tool['function']['description'] + '\n\nParameters: ' + (tool['function']['parameters'] | tojson) + '\n' -%}
  {%- endfor -%}
  {%- set ns.system_prompt = ns.system_prompt + tool_ns.text + '\nIMPORTANT: ALWAYS adhere to this exact format for tool use:\n<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>tool_call_name<｜tool▁sep｜>tool_call_arguments<｜tool▁call▁end｜>{{additional_tool_calls}}<｜tool▁calls▁end｜>\n\nWhere:\n- `tool_call_name` must be an exact match to one of the available tools\n- `tool_call_arguments` must be valid JSON that strictly follows the tool\\'s Parameters Schema\n- For multiple tool calls, chain them directly without separators or spaces\n' -%}
{%- endif -%}"""
_SYSTEM = "{{ bos_token }}{{ ns.system_prompt }}"
TOOL_USE = V31.replace(_SYSTEM, _TOOLS_TEXT + _SYSTEM)
assert TOOL_USE != V31

SPECIAL = [BOS, EOS, USER, ASSISTANT, "<think>", "</think>", DS_CALLS_OPEN, DS_CALLS_CLOSE, DS_CALL_OPEN,
           DS_CALL_CLOSE, DS_SEP, OUTPUT_OPEN, OUTPUT_CLOSE]


def write_deepseek_dir(out, default=V31, tool_use=TOOL_USE):
    """Tokenizer files with DeepSeek's chat and tool tokens, V3.1's template and TOOL_USE."""
    return write_special_tokens_dir(out, SPECIAL, [V31, "the weather in Paris is sunny; get_weather city days"],
                                    eos_token=EOS, bos_token=BOS, template=default, tool_use=tool_use)


CALLS = [{"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}},
         {"id": "call_2", "type": "function", "function": {"name": "get_time", "arguments": {"zone": "CET"}}}]
ROUND_TRIP = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Weather and time?"},
              {"role": "assistant", "content": "", "tool_calls": CALLS},
              {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
              {"role": "tool", "tool_call_id": "call_2", "content": "12:00"},
              {"role": "assistant", "content": "Sunny, noon."}, {"role": "user", "content": "Thanks"}]


@pytest.mark.parametrize("thinking", [False, True])
def test_the_template_renders_object_arguments_as_transformers_renders_text_arguments(tmp_path, thinking):
    """The template joins arguments as text (transformers fails on objects); flashmoe passes objects, so
    it writes them as JSON text for this template, and the prompt is transformers' token for token."""
    transformers = pytest.importorskip("transformers", reason="transformers renders the expected prompt")
    path = write_deepseek_dir(tmp_path, tool_use=None)
    as_text = [{**m, "tool_calls": [{**c, "function": {**c["function"], "arguments": json.dumps(
        c["function"]["arguments"])}} for c in m["tool_calls"]]} if "tool_calls" in m else m for m in ROUND_TRIP]
    hf = transformers.AutoTokenizer.from_pretrained(str(path))
    expected = hf.apply_chat_template(as_text, tokenize=False, add_generation_prompt=True, thinking=thinking)
    ours = FlashMoeTokenizer(path)
    text = ours.apply_chat_template(ROUND_TRIP, thinking=thinking)
    assert text == expected
    assert (f'{ASSISTANT}</think>{DS_CALLS_OPEN}{DS_CALL_OPEN}get_weather{DS_SEP}{{"city": "Paris"}}{DS_CALL_CLOSE}'
            f'{DS_CALL_OPEN}get_time{DS_SEP}{{"zone": "CET"}}{DS_CALL_CLOSE}{DS_CALLS_CLOSE}{EOS}'
            f'{OUTPUT_OPEN}sunny{OUTPUT_CLOSE}') in text
    assert text.endswith(f"{USER}Thanks{ASSISTANT}" + ("<think>" if thinking else "</think>"))
    assert ours.encode(text) == hf.apply_chat_template(as_text, tokenize=True, return_dict=False,
                                                       add_generation_prompt=True, thinking=thinking)


def test_calls_the_template_writes_parse_back_with_reasoning_apart():
    turn = render_chat(V31, [{"role": "user", "content": "q"},
                             {"role": "assistant", "content": "Checking both.", "tool_calls": CALLS}])
    reply = turn.split(f"{ASSISTANT}</think>", 1)[1].removesuffix(EOS)
    out = parse_output("<think>\nWeather, then time.\n</think>" + reply)
    assert out == ParsedOutput(content="Checking both.", reasoning="Weather, then time.",
                               tool_calls=[ToolCall("get_weather", '{"city": "Paris"}'),
                                           ToolCall("get_time", '{"zone": "CET"}')])
    pieces = OutputParser()  # the same, one character at a time
    streamed = ParsedOutput()
    for ch in "<think>\nWeather, then time.\n</think>" + reply:
        streamed.extend(pieces.feed(ch))
    streamed.extend(pieces.finish())
    assert streamed == out
    assert tool_call_format(V31) == tool_call_format(TOOL_USE) == "deepseek"


def test_deepseek_calls_edge_cases():
    args_with_tag = f'{{"note": "a {DS_CALL_CLOSE} b"}}'
    out = parse_output(f"{DS_CALLS_OPEN}{DS_CALL_OPEN}f{DS_SEP}{args_with_tag}{DS_CALL_CLOSE}")  # no block end
    assert out == ParsedOutput(tool_calls=[ToolCall("f", args_with_tag)])
    bad = f"Hi {DS_CALLS_OPEN}{DS_CALL_OPEN}f{DS_SEP}not json{DS_CALL_CLOSE}{DS_CALLS_CLOSE} there"
    assert parse_output(bad) == ParsedOutput(content=bad)  # exactly as generated
    prose = f"Use {DS_CALLS_OPEN} to start"
    assert parse_output(prose) == ParsedOutput(content=prose)
    assert parse_output(bad, parse_tools=False) == ParsedOutput(content=bad)
    forced = forced_call_prefix("deepseek", "get_weather")
    assert forced == f"{DS_CALLS_OPEN}{DS_CALL_OPEN}get_weather{DS_SEP}"
    out = parse_output(f'{{"city": "Oslo"}}{DS_CALL_CLOSE}{DS_CALLS_CLOSE}', prefix=forced)
    assert out == ParsedOutput(tool_calls=[ToolCall("get_weather", '{"city": "Oslo"}')])


# ---- through the server ---------------------------------------------------------------------------

def _reply(prompt: str) -> str:
    """The scripted model: a reasoned tool call, a forced call's arguments, or the tool's result echoed."""
    if prompt.endswith(DS_SEP):
        return f'{{"city": "Oslo"}}{DS_CALL_CLOSE}{DS_CALLS_CLOSE}'
    if prompt.endswith(OUTPUT_CLOSE):
        return "It is " + prompt.rsplit(OUTPUT_OPEN, 1)[1].removesuffix(OUTPUT_CLOSE) + "."
    return (f"The user wants weather.</think>Let me look.{DS_CALLS_OPEN}{DS_CALL_OPEN}get_weather{DS_SEP}"
            f'{{"city": "Paris", "days": 2}}{DS_CALL_CLOSE}{DS_CALLS_CLOSE}')


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    yield from serve_scripted(write_deepseek_dir(tmp_path_factory.mktemp("deepseek")), _reply, EOS)


THINKING = {"chat_template_kwargs": {"thinking": True}}
ASK = [{"role": "user", "content": "Weather in Paris?"}]


def test_server_returns_the_call_with_reasoning_and_content_apart(served):
    engine, client = served
    r = client.chat.completions.create(model="fake", messages=ASK, tools=[WEATHER], extra_body=THINKING)
    assert engine.prompts[-1].endswith(f"{USER}Weather in Paris?{ASSISTANT}<think>")
    assert "### get_weather\nDescription: Weather in a city." in engine.prompts[-1]
    message = r.choices[0].message
    assert r.choices[0].finish_reason == "tool_calls"
    assert message.model_extra["reasoning_content"] == "The user wants weather."
    assert message.content == "Let me look."
    (call,) = message.tool_calls
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris", "days": 2}

    follow = client.chat.completions.create(model="fake", tools=[WEATHER], messages=ASK + [
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": "sunny"}])
    assert follow.choices[0].message.content == "It is sunny."
    assert engine.prompts[-1].endswith(
        f'{ASSISTANT}</think>{DS_CALLS_OPEN}{DS_CALL_OPEN}get_weather{DS_SEP}{{"city": "Paris", "days": 2}}'
        f"{DS_CALL_CLOSE}{DS_CALLS_CLOSE}{EOS}{OUTPUT_OPEN}sunny{OUTPUT_CLOSE}")


def test_server_streams_the_same_reply(served):
    _, client = served
    chunks = list(client.chat.completions.create(model="fake", messages=ASK, tools=[WEATHER], extra_body=THINKING,
                                                 stream=True))
    assert streamed_reply(chunks) == ("The user wants weather.", "Let me look.",
                                      [(0, "get_weather", {"city": "Paris", "days": 2})], "tool_calls")


def test_server_forces_a_named_call_with_the_call_tokens(served):
    engine, client = served
    r = client.chat.completions.create(model="fake", messages=ASK, tools=[WEATHER],
                                       tool_choice={"type": "function", "function": {"name": "get_weather"}})
    assert engine.prompts[-1].endswith(f"{ASSISTANT}</think>{DS_CALLS_OPEN}{DS_CALL_OPEN}get_weather{DS_SEP}")
    (call,) = r.choices[0].message.tool_calls
    assert (call.function.name, json.loads(call.function.arguments)) == ("get_weather", {"city": "Oslo"})
    assert r.choices[0].message.content is None
