"""Incremental parsing of model output into content, reasoning and tool calls.

Five tool-call formats. Three open with `<tool_call>` and are told apart by the characters after it:

- Qwen3 / Qwen3.5 JSON (Hermes style), as Qwen3's chat template writes it:
  `<tool_call>\\n{"name": "get_weather", "arguments": {"city": "Paris"}}\\n</tool_call>`
- Qwen3-Coder XML, as Qwen3-Coder's and Qwen3.5's templates write it:
  `<tool_call>\\n<function=get_weather>\\n<parameter=city>\\nParis\\n</parameter>\\n</function>\\n</tool_call>`
  (parameter values are raw text; they are converted with the tool's JSON schema when it gives a type, as
  vLLM's qwen3_coder parser does).
- GLM-4.5 key/value, as GLM-4.5's template writes it (the function name right after the tag):
  `<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>Paris</arg_value>\n</tool_call>`
  (values are raw text for strings and JSON otherwise: typed by the schema like XML values, else parsed as
  JSON when they are JSON, as vLLM's glm45 parser does).

The fifth, MiniMax-M2's invoke blocks, as its template writes them (one block may hold several calls):
  `<minimax:tool_call>\n<invoke name="get_weather">\n<parameter name="city">Paris</parameter>\n</invoke>\n</minimax:tool_call>`
  (values typed like GLM's: raw text for strings, JSON otherwise, as vLLM's minimax_m2 parser does).

A template's format is read from the template itself (tool_call_format); harmony replies (gpt-oss) have a
parser of their own (flashmoe.serve.harmony), chosen by reply_parser.

The fourth is DeepSeek-V3.1's tokens, as its chat template writes them: a block of calls, each a function
name and its JSON arguments,
  `<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>get_weather<｜tool▁sep｜>{"city": "Paris"}<｜tool▁call▁end｜>`
  `<｜tool▁call▁begin｜>...<｜tool▁call▁end｜><｜tool▁calls▁end｜>` (calls chained without separators; the
  block's end may be missing when generation stops at end-of-sequence right after the last call).

`<think>...</think>` is reasoning (reasoning_content in the OpenAI API), never content. Qwen3.5-style
templates open `<think>` in the prompt itself; `opens_reasoning(prompt)` tells the parser to start inside it.

Robustness rules:
- A closing tag inside an argument value is not the end of the call: a call ends at the first
  `</tool_call>` (`<｜tool▁call▁end｜>`) at which the text so far is a complete call (for JSON and DeepSeek's
  arguments: at which the text is not inside a string; for XML: not inside a parameter value, which may hold `</function>` and `</tool_call>` too);
  `</parameter>` ends a value only when followed by the next `<parameter=...>` or `</function>`.
- Anything that turns out not to be a well-formed call (bad JSON, no name, prose after `<tool_call>`, output
  cut off inside a call) is returned as content, with the tags, exactly as generated; parsing never raises.
- Whitespace that templates put around blocks (newlines before and after `<think>`, before `</think>`,
  between content and calls) is not content.

The result depends only on the whole text, never on how it was split into pieces (tests/test_toolcalls.py
checks this with hypothesis).
"""

from __future__ import annotations

import json
import re

from flashmoe.serve import harmony
from flashmoe.serve.parsed import ParsedOutput, ReplyParser, ToolCall, held_suffix

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"
BLOCK_OPEN, BLOCK_CLOSE = "<minimax:tool_call>", "</minimax:tool_call>"
_INVOKE = re.compile(r'<invoke name="([^"\n]+)">')
_INVOKE_PARAMETER = re.compile(r'<parameter name="([^"\n]+)">')
_INVOKE_CLOSE = "</invoke>"
_FUNCTION = re.compile(r"\s*<function=([^>\n]+)>")
_PARAMETER = re.compile(r"<parameter=([^>\n]+)>")
_PARAMETER_CLOSE, _FUNCTION_CLOSE = "</parameter>", "</function>"
_GLM_NAME = re.compile(r"[\w.\-]+")
_ARG_KEY = re.compile(r"<arg_key>(.*?)</arg_key>\s*<arg_value>", re.S)
_ARG_VALUE_CLOSE = "</arg_value>"
DS_CALLS_OPEN, DS_CALLS_CLOSE = "<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>"
DS_CALL_OPEN, DS_CALL_CLOSE, DS_SEP = "<｜tool▁call▁begin｜>", "<｜tool▁call▁end｜>", "<｜tool▁sep｜>"

#: Every tag the parser reads. Tokenizers may declare these special tokens, which decoding skips by
#: default; flashmoe.serve.tokenizer keeps them in decoded text so that they reach the parser.
MARKUP_TAGS = (THINK_OPEN, THINK_CLOSE, CALL_OPEN, CALL_CLOSE, "<arg_key>", "</arg_key>", "<arg_value>",
               _ARG_VALUE_CLOSE, DS_CALLS_OPEN, DS_CALLS_CLOSE, DS_CALL_OPEN, DS_CALL_CLOSE, DS_SEP, BLOCK_OPEN,
               BLOCK_CLOSE) + harmony.MARKUP
_CLOSE_OF = {CALL_OPEN: CALL_CLOSE, DS_CALL_OPEN: DS_CALL_CLOSE, BLOCK_OPEN: BLOCK_CLOSE}


def opens_reasoning(prompt: str) -> bool:
    """True when the prompt leaves a `<think>` block open, so generation starts inside reasoning."""
    return prompt.rfind(THINK_OPEN) > prompt.rfind(THINK_CLOSE)


def tool_call_format(template: str | None) -> str | None:
    """The reply format a chat template writes: 'harmony' (the whole reply, tool calls included), or the
    tool-call format 'deepseek', 'invoke', 'xml', 'glm' or 'json' it renders (or describes to the model);
    None for a template that renders no tool calls."""
    if template and harmony.CHANNEL in template:
        return "harmony"
    if template and DS_CALL_OPEN in template:
        return "deepseek"
    if template and BLOCK_OPEN in template:
        return "invoke"
    if not template or CALL_OPEN not in template:
        return None
    return "xml" if "<function=" in template else "glm" if "<arg_key>" in template else "json"


def reply_parser(fmt: str | None, prompt: str, *, parse_tools: bool = True, tools: list[dict] | None = None,
                 prefix: str = "") -> "OutputParser | harmony.HarmonyParser":
    """The parser for a reply to `prompt` in format `fmt` (tool_call_format of the prompt's template):
    HarmonyParser for harmony, else an OutputParser that starts inside reasoning when the prompt opened it.
    Arguments as OutputParser's."""
    if fmt == "harmony":
        return harmony.HarmonyParser(parse_tools=parse_tools, prefix=prefix)
    return OutputParser(in_reasoning=opens_reasoning(prompt), parse_tools=parse_tools, tools=tools, prefix=prefix)


def forced_call_prefix(fmt: str | None, name: str | None = None) -> str:
    """Text that, appended to a prompt, makes the model continue inside a tool call (tool_choice 'required'
    or a named function). The parser must be fed the same text first (OutputParser(prefix=...))."""
    if fmt == "harmony":
        return harmony.forced_harmony_call(name)
    if fmt == "invoke":
        return f'{BLOCK_OPEN}\n<invoke name="{name}">\n' if name else f'{BLOCK_OPEN}\n<invoke name="'
    if fmt == "deepseek":
        return DS_CALLS_OPEN + DS_CALL_OPEN + (f"{name}{DS_SEP}" if name else "")
    if fmt == "xml":
        return f"{CALL_OPEN}\n<function={name}>\n" if name else f"{CALL_OPEN}\n<function="
    if fmt == "glm":
        return f"{CALL_OPEN}{name}\n" if name else CALL_OPEN
    return f'{CALL_OPEN}\n{{"name": "{name}", "arguments": ' if name else f"{CALL_OPEN}\n"


def _json_open_string(text: str) -> bool:
    """Whether text, read as the start of a JSON document, ends inside a string literal."""
    inside = escaped = False
    for ch in text:
        if escaped:
            escaped = False
        elif ch == "\\" and inside:
            escaped = True
        elif ch == '"':
            inside = not inside
    return inside


def _xml_open_value(text: str, opener: re.Pattern = _PARAMETER) -> bool:
    """Whether `text` (an XML or invoke call's body so far) ends inside a parameter value: its last
    parameter tag (`opener`) has no `</parameter>` after it."""
    last = None
    for last in opener.finditer(text):
        pass
    return last is not None and text.find(_PARAMETER_CLOSE, last.end()) < 0


def _key_values(body: str, opener: re.Pattern, close: str) -> list[tuple[str, str]] | None:
    """The (key, raw value) pairs of a call body made only of `opener` (group 1: the key) value `close`
    blocks and whitespace (XML's <parameter=k>v</parameter>, GLM's <arg_key>k</arg_key><arg_value>v</arg_value>);
    None when anything else is there. A value ends at the `close` followed by the next opener or the end, so
    values may hold the closing tag themselves."""
    pairs, pos = [], 0
    while True:
        while pos < len(body) and body[pos].isspace():
            pos += 1
        if pos == len(body):
            return pairs
        key = opener.match(body, pos)
        if not key:
            return None
        end = body.find(close, key.end())
        while end >= 0 and (after := body[end + len(close):].lstrip()) and not opener.match(after):
            end = body.find(close, end + 1)
        if end < 0:
            return None
        pairs.append((key.group(1).strip(), body[key.end():end]))
        pos = end + len(close)


def _json_or_text(value: str):
    """A GLM value without a schema type: its template writes non-strings as JSON, strings raw."""
    try:
        return json.loads(value)
    except ValueError:
        return value


def _glm_open_value(text: str) -> bool:
    """Whether a GLM call body ends inside an <arg_value> (its last value not closed by a </arg_value> that
    ends the call)."""
    opened = text.rfind("<arg_value>")
    return opened >= 0 and not text[opened:].rstrip().endswith(_ARG_VALUE_CLOSE)


def _inside_value(kind: str, body: str) -> bool:
    """Whether the closing tag found right after `body` (a call's text that did not parse) lies inside an
    argument value, so that the call goes on after it."""
    if kind == "json":
        return _json_open_string(body)
    if kind == "xml":  # an XML value may hold </function> too
        return not body.rstrip().endswith(_FUNCTION_CLOSE) or _xml_open_value(body)
    if kind == "glm":
        return _glm_open_value(body)
    if kind == "invoke":
        return _xml_open_value(body, _INVOKE_PARAMETER)
    return _json_open_string(body.partition(DS_SEP)[2])


def _convert(value: str, schema: dict | None):
    """An XML parameter value converted per its JSON-schema type; the raw text when untyped or invalid."""
    kind = (schema or {}).get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), None)
    if kind in (None, "string"):
        return value
    text = value.strip()
    if kind == "boolean":
        return {"true": True, "false": False}.get(text.lower(), value)
    try:
        parsed = json.loads(text)
    except ValueError:
        return value
    expected = {"integer": (int,), "number": (int, float), "object": (dict,), "array": (list,)}.get(kind)
    if expected is None or (isinstance(parsed, expected) and not isinstance(parsed, bool)):
        return parsed
    return value


class OutputParser(ReplyParser):
    """Routes generated text, fed in pieces, into content, reasoning and tool calls.

    Args:
        in_reasoning: generation starts inside a `<think>` block the prompt opened (opens_reasoning).
        parse_tools: recognise tool calls; when False (no tools offered) it is ordinary content.
        tools: the request's tool schemas ({"type": "function", "function": {"name", "parameters"}}), used to
            type XML parameter values.
        prefix: text the prompt already contains as the start of the model's reply (forced_call_prefix); it
            is parsed first, and appears in the output only as part of a malformed call returned as content.
    """

    def __init__(self, *, in_reasoning: bool = False, parse_tools: bool = True, tools: list[dict] | None = None,
                 prefix: str = ""):
        super().__init__()
        self._mode = "reasoning" if in_reasoning else "content"  # or "call", or "block" (between DeepSeek calls)
        self._tags = (THINK_OPEN, CALL_OPEN, DS_CALLS_OPEN, BLOCK_OPEN) if parse_tools else (THINK_OPEN,)
        self._schemas = {}
        for tool in tools or ():
            fn = tool.get("function", tool) if isinstance(tool, dict) else {}
            if isinstance(fn, dict) and isinstance(fn.get("name"), str):
                props = (fn.get("parameters") or {}).get("properties") or {}
                self._schemas[fn["name"]] = props if isinstance(props, dict) else {}
        self._lstrip = in_reasoning  # drop whitespace at the start of the current block
        self._pending = {"content": "", "reasoning": ""}  # trailing whitespace held until we see what follows
        self._ws_before_call = ""
        self._scan_from = 0  # in call mode, where the next search for the closing tag starts
        self._call_open = CALL_OPEN  # the tag that opened the current call
        self._block_open = ""  # a DeepSeek block's opening tag, until a call in it parses (content if none does)
        self._block_parsed = False  # a call of the current DeepSeek block parsed
        self._calls_seen = False
        if prefix:
            self.feed(prefix)

    def _flush(self) -> None:
        """End of generation: release held text (an unterminated call has become content)."""
        if not self._calls_seen:
            self._out.content += self._pending["content"]
        self._pending = {"content": "", "reasoning": ""}

    # ---- emitters ------------------------------------------------------------------------------

    def _emit(self, kind: str, text: str) -> None:
        """Append text to content or reasoning, dropping whitespace at block starts and holding trailing
        whitespace (it is dropped at block ends and before tool calls)."""
        if self._lstrip:
            text = text.lstrip()
            if not text:
                return
            self._lstrip = False
        body = text.rstrip()
        if body:
            setattr(self._out, kind, getattr(self._out, kind) + self._pending[kind] + body)
            self._pending[kind] = ""
        self._pending[kind] += text[len(body):]

    def _emit_raw_call(self, text: str) -> None:
        """A would-be call that is not one: its exact text (and the whitespace and unused block tag before it)
        is content."""
        self._pending["content"] = self._ws_before_call
        self._ws_before_call = ""
        self._emit("content", self._block_open + text)
        self._block_open = ""

    # ---- the state machine ---------------------------------------------------------------------

    def _run(self, final: bool) -> None:
        while True:
            before = (self._mode, len(self._buf))
            if self._mode == "content":
                self._step_text("content", self._tags, final)
            elif self._mode == "reasoning":
                self._step_text("reasoning", (THINK_CLOSE,), final)
            elif self._mode == "block":
                self._step_block(final)
            else:
                self._step_call(final)
            if (self._mode, len(self._buf)) == before:
                return

    def _step_text(self, kind: str, tags: tuple[str, ...], final: bool) -> None:
        hits = [(i, tag) for tag in tags if (i := self._buf.find(tag)) >= 0]
        if not hits:
            keep = 0 if final else held_suffix(self._buf, tags)
            self._emit(kind, self._buf[: len(self._buf) - keep])
            self._buf = self._buf[len(self._buf) - keep :]
            if final and kind == "reasoning":
                self._pending["reasoning"] = ""
            return
        i, tag = min(hits)
        self._emit(kind, self._buf[:i])
        self._buf = self._buf[i + len(tag) :]
        if tag in (CALL_OPEN, DS_CALLS_OPEN, BLOCK_OPEN):
            self._mode, self._scan_from, self._call_open = ("block" if tag == DS_CALLS_OPEN else "call"), 0, tag
            self._block_open, self._block_parsed = (tag if tag == DS_CALLS_OPEN else ""), False
            self._ws_before_call, self._pending["content"] = self._pending["content"], ""
            return
        if tag == THINK_OPEN:  # whitespace before the block is layout (GLM-4.5 replies start "\n<think>")
            self._mode = "reasoning"
            self._pending["content"] = ""
        else:  # </think>: the reasoning's trailing newlines and the content's leading ones are layout
            self._mode = "content"
            self._pending["reasoning"] = ""
        self._lstrip = True

    def _step_block(self, final: bool) -> None:
        """Between DeepSeek calls: the next call, the block's end, or (anything else) the end of the block,
        whose text is parsed as content."""
        stripped = self._buf.lstrip()
        if stripped.startswith(DS_CALL_OPEN):
            self._buf = stripped[len(DS_CALL_OPEN):]
            self._mode, self._scan_from, self._call_open = "call", 0, DS_CALL_OPEN
        elif stripped.startswith(DS_CALLS_CLOSE):
            parsed = self._block_parsed
            self._leave_call(len(self._buf) - len(stripped) + len(DS_CALLS_CLOSE), strip_after=parsed)
            if not parsed:  # a block of malformed calls is content, its tags included
                self._emit_raw_call(DS_CALLS_CLOSE)
        elif final or not (DS_CALL_OPEN.startswith(stripped) or DS_CALLS_CLOSE.startswith(stripped)):
            self._mode = "content"
            self._emit_raw_call("")

    def _step_call(self, final: bool) -> None:
        close = _CLOSE_OF[self._call_open]
        kind = {DS_CALL_OPEN: "deepseek", BLOCK_OPEN: "invoke"}.get(self._call_open) or \
            self._body_kind(self._buf.lstrip())
        if kind == "text":  # prose that mentions the tag: the tag is content, the rest is parsed again
            self._leave_call(0, strip_after=False)
            self._emit_raw_call(CALL_OPEN)
            return
        while kind is not None:
            i = self._buf.find(close, self._scan_from)
            if i < 0:
                self._scan_from = max(0, len(self._buf) - len(close) + 1)
                break
            calls = self._parse(kind, self._buf[:i])
            if calls is not None:
                self._out.tool_calls.extend(calls)
                self._calls_seen = True
                self._ws_before_call = self._block_open = ""
                self._block_parsed = True
                self._leave_call(i + len(close), strip_after=True)
                return
            if _inside_value(kind, self._buf[:i]):
                self._scan_from = i + 1
                continue
            end = i + len(close)
            text = self._call_open + self._buf[:end]
            self._leave_call(end, strip_after=False)
            self._emit_raw_call(text)
            return
        if final:
            text = self._call_open + self._buf
            self._leave_call(len(self._buf), strip_after=False)
            self._emit_raw_call(text)

    def _leave_call(self, consumed: int, strip_after: bool) -> None:
        """Drop `consumed` characters; go on after the call (in its DeepSeek block, if any)."""
        self._buf = self._buf[consumed:]
        self._mode = "block" if self._mode == "call" and self._call_open == DS_CALL_OPEN else "content"
        self._lstrip = strip_after

    @staticmethod
    def _body_kind(stripped: str) -> str | None:
        """'json', 'xml', 'text' (not a call), or None while the start is still ambiguous."""
        if not stripped:
            return None
        if stripped[0] == "{":
            return "json"
        if "<function=".startswith(stripped[:10]):
            return "xml" if len(stripped) >= 10 else None
        name = _GLM_NAME.match(stripped)  # GLM-4.5: a function name, then its arguments or the closing tag
        if name is None:
            return "text"
        if name.end() == len(stripped):
            return None
        return "glm" if stripped[name.end()] in "\n<" else "text"

    def _parse(self, kind: str, body: str) -> list[ToolCall] | None:
        """The calls of one call body (one, or for an invoke block any number), or None when malformed."""
        if kind == "invoke":
            return self._parse_invoke(body)
        parse = {"json": self._parse_json, "xml": self._parse_xml, "glm": self._parse_glm,
                 "deepseek": self._parse_deepseek}
        call = parse[kind](body)
        return None if call is None else [call]

    def _call(self, name: str, pairs: list[tuple[str, str]], untyped) -> ToolCall:
        """A call from raw (parameter, value) pairs: values typed by the tool's schema where it gives a type
        (_convert), else by `untyped`."""
        schema, args = self._schemas.get(name, {}), {}
        for param, value in pairs:
            typed = schema.get(param) if isinstance(schema.get(param), dict) else None
            args[param] = _convert(value, typed) if typed else untyped(value)
        return ToolCall(name, json.dumps(args, ensure_ascii=False))

    def _parse_invoke(self, body: str) -> list[ToolCall] | None:
        invokes = _key_values(body, _INVOKE, _INVOKE_CLOSE)
        if not invokes:
            return None
        calls = []
        for name, inner in invokes:
            pairs = _key_values(inner, _INVOKE_PARAMETER, _PARAMETER_CLOSE)
            if pairs is None:
                return None
            calls.append(self._call(name, [(k, _strip_newline(v)) for k, v in pairs], _json_or_text))
        return calls

    @staticmethod
    def _parse_deepseek(body: str) -> ToolCall | None:
        name, sep, arguments = body.partition(DS_SEP)
        name = name.strip()
        if not sep or not _GLM_NAME.fullmatch(name):
            return None
        try:
            args = json.loads(arguments)
        except ValueError:
            return None
        return ToolCall(name, json.dumps(args, ensure_ascii=False)) if isinstance(args, dict) else None

    def _parse_glm(self, body: str) -> ToolCall | None:
        body = body.strip()
        name = _GLM_NAME.match(body)
        if name is None:
            return None
        pairs = _key_values(body[name.end():], _ARG_KEY, _ARG_VALUE_CLOSE)
        return None if pairs is None else self._call(name.group(0), pairs, _json_or_text)

    @staticmethod
    def _parse_json(body: str) -> ToolCall | None:
        try:
            obj = json.loads(body)
        except ValueError:
            return None
        if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not obj["name"]:
            return None
        args = obj.get("arguments", obj.get("parameters", {}))
        if isinstance(args, str):
            try:
                args = json.loads(args)
            except ValueError:
                return None
        if not isinstance(args, dict):
            return None
        return ToolCall(obj["name"], json.dumps(args, ensure_ascii=False))

    def _parse_xml(self, body: str) -> ToolCall | None:
        m = _FUNCTION.match(body)
        inner = body[m.end() :].rstrip() if m else ""
        if not m or not inner.endswith(_FUNCTION_CLOSE):
            return None
        pairs = _key_values(inner[: -len(_FUNCTION_CLOSE)], _PARAMETER, _PARAMETER_CLOSE)
        if pairs is None:
            return None
        return self._call(m.group(1).strip(), [(k, _strip_newline(v)) for k, v in pairs], str)


def _strip_newline(value: str) -> str:
    """A parameter value without the one newline templates may put on each side of it."""
    value = value[1:] if value.startswith("\n") else value
    return value[:-1] if value.endswith("\n") else value


def parse_output(text: str, **kwargs) -> ParsedOutput:
    """Parse a whole generated text at once (OutputParser's arguments as keywords)."""
    parser = OutputParser(**kwargs)
    out = parser.feed(text)
    out.extend(parser.finish())
    return out
