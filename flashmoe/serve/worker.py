"""The one thread that generates, and what the server's wire formats share (flashmoe.serve.openai_api, ...).

One model generates one sequence at a time: every request becomes a Job for a single worker thread, so jobs
run in arrival order and never overlap. The worker keeps one Session (flashmoe.serve.session): a request whose
prompt extends the previous request's prompt + reply (a chat client sending the conversation back) prefills
only the new tokens, one that shares a shorter prefix reuses what the Session can rewind to, and any other
prompt starts from a fresh state, so nothing leaks between requests. A client that disconnects cancels its
job: a queued job never starts, a running one stops after the current token. A server stopping (SIGTERM,
Ctrl-C) cuts every job short the same way and ends each reply with an error, not as if it were complete.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
import uuid
from collections import Counter, OrderedDict
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError
from starlette.requests import Request
from starlette.responses import StreamingResponse

from flashmoe.errors import FlashMoeError, TextError
from flashmoe.runtime.engine import Engine
from flashmoe.serve.chat_template import select_template
from flashmoe.serve.generate import CANCELLED
from flashmoe.serve.live_trace import LiveTrace
from flashmoe.serve.sampling import SAMPLING_KEYS, Sampler
from flashmoe.serve.schemas import APIError, SamplingBody
from flashmoe.serve.session import ContextError, RunInfo, Session, history_boundary
from flashmoe.serve.tokenizer import Tokenizer
from flashmoe.serve.harmony import HarmonyParser
from flashmoe.serve.toolcalls import (OutputParser, ParsedOutput, forced_call_prefix, opens_reasoning, reply_parser,
                                      tool_call_format)

log = logging.getLogger("flashmoe.serve")


# ---- jobs ----------------------------------------------------------------------------------------

@dataclass(eq=False)  # each job is itself (Worker._jobs)
class Job:
    """One generation: what to run and how its output is routed. Built on the event loop, run by the
    worker thread."""

    prompt_ids: list[int]
    sampler: Sampler
    max_tokens: int | None
    stop: list[str]
    parser: OutputParser | HarmonyParser | None  # None: plain completion text
    checkpoint_at: int | None = None  # where the chat history ends (Session.generate)
    cancel: threading.Event = field(default_factory=threading.Event)


@dataclass
class Conversation:
    """A chat request as every wire format reduces it.

    messages: the conversation as chat templates expect it (role, content text, reasoning_content, tool_calls
    with arguments as objects, tool results as role 'tool' with tool_call_id). tools: OpenAI-form schemas
    ({"type": "function", "function": {"name", "description", "parameters"}}) or None. choice: 'auto', 'none'
    or 'required'; forced_name: the one function the reply must call, or None. template_kwargs: extra
    chat-template variables (enable_thinking, ...).
    """

    messages: list[dict]
    tools: list[dict] | None = None
    choice: str = "auto"
    forced_name: str | None = None
    template_kwargs: dict = field(default_factory=dict)


_END = object()
#: The error that ends the replies a stopping server cut short (Worker.stop).
STOPPING = "the server is shutting down: this reply was cut short"


def new_id(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex[:24]}"


class Worker:
    """Generation for the server: the Session, the worker thread, the counters /v1/stats reports.

    Args:
        engine: the loaded model.
        tokenizer: its tokenizer (chat template included).
        context: longest prompt + completion in tokens (default: the model's max_position_embeddings).
        defaults: sampling settings used when a request omits them (sampling_defaults(model_dir)).
    """

    def __init__(self, engine: Engine, tokenizer: Tokenizer, context: int | None = None,
                 defaults: dict[str, float] | None = None):
        self.engine, self.tokenizer = engine, tokenizer
        self.session = Session(engine, tokenizer, context)
        self.defaults = {"temperature": 1.0, "top_p": 1.0, **(defaults or {})}
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="flashmoe-generate")
        self.counters = {"requests": 0, "completed": 0, "cancelled": 0, "errors": 0, "queued": 0,
                         "prefix_reuse_hits": 0, "reused_prompt_tokens": 0, "prefilled_prompt_tokens": 0,
                         "completion_tokens": 0}
        self.error_responses: Counter[int] = Counter()  # responses by status >= 400 (count_response)
        self.last_run: dict | None = None
        # Reasoning of recent replies that called tools, by call id: clients send the assistant turn back
        # without it, and templates that render the current turn's reasoning (Qwen3, Qwen3.5) would then
        # no longer match the generated tokens, defeating prefix reuse in agent loops. Call ids are random,
        # so only the client that received a reply can refer to it.
        self._reasoning_by_call: OrderedDict[str, str] = OrderedDict()
        self._lock = threading.Lock()  # counters are updated from the event loop and the worker thread
        self.live: LiveTrace | None = None  # made by the first /v1/trace subscriber
        self._jobs: set[Job] = set()  # queued and running (events: on the event loop only)
        self.stopping = False

    def live_trace(self, model: str) -> LiveTrace:
        """The engine's live trace (flashmoe.serve.live_trace), made on first use."""
        if self.live is None:
            self.live = LiveTrace(self.engine, model)
        return self.live

    def close(self) -> None:
        """Stop the worker thread after the current job; queued jobs are dropped."""
        self._executor.shutdown(wait=True, cancel_futures=True)

    def stop(self) -> None:
        """End what a stopping server would otherwise wait for: every queued and running job (the running one
        after its current token), each reply ending with the error STOPPING, and the live trace's streams. On
        the event loop."""
        self.stopping = True
        for job in self._jobs:
            job.cancel.set()
        if self.live is not None:
            self.live.close()

    def server_stats(self) -> dict:
        """The counters, the error responses by status and the last run's RunInfo, as /v1/stats reports them.
        `errors` counts the runs that failed (a streamed one among them, whose status was 200 already);
        `error_responses` every response of status 400 and above, whatever produced it."""
        with self._lock:
            return dict(self.counters, error_responses={str(status): n for status, n in
                                                        sorted(self.error_responses.items())}, last_run=self.last_run)

    def count_response(self, status: int) -> None:
        """Count a response with HTTP `status` (the server calls this for every response it sends)."""
        if status >= 400:
            with self._lock:
                self.error_responses[status] += 1

    def _count(self, **deltas: int) -> None:
        with self._lock:
            for key, n in deltas.items():
                self.counters[key] += n

    # ---- what both wire formats share: parsing, sampling, prompts ----------------------------

    @staticmethod
    async def parse(request: Request, model: type[SamplingBody], served: str) -> Any:
        """The request body validated as `model`, for the model named `served`. Raises APIError: 400 for
        malformed JSON, a field of the wrong type or range or an option flashmoe does not implement (as OpenAI's
        API and vLLM answer; not FastAPI's 422), 404 for a `model` other than `served` (as vLLM answers; an
        omitted or empty `model` means the one served)."""
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
            raise APIError(400, f"{where}: {first['msg']} ({e.error_count()} error(s) in the request)",
                           param=where) from None
        if parsed.model and parsed.model != served:
            raise APIError(404, f"The model `{parsed.model}` does not exist: this server serves `{served}` "
                                "(GET /v1/models)", param="model", code="model_not_found")
        if names := parsed.unsupported():
            hint = " (for repetition use repetition_penalty)" if any(n.endswith("_penalty") for n in names) else ""
            raise APIError(400, f"not supported by flashmoe: {', '.join(names)}{hint}", param=names[0])
        return parsed

    def sampler(self, body: SamplingBody) -> Sampler:
        """The request's sampler; settings it omits come from the model's defaults."""
        settings = {k: getattr(body, k) if getattr(body, k) is not None else self.defaults.get(k)
                    for k in SAMPLING_KEYS}
        try:
            return Sampler(seed=body.seed, **{k: v for k, v in settings.items() if v is not None})
        except FlashMoeError as e:
            raise APIError(400, str(e)) from None

    async def encode(self, text: str, prompt_param: str) -> list[int]:
        """Token ids of a prompt; APIError (400) naming `prompt_param` for text that is not valid UTF-8."""
        try:
            return await asyncio.to_thread(self.tokenizer.encode, text)
        except TextError as e:
            raise APIError(400, str(e), param=prompt_param) from None

    def budget(self, n_prompt: int, max_tokens: int | None, prompt_param: str) -> int:
        """The completion budget (Session.check_fits); APIError (400) naming `prompt_param` (the request field
        that holds the prompt) for an empty prompt or one too long for the context, else max_tokens; code
        context_length_exceeded for both overflows, as OpenAI's API answers."""
        try:
            return self.session.check_fits(n_prompt, max_tokens)
        except ContextError as e:
            raise APIError(400, str(e), param=prompt_param if e.field == "prompt" else "max_tokens",
                           code="context_length_exceeded" if n_prompt else None) from None

    def render(self, chat: Conversation) -> tuple[str, OutputParser | HarmonyParser,
                                                  Callable[[list[int]], int | None]]:
        """The prompt text for a conversation, the parser for its reply (the tool choice decides both), and
        boundary(prompt_ids): where the history ends in the prompt's tokens (history_boundary).

        Raises APIError (400) for a tool choice without tools, a forced name not among them, tools offered to
        a template that does not render them, or a conversation the template refuses.
        """
        tools, choice, forced_name = chat.tools, chat.choice, chat.forced_name
        if not tools:
            if choice not in ("auto", "none") or forced_name:
                raise APIError(400, "tool_choice 'required' or a named function needs tools", param="tool_choice")
            choice = "none"
        if forced_name and forced_name not in {t["function"]["name"] for t in tools}:
            raise APIError(400, f"tool_choice names {forced_name!r}, which is not among the tools",
                           param="tool_choice")
        messages = [self.with_reasoning(m) for m in chat.messages]
        kwargs = dict(chat.template_kwargs, tools=tools if choice != "none" else None)
        try:
            prompt = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, **kwargs)
            ignored = bool(kwargs["tools"]) and prompt == self.tokenizer.apply_chat_template(
                messages, add_generation_prompt=True, **dict(kwargs, tools=None))
        except FlashMoeError as e:
            raise APIError(400, str(e), param="messages") from None
        if ignored:  # refused, not warned: the model would never see the tools, and clients do not read warnings
            raise APIError(400, "this model's chat template does not render tools, so the model would not see "
                                "them: send the request without tools (or with tool_choice 'none')", param="tools")
        fmt = tool_call_format(select_template(self.tokenizer.chat_template, tools=tools))
        prefix = ""
        if choice == "required" or forced_name:
            prefix = forced_call_prefix(fmt or "json", forced_name)
            prompt += ("\n</think>\n\n" if fmt != "harmony" and opens_reasoning(prompt) else "") + prefix
        parser = reply_parser(fmt, prompt, parse_tools=choice != "none", tools=tools, prefix=prefix)
        return prompt, parser, lambda ids: history_boundary(self.tokenizer, messages, ids, **kwargs)

    async def chat_job(self, chat: Conversation, body: SamplingBody, max_tokens: int | None,
                       stops: list[str]) -> Job:
        """A job for a conversation, in either wire format. Raises APIError as render() does, and (400) for
        a prompt that does not fit the context with max_tokens."""
        prompt, parser, boundary = self.render(chat)
        prompt_ids = await self.encode(prompt, "messages")
        return Job(prompt_ids, self.sampler(body), self.budget(len(prompt_ids), max_tokens, "messages"), stops,
                   parser, checkpoint_at=await asyncio.to_thread(boundary, prompt_ids))

    def call_id(self, prefix: str, reasoning: str) -> str:
        """A new tool-call id that remembers the reply's reasoning (see with_reasoning)."""
        call_id = new_id(prefix)
        if reasoning:
            with self._lock:
                self._reasoning_by_call[call_id] = reasoning
                while len(self._reasoning_by_call) > 256:
                    self._reasoning_by_call.popitem(last=False)
        return call_id

    def with_reasoning(self, message: dict) -> dict:
        """An assistant message sent back without its reasoning gets it again when one of its tool-call ids
        is one this server issued."""
        if message["role"] != "assistant" or message.get("reasoning_content") is not None:
            return message
        with self._lock:
            found = [self._reasoning_by_call.get(c.get("id")) for c in message.get("tool_calls") or []
                     if isinstance(c, dict)]
        reasoning = next((r for r in found if r), None)
        return message if reasoning is None else {**message, "reasoning_content": reasoning}

    # ---- running jobs ------------------------------------------------------------------------

    async def events(self, job: Job) -> AsyncIterator[tuple]:
        """Queue job on the worker and yield its events: ('delta', ParsedOutput), ('done', RunInfo) or
        ('error', message). Leaving early (a disconnect) cancels the job."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        self._count(requests=1, queued=1)

        def emit(event) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, event)

        self._jobs.add(job)
        future: Future = self._executor.submit(self._work, job, emit)
        finished = False  # a 'done' or 'error' event was delivered: leaving after it is no cancellation
        try:
            while (event := await queue.get()) is not _END:
                finished = event[0] != "delta"
                yield event
        finally:
            self._jobs.discard(job)
            if not finished:
                job.cancel.set()
                self._count(cancelled=1, queued=-int(future.cancel()))

    def _work(self, job: Job, emit: Callable[[object], None]) -> None:
        """Run one job on the worker thread, reporting through emit (thread-safe)."""
        self._count(queued=-1)
        if self.live is not None:  # between forwards: a forward is traced whole or not at all
            self.engine.tracer = self.live.tracer if self.live.listened else None
        try:
            if self.stopping:
                raise FlashMoeError(STOPPING)
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
            if info.stop == CANCELLED and self.stopping:
                raise FlashMoeError(STOPPING)
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
        self._count(completed=int(info.stop != CANCELLED), prefix_reuse_hits=int(info.reused_tokens > 0),
                    reused_prompt_tokens=info.reused_tokens,
                    prefilled_prompt_tokens=info.prompt_tokens - info.reused_tokens,
                    completion_tokens=info.completion_tokens)
        with self._lock:
            self.last_run = info.to_dict()

    async def collect(self, request: Request, job: Job) -> tuple[ParsedOutput, RunInfo]:
        """Run a job to the end for a non-streamed reply; a client that goes away cancels it."""
        out = ParsedOutput()
        result: dict = {}

        async def consume() -> None:
            async for event in self.events(job):
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


def sse(events: AsyncIterator[dict], named: bool = False) -> StreamingResponse:
    """A server-sent event stream of JSON events: OpenAI's form (`data: {...}` lines ended by `data: [DONE]`) or,
    when `named`, Anthropic's (each event's "type" in an `event:` line before its data; no end marker)."""
    async def body() -> AsyncIterator[str]:
        async for event in events:
            name = f"event: {event['type']}\n" if named else ""
            yield f"{name}data: {json.dumps(event, ensure_ascii=False)}\n\n"
        if not named:
            yield "data: [DONE]\n\n"

    return StreamingResponse(body(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
