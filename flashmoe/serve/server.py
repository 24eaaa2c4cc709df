"""An OpenAI-compatible HTTP server over one loaded model (starlette + uvicorn).

Endpoints: POST /v1/chat/completions and POST /v1/completions (streamed as server-sent events or not),
GET /v1/models, GET /health, GET /v1/stats (the engine's I/O and time statistics plus the server's).

One model generates one sequence at a time: every request becomes a job for a single worker thread, so jobs
run in arrival order and never overlap. The worker keeps one Session (flashmoe.serve.session): a request whose
prompt extends the previous request's prompt + reply (a chat client sending the conversation back) prefills
only the new tokens, one that shares a shorter prefix reuses what the Session can rewind to, and any other
prompt starts from a fresh state, so nothing leaks between requests. A client that disconnects cancels its
job: a queued job never starts, a running one stops after the current token.

Errors are OpenAI-shaped (`{"error": {"message", "type", "param", "code"}}`): malformed JSON is 400, a
field of the wrong type or range 422, a prompt that does not fit the context with max_tokens 400, an unknown route
404, a wrong method 405; the server keeps serving after each.
"""

from __future__ import annotations

import asyncio
import json
from collections import OrderedDict
import logging
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from flashmoe.serve.chat_template import select_template
from flashmoe.runtime.engine import Engine
from flashmoe.errors import FlashMoeError
from flashmoe.serve.sampling import SAMPLING_KEYS, Sampler, sampling_defaults
from flashmoe.serve.session import ContextError, RunInfo, Session, history_boundary
from flashmoe.serve.tokenizer import Tokenizer
from flashmoe.serve.toolcalls import OutputParser, ParsedOutput, forced_call_prefix, opens_reasoning, tool_call_format

log = logging.getLogger("flashmoe.serve.server")


# ---- request bodies ------------------------------------------------------------------------------

class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0)
    min_p: float | None = Field(None, ge=0, lt=1)
    repetition_penalty: float | None = Field(None, gt=0)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    n: int = Field(1, ge=1, le=1, description="one choice per request")
    # Accepted only at their neutral values (clients send them by default); anything else is a 400.
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logprobs: bool | int | None = None

    def unsupported(self) -> list[str]:
        """Names of options this request sets that flashmoe does not implement."""
        names = [k for k in ("presence_penalty", "frequency_penalty") if getattr(self, k)]
        return names + (["logprobs"] if self.logprobs not in (None, False) else [])


class FunctionDef(BaseModel):
    name: str = Field(min_length=1)
    description: str | None = None
    parameters: dict[str, Any] | None = None


class ToolDef(BaseModel):
    type: Literal["function"] = "function"
    function: FunctionDef


class NamedToolChoice(BaseModel):
    type: Literal["function"] = "function"
    function: dict[str, str]


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None


class ChatRequest(_Body):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    tools: list[ToolDef] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    chat_template_kwargs: dict[str, Any] | None = None


class CompletionRequest(_Body):
    prompt: str | list[str] | list[int]
    max_tokens: int | None = Field(16, ge=1)
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None

    def unsupported(self) -> list[str]:
        extra = [k for k in ("echo", "suffix") if getattr(self, k)] + (["best_of"] if (self.best_of or 1) > 1 else [])
        return super().unsupported() + extra


class APIError(Exception):
    """An error reported to the client with an HTTP status."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 type: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.type = status, message, param, type

    def response(self) -> JSONResponse:
        return JSONResponse({"error": {"message": self.message, "type": self.type, "param": self.param,
                                       "code": None}}, status_code=self.status)


# ---- jobs ----------------------------------------------------------------------------------------

@dataclass
class Job:
    """One generation: what to run and how its output is routed. Built on the event loop, run by the
    worker thread."""

    prompt_ids: list[int]
    sampler: Sampler
    max_tokens: int | None
    stop: list[str]
    parser: OutputParser | None  # None: plain completion text
    checkpoint_at: int | None = None  # where the chat history ends (Session.generate)
    cancel: threading.Event = field(default_factory=threading.Event)


_END = object()


def _new_id(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex[:24]}"


class FlashMoeServer:
    """The ASGI application over one Engine.

    Args:
        engine: the loaded model.
        tokenizer: its tokenizer (chat template included).
        model_id: the name /v1/models reports (requests may name any model; there is one).
        context: longest prompt + completion in tokens (default: the model's max_position_embeddings).
        defaults: sampling settings used when a request omits them (sampling_defaults(model_dir)).
    """

    def __init__(self, engine: Engine, tokenizer: Tokenizer, model_id: str, context: int | None = None,
                 defaults: dict[str, float] | None = None):
        self.engine, self.tokenizer, self.model_id = engine, tokenizer, model_id
        self.session = Session(engine, tokenizer, context)
        self.defaults = {"temperature": 1.0, "top_p": 1.0, **(defaults or {})}
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="flashmoe-generate")
        self.counters = {"requests": 0, "completed": 0, "cancelled": 0, "errors": 0, "queued": 0,
                         "prefix_reuse_hits": 0, "reused_prompt_tokens": 0, "prefilled_prompt_tokens": 0,
                         "completion_tokens": 0}
        self.last_run: dict | None = None
        # Reasoning of recent replies that called tools, by call id: clients send the assistant turn back
        # without it, and templates that render the current turn's reasoning (Qwen3, Qwen3.5) would then
        # no longer match the generated tokens, defeating prefix reuse in agent loops. Call ids are random,
        # so only the client that received a reply can refer to it.
        self._reasoning_by_call: OrderedDict[str, str] = OrderedDict()
        self._lock = threading.Lock()  # counters are updated from the event loop and the worker thread
        self.created = int(time.time())
        self.app = Starlette(routes=[
            Route("/health", self.health, methods=["GET"]),
            Route("/v1/models", self.models, methods=["GET"]),
            Route("/v1/stats", self.stats, methods=["GET"]),
            Route("/v1/chat/completions", self.chat_completions, methods=["POST"]),
            Route("/v1/completions", self.completions, methods=["POST"]),
        ], exception_handlers={APIError: _error_response, HTTPException: _http_error_response})

    def close(self) -> None:
        """Stop the worker thread after the current job; queued jobs are dropped."""
        self._executor.shutdown(wait=True, cancel_futures=True)

    # ---- simple endpoints --------------------------------------------------------------------

    async def health(self, request: Request) -> Response:
        return JSONResponse({"status": "ok", "model": self.model_id})

    async def models(self, request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [
            {"id": self.model_id, "object": "model", "created": self.created, "owned_by": "flashmoe",
             "max_model_len": self.session.context}]})

    async def stats(self, request: Request) -> Response:
        engine_stats = self.engine.stats.to_dict()
        engine_stats.pop("per_token", None)  # up to 2 x TOKEN_WINDOW token records; the totals carry them
        with self._lock:
            server = dict(self.counters, last_run=self.last_run)
        return JSONResponse({"model": self.model_id, "context": self.session.context, "server": server,
                             "engine": engine_stats})

    def _count(self, **deltas: int) -> None:
        with self._lock:
            for key, n in deltas.items():
                self.counters[key] += n

    # ---- request parsing ---------------------------------------------------------------------

    @staticmethod
    async def _parse(request: Request, model: type[_Body]) -> Any:
        try:
            body = json.loads(await request.body())
        except (ValueError, UnicodeDecodeError) as e:
            raise APIError(400, f"the request body is not valid JSON: {e}") from None
        if not isinstance(body, dict):
            raise APIError(400, "the request body must be a JSON object")
        try:
            parsed = model.model_validate(body)
        except ValidationError as e:
            first = e.errors()[0]
            where = ".".join(str(p) for p in first["loc"])
            raise APIError(422, f"{where}: {first['msg']} ({e.error_count()} error(s) in the request)",
                           param=where) from None
        if names := parsed.unsupported():
            hint = " (for repetition use repetition_penalty)" if any(n.endswith("_penalty") for n in names) else ""
            raise APIError(400, f"not supported by flashmoe: {', '.join(names)}{hint}", param=names[0])
        return parsed

    def _sampler(self, body: _Body) -> Sampler:
        settings = {k: getattr(body, k) if getattr(body, k) is not None else self.defaults.get(k)
                    for k in SAMPLING_KEYS}
        try:
            return Sampler(seed=body.seed, **{k: v for k, v in settings.items() if v is not None})
        except FlashMoeError as e:
            raise APIError(422, str(e)) from None

    @staticmethod
    def _stops(body: _Body) -> list[str]:
        stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        if len(stops) > 4:
            raise APIError(422, "stop: at most 4 sequences", param="stop")
        return stops

    async def _encode(self, text: str) -> list[int]:
        return await asyncio.to_thread(self.tokenizer.encode, text)

    def _budget(self, n_prompt: int, max_tokens: int | None, prompt_param: str) -> int:
        """The completion budget (Session.check_fits); APIError naming `prompt_param` (the request field that
        holds the prompt) for an empty prompt, else max_tokens."""
        try:
            return self.session.check_fits(n_prompt, max_tokens)
        except ContextError as e:
            raise APIError(400, str(e), param=prompt_param if n_prompt == 0 else "max_tokens") from None

    # ---- running jobs ------------------------------------------------------------------------

    async def _events(self, job: Job) -> AsyncIterator[tuple]:
        """Queue job on the worker and yield its events: ('delta', ParsedOutput), ('done', RunInfo) or
        ('error', message). Leaving early (a disconnect) cancels the job."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        self._count(requests=1, queued=1)

        def emit(event) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, event)

        future: Future = self._executor.submit(self._work, job, emit)
        finished = False  # a 'done' or 'error' event was delivered: leaving after it is no cancellation
        try:
            while (event := await queue.get()) is not _END:
                finished = event[0] != "delta"
                yield event
        finally:
            if not finished:
                job.cancel.set()
                self._count(cancelled=1, queued=-int(future.cancel()))

    def _work(self, job: Job, emit: Callable[[object], None]) -> None:
        """Run one job on the worker thread, reporting through emit (thread-safe)."""
        self._count(queued=-1)
        try:
            if job.cancel.is_set():
                return
            for step in self.session.generate(job.prompt_ids, job.sampler, job.max_tokens, job.stop, job.cancel,
                                              job.checkpoint_at):
                delta = job.parser.feed(step.text) if job.parser else ParsedOutput(content=step.text)
                if delta:
                    emit(("delta", delta))
            if job.parser:
                delta = job.parser.finish()
                if delta:
                    emit(("delta", delta))
            info = self.session.last
            self._account(info)
            emit(("done", info))
        except FlashMoeError as e:
            self._count(errors=1)
            emit(("error", str(e)))
        except Exception as e:  # the server must outlive any one request
            log.exception("generation failed")
            self._count(errors=1)
            emit(("error", f"internal error: {type(e).__name__}: {e}"))
        finally:
            emit(_END)

    def _account(self, info: RunInfo) -> None:
        self._count(completed=int(info.finish_reason != "cancelled"), prefix_reuse_hits=int(info.reused_tokens > 0),
                    reused_prompt_tokens=info.reused_tokens,
                    prefilled_prompt_tokens=info.prompt_tokens - info.reused_tokens,
                    completion_tokens=info.completion_tokens)
        with self._lock:
            self.last_run = info.to_dict()

    async def _collect(self, request: Request, job: Job) -> tuple[ParsedOutput, RunInfo]:
        """Run a job to the end for a non-streamed reply; a client that goes away cancels it."""
        out = ParsedOutput()
        result: dict = {}

        async def consume() -> None:
            async for event in self._events(job):
                if event[0] == "delta":
                    out.extend(event[1])
                else:
                    result[event[0]] = event[1]

        task = asyncio.ensure_future(consume())
        while not task.done():
            await asyncio.wait({task}, timeout=0.25)
            if not task.done() and await request.is_disconnected():
                task.cancel()
                raise APIError(499, "client disconnected")
        task.result()
        if "error" in result:
            raise APIError(500, result["error"], type="server_error")
        return out, result["done"]

    # ---- /v1/chat/completions ----------------------------------------------------------------

    def _chat_prompt(self, body: ChatRequest) -> tuple[str, OutputParser, Callable[[list[int]], int | None]]:
        """Render the conversation and build the output parser for it (tool_choice decides both).

        Also returns boundary(prompt_ids): where the history ends in the prompt's tokens (history_boundary).
        """
        tools = [t.model_dump(exclude_none=True) for t in body.tools] if body.tools else None
        choice = body.tool_choice or "auto"
        if not tools:
            if choice not in ("auto", "none"):
                raise APIError(400, "tool_choice 'required' or a named function needs tools", param="tool_choice")
            choice = "none"
        forced_name = None
        if isinstance(choice, NamedToolChoice):
            forced_name = choice.function.get("name")
            if forced_name not in {t["function"]["name"] for t in tools}:
                raise APIError(400, f"tool_choice names {forced_name!r}, which is not among the tools",
                               param="tool_choice")
        messages = [self._with_reasoning(_template_message(m, i)) for i, m in enumerate(body.messages)]
        kwargs = dict(body.chat_template_kwargs or {}, tools=tools if choice != "none" else None)
        try:
            prompt = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, **kwargs)
        except FlashMoeError as e:
            raise APIError(400, str(e), param="messages") from None
        prefix = ""
        if choice == "required" or forced_name:
            template = select_template(self.tokenizer.chat_template, tools=tools)
            prefix = ("\n</think>\n\n" if opens_reasoning(prompt) else "") + forced_call_prefix(
                tool_call_format(template) or "json", forced_name)
            prompt += prefix
            prefix = prefix[prefix.index("<tool_call>"):]
        parser = OutputParser(in_reasoning=opens_reasoning(prompt), parse_tools=choice != "none", tools=tools,
                              prefix=prefix)
        return prompt, parser, lambda ids: history_boundary(self.tokenizer, messages, ids, **kwargs)

    async def chat_completions(self, request: Request) -> Response:
        body = await self._parse(request, ChatRequest)
        prompt, parser, boundary = self._chat_prompt(body)
        prompt_ids = await self._encode(prompt)
        max_tokens = body.max_completion_tokens or body.max_tokens
        job = Job(prompt_ids, self._sampler(body), self._budget(len(prompt_ids), max_tokens, "messages"),
                  self._stops(body), parser, checkpoint_at=await asyncio.to_thread(boundary, prompt_ids))
        rid, created = _new_id("chatcmpl-"), int(time.time())
        base = {"id": rid, "created": created, "model": self.model_id}
        if body.stream:
            usage = bool((body.stream_options or {}).get("include_usage"))
            return _sse(self._chat_stream(job, base, usage))
        out, info = await self._collect(request, job)
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
        async for kind, value in self._events(job):
            if kind == "error":
                yield {"error": {"message": value, "type": "server_error", "param": None, "code": None}}
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

    def _tool_call_json(self, call, reasoning: str) -> dict:
        """The OpenAI form of a parsed call, under a new id that remembers the reply's reasoning."""
        call_id = _new_id("call_")
        if reasoning:
            with self._lock:
                self._reasoning_by_call[call_id] = reasoning
                while len(self._reasoning_by_call) > 256:
                    self._reasoning_by_call.popitem(last=False)
        return {"id": call_id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}}

    def _with_reasoning(self, message: dict) -> dict:
        """An assistant message sent back without its reasoning gets it again when one of its tool-call ids
        is one this server issued."""
        if message["role"] != "assistant" or message.get("reasoning_content") is not None:
            return message
        with self._lock:
            found = [self._reasoning_by_call.get(c.get("id")) for c in message.get("tool_calls") or []
                     if isinstance(c, dict)]
        reasoning = next((r for r in found if r), None)
        return message if reasoning is None else {**message, "reasoning_content": reasoning}

    # ---- /v1/completions ---------------------------------------------------------------------

    async def completions(self, request: Request) -> Response:
        body = await self._parse(request, CompletionRequest)
        prompt = body.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], int):
            prompt_ids = list(prompt)
            if any(not 0 <= t < self.tokenizer.vocab_size for t in prompt_ids):
                raise APIError(422, f"prompt: token ids must be in [0, {self.tokenizer.vocab_size})",
                               param="prompt")
        else:
            if isinstance(prompt, list) and len(prompt) != 1:
                raise APIError(422, "prompt: give one prompt per request", param="prompt")
            prompt_ids = await self._encode(prompt if isinstance(prompt, str) else prompt[0])
        job = Job(prompt_ids, self._sampler(body), self._budget(len(prompt_ids), body.max_tokens, "prompt"),
                  self._stops(body), None)
        base = {"id": _new_id("cmpl-"), "created": int(time.time()), "model": self.model_id}
        if body.stream:
            usage = bool((body.stream_options or {}).get("include_usage"))
            return _sse(self._completion_stream(job, base, usage))
        out, info = await self._collect(request, job)
        return JSONResponse({**base, "object": "text_completion", "choices": [
            {"index": 0, "text": out.content, "logprobs": None, "finish_reason": _finish(info, 0)}],
            "usage": _usage(info)})

    async def _completion_stream(self, job: Job, base: dict, include_usage: bool) -> AsyncIterator[dict]:
        def chunk(text: str, finish: str | None = None) -> dict:
            return {**base, "object": "text_completion",
                    "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}]}

        async for kind, value in self._events(job):
            if kind == "error":
                yield {"error": {"message": value, "type": "server_error", "param": None, "code": None}}
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
    arguments as objects (templates iterate or tojson them), 'developer' read as 'system'."""
    out = message.model_dump(exclude_none=True)
    if out["role"] == "developer":
        out["role"] = "system"
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


async def _error_response(request: Request, error: APIError) -> Response:
    return error.response()


async def _http_error_response(request: Request, error: HTTPException) -> Response:
    """Starlette's own errors (404 unknown route, 405 wrong method) in OpenAI's shape, keeping its headers
    (405's Allow)."""
    body = APIError(error.status_code, f"{error.detail}: {request.method} {request.url.path}").response()
    body.headers.update(error.headers or {})
    return body




def _finish(info: RunInfo, tool_calls) -> str:
    if tool_calls:
        return "tool_calls"
    return "length" if info.finish_reason == "length" else "stop"


def _usage(info: RunInfo) -> dict:
    return {"prompt_tokens": info.prompt_tokens, "completion_tokens": info.completion_tokens,
            "total_tokens": info.prompt_tokens + info.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": info.reused_tokens}}


def _sse(events: AsyncIterator[dict]) -> StreamingResponse:
    async def body() -> AsyncIterator[str]:
        async for event in events:
            yield f"data: {json.dumps(event, ensure_ascii=False)}\n\n"
        yield "data: [DONE]\n\n"

    return StreamingResponse(body(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


# ---- running -------------------------------------------------------------------------------------

class RunningServer:
    """A uvicorn server on its own thread (tests, notebooks). Use as a context manager or call stop()."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning"):
        import uvicorn

        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind((host, port))
        self.host, self.port = host, self._sock.getsockname()[1]
        self._server = uvicorn.Server(uvicorn.Config(app, log_level=log_level, lifespan="off"))
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self._sock]},
                                        name="flashmoe-server", daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 10.0) -> "RunningServer":
        """Start serving; returns once the server accepts connections.

        Raises FlashMoeError when it has not started within timeout seconds.
        """
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise FlashMoeError(f"the server on {self.url} did not start within {timeout} s")
            time.sleep(0.01)
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self._server.should_exit = True
        self._thread.join(timeout)
        self._sock.close()

    def __enter__(self) -> "RunningServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def serve(model_dir: str | Path | None, host: str = "127.0.0.1", port: int = 8000, context: int = 4096,
          log_level: str = "info", **load_options: Any) -> None:
    """Load a model and serve it until interrupted (flashmoe serve). `context` (tokens, capped by the
    model's max_position_embeddings) bounds prompt + completion and sizes the KV cache in the memory budget;
    `load_options` are load_engine's (backend, io, max_memory, experts_per_token, cache_policy, ...).

    Raises FlashMoeError when the model cannot be loaded (FormatError naming a missing directory).
    """
    import uvicorn

    from flashmoe.runtime.load import default_model_dir, load_engine
    from flashmoe.format.modeldir import ModelDir

    model = ModelDir.open(model_dir if model_dir is not None else default_model_dir())
    tokenizer = Tokenizer(model.path)
    engine = load_engine(model, context=context, **load_options)
    server = FlashMoeServer(engine, tokenizer, model.path.name, context=context,
                            defaults=sampling_defaults(model.path))
    log.info("serving %s on http://%s:%d (context %d tokens)", model.path, host, port, server.session.context)
    try:
        uvicorn.run(server.app, host=host, port=port, log_level=log_level, lifespan="off")
    finally:
        server.close()
