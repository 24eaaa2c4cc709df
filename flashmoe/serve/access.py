"""Who may call the server, and how much they may send: an ASGI middleware in front of every route.

- With an API key set (`flashmoe serve --api-key`, or FLASHMOE_API_KEY), a request must carry it as
  `Authorization: Bearer KEY` (OpenAI clients) or `x-api-key: KEY` (Anthropic clients); the comparison takes
  the same time wherever the given key differs (hmac.compare_digest). A missing or wrong key is 401 in the
  shape of the API the path belongs to. Public paths (/health, the web page's static files) need no key:
  they reveal nothing and the page itself asks for the key before calling the API.
- A request body longer than max_request_bytes is 413: at once when Content-Length says so (the body is
  never read), else as soon as the bytes received pass the limit (a chunked upload is not buffered whole).
"""

from __future__ import annotations

import hmac
import ipaddress
from collections.abc import Awaitable, Callable, Collection

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from flashmoe.serve.schemas import APIError

DEFAULT_MAX_REQUEST_BYTES = 4 * 1024 * 1024


class AccessGuard:
    """ASGI middleware: the API key check and the request-body limit (see the module docstring).

    Args:
        app: the application it guards.
        api_key: the key every non-public request must carry, or None for none.
        max_request_bytes: the longest request body accepted, in bytes.
        public: paths that need no key (exact).
        public_under: prefixes under which no key is needed (a folder of static files: '/static/').
    """

    def __init__(self, app: ASGIApp, api_key: str | None = None,
                 max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES, public: Collection[str] = ("/health",),
                 public_under: Collection[str] = ()):
        if max_request_bytes < 1:
            raise ValueError(f"max_request_bytes must be at least 1, got {max_request_bytes}")
        self.app, self.max_request_bytes = app, max_request_bytes
        self._key = api_key.encode() if api_key else None
        self._public, self._public_under = frozenset(public), tuple(public_under)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path, headers = scope["path"], Headers(scope=scope)
        if self._key is not None and not self._is_public(path) and not self._authorized(headers):
            return await self._unauthorized(headers).response(path, {"WWW-Authenticate": "Bearer"})(
                scope, receive, send)
        length = headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_request_bytes):
            return await self._too_large().response(path)(scope, receive, send)
        await self.app(scope, self._counted(receive), send)

    def _is_public(self, path: str) -> bool:
        return path in self._public or path.startswith(self._public_under)

    @staticmethod
    def _given_keys(headers: Headers) -> list[str]:
        scheme, _, bearer = headers.get("authorization", "").partition(" ")
        given = [bearer.strip()] if scheme.lower() == "bearer" else []
        return given + ([headers["x-api-key"]] if "x-api-key" in headers else [])

    def _authorized(self, headers: Headers) -> bool:
        # Compare every candidate (no early exit), each in constant time.
        return sum(hmac.compare_digest(g.encode(), self._key) for g in self._given_keys(headers)) > 0

    def _unauthorized(self, headers: Headers) -> APIError:
        """401 as OpenAI's API words it: code invalid_api_key for a wrong key, none for a missing one (Anthropic's
        shape says authentication_error for both)."""
        how = "send it as 'Authorization: Bearer KEY' or 'x-api-key: KEY'"
        if self._given_keys(headers):
            return APIError(401, f"incorrect API key provided: {how}", code="invalid_api_key")
        return APIError(401, f"no API key provided: this server requires one; {how}")

    def _too_large(self) -> APIError:
        return APIError(413, f"the request body is larger than the server's limit of {self.max_request_bytes} "
                             "bytes (flashmoe serve --max-request-bytes)")

    def _counted(self, receive: Receive) -> Callable[[], Awaitable[Message]]:
        """receive(), raising APIError 413 (answered by the app's error handler) once the body passes the limit."""
        received = 0

        async def counted() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_request_bytes:
                    raise self._too_large()
            return message

        return counted


def is_loopback(host: str) -> bool:
    """Whether `host` (an address or 'localhost') is reachable only from this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
