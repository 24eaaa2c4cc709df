"""gpt-oss's harmony replies: the parser (split invariance, both header orders, malformed calls kept as text),
the tokenizer keeping harmony's special tokens in decoded text, and the servers over a model directory with a
harmony chat template (OpenAI and Anthropic wire formats, streamed and not)."""

from __future__ import annotations

import json

import pytest
from chat_helpers import WEATHER, FakeEngine, build_tokenizer, parse_in_pieces, write_model_dir
from chat_templates import HARMONY
from hypothesis import given, settings, strategies as st

from flashmoe.serve.harmony import HarmonyParser
from flashmoe.serve.parsed import ParsedOutput, ToolCall
from flashmoe.serve.tokenizer import Tokenizer
from flashmoe.serve.toolcalls import forced_call_prefix, reply_parser, tool_call_format

FRAGMENTS = ["<|start|>", "<|channel|>", "<|message|>", "<|end|>", "<|constrain|>", "<|call|>", "<|return|>",
             "assistant", "analysis", "final", "commentary", " to=functions.f", " json", "json", "{", "}", '"a": 1',
             "<|", "|>", "<", " ", "\n", "x", "é"]
soup = st.lists(st.sampled_from(FRAGMENTS) | st.text(max_size=3), max_size=40).map("".join)


def _parse(text: str, cuts: list[int] = (), **kwargs) -> ParsedOutput:
    return parse_in_pieces(HarmonyParser(**kwargs), text, cuts)


@settings(max_examples=300, deadline=None)
@given(text=soup, cuts=st.lists(st.integers(0, 400), max_size=25), parse_tools=st.booleans())
def test_any_split_of_the_stream_gives_the_same_result(text, cuts, parse_tools):
    assert _parse(text, cuts, parse_tools=parse_tools) == _parse(text, parse_tools=parse_tools)
    assert _parse(text, range(len(text)), parse_tools=parse_tools) == _parse(text, parse_tools=parse_tools)


def test_analysis_is_reasoning_and_final_is_content():
    text = "<|channel|>analysis<|message|>2 + 2 is 4.<|end|><|start|>assistant<|channel|>final<|message|>It is 4."
    assert _parse(text) == ParsedOutput(content="It is 4.", reasoning="2 + 2 is 4.")


@pytest.mark.parametrize("header", [
    "<|channel|>commentary to=functions.get_weather <|constrain|>json",  # the recipient after the channel
    " to=functions.get_weather<|channel|>commentary json",  # and before it, as gpt-oss's template writes it
])
def test_a_call_in_either_header_order(header):
    text = ("<|channel|>analysis<|message|>Look it up.<|end|><|start|>assistant" + header +
            '<|message|>{"city": "Paris", "note": "<|channel|> is text here"}')
    # A call's body is held until the reply ends (<|call|> is an end-of-sequence token, never decoded).
    assert _parse(text) == ParsedOutput(reasoning="Look it up.", tool_calls=[
        ToolCall("get_weather", json.dumps({"city": "Paris", "note": "<|channel|> is text here"}))])


def test_a_preamble_on_commentary_is_content():
    text = ("<|channel|>commentary<|message|>Checking the weather.<|end|>"
            "<|start|>assistant<|channel|>commentary to=functions.get_weather json<|message|>{}")
    assert _parse(text) == ParsedOutput(content="Checking the weather.", tool_calls=[ToolCall("get_weather", "{}")])


def test_malformed_calls_and_calls_without_tools_are_content_with_their_markup():
    broken = "<|channel|>commentary to=functions.f json<|message|>{not json"
    assert _parse(broken) == ParsedOutput(content=broken)
    call = '<|channel|>commentary to=functions.f json<|message|>{"a": 1}'
    assert _parse(call, parse_tools=False) == ParsedOutput(content=call)
    assert _parse("<|channel|>final") == ParsedOutput(content="<|channel|>final")  # cut off inside a header


def test_streamed_deltas_hold_back_partial_markup_only():
    parser = HarmonyParser()
    assert parser.feed("<|channel|>final<|message|>Hel") == ParsedOutput(content="Hel")
    assert parser.feed("lo<|e") == ParsedOutput(content="lo")
    assert parser.feed("nd|>") == ParsedOutput()
    assert parser.finish() == ParsedOutput()


def test_a_call_rendered_by_the_template_parses_back():
    """The assistant turn gpt-oss's template writes for a call, read back as the reply it was."""
    messages = [{"role": "user", "content": "weather?"},
                {"role": "assistant", "reasoning_content": "Need the tool.", "tool_calls": [
                    {"id": "c1", "type": "function", "function": {"name": "get_weather",
                                                                  "arguments": {"city": "Oslo", "days": 3}}}]}]
    from flashmoe.serve.chat_template import render_chat

    rendered = render_chat(HARMONY, messages, tools=[WEATHER])
    reply = rendered.split("<|start|>user<|message|>weather?<|end|><|start|>assistant", 1)[1]
    assert reply.endswith("<|call|>")
    out = _parse(reply.removesuffix("<|call|>"))
    assert out.reasoning == "Need the tool." and out.content == ""
    assert [(c.name, c.arguments_dict()) for c in out.tool_calls] == [("get_weather", {"city": "Oslo", "days": 3})]


def test_format_forced_prefix_and_parser_are_chosen_by_the_template():
    assert tool_call_format(HARMONY) == "harmony"
    assert isinstance(reply_parser("harmony", "<|start|>assistant"), HarmonyParser)
    prefix = forced_call_prefix("harmony", "get_weather")
    assert prefix == "<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>"
    out = _parse('{"city": "Rome"}', prefix=prefix)
    assert out == ParsedOutput(tool_calls=[ToolCall("get_weather", '{"city": "Rome"}')])
    out = _parse('f <|constrain|>json<|message|>{}', prefix=forced_call_prefix("harmony"))
    assert out == ParsedOutput(tool_calls=[ToolCall("f", "{}")])


def test_the_tokenizer_keeps_harmony_markup_and_drops_other_special_tokens(tmp_path):
    tok = Tokenizer(write_model_dir(tmp_path / "m", HARMONY, eos_token="<|return|>"))
    text = "<|channel|>final<|message|>Hi<|end|><|endoftext|>"
    ids = tok.encode(text)
    assert tok.encode("<|channel|>") == [build_tokenizer().token_to_id("<|channel|>")]
    assert tok.decode(ids) == "<|channel|>final<|message|>Hi<|end|>"
    assert tok.decode(ids, skip_special_tokens=False) == text


# ---- the servers over a harmony model directory --------------------------------------------------

def _last_user(prompt: str) -> str:
    return prompt.split("<|start|>user<|message|>")[-1].split("<|end|>")[0]


def harmony_reply(prompt: str) -> str:
    """The scripted model: a call for "weather", an answer after a tool result, else an echo."""
    if "<|start|>functions.get_weather to=assistant" in prompt.rsplit("<|start|>user", 1)[-1]:
        result = json.loads(prompt.rsplit("<|message|>", 1)[1].split("<|end|>")[0])
        return f"<|channel|>final<|message|>It is {result}.<|return|>"
    if _last_user(prompt) == "weather":
        return ('<|channel|>analysis<|message|>The user wants weather.<|end|><|start|>assistant<|channel|>commentary'
                ' to=functions.get_weather <|constrain|>json<|message|>{"city": "Paris", "days": 2}<|call|>')
    return f"<|channel|>analysis<|message|>Echo it.<|end|><|start|>assistant<|channel|>final<|message|>" \
           f"{_last_user(prompt)}<|return|>"


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    from flashmoe.serve.server import FlashMoeServer, RunningServer

    ids = [build_tokenizer().token_to_id(t) for t in ("<|return|>", "<|call|>")]
    model_dir = write_model_dir(tmp_path_factory.mktemp("harmony"), HARMONY, eos_token="<|return|>", eos_token_ids=ids)
    tokenizer = Tokenizer(model_dir)
    engine = FakeEngine(tokenizer, harmony_reply, max_position_embeddings=1024, eos_token="<|return|>")
    app = FlashMoeServer(engine, tokenizer, "fake", context=1024)
    with RunningServer(app) as running:
        yield engine, running.url
    app.close()


openai = pytest.importorskip("openai", reason="the official client is the test's oracle of the API")


@pytest.mark.parametrize("stream", [False, True])
def test_openai_call_then_answer_from_the_tool_result(served, stream):
    engine, url = served
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=30)
    messages = [{"role": "user", "content": "weather"}]
    r = client.chat.completions.create(model="fake", messages=messages, tools=[WEATHER], stream=stream)
    if stream:
        deltas = [c.choices[0].delta for c in r]
        reasoning = "".join(d.model_extra.get("reasoning_content") or "" for d in deltas)
        content = "".join(d.content or "" for d in deltas)
        calls = [tc for d in deltas for tc in d.tool_calls or []]
        (call,) = calls
        name, arguments, call_id = call.function.name, call.function.arguments, call.id
    else:
        message = r.choices[0].message
        assert r.choices[0].finish_reason == "tool_calls"
        reasoning, content = message.model_extra["reasoning_content"], message.content or ""
        (call,) = message.tool_calls
        name, arguments, call_id = call.function.name, call.function.arguments, call.id
    assert (reasoning, content, name, json.loads(arguments)) == (
        "The user wants weather.", "", "get_weather", {"city": "Paris", "days": 2})
    messages += [{"role": "assistant", "content": None, "tool_calls": [
        {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}]},
        {"role": "tool", "tool_call_id": call_id, "content": "sunny"}]
    follow = client.chat.completions.create(model="fake", messages=messages, tools=[WEATHER])
    assert follow.choices[0].message.content == "It is sunny."
    prompt = engine.prompts[-1]
    # the call and its reasoning (kept by the server for the call id) rendered back as the model wrote them
    assert prompt.endswith("<|start|>assistant<|channel|>analysis<|message|>The user wants weather.<|end|>"
                           '<|start|>assistant to=functions.get_weather<|channel|>commentary json<|message|>'
                           '{"city": "Paris", "days": 2}<|call|><|start|>functions.get_weather to=assistant'
                           '<|channel|>commentary<|message|>"sunny"<|end|><|start|>assistant')


def test_openai_plain_answer_and_a_forced_call(served):
    engine, url = served
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=30)
    r = client.chat.completions.create(model="fake", messages=[{"role": "user", "content": "Bonjour"}])
    assert r.choices[0].message.content == "Bonjour"
    assert r.choices[0].message.model_extra["reasoning_content"] == "Echo it."
    client.chat.completions.create(model="fake", messages=[{"role": "user", "content": "x"}], tools=[WEATHER],
                                   tool_choice={"type": "function", "function": {"name": "get_weather"}})
    assert engine.prompts[-1].endswith("<|start|>assistant<|channel|>commentary to=functions.get_weather "
                                       "<|constrain|>json<|message|>")


@pytest.mark.parametrize("stream", [False, True])
def test_anthropic_tool_use_with_thinking(served, stream):
    anthropic = pytest.importorskip("anthropic", reason="the official client is the test's oracle of the API")
    client = anthropic.Anthropic(base_url=served[1], api_key="unused", max_retries=0, timeout=30)
    tools = [{"name": "get_weather", "description": "Weather in a city.",
              "input_schema": WEATHER["function"]["parameters"]}]
    kwargs = dict(model="fake", max_tokens=200, tools=tools, messages=[{"role": "user", "content": "weather"}],
                  thinking={"type": "enabled", "budget_tokens": 100})
    if stream:
        with client.messages.stream(**kwargs) as events:
            message = events.get_final_message()
    else:
        message = client.messages.create(**kwargs)
    assert message.stop_reason == "tool_use"
    thinking, use = message.content
    assert (thinking.type, thinking.thinking) == ("thinking", "The user wants weather.")
    assert (use.type, use.name, use.input) == ("tool_use", "get_weather", {"city": "Paris", "days": 2})


def test_a_tiny_gpt_oss_checkpoint_with_the_harmony_template_chats(tmp_path):
    """A random gpt_oss model directory (MXFP4 experts) carrying the harmony template: the prompt encodes its
    markup as single special tokens, and the reply is the harmony parse of the generated tokens' text."""
    from chat_helpers import tiny_engine

    from flashmoe.serve.chat import ChatSession
    from flashmoe.serve.sampling import Sampler
    from flashmoe.serve.session import Session

    config = dict(model_type="gpt_oss", vocab_size=1000, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, intermediate_size=64, num_local_experts=4,
                  num_experts_per_tok=2, sliding_window=8, max_position_embeddings=1024)
    engine, tokenizer = tiny_engine(tmp_path / "model", HARMONY, config)
    messages = [{"role": "user", "content": "Hi"}]
    prompt = tokenizer.encode(tokenizer.apply_chat_template(messages))
    assert prompt.count(build_tokenizer().token_to_id("<|start|>")) == 3  # system, user, the generation prompt
    steps = list(Session(engine, tokenizer).generate(prompt, Sampler(temperature=0.0), 12))
    text = "".join(step.text for step in steps)
    assert text == tokenizer.decode([step.token_id for step in steps]) and len(steps) >= 11
    reply = ChatSession(engine, tokenizer, Sampler(temperature=0.0), max_tokens=12).send("Hi")
    assert reply == _parse(text, parse_tools=False)
