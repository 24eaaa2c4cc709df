"""GLM-4.5's chat template and `<tool_call>NAME<arg_key>…</arg_key><arg_value>…</arg_value></tool_call>` calls
through the OpenAI server: reasoning apart from content, calls parsed streamed and not, the prompt of a
conversation with calls and tool results rendered as transformers renders it, and forced calls.

The template is GLM-4.5's and GLM-4.6's own (zai-org/GLM-4.6 chat_template.jinja, as llama.cpp keeps it in
models/templates/GLM-4.6.jinja; its tool-call part is tests/test_toolcalls.py's GLM45_TOOL_CALLS).
"""

from __future__ import annotations

import json

import pytest
from chat_helpers import WEATHER, serve_scripted, streamed_reply, write_special_tokens_dir

from flashmoe.serve.tokenizer import Tokenizer as FlashMoeTokenizer

openai = pytest.importorskip("openai", reason="the official client is the test's oracle of the API")

GLM45 = r"""[gMASK]<sop>
{%- if tools -%}
<|system|>
# Tools

You may call one or more functions to assist with the user query.

You are provided with function signatures within <tools></tools> XML tags:
<tools>
{% for tool in tools %}
{{ tool | tojson(ensure_ascii=False) }}
{% endfor %}
</tools>

For each function call, output the function name and arguments within the following XML format:
<tool_call>{function-name}
<arg_key>{arg-key-1}</arg_key>
<arg_value>{arg-value-1}</arg_value>
<arg_key>{arg-key-2}</arg_key>
<arg_value>{arg-value-2}</arg_value>
...
</tool_call>{%- endif -%}
{%- macro visible_text(content) -%}
    {%- if content is string -%}
        {{- content }}
    {%- elif content is iterable and content is not mapping -%}
        {%- for item in content -%}
            {%- if item is mapping and item.type == 'text' -%}
                {{- item.text }}
            {%- elif item is string -%}
                {{- item }}
            {%- endif -%}
        {%- endfor -%}
    {%- else -%}
        {{- content }}
    {%- endif -%}
{%- endmacro -%}
{%- set ns = namespace(last_user_index=-1) %}
{%- for m in messages %}
    {%- if m.role == 'user' %}
        {% set ns.last_user_index = loop.index0 -%}
    {%- endif %}
{%- endfor %}
{% for m in messages %}
{%- if m.role == 'user' -%}<|user|>
{{ visible_text(m.content) }}
{{- '/nothink' if (enable_thinking is defined and not enable_thinking and not visible_text(m.content).endswith("/nothink")) else '' -}}
{%- elif m.role == 'assistant' -%}
<|assistant|>
{%- set reasoning_content = '' %}
{%- set content = visible_text(m.content) %}
{%- if m.reasoning_content is string %}
    {%- set reasoning_content = m.reasoning_content %}
{%- else %}
    {%- if '</think>' in content %}
        {%- set reasoning_content = content.split('</think>')[0].rstrip('\n').split('<think>')[-1].lstrip('\n') %}
        {%- set content = content.split('</think>')[-1].lstrip('\n') %}
    {%- endif %}
{%- endif %}
{%- if loop.index0 > ns.last_user_index and reasoning_content -%}
{{ '\n<think>' + reasoning_content.strip() +  '</think>'}}
{%- else -%}
{{ '\n<think></think>' }}
{%- endif -%}
{%- if content.strip() -%}
{{ '\n' + content.strip() }}
{%- endif -%}
{% if m.tool_calls %}
{% for tc in m.tool_calls %}
{%- if tc.function %}
    {%- set tc = tc.function %}
{%- endif %}
{{ '\n<tool_call>' + tc.name }}
{% set _args = tc.arguments or {} %}
{% for k, v in _args.items() %}
<arg_key>{{ k }}</arg_key>
<arg_value>{{ v | tojson(ensure_ascii=False) if v is not string else v }}</arg_value>
{% endfor %}
</tool_call>{% endfor %}
{% endif %}
{%- elif m.role == 'tool' -%}
{%- if m.content is string -%}
{%- if loop.first or (messages[loop.index0 - 1].role != "tool") %}
    {{- '<|observation|>' }}
{%- endif %}
{{- '\n<tool_response>\n' }}
{{- m.content }}
{{- '\n</tool_response>' }}
{%- else -%}
<|observation|>{% for tr in m.content %}

<tool_response>
{{ tr.output if tr.output is defined else tr }}
</tool_response>{% endfor -%}
{% endif -%}
{%- elif m.role == 'system' -%}
<|system|>
{{ visible_text(m.content) }}
{%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
    <|assistant|>{{- '\n<think></think>' if (enable_thinking is defined and not enable_thinking) else '' -}}
{%- endif -%}
"""

EOS = "<|endoftext|>"
SPECIAL = [EOS, "[gMASK]", "<sop>", "<|system|>", "<|user|>", "<|assistant|>", "<|observation|>", "<think>",
           "</think>", "<tool_call>", "</tool_call>", "<arg_key>", "</arg_key>", "<arg_value>", "</arg_value>",
           "<tool_response>", "</tool_response>"]
CALL = ("<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>Paris</arg_value>\n"
        "<arg_key>days</arg_key>\n<arg_value>2</arg_value>\n</tool_call>")


def _reply(prompt: str) -> str:
    """The scripted model: a reasoned call, or the tool's result echoed (`<|observation|>` ends a call turn
    in GLM-4.5; the tests' tokenizer ends every turn with <|endoftext|>)."""
    if prompt.endswith("</tool_response><|assistant|>"):
        return "\n<think></think>\nIt is " + prompt.rsplit("<tool_response>\n", 1)[1].split("\n")[0] + "."
    return "\n<think>The user wants weather.</think>\nLet me look.\n" + CALL


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write_special_tokens_dir(tmp_path_factory.mktemp("glm"), SPECIAL, [GLM45, CALL], eos_token=EOS,
                                    template=GLM45)


@pytest.fixture(scope="module")
def served(model_dir):
    yield from serve_scripted(model_dir, _reply, EOS)


ASK = [{"role": "user", "content": "Weather in Paris?"}]


def test_server_returns_the_call_with_reasoning_and_content_apart(served):
    engine, client = served
    r = client.chat.completions.create(model="fake", messages=ASK, tools=[WEATHER])
    assert engine.prompts[-1].startswith("[gMASK]<sop><|system|>\n# Tools")
    assert engine.prompts[-1].endswith("<|user|>\nWeather in Paris?<|assistant|>")
    message = r.choices[0].message
    assert r.choices[0].finish_reason == "tool_calls"
    assert message.model_extra["reasoning_content"] == "The user wants weather."
    assert message.content == "Let me look."
    (call,) = message.tool_calls
    assert (call.function.name, json.loads(call.function.arguments)) == ("get_weather", {"city": "Paris", "days": 2})

    follow = client.chat.completions.create(model="fake", tools=[WEATHER], messages=ASK + [
        {"role": "assistant", "content": message.content, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": "sunny"}])
    assert follow.choices[0].message.content == "It is sunny."
    assert follow.choices[0].message.model_extra.get("reasoning_content") in (None, "")
    # the reasoning restored from the call id, the call as the template writes it (days typed by the schema)
    assert engine.prompts[-1].endswith("<|assistant|>\n<think>The user wants weather.</think>\nLet me look.\n" + CALL
                                       + "<|observation|>\n<tool_response>\nsunny\n</tool_response><|assistant|>")


def test_server_streams_the_same_reply(served):
    _, client = served
    chunks = list(client.chat.completions.create(model="fake", messages=ASK, tools=[WEATHER], stream=True))
    assert streamed_reply(chunks) == ("The user wants weather.", "Let me look.",
                                      [(0, "get_weather", {"city": "Paris", "days": 2})], "tool_calls")


def test_server_forces_a_named_call(served):
    engine, client = served
    client.chat.completions.create(model="fake", messages=ASK, tools=[WEATHER],
                                   tool_choice={"type": "function", "function": {"name": "get_weather"}})
    assert engine.prompts[-1].endswith("<|assistant|><tool_call>get_weather\n")


def test_prompts_with_calls_and_results_render_as_transformers_renders_them(model_dir):
    transformers = pytest.importorskip("transformers", reason="transformers renders the expected prompt")
    calls = [{"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}},
             {"id": "c2", "type": "function", "function": {"name": "get_time", "arguments": {"zone": ["CET", 1]}}}]
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Weather and time?"},
                {"role": "assistant", "content": "Checking.", "reasoning_content": "Two tools.", "tool_calls": calls},
                {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
                {"role": "tool", "tool_call_id": "c2", "content": "12:00"}]
    hf = transformers.AutoTokenizer.from_pretrained(str(model_dir))
    ours = FlashMoeTokenizer(model_dir)
    for thinking in (None, False):
        kwargs = {} if thinking is None else {"enable_thinking": thinking}
        want = hf.apply_chat_template(messages, tools=[WEATHER], tokenize=False, add_generation_prompt=True, **kwargs)
        text = ours.apply_chat_template(messages, tools=[WEATHER], **kwargs)
        assert text == want
        assert ours.encode(text) == hf.apply_chat_template(messages, tools=[WEATHER], tokenize=True,
                                                           return_dict=False, add_generation_prompt=True, **kwargs)
    assert '<arg_key>zone</arg_key>\n<arg_value>["CET", 1]</arg_value>' in text
    assert text.endswith("</tool_response><|assistant|>\n<think></think>")
