"""GET /v1/trace: the engine's routing trace, live, as server-sent events (the web page's expert view).

The lines are exactly those `flashmoe generate --trace FILE` writes (flashmoe.runtime.trace: per token and
MoE layer the experts routed to, hits, bytes read and from disk, I/O wait and compute in ms), plus `t`, the
wall-clock time in seconds at which the token's forward finished. The first event is the header
(`{"type": "header", ...}`), each further one a token (`{"type": "token", ...}`).

The engine is traced only while someone listens: the worker thread attaches the Tracer at the start of a job
when there are subscribers and detaches it otherwise (never during a forward, so a forward is traced whole or
not at all). A subscriber that falls behind by more than MAX_BEHIND lines loses the oldest (a long prompt's
prefill sends one line per prompt token); `dropped` in the next line says how many.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator

from flashmoe.runtime.engine import Engine
from flashmoe.runtime.trace import TraceSink, Tracer, trace_header

MAX_BEHIND = 2048


class LiveTrace(TraceSink):
    """A TraceSink that fans each token line out to the current subscribers (asyncio queues on their loops).

    Args:
        engine: the engine to trace (its cfg, store and stats make the header and the Tracer).
        model: the model's name in the header.
    """

    def __init__(self, engine: Engine, model: str = ""):
        super().__init__(trace_header(engine, model))
        self.tracer = Tracer(self, engine.store, engine.stats)
        self._subscribers: dict[asyncio.Queue, asyncio.AbstractEventLoop] = {}
        self._lock = threading.Lock()  # subscribe on the event loop, put on the worker thread

    @property
    def listened(self) -> bool:
        with self._lock:
            return bool(self._subscribers)

    def put(self, line: dict) -> None:
        event = {"type": "token", **line, "t": round(time.time(), 4)}
        with self._lock:
            subscribers = list(self._subscribers.items())
        for queue, loop in subscribers:
            loop.call_soon_threadsafe(_offer, queue, event)

    def close(self) -> None:
        """End every subscriber's stream after the lines already queued (a stopping server). On the event loop."""
        with self._lock:
            queues = list(self._subscribers)
        for queue in queues:
            queue.put_nowait(None)

    async def events(self) -> AsyncIterator[dict]:
        """The header, then every token line until the consumer leaves or close()."""
        queue: asyncio.Queue = asyncio.Queue()
        with self._lock:
            self._subscribers[queue] = asyncio.get_running_loop()
        try:
            yield {"type": "header", **self.header.to_dict()}
            while (event := await queue.get()) is not None:
                yield event
        finally:
            with self._lock:
                del self._subscribers[queue]


def _offer(queue: asyncio.Queue, event: dict) -> None:
    """Queue event; beyond MAX_BEHIND lines waiting, drop the oldest and count it in the next one sent."""
    dropped = 0
    while queue.qsize() >= MAX_BEHIND:
        queue.get_nowait()
        dropped += 1
    queue.put_nowait({**event, "dropped": dropped} if dropped else event)
