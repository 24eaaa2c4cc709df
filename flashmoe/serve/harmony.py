"""Incremental parsing of replies in OpenAI's harmony format (gpt-oss) into content, reasoning and tool calls.

A harmony reply is a sequence of messages, each `<|start|>ROLE HEADER<|message|>BODY` closed by `<|end|>`,
or by `<|return|>` (the last message of a reply) or `<|call|>` (a tool call), both end-of-sequence tokens
that generation stops at and never decodes. The prompt ends with `<|start|>assistant`, so a reply begins
inside the first message's header. The header names the channel (`<|channel|>analysis`, `commentary`,
`final`) and, for a tool call, the recipient `to=functions.NAME`, written before or after the channel, and
the arguments' type (`<|constrain|>json` or `json`), as the harmony guide (OpenAI cookbook, "OpenAI Harmony
Response Format") and gpt-oss's chat template write them:

    <|channel|>analysis<|message|>The user wants ...<|end|><|start|>assistant<|channel|>final<|message|>It is 4.
    <|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>{"city": "Paris"}
     to=functions.get_weather<|channel|>commentary json<|message|>{"city": "Paris"}

Routing: `analysis` bodies are reasoning; a body with a recipient is a tool call whose arguments are the
body's JSON object (the name is the recipient without its `functions.` namespace); every other body
(`final`, a `commentary` preamble, no channel) is content. Bodies are kept exactly, markup is never content,
and several messages of one kind are concatenated as they are. A call whose body is not a JSON object, a
call when no tools were offered, and text outside any message are content, with their markup, exactly as
generated. The result depends only on the whole text, never on how it was split into pieces.

The markup tokens are special tokens of gpt-oss's vocabulary; the tokenizer keeps them in decoded text
(flashmoe.serve.toolcalls.markup_tokens). OpenAI's `openai-harmony` package parses the same format, but from
o200k token ids, and downloads its vocabulary file at run time, which an offline server cannot do; this
parser reads the decoded text the other formats' parsers read.
"""

from __future__ import annotations

import json
import re

from flashmoe.serve.parsed import ReplyParser, ToolCall, held_suffix

START, CHANNEL, MESSAGE, END = "<|start|>", "<|channel|>", "<|message|>", "<|end|>"
CONSTRAIN, CALL, RETURN = "<|constrain|>", "<|call|>", "<|return|>"
#: Every harmony markup token a reply may contain.
MARKUP = (START, CHANNEL, MESSAGE, END, CONSTRAIN, CALL, RETURN)
_HEADER_ENDS = (MESSAGE, START, END, CALL, RETURN)
_BODY_ENDS = (END, CALL, RETURN, START)
_RECIPIENT = re.compile(r"(?:^|\s)to=([^\s<]+)")
_CHANNEL = re.compile(re.escape(CHANNEL) + r"\s*([^\s<]+)")
_FUNCTIONS = "functions."


def _first(text: str, tags: tuple[str, ...]) -> tuple[int, str] | None:
    """The earliest (index, tag) of any of tags in text, or None."""
    hits = [(i, tag) for tag in tags if (i := text.find(tag)) >= 0]
    return min(hits) if hits else None


def forced_harmony_call(name: str | None) -> str:
    """The header that, appended to a prompt ending in `<|start|>assistant`, makes the reply a call to
    function `name` (or to some function, when None)."""
    return f"{CHANNEL}commentary to={_FUNCTIONS}{name} {CONSTRAIN}json{MESSAGE}" if name else \
        f"{CHANNEL}commentary to={_FUNCTIONS}"


class HarmonyParser(ReplyParser):
    """Routes a harmony reply, fed in pieces, into content, reasoning and tool calls (the same interface as
    flashmoe.serve.toolcalls.OutputParser).

    Args:
        parse_tools: read messages with a recipient as tool calls; when False (no tools offered) they are
            content, markup included.
        prefix: text the prompt already contains as the start of the reply (forced_harmony_call); it is
            parsed first.
    """

    def __init__(self, *, parse_tools: bool = True, prefix: str = ""):
        super().__init__()
        self._parse_tools = parse_tools
        self._mode = "header"  # header (before <|message|>), body, or between messages
        self._opened = ""  # the <|start|> of the current message, when the reply wrote it
        self._header = ""
        self._route = "content"  # the current body's kind: content, reasoning, call, or raw (kept as content)
        self._name = ""
        self._body = ""  # a call's (or a raw message's) body so far; content and reasoning are emitted at once
        if prefix:
            self.feed(prefix)

    def _flush(self) -> None:
        """End of the reply: an open call ends here (`<|call|>` is an end-of-sequence token, never decoded);
        an unfinished header is content."""
        if self._mode == "header":
            self._out.content += self._opened + self._buf
        elif self._mode == "body":
            self._close_message("")
        self._buf, self._mode, self._opened = "", "between", ""

    def _run(self, final: bool) -> None:
        steps = {"header": self._step_header, "body": self._step_body, "between": self._step_between}
        while True:
            before = (self._mode, len(self._buf))
            steps[self._mode](final)
            if (self._mode, len(self._buf)) == before:
                return

    def _step_header(self, final: bool) -> None:
        hit = _first(self._buf, _HEADER_ENDS)
        if hit is None:
            return  # a header is held whole until its <|message|>
        i, tag = hit
        header, self._buf = self._buf[:i], self._buf[i + len(tag):]
        if tag == MESSAGE:
            self._open_body(header)
        elif tag == START:  # a header without a body is no message: its text is content
            self._out.content += self._opened + header
            self._opened = START
        else:
            self._out.content += self._opened + header + tag
            self._opened, self._mode = "", "between"

    def _open_body(self, header: str) -> None:
        self._header, self._body, self._mode = header, "", "body"
        recipient = _RECIPIENT.search(header)
        channel = _CHANNEL.search(header)
        if recipient:
            self._route = "call" if self._parse_tools else "raw"
            self._name = recipient.group(1).removeprefix(_FUNCTIONS)
        else:
            self._route = "reasoning" if channel and channel.group(1) == "analysis" else "content"

    def _step_body(self, final: bool) -> None:
        hit = _first(self._buf, _BODY_ENDS)
        if hit is None:
            keep = 0 if final else held_suffix(self._buf, MARKUP)
            self._add_body(self._buf[: len(self._buf) - keep])
            self._buf = self._buf[len(self._buf) - keep:]
            return
        i, tag = hit
        self._add_body(self._buf[:i])
        self._buf = self._buf[i + len(tag):]
        if tag == START:  # the next message began without closing this one
            self._close_message("")
            self._opened, self._mode = START, "header"
        else:
            self._close_message(tag)
            self._mode = "between"

    def _add_body(self, text: str) -> None:
        if self._route in ("content", "reasoning"):
            setattr(self._out, self._route, getattr(self._out, self._route) + text)
        else:
            self._body += text

    def _close_message(self, tag: str) -> None:
        """The current body ended (at `tag`, or "" when the reply ended or the next message began)."""
        if self._route == "call":
            call = _call(self._name, self._body)
            if call is not None:
                self._out.tool_calls.append(call)
            else:
                self._route = "raw"
        if self._route == "raw":
            self._out.content += self._opened + self._header + MESSAGE + self._body + tag
        self._opened = self._header = self._body = ""

    def _step_between(self, final: bool) -> None:
        i = self._buf.find(START)
        if i < 0:
            keep = 0 if final else held_suffix(self._buf, (START,))
            self._out.content += self._buf[: len(self._buf) - keep]
            self._buf = self._buf[len(self._buf) - keep:]
            return
        self._out.content += self._buf[:i]
        self._buf = self._buf[i + len(START):]
        self._opened, self._mode = START, "header"


def _call(name: str, body: str) -> ToolCall | None:
    """The tool call of a body that is a JSON object, else None."""
    try:
        args = json.loads(body)
    except ValueError:
        return None
    if not name or not isinstance(args, dict):
        return None
    return ToolCall(name, json.dumps(args, ensure_ascii=False))
