"""What the reply parsers (flashmoe.serve.toolcalls, flashmoe.serve.harmony) return, and a helper both use."""

from __future__ import annotations

import json
from dataclasses import dataclass, field


@dataclass(frozen=True)
class ToolCall:
    """One parsed call: the function name and its arguments as a JSON object text (the OpenAI wire form)."""

    name: str
    arguments: str

    def arguments_dict(self) -> dict:
        return json.loads(self.arguments)


@dataclass
class ParsedOutput:
    """Text routed by kind. For a stream, each feed() returns the new part; concatenating them gives the
    same as parsing the whole text at once."""

    content: str = ""
    reasoning: str = ""
    tool_calls: list[ToolCall] = field(default_factory=list)

    def extend(self, other: "ParsedOutput") -> None:
        self.content += other.content
        self.reasoning += other.reasoning
        self.tool_calls.extend(other.tool_calls)

    def __bool__(self) -> bool:
        return bool(self.content or self.reasoning or self.tool_calls)


class ReplyParser:
    """What every reply parser shares: text fed in pieces is buffered and run through the subclass's state
    machine (`_run(final)`), which appends to `_out`; each call returns what it completed."""

    def __init__(self) -> None:
        self._buf = ""
        self._out = ParsedOutput()

    def feed(self, text: str) -> ParsedOutput:
        """Parse the next piece of generated text; return what it completed."""
        self._buf += text
        self._run(final=False)
        return self._take()

    def finish(self) -> ParsedOutput:
        """End of generation: parse what is held, then flush it (the subclass's `_flush`)."""
        self._run(final=True)
        self._flush()
        return self._take()

    def _take(self) -> ParsedOutput:
        out, self._out = self._out, ParsedOutput()
        return out

    def _run(self, final: bool) -> None:
        raise NotImplementedError

    def _flush(self) -> None:
        raise NotImplementedError


def held_suffix(text: str, tags: tuple[str, ...]) -> int:
    """Length of the longest suffix of text that is a proper prefix of one of tags (it may become a tag)."""
    longest = 0
    for tag in tags:
        for n in range(min(len(tag) - 1, len(text)), longest, -1):
            if text.endswith(tag[:n]):
                longest = n
                break
    return longest
