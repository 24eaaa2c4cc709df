"""The OpenAI wire format: POST /v1/chat/completions and POST /v1/completions, streamed as server-sent events
(`data: {chunk}` ... `data: [DONE]`) or not. Generation itself is the Worker's (flashmoe.serve.worker); this
module only reads OpenAI requests and writes OpenAI replies.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from flashmoe.serve.generate import CONTEXT, LENGTH
from flashmoe.serve.schemas import APIError, ChatRequest, CompletionRequest, Message, NamedToolChoice, OpenAIBody
from flashmoe.serve.session import RunInfo
from flashmoe.serve.toolcalls import ToolCall
from flashmoe.serve.worker import Conversation, Job, Worker, new_id, sse


def routes(worker: Worker, model_id: str) -> list[Route]:
    """The OpenAI endpoints over one worker; replies name the model model_id."""
    api = OpenAIAPI(worker, model_id)
    return [Route("/v1/chat/completions", api.chat_completions, methods=["POST"]),
            Route("/v1/completions", api.completions, methods=["POST"])]


class OpenAIAPI:
    """The OpenAI endpoints' handlers over one worker."""

    def __init__(self, worker: Worker, model_id: str):
        self.worker, self.model_id = worker, model_id

    # ---- /v1/chat/completions ----------------------------------------------------------------

    async def chat_completions(self, request: Request) -> Response:
        worker = self.worker
        body: ChatRequest = await worker.parse(request, ChatRequest, self.model_id)
        tools = [t.model_dump(exclude_none=True) for t in body.tools] if body.tools else None
        choice, forced_name = body.tool_choice or "auto", None
        if isinstance(choice, NamedToolChoice):
            forced_name = choice.function.get("name")
            if not forced_name:
                raise APIError(400, "tool_choice.function.name is missing", param="tool_choice")
            choice = "auto"
        chat = Conversation([_template_message(m, i) for i, m in enumerate(body.messages)], tools, choice,
                            forced_name, body.chat_template_kwargs or {})
        job = await worker.chat_job(chat, body, body.max_completion_tokens or body.max_tokens, _stops(body))
        base = {"id": new_id("chatcmpl-"), "created": int(time.time()), "model": self.model_id}
        if body.stream:
            return sse(self._chat_stream(job, base, _include_usage(body)))
        out, info = await worker.collect(request, job)
        message: dict[str, Any] = {"role": "assistant", "content": out.content or (None if out.tool_calls else "")}
        if out.reasoning:
            message["reasoning_content"] = out.reasoning
        if out.tool_calls:
            message["tool_calls"] = [self._tool_call_json(c, out.reasoning) for c in out.tool_calls]
        return JSONResponse({**base, "object": "chat.completion", "choices": [
            {"index": 0, "message": message, "logprobs": None, "finish_reason": _finish(info, out.tool_calls)}],
            "usage": _usage(info)})

    async def _chat_stream(self, job: Job, base: dict, include_usage: bool) -> AsyncIterator[dict]:
        def chunk(delta: dict, finish: str | None = None) -> dict:
            return {**base, "object": "chat.completion.chunk",
                    "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}

        yield chunk({"role": "assistant", "content": ""})
        n_calls, reasoning = 0, ""
        async for kind, value in self.worker.events(job):
            if kind == "error":
                yield APIError(500, value, type="server_error").openai_body()
                return
            if kind == "done":
                yield chunk({}, _finish(value, n_calls))
                if include_usage:
                    yield {**base, "object": "chat.completion.chunk", "choices": [], "usage": _usage(value)}
                return
            if value.reasoning:
                reasoning += value.reasoning
                yield chunk({"reasoning_content": value.reasoning})
            if value.content:
                yield chunk({"content": value.content})
            for call in value.tool_calls:
                yield chunk({"tool_calls": [{"index": n_calls, **self._tool_call_json(call, reasoning)}]})
                n_calls += 1

    def _tool_call_json(self, call: ToolCall, reasoning: str) -> dict:
        """The OpenAI form of a parsed call, under a new id that remembers the reply's reasoning."""
        return {"id": self.worker.call_id("call_", reasoning), "type": "function",
                "function": {"name": call.name, "arguments": call.arguments}}

    # ---- /v1/completions ---------------------------------------------------------------------

    async def completions(self, request: Request) -> Response:
        worker = self.worker
        body: CompletionRequest = await worker.parse(request, CompletionRequest, self.model_id)
        prompt = body.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], int):
            prompt_ids = list(prompt)
            vocab = worker.tokenizer.vocab_size
            if any(not 0 <= t < vocab for t in prompt_ids):
                raise APIError(400, f"prompt: token ids must be in [0, {vocab})", param="prompt")
        else:
            if isinstance(prompt, list) and len(prompt) != 1:
                raise APIError(400, "prompt: give one prompt per request", param="prompt")
            prompt_ids = await worker.encode(prompt if isinstance(prompt, str) else prompt[0], "prompt")
        job = Job(prompt_ids, worker.sampler(body), worker.budget(len(prompt_ids), body.max_tokens, "prompt"),
                  _stops(body), None)
        base = {"id": new_id("cmpl-"), "created": int(time.time()), "model": self.model_id}
        if body.stream:
            return sse(self._completion_stream(job, base, _include_usage(body)))
        out, info = await worker.collect(request, job)
        return JSONResponse({**base, "object": "text_completion", "choices": [
            {"index": 0, "text": out.content, "logprobs": None, "finish_reason": _finish(info, 0)}],
            "usage": _usage(info)})

    async def _completion_stream(self, job: Job, base: dict, include_usage: bool) -> AsyncIterator[dict]:
        def chunk(text: str, finish: str | None = None) -> dict:
            return {**base, "object": "text_completion",
                    "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}]}

        async for kind, value in self.worker.events(job):
            if kind == "error":
                yield APIError(500, value, type="server_error").openai_body()
                return
            if kind == "done":
                yield chunk("", _finish(value, 0))
                if include_usage:
                    yield {**base, "object": "text_completion", "choices": [], "usage": _usage(value)}
                return
            yield chunk(value.content)


# ---- helpers -------------------------------------------------------------------------------------

def _template_message(message: Message, index: int) -> dict:
    """An OpenAI message as chat templates expect it: text parts joined into one string, tool-call
    arguments as objects (templates iterate or tojson them), 'developer' read as 'system', and an
    assistant's null content (a reply that is only tool calls) as "", as vLLM passes it and as the Anthropic
    path writes it (DeepSeek-V3.1's template adds it to the call tokens; none of its keys may be missing)."""
    out = message.model_dump(exclude_none=True)
    if out["role"] == "developer":
        out["role"] = "system"
    if out["role"] == "assistant":
        out.setdefault("content", "")
    content = out.get("content")
    if isinstance(content, list):
        texts = []
        for part in content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise APIError(400, f"messages[{index}].content: only text parts are supported",
                               param=f"messages.{index}.content")
            texts.append(part["text"])
        out["content"] = "".join(texts)
    for call in out.get("tool_calls") or []:
        function = call.get("function") if isinstance(call, dict) else None
        if isinstance(function, dict) and isinstance(function.get("arguments"), str):
            try:
                args = json.loads(function["arguments"])
            except ValueError:
                continue  # the template renders the text as given
            if isinstance(args, dict):
                function["arguments"] = args
    return out


def _stops(body: OpenAIBody) -> list[str]:
    stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    if len(stops) > 4:
        raise APIError(400, "stop: at most 4 sequences", param="stop")
    return stops


def _include_usage(body: OpenAIBody) -> bool:
    return bool((body.stream_options or {}).get("include_usage"))


def _finish(info: RunInfo, tool_calls) -> str:
    """OpenAI's finish_reason for a run: 'tool_calls', 'length' (max_tokens or the context) or 'stop'."""
    if tool_calls:
        return "tool_calls"
    return "length" if info.stop in (LENGTH, CONTEXT) else "stop"


def _usage(info: RunInfo) -> dict:
    return {"prompt_tokens": info.prompt_tokens, "completion_tokens": info.completion_tokens,
            "total_tokens": info.prompt_tokens + info.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": info.reused_tokens}}
