"""The HTTP server over one loaded model (starlette + uvicorn): one implementation of generation
(flashmoe.serve.worker), two wire formats: OpenAI's (flashmoe.serve.openai_api) and Anthropic's
(flashmoe.serve.anthropic_api).

Endpoints: POST /v1/chat/completions and POST /v1/completions (OpenAI), POST /v1/messages and
POST /v1/messages/count_tokens (Anthropic), each streamed as server-sent events or not; GET /v1/models,
GET /health, GET /v1/stats (the engine's I/O and time statistics plus the server's), GET /v1/trace (the
routing trace, live: flashmoe.serve.live_trace) and the web page at / (files in flashmoe/serve/static).

Errors are in the shape of the API the path belongs to: OpenAI's `{"error": {"message", "type", "param",
"code"}}` (malformed JSON, a field of the wrong type or range, or a prompt that does not fit the context with
max_tokens 400, as OpenAI's API and vLLM answer; a `model` other than the one served 404, as vLLM answers; an
unknown route 404, a wrong method 405) or, under /v1/messages, Anthropic's `{"type": "error", "error": {"type",
"message"}}` (the same statuses); an exception nothing expected is a 500 in the same shapes. The server keeps
serving after each, and /v1/stats counts every error response by status (CountedResponses).
"""

from __future__ import annotations

import socket
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from flashmoe.errors import FlashMoeError
from flashmoe.runtime.engine import Engine
from flashmoe.serve import anthropic_api, openai_api
from flashmoe.serve.access import DEFAULT_MAX_REQUEST_BYTES, AccessGuard, is_loopback
from flashmoe.serve.sampling import sampling_defaults
from flashmoe.serve.schemas import APIError
from flashmoe.serve.tokenizer import Tokenizer
from flashmoe.serve.worker import Worker, sse

STATIC = Path(__file__).parent / "static"  # the web page: plain HTML, CSS and JavaScript, no build step
#: serve's context when --context is not given (tokens; capped by the model's max_position_embeddings).
DEFAULT_CONTEXT = 4096


class FlashMoeServer:
    """The ASGI application (`app`) over one Engine.

    Args:
        engine: the loaded model.
        tokenizer: its tokenizer (chat template included).
        model_id: the name /v1/models reports; a request naming another model gets 404 (one without `model`
            gets this one).
        context: longest prompt + completion in tokens (default: the model's max_position_embeddings).
        defaults: sampling settings used when a request omits them (sampling_defaults(model_dir)).
        api_key: the key every request but /health must carry (flashmoe.serve.access), or None.
        max_request_bytes: the longest request body accepted (413 beyond).
    """

    def __init__(self, engine: Engine, tokenizer: Tokenizer, model_id: str, context: int | None = None,
                 defaults: dict[str, float] | None = None, api_key: str | None = None,
                 max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES):
        self.model_id = model_id
        self.worker = Worker(engine, tokenizer, context, defaults)
        self.created = int(time.time())
        self.app = CountedResponses(Starlette(routes=[
            Route("/health", self.health, methods=["GET"]),
            Route("/v1/models", self.models, methods=["GET"]),
            Route("/v1/stats", self.stats, methods=["GET"]),
            Route("/v1/trace", self.trace, methods=["GET"]),
            Route("/", self.page, methods=["GET"]),
            Mount("/static", StaticFiles(directory=STATIC)),
            *openai_api.routes(self.worker, model_id),
            *anthropic_api.routes(self.worker, model_id),
        ], exception_handlers={APIError: _error_response, HTTPException: _http_error_response,
                               Exception: _internal_error_response},
            middleware=[Middleware(AccessGuard, api_key=api_key, max_request_bytes=max_request_bytes,
                                   public=("/health", "/"), public_under=("/static/",))]),
            self.worker.count_response)

    def close(self) -> None:
        """Stop the worker thread after the current job; queued jobs are dropped."""
        self.worker.close()

    async def page(self, request: Request) -> Response:
        return FileResponse(STATIC / "index.html")

    async def trace(self, request: Request) -> Response:
        return sse(self.worker.live_trace(self.model_id).events(), named=True)

    async def health(self, request: Request) -> Response:
        return JSONResponse({"status": "ok", "model": self.model_id})

    async def models(self, request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [
            {"id": self.model_id, "object": "model", "created": self.created, "owned_by": "flashmoe",
             "max_model_len": self.worker.session.context}]})

    async def stats(self, request: Request) -> Response:
        engine_stats = self.worker.engine.stats.to_dict()
        engine_stats.pop("per_token", None)  # up to 2 x TOKEN_WINDOW token records; the totals carry them
        return JSONResponse({"model": self.model_id, "context": self.worker.session.context,
                             "server": self.worker.server_stats(), "engine": engine_stats})


async def _error_response(request: Request, error: APIError) -> Response:
    return error.response(request.url.path)


async def _http_error_response(request: Request, error: HTTPException) -> Response:
    """Starlette's own errors (404 unknown route, 405 wrong method) in the API's shape, keeping its headers
    (405's Allow)."""
    message = f"{error.detail}: {request.method} {request.url.path}"
    return APIError(error.status_code, message).response(request.url.path, error.headers)


async def _internal_error_response(request: Request, error: Exception) -> Response:
    """An exception no handler expected: 500 in the API's shape (Starlette's own is plain text); Starlette
    then raises it again, so the server's log shows its traceback."""
    return APIError(500, f"internal error: {type(error).__name__}: {error}", type="server_error").response(
        request.url.path)


class CountedResponses:
    """ASGI wrapper around the whole application, Starlette's handler of unexpected exceptions included:
    calls `count(status)` for every HTTP response, so /v1/stats counts each error response whatever produced
    it (a refused request, the access guard, routing, a failed run, a bug)."""

    def __init__(self, app: ASGIApp, count: Callable[[int], None]):
        self.app, self.count = app, count

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def counted(message: Message) -> None:
            if message["type"] == "http.response.start":
                self.count(message["status"])
            await send(message)

        await self.app(scope, receive, counted)


# ---- running -------------------------------------------------------------------------------------

def bind(host: str, port: int) -> socket.socket:
    """A listening-ready TCP socket bound to (host, port); port 0 picks a free one.

    Raises FlashMoeError naming the address when the host does not resolve or the port is taken or not ours
    to bind: serve binds before it loads the model, so these come first and alone.
    """
    try:
        family, _, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as exc:
        raise FlashMoeError(f"--host {host!r} is not an address of this machine ({exc.strerror})") from None
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as exc:
        sock.close()
        raise FlashMoeError(f"cannot listen on {host}:{port}: {exc.strerror} (choose another --port or --host)") from None
    return sock


class _StoppingServer(uvicorn.Server):
    """uvicorn's server whose stop (SIGTERM, Ctrl-C) first ends the responses that would not end by themselves
    (Worker.stop): uvicorn waits for every open response, which a long generation held off for minutes and the
    page's live /v1/trace stream for ever."""

    def __init__(self, config: uvicorn.Config, worker: Worker):
        super().__init__(config)
        self.worker = worker

    async def shutdown(self, sockets=None) -> None:
        self.worker.stop()
        await super().shutdown(sockets)


class RunningServer:
    """A FlashMoeServer served by uvicorn on its own thread (tests, notebooks). Use as a context manager or call
    stop(), which ends the replies in progress and the live trace streams as `flashmoe serve`'s stop does."""

    def __init__(self, server: FlashMoeServer, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning"):
        self._sock = bind(host, port)
        self.host, self.port = host, self._sock.getsockname()[1]
        self._server = _StoppingServer(uvicorn.Config(server.app, log_level=log_level, lifespan="off"), server.worker)
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


def serve(model_dir: str | Path | None, host: str = "127.0.0.1", port: int = 8000, context: int | None = None,
          log_level: str = "info", api_key: str | None = None,
          max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES, echo: Callable[[str], None] | None = None,
          **load_options: Any) -> None:
    """Load a model and serve it until interrupted (flashmoe serve). `context` (tokens, capped by the
    model's max_position_embeddings, which a line then notes; None: 4096, capped without a note) bounds prompt +
    completion and sizes the KV cache in the memory budget;
    `api_key` and `max_request_bytes` are AccessGuard's; `load_options` are load_engine's (backend, io,
    max_memory, experts_per_token, cache_policy, ...). What is served, and a warning when a non-loopback
    address is bound without a key, go to `echo` (default: standard error). A stop (SIGTERM, Ctrl-C) ends the
    replies in progress with an error after their current token and the live trace streams (Worker.stop), then
    raises the signal again for the command line (SIGTERM: exit code 143).

    Raises FlashMoeError when host:port cannot be bound (before the model loads) or the model cannot be
    loaded (FormatError naming a missing directory).
    """
    from flashmoe.format.modeldir import ModelDir
    from flashmoe.runtime.load import default_model_dir, load_engine

    echo = echo or (lambda line: print(line, file=sys.stderr, flush=True))
    sock = bind(host, port)  # before loading: a taken port is the first and only error
    port = sock.getsockname()[1]
    try:
        model = ModelDir.open(model_dir if model_dir is not None else default_model_dir())
        tokenizer = Tokenizer(model.path)
        engine = load_engine(model, context=context or DEFAULT_CONTEXT, **load_options)
        server = FlashMoeServer(engine, tokenizer, model.path.name, context=context or DEFAULT_CONTEXT,
                                defaults=sampling_defaults(model.path), api_key=api_key,
                                max_request_bytes=max_request_bytes)
        served = server.worker.session.context
        capped = f" (--context {context} capped by the model's {served})" if served < (context or 0) else ""
        echo(f"flashmoe serve: {model.path} on the {load_options.get('backend', 'numba')} backend, context "
             f"{served} tokens{capped}, http://{host}:{port}/ (API key {'required' if api_key else 'not required'})")
        if not api_key and not is_loopback(host):
            echo(f"warning: {host} is reachable from other machines and no --api-key is set: anyone who can "
                 "reach this port can use the model")
        try:
            _StoppingServer(uvicorn.Config(server.app, log_level=log_level, lifespan="off"),
                            server.worker).run(sockets=[sock])
        finally:
            server.close()
    finally:
        sock.close()
