"""The Anthropic Messages wire format: POST /v1/messages (streamed as named server-sent events or not) and
POST /v1/messages/count_tokens. Generation is the Worker's (flashmoe.serve.worker), shared with the OpenAI
endpoints, prefix reuse included; this module only reads Anthropic requests and writes Anthropic replies.

Mapping (https://docs.anthropic.com/en/api/messages):
- `system` and text blocks become the template's system and user/assistant text; `tool_result` blocks become
  'tool' messages, `tool_use` blocks the assistant's tool calls, `thinking` blocks its reasoning_content.
- `tools` ({name, description, input_schema}) are offered as functions; `tool_choice` auto/any/tool/none is
  OpenAI's auto/required/named/none.
- `thinking: {"type": "enabled"}` renders the template with enable_thinking; without it thinking is off, as in
  Anthropic's API (budget_tokens is not enforced: max_tokens bounds reasoning and reply together). A model
  that reasons regardless has its reasoning returned as `thinking` blocks (with an empty signature).
- usage: input_tokens counts the prompt tokens prefilled for this request, cache_read_input_tokens those
  reused from the previous request's state (their sum is the prompt).
- stop_reason: tool_use, max_tokens, stop_sequence (with stop_sequence set) or end_turn.
Errors are `{"type": "error", "error": {"type", "message"}}` (flashmoe.serve.schemas.APIError).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from flashmoe.serve.generate import CONTEXT, LENGTH, STOP_STRING
from flashmoe.serve.schemas import APIError, CountTokensRequest, MessagesRequest
from flashmoe.serve.session import RunInfo
from flashmoe.serve.toolcalls import ToolCall
from flashmoe.serve.worker import Conversation, Job, Worker, new_id, sse

_CHOICES = {"auto": "auto", "any": "required", "none": "none", "tool": "auto"}


def routes(worker: Worker, model_id: str) -> list[Route]:
    """The Anthropic endpoints over one worker; replies name the model model_id."""
    api = AnthropicAPI(worker, model_id)
    return [Route("/v1/messages", api.messages, methods=["POST"]),
            Route("/v1/messages/count_tokens", api.count_tokens, methods=["POST"])]


class AnthropicAPI:
    """The Anthropic endpoints' handlers over one worker."""

    def __init__(self, worker: Worker, model_id: str):
        self.worker, self.model_id = worker, model_id

    async def count_tokens(self, request: Request) -> Response:
        body: CountTokensRequest = await self.worker.parse(request, CountTokensRequest, self.model_id)
        prompt, _, _ = self.worker.render(_conversation(body))
        return JSONResponse({"input_tokens": len(await self.worker.encode(prompt, "messages"))})

    async def messages(self, request: Request) -> Response:
        body: MessagesRequest = await self.worker.parse(request, MessagesRequest, self.model_id)
        job = await self.worker.chat_job(_conversation(body), body, body.max_tokens, body.stop_sequences or [])
        base = {"id": new_id("msg_"), "type": "message", "role": "assistant", "model": self.model_id}
        if body.stream:
            return sse(self._stream(job, base), named=True)
        out, info = await self.worker.collect(request, job)
        content = [{"type": "thinking", "thinking": out.reasoning, "signature": ""}] if out.reasoning else []
        content += [{"type": "text", "text": out.content}] if out.content else []
        content += [self._tool_use(call, out.reasoning) for call in out.tool_calls]
        return JSONResponse({**base, "content": content, **_stop(info, out.tool_calls), "usage": _usage(info)})

    def _tool_use(self, call: ToolCall, reasoning: str) -> dict:
        """The Anthropic form of a parsed call, under a new id that remembers the reply's reasoning."""
        return {"type": "tool_use", "id": self.worker.call_id("toolu_", reasoning), "name": call.name,
                "input": call.arguments_dict()}

    async def _stream(self, job: Job, base: dict) -> AsyncIterator[dict]:
        """message_start, then per block content_block_start / _delta... / _stop, then message_delta (stop
        reason and usage) and message_stop; an error after the start is an `error` event."""
        yield {"type": "message_start", "message": {**base, "content": [], "stop_reason": None, "stop_sequence": None,
                                                    "usage": {"input_tokens": len(job.prompt_ids), "output_tokens": 0}}}
        blocks, reasoning, n_calls = _Blocks(), "", 0
        async for kind, value in self.worker.events(job):
            if kind == "error":
                yield APIError(500, value).anthropic_body()
                return
            if kind == "done":
                for event in blocks.close():
                    yield event
                yield {"type": "message_delta", "delta": _stop(value, n_calls), "usage": _usage(value)}
                yield {"type": "message_stop"}
                return
            reasoning += value.reasoning
            n_calls += len(value.tool_calls)
            events = blocks.text("thinking", value.reasoning) if value.reasoning else []
            events += blocks.text("text", value.content) if value.content else []
            for call in value.tool_calls:
                events += blocks.tool_use(self._tool_use(call, reasoning))
            for event in events:
                yield event


class _Blocks:
    """The content blocks of a streamed message: opens a block when the kind of text changes, closes it
    before the next."""

    def __init__(self):
        self.index, self.open = -1, None

    def _start(self, block: dict) -> list[dict]:
        events = self.close()
        self.index += 1
        return events + [{"type": "content_block_start", "index": self.index, "content_block": block}]

    def text(self, kind: str, text: str) -> list[dict]:
        """kind: 'thinking' or 'text'."""
        events = []
        if self.open != kind:
            events = self._start({"type": "thinking", "thinking": "", "signature": ""} if kind == "thinking"
                                 else {"type": "text", "text": ""})
            self.open = kind
        return events + [{"type": "content_block_delta", "index": self.index,
                          "delta": {"type": f"{kind}_delta", kind: text}}]

    def tool_use(self, use: dict) -> list[dict]:
        """One whole call: its start (input {}), its arguments as one input_json_delta, its stop."""
        events = self._start({**use, "input": {}})
        events.append({"type": "content_block_delta", "index": self.index,
                       "delta": {"type": "input_json_delta", "partial_json": json.dumps(use["input"])}})
        self.open = "tool_use"
        return events + self.close()

    def close(self) -> list[dict]:
        if self.open is None:
            return []
        self.open = None
        return [{"type": "content_block_stop", "index": self.index}]


# ---- requests to conversations -------------------------------------------------------------------

def _conversation(body: CountTokensRequest) -> Conversation:
    """The request as the worker's Conversation (see the module docstring for the mapping)."""
    messages = [{"role": "system", "content": _text(body.system, "system")}] if body.system else []
    for i, message in enumerate(body.messages):
        blocks = message.content
        if isinstance(blocks, str):
            blocks = [{"type": "text", "text": blocks}]
        turn = _user_turn if message.role == "user" else _assistant_turn
        messages += turn(blocks, f"messages.{i}.content")
    tools = [{"type": "function", "function": {"name": t.name, "parameters": t.input_schema,
                                               **({"description": t.description} if t.description else {})}}
             for t in body.tools or ()] or None
    choice = body.tool_choice
    if choice is not None and choice.type == "tool" and not choice.name:
        raise APIError(400, "tool_choice.name: required when tool_choice.type is 'tool'", param="tool_choice.name")
    thinking = body.thinking is not None and body.thinking.type != "disabled"
    return Conversation(messages, tools, _CHOICES[choice.type] if choice else "auto",
                        choice.name if choice is not None and choice.type == "tool" else None,
                        {"enable_thinking": thinking})


def _user_turn(blocks: list[dict], where: str) -> list[dict]:
    """A user message: its tool results as 'tool' messages first, then its text as one user message."""
    turn, texts = [], []
    for j, block in enumerate(blocks):
        if block.get("type") == "tool_result":
            if not isinstance(block.get("tool_use_id"), str):
                raise APIError(400, f"{where}.{j}.tool_use_id: a string is required", param=f"{where}.{j}")
            turn.append({"role": "tool", "tool_call_id": block["tool_use_id"],
                         "content": _text(block.get("content") or "", f"{where}.{j}.content")})
        else:
            texts.append(_text([block], f"{where}.{j}", also="tool_result"))
    return turn + ([{"role": "user", "content": "".join(texts)}] if texts else [])


def _assistant_turn(blocks: list[dict], where: str) -> list[dict]:
    """An assistant message: text as content, thinking as reasoning_content, tool_use as tool_calls."""
    texts, thinking, calls = [], [], []
    for j, block in enumerate(blocks):
        kind = block.get("type")
        if kind == "thinking":
            thinking.append(str(block.get("thinking", "")))
        elif kind == "tool_use":
            if not isinstance(block.get("name"), str) or not isinstance(block.get("input"), dict):
                raise APIError(400, f"{where}.{j}: a tool_use block needs a name and an input object",
                               param=f"{where}.{j}")
            calls.append({"id": block.get("id"), "type": "function",
                          "function": {"name": block["name"], "arguments": block["input"]}})
        elif kind != "redacted_thinking":  # reasoning only the API that wrote it can read
            texts.append(_text([block], f"{where}.{j}", also="thinking, tool_use"))
    message: dict[str, Any] = {"role": "assistant", "content": "".join(texts)}
    if thinking:
        message["reasoning_content"] = "".join(thinking)
    if calls:
        message["tool_calls"] = calls
    return [message]


def _text(value: str | list[dict], where: str, also: str = "") -> str:
    """The text of a string or of a list of text blocks; APIError (400) naming `where` for any other block."""
    if isinstance(value, str):
        return value
    texts = []
    for block in value:
        if not isinstance(block, dict) or block.get("type") != "text" or not isinstance(block.get("text"), str):
            kind = block.get("type") if isinstance(block, dict) else type(block).__name__
            allowed = "text" + (f", {also}" if also else "")
            raise APIError(400, f"{where}: content of type {kind!r} is not supported here (supported: {allowed})",
                           param=where)
        texts.append(block["text"])
    return "\n".join(texts)


def _stop(info: RunInfo, tool_calls) -> dict:
    """Anthropic's stop_reason for a run: 'tool_use', 'max_tokens' (max_tokens or the context),
    'stop_sequence' (with the string) or 'end_turn'."""
    if tool_calls:
        reason = "tool_use"
    elif info.stop in (LENGTH, CONTEXT):
        reason = "max_tokens"
    else:
        reason = "stop_sequence" if info.stop == STOP_STRING else "end_turn"
    return {"stop_reason": reason, "stop_sequence": info.stop_sequence if reason == "stop_sequence" else None}


def _usage(info: RunInfo) -> dict:
    return {"input_tokens": info.prompt_tokens - info.reused_tokens, "output_tokens": info.completion_tokens,
            "cache_read_input_tokens": info.reused_tokens, "cache_creation_input_tokens": 0}
