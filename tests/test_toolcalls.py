"""Incremental tool-call and reasoning parsing: split invariance (hypothesis), round trips through the
formats chat templates write, and malformed output returned as text."""

from __future__ import annotations

import json

from chat_helpers import parse_in_pieces
from chat_templates import MINIMAX_M2
from hypothesis import assume, given, settings, strategies as st

from flashmoe.serve.toolcalls import (DS_CALL_CLOSE, DS_CALL_OPEN, DS_CALLS_CLOSE, DS_CALLS_OPEN, DS_SEP, OutputParser,
                                      ParsedOutput, ToolCall, forced_call_prefix, opens_reasoning, parse_output,
                                      tool_call_format)

FRAGMENTS = ["<think>", "</think>", "<tool_call>", "</tool_call>", "<function=f>", "<parameter=a>", "</parameter>",
             "</function>", "<function=", "<parameter=", "<arg_key>", "</arg_key>", "<arg_value>", "</arg_value>",
             "<minimax:tool_call>", "</minimax:tool_call>", '<invoke name="f">', "</invoke>", '<parameter name="a">',
             "f\n", "{", "}", '"', "\\", ":", ",", '"name"', '"arguments"',
             "\n", " ", "x", "é", "🦊", "<", "/", ">", "<tool", "</thi", '{"name": "f", "arguments": {}}',
             DS_CALLS_OPEN, DS_CALLS_CLOSE, DS_CALL_OPEN, DS_CALL_CLOSE, DS_SEP, "<｜tool▁call"]
soup = st.lists(st.sampled_from(FRAGMENTS) | st.text(max_size=3), max_size=40).map("".join)
value_text = st.lists(st.sampled_from(FRAGMENTS) | st.text(max_size=4), max_size=12).map("".join)
plain_text = st.text(alphabet=st.sampled_from(list("abc xyz.,!?<>/=é世\n")), max_size=20)


def _parse_in_pieces(text: str, cuts: list[int], **kwargs) -> ParsedOutput:
    return parse_in_pieces(OutputParser(**kwargs), text, cuts)


@settings(max_examples=300, deadline=None)
@given(text=soup, cuts=st.lists(st.integers(0, 400), max_size=25), in_reasoning=st.booleans(),
       parse_tools=st.booleans())
def test_any_split_of_the_stream_gives_the_same_result(text, cuts, in_reasoning, parse_tools):
    kwargs = {"in_reasoning": in_reasoning, "parse_tools": parse_tools}
    assert _parse_in_pieces(text, cuts, **kwargs) == parse_output(text, **kwargs)


@settings(max_examples=150, deadline=None)
@given(text=soup)
def test_one_character_at_a_time_equals_whole(text):
    assert _parse_in_pieces(text, list(range(len(text)))) == parse_output(text)


def _content_text(draw) -> str:
    text = draw(plain_text).strip()
    assume("<think>" not in text and "<tool_call>" not in text)
    return text


def _xml_value_ok(value: str) -> bool:
    """The one ambiguity of the XML format: a value containing a </parameter> that is followed by what
    looks like the next parameter or the end of the call cannot be told from the value's end."""
    import re

    return not re.search(r"</parameter>\s*(<parameter=[^>\n]+>|$)", value + "\n")


def _glm_value_ok(value: str) -> bool:
    """GLM's ambiguities: a raw string that is also JSON reads back as JSON, and a value holding an
    </arg_value> followed by the next <arg_key> or the end cannot be told from the value's end."""
    import re

    try:
        json.loads(value)
        return False
    except ValueError:
        return not re.search(r"</arg_value>\s*(<arg_key>|$)", value)


def _invoke_value_ok(value: str) -> bool:
    """An invoke value reads back as written unless it is also JSON (typed like GLM's), starts or ends with
    a newline (templates' layout), or holds a closing tag that could end it."""
    try:
        json.loads(value)
        return False
    except ValueError:
        return not (value.startswith("\n") or value.endswith("\n") or "</parameter>" in value or "</invoke>" in value)


def _render_call(draw, name: str) -> tuple[str, dict]:
    """One call in the JSON, XML, GLM-4.5, DeepSeek-V3.1 or invoke format, as the templates write them, and
    its arguments."""
    fmt = draw(st.sampled_from(["json", "xml", "glm", "deepseek", "invoke"]))
    if fmt == "invoke":
        args = draw(st.dictionaries(st.sampled_from(["city", "code", "n"]), value_text | st.integers(), max_size=3))
        assume(all(_invoke_value_ok(v) for v in args.values() if isinstance(v, str)))
        params = "".join(f'<parameter name="{k}">{v if isinstance(v, str) else json.dumps(v)}</parameter>\n'
                         for k, v in args.items())
        return f'<minimax:tool_call>\n<invoke name="{name}">\n{params}</invoke>\n</minimax:tool_call>', args
    if fmt in ("json", "deepseek"):
        args = draw(st.dictionaries(st.sampled_from(["city", "code", "n"]),
                                    value_text | st.integers() | st.booleans() | st.lists(st.integers(), max_size=3),
                                    max_size=3))
        if fmt == "deepseek":
            arguments = json.dumps(args, ensure_ascii=False)
            return f"{DS_CALLS_OPEN}{DS_CALL_OPEN}{name}{DS_SEP}{arguments}{DS_CALL_CLOSE}{DS_CALLS_CLOSE}", args
        return "<tool_call>\n" + json.dumps({"name": name, "arguments": args}, ensure_ascii=False) + "\n</tool_call>", args
    if fmt == "xml":
        args = draw(st.dictionaries(st.sampled_from(["city", "code"]), value_text, max_size=3))
        assume(all(_xml_value_ok(v) for v in args.values()))
        params = "".join(f"<parameter={k}>\n{v}\n</parameter>\n" for k, v in args.items())
        return f"<tool_call>\n<function={name}>\n{params}</function>\n</tool_call>", args
    args = draw(st.dictionaries(st.sampled_from(["city", "code", "n"]),
                                value_text | st.integers() | st.lists(st.integers(), max_size=3), max_size=3))
    assume(all(_glm_value_ok(v) for v in args.values() if isinstance(v, str)))
    pairs = "".join(f"<arg_key>{k}</arg_key>\n<arg_value>{v if isinstance(v, str) else json.dumps(v)}</arg_value>\n"
                    for k, v in args.items())
    return f"<tool_call>{name}\n{pairs}</tool_call>", args


@st.composite
def conversations(draw):
    reasoning = draw(plain_text).strip()
    assume("</think>" not in reasoning)
    content = _content_text(draw)
    calls, rendered = [], []
    for _ in range(draw(st.integers(0, 3))):
        name = draw(st.sampled_from(["get_weather", "run_code", "f"]))
        text, args = _render_call(draw, name)
        rendered.append(text)
        calls.append(ToolCall(name, json.dumps(args, ensure_ascii=False)))
    text = (f"<think>\n{reasoning}\n</think>\n\n" if reasoning else "") + content
    text += ("\n" if content and rendered else "") + "\n".join(rendered)
    return text, ParsedOutput(content=content, reasoning=reasoning, tool_calls=calls)


@settings(max_examples=300, deadline=None)
@given(conv=conversations(), cuts=st.lists(st.integers(0, 600), max_size=30))
def test_template_formatted_output_round_trips(conv, cuts):
    text, expected = conv
    assert parse_output(text) == expected
    assert _parse_in_pieces(text, cuts) == expected


def test_tag_like_text_inside_argument_values_is_kept():
    text = ('<tool_call>\n{"name": "run_code", "arguments": {"code": "print(\\"</tool_call>\\")"}}\n</tool_call>\n'
            "<tool_call>\n<function=write>\n<parameter=body>\nclose with </parameter> then </tool_call>\n"
            "</parameter>\n</function>\n</tool_call>")
    out = parse_output(text)
    assert out.content == "" and out.reasoning == ""
    assert [c.name for c in out.tool_calls] == ["run_code", "write"]
    assert out.tool_calls[0].arguments_dict() == {"code": 'print("</tool_call>")'}
    assert out.tool_calls[1].arguments_dict() == {"body": "close with </parameter> then </tool_call>"}


def test_an_xml_value_holding_function_and_tool_call_closing_tags_on_their_own_lines():
    """The string parameter ends with </function>, and </tool_call> follows on the next line: still one value."""
    code = 'html = """\n</function>\n</tool_call>\n"""'
    text = (f"Writing it.\n<tool_call>\n<function=write_file>\n<parameter=path>\na.py\n</parameter>\n"
            f"<parameter=content>\n{code}\n</parameter>\n</function>\n</tool_call>")
    expected = ParsedOutput(content="Writing it.", tool_calls=[ToolCall("write_file", json.dumps(
        {"path": "a.py", "content": code}))])
    assert parse_output(text) == expected
    assert _parse_in_pieces(text, list(range(len(text)))) == expected


def test_malformed_calls_are_returned_as_text():
    cases = [
        "<tool_call>\n{not json}\n</tool_call>",
        '<tool_call>\n{"arguments": {}}\n</tool_call>',  # no name
        '<tool_call>\n{"name": "f", "arguments": [1]}\n</tool_call>',
        "<tool_call>\n<function=f>\n<parameter=a>\n1\n</function>\n</tool_call>",  # unclosed parameter
        '<tool_call>\n{"name": "f", "arguments": {"a": "cut off',  # generation stopped inside the call
        "<tool_call> is the tag I use",
    ]
    for text in cases:
        out = parse_output("Before " + text)
        assert out == ParsedOutput(content="Before " + text), text


def test_a_malformed_call_does_not_hide_a_later_good_one():
    out = parse_output('<tool_call>{oops}</tool_call>\n<tool_call>{"name": "f", "arguments": {"a": 1}}</tool_call>')
    assert out.content == "<tool_call>{oops}</tool_call>"
    assert out.tool_calls == [ToolCall("f", '{"a": 1}')]


def test_xml_values_are_typed_by_the_tool_schema():
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {
        "n": {"type": "integer"}, "x": {"type": "number"}, "ok": {"type": "boolean"}, "tags": {"type": "array"},
        "s": {"type": "string"}, "bad": {"type": "integer"}}}}}]
    params = {"n": "42", "x": "2.5", "ok": "True", "tags": '["a", 1]', "s": "007", "bad": "many", "free": "3"}
    body = "".join(f"<parameter={k}>\n{v}\n</parameter>\n" for k, v in params.items())
    out = parse_output(f"<tool_call>\n<function=f>\n{body}</function>\n</tool_call>", tools=tools)
    assert out.tool_calls[0].arguments_dict() == {"n": 42, "x": 2.5, "ok": True, "tags": ["a", 1], "s": "007",
                                                  "bad": "many", "free": "3"}


def test_reasoning_opened_by_the_prompt():
    prompt = "<|im_start|>assistant\n<think>\n"
    assert opens_reasoning(prompt)
    assert not opens_reasoning("<think>\nold\n</think>\n\nhi<|im_start|>assistant\n")
    out = parse_output("Let me think.\n</think>\n\nIt is 4.", in_reasoning=opens_reasoning(prompt))
    assert out == ParsedOutput(content="It is 4.", reasoning="Let me think.")


def test_without_tools_tool_call_tags_are_content():
    text = '<tool_call>\n{"name": "f", "arguments": {}}\n</tool_call>'
    assert parse_output(text, parse_tools=False) == ParsedOutput(content=text)


def test_forced_prefix_is_parsed_but_not_returned():
    for fmt, rest in [("json", '{"city": "Oslo"}}\n</tool_call>'),
                      ("xml", "<parameter=city>\nOslo\n</parameter>\n</function>\n</tool_call>")]:
        prefix = forced_call_prefix(fmt, "get_weather")
        out = parse_output(rest, prefix=prefix)
        assert out == ParsedOutput(tool_calls=[ToolCall("get_weather", '{"city": "Oslo"}')])
    out = parse_output('"name": "f", "arguments": {}}</tool_call>', prefix=forced_call_prefix("json") + "{")
    assert out.tool_calls == [ToolCall("f", "{}")]


def test_tool_call_format_is_read_from_the_template():
    from chat_templates import MIXTRAL, QWEN3, QWEN35_XML

    assert tool_call_format(QWEN3) == "json"
    assert tool_call_format(QWEN35_XML) == "xml"
    assert tool_call_format(MIXTRAL) is None
    assert tool_call_format(GLM45_TOOL_CALLS) == "glm"
    assert tool_call_format(MINIMAX_M2) == "invoke"


def test_minimax_m2_calls_rendered_by_its_template_parse_back_with_reasoning_apart():
    """One invoke block with two calls, as MiniMax-M2's template writes an assistant turn; values typed by
    the schema, else read as JSON when they are JSON; a closing tag inside a value does not end the call."""
    from flashmoe.serve.chat_template import render_chat

    calls = [{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris", "days": 3}}},
             {"type": "function", "function": {"name": "run_code", "arguments": {"code": "x</minimax:tool_call>"}}}]
    messages = [{"role": "user", "content": "hi"},
                {"role": "assistant", "content": "Checking.", "reasoning_content": "Two tools.", "tool_calls": calls}]
    rendered = render_chat(MINIMAX_M2, messages)
    reply = rendered.split("]~b]ai\n", 1)[1].removesuffix("[e~[\n")
    out = parse_output(reply)
    assert (out.reasoning, out.content) == ("Two tools.", "Checking.")
    assert out.tool_calls == [ToolCall("get_weather", '{"city": "Paris", "days": 3}'),
                              ToolCall("run_code", '{"code": "x</minimax:tool_call>"}')]
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"properties": {"n": {"type": "string"}}}}}]
    typed = parse_output('<minimax:tool_call>\n<invoke name="f">\n<parameter name="n">42</parameter>\n</invoke>\n'
                         '</minimax:tool_call>', tools=tools)
    assert typed.tool_calls == [ToolCall("f", '{"n": "42"}')]
    forced = parse_output('<parameter name="city">Oslo</parameter>\n</invoke>\n</minimax:tool_call>',
                          prefix=forced_call_prefix("invoke", "get_weather"))
    assert forced == ParsedOutput(tool_calls=[ToolCall("get_weather", '{"city": "Oslo"}')])
    broken = '<minimax:tool_call>\n<invoke name="f">\n<parameter name="n">1</parameter>\n</minimax:tool_call>'
    assert parse_output("Hi." + broken) == ParsedOutput(content="Hi." + broken)


# The tool-call part of GLM-4.5's chat template (zai-org/GLM-4.5 tokenizer_config.json / chat_template.jinja).
GLM45_TOOL_CALLS = """{%- for tc in m.tool_calls -%}
{%- if tc.function %}{%- set tc = tc.function %}{%- endif %}
{{ '\n<tool_call>' + tc.name }}
{% set _args = tc.arguments %}
{% for k, v in _args.items() %}
<arg_key>{{ k }}</arg_key>
<arg_value>{{ v | tojson(ensure_ascii=False) if v is not string else v }}</arg_value>
{% endfor %}
</tool_call>{% endfor %}"""


def test_glm45_calls_rendered_by_its_template_parse_back_with_reasoning_apart():
    from flashmoe.serve.chat_template import compile_template

    calls = [{"function": {"name": "get_weather", "arguments": {"city": "Paris", "days": 3, "units": ["C"]}}},
             {"function": {"name": "get_time", "arguments": {}}}]
    rendered = compile_template(GLM45_TOOL_CALLS).render(m={"tool_calls": calls})  # transformers' environment
    out = parse_output("<think>Weather, then time.</think>\nChecking." + rendered)
    assert out.reasoning == "Weather, then time." and out.content == "Checking."
    assert out.tool_calls == [ToolCall("get_weather", '{"city": "Paris", "days": 3, "units": ["C"]}'),
                              ToolCall("get_time", "{}")]
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"properties": {"n": {"type": "string"}}}}}]
    typed = parse_output("<tool_call>f\n<arg_key>n</arg_key>\n<arg_value>42</arg_value>\n</tool_call>", tools=tools)
    assert typed.tool_calls == [ToolCall("f", '{"n": "42"}')]  # the schema keeps a string a string
    forced = parse_output("<arg_key>city</arg_key>\n<arg_value>Oslo</arg_value>\n</tool_call>",
                          prefix=forced_call_prefix("glm", "get_weather"))
    assert forced == ParsedOutput(tool_calls=[ToolCall("get_weather", '{"city": "Oslo"}')])


def test_streamed_deltas_hold_back_partial_tags_only():
    parser = OutputParser()
    assert parser.feed("Hello <thi").content == "Hello"
    assert parser.feed("s is fine").content == " <this is fine"
    assert parser.feed("<think>").content == ""
    assert parser.feed("\nhm").reasoning == "hm"
    delta = parser.feed("\n</think>\n\nDone")
    assert (delta.reasoning, delta.content) == ("", "Done")


def test_whitespace_before_a_think_block_is_layout():
    """GLM-4.5's replies start with "\\n<think>" (its generation prompt ends at <|assistant|>)."""
    assert parse_output("\n<think>Plan.</think>\nAnswer.") == ParsedOutput(content="Answer.", reasoning="Plan.")
    assert parse_output("Before.\n<think>Plan.</think>\nAfter.") == ParsedOutput(content="Before.After.",
                                                                                reasoning="Plan.")
