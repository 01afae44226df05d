"""Raw ASGI plumbing of ``cascade serve``'s hot endpoints: complete responses rendered once, the request body read
straight from ``receive``, and the app that sends the hot endpoints past Starlette's middleware and router.

The hot endpoints (``POST /v1/chat/completions``, ``POST /v1/completions``, ``GET /health``) are plain ASGI
handlers that answer every error themselves (OpenAI-style JSON); Starlette routes them too (so a ``root_path``,
another method or anything unusual still gets Starlette's own answer), but an exact method and path match skips
its middleware stack, its router and its Request objects, which cost more CPU per request than the handler's own
work on a quiet gateway.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Iterable, Mapping, MutableMapping
from typing import TYPE_CHECKING, Any

from cascade.server.wire import HTTPError

if TYPE_CHECKING:
    from starlette.applications import Starlette

__all__ = ["ASGIHandler", "ClientGone", "Endpoint", "Reply", "error_reply", "gateway", "json_reply", "read_body",
           "request_headers"]

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
ASGIHandler = Callable[[Scope, Receive, Send], Awaitable[None]]

#: Starlette's ``JSONResponse`` rendering (compact, UTF-8, no NaN), with one encoder made once
_JSON = json.JSONEncoder(ensure_ascii=False, allow_nan=False, separators=(",", ":"))
_JSON_TYPE = (b"content-type", b"application/json")


_READ = frozenset((b"host", b"origin", b"authorization", b"content-type", b"content-length"))


def request_headers(scope: Scope) -> dict[str, str]:
    """The request headers the service reads, decoded in one pass over the raw list and kept for the request
    (each Starlette ``headers.get`` scans and decodes the whole list). The first of a repeated header wins, as
    with ``headers.get``."""
    found: dict[str, str] | None = scope.get("cascade.headers")
    if found is None:
        found = {}
        for key, value in scope["headers"]:
            if key in _READ:
                found.setdefault(key.decode("latin-1"), value.decode("latin-1"))
        scope["cascade.headers"] = found
    return found


class ClientGone(Exception):
    """The client disconnected while its request body was being received."""


class Reply:
    """A complete response, rendered once: status, raw headers and body (the bytes Starlette's ``Response`` would
    send: the given headers lowercased, then ``content-length`` and ``content-type`` unless given)."""

    __slots__ = ("body", "headers", "status")

    def __init__(self, status: int, body: bytes, headers: Iterable[tuple[bytes, bytes]],
                 content_type: tuple[bytes, bytes] | None = None) -> None:
        self.status, self.body = status, body
        self.headers = list(headers)
        if not (status < 200 or status in (204, 304)):
            self.headers.append((b"content-length", str(len(body)).encode()))
        if content_type is not None:
            self.headers.append(content_type)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": self.status, "headers": self.headers})
        await send({"type": "http.response.body", "body": self.body})


def _raw(headers: Mapping[str, str] | None) -> list[tuple[bytes, bytes]]:
    return [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in (headers or {}).items()]


def json_reply(payload: Any, status: int = 200, headers: Mapping[str, str] | None = None) -> Reply:
    """``payload`` as Starlette's ``JSONResponse`` sends it."""
    return Reply(status, _JSON.encode(payload).encode("utf-8"), _raw(headers), _JSON_TYPE)


def error_reply(exc: HTTPError) -> Reply:
    """The JSON error, ASCII-escaped: a message may echo a client's string, lone surrogates included."""
    return Reply(exc.status, json.dumps(exc.body()).encode("utf-8"), _raw(exc.headers), _JSON_TYPE)


async def read_body(receive: Receive, limit: int) -> bytes:
    """The request body from ``receive``, at most ``limit`` bytes (HTTPError 413 beyond; ClientGone if the client
    disconnects first). Messages of other types are skipped, as Starlette's ``Request.stream`` does."""
    parts: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        kind = message["type"]
        if kind == "http.request":
            chunk = message.get("body", b"")
            if chunk:
                parts.append(chunk)
                size += len(chunk)
                if size > limit:
                    raise HTTPError(413, f"request body larger than {limit} bytes", code="request_too_large")
            if not message.get("more_body", False):
                return bytes(parts[0]) if len(parts) == 1 else b"".join(parts)
        elif kind == "http.disconnect":
            raise ClientGone()


class Endpoint:
    """An ASGI handler as a Starlette route endpoint (a callable object: Starlette calls it as an ASGI app, with
    no Request of its own)."""

    def __init__(self, handler: ASGIHandler) -> None:
        self.handler = handler

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.handler(scope, receive, send)


def gateway(hot: Mapping[tuple[str, str], ASGIHandler], **starlette: Any) -> Starlette:
    """A Starlette app (``Starlette(**starlette)``) that sends a request whose method and path are a key of ``hot``
    straight to its handler, past the middleware stack and the router; everything else (and every request under
    a ``root_path``) goes through Starlette as usual. The handlers answer their own errors."""
    from starlette.applications import Starlette

    class Gateway(Starlette):
        async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
            if scope["type"] == "http" and not scope.get("root_path"):
                handler = hot.get((scope["method"], scope["path"]))
                if handler is not None:
                    scope["app"] = self
                    await handler(scope, receive, send)
                    return
            await super().__call__(scope, receive, send)

    return Gateway(**starlette)
