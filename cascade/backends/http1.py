"""A small HTTP/1.1 client for tier requests to plain-``http://`` servers (vLLM, llama.cpp, TGI, SGLang in a
cluster): one write per request, the answer parsed from the socket's bytes as they arrive.

Why not the openai client here: profiled in ``cascade serve`` (accepted requests, streamed small-tier answers),
the openai client's request building, its ``httpx``/``httpx2`` layers and their transport (httpcore or aiohttp)
cost the gateway about 1.5 of its 4 ms of CPU per request; the same request and answer over an
:class:`asyncio.Protocol` costs a tenth of that. What this client keeps of the openai client:

* **Retries**: ``max_retries`` times after a refused or dropped connection and after HTTP 408, 409, 429 and
  5xx, with exponential backoff (0.5 s doubling, at most 8 s, 25% jitter), honouring ``Retry-After``
  (``retry-after-ms``) up to 60 s and ``x-should-retry``, as the openai client does. A stale pooled
  connection (closed by the server while idle) is replaced once at once, without counting as an attempt.
* **Errors** are the cascade's own, worded as :func:`~cascade.backends.openai_request.map_errors` words the
  openai client's (``cannot reach``, ``HTTP 500 from ...: <the server's message>``, a connection lost mid-stream).
* **The key** as ``Authorization: Bearer``; credentials in the URL are never sent or shown.

Timeouts are not this module's: the backend bounds each request, retries and the whole answer included, by
``timeout_s`` (:func:`cascade.deadlines.within`), so no timer runs per read.

Connections: a pool of idle keep-alive connections (most recently used first, dropped after
:data:`KEEPALIVE_S` idle, below the 5 s of uvicorn, which vLLM and SGLang run on); a new connection when none
is idle. The pool never holds more connections than requests were in flight at once, which the backend bounds
by ``max_concurrency``. A response closed before its end closes its connection: that is how the server learns
to stop generating (the early exit). Bodies are read as they arrive (``Content-Length``, chunked, or up to
the connection's end) and decoded when the server compressed them anyway (gzip, deflate):
:mod:`cascade.backends.http1_read`.

Redirects are not followed (a tier that answers 3xx is misconfigured: the error names the status).

Only ``http://`` URLs with no proxy set for their host in the environment (``HTTP_PROXY``/``NO_PROXY``) are
sent this way (:func:`usable`); ``https://`` and proxied servers go through the openai client.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import time
import urllib.request
from collections.abc import AsyncIterator, Mapping
from typing import Any
from urllib.parse import quote, urlsplit

from cascade.backends.http1_read import (
    MAX_HEAD,
    Conn,
    ConnectionFault,
    Decoder,
    ProtocolFault,
    StatusFault,
    read_head,
)
from cascade.backends.openai_answer import decode_json
from cascade.errors import BackendError, ConfigError

__all__ = ["KEEPALIVE_S", "ConnectionFault", "Http1Client", "Http1Stream", "ProtocolFault", "StatusFault", "usable"]

#: Seconds an idle pooled connection is kept (servers on uvicorn close theirs after 5 s).
KEEPALIVE_S = 4.0
#: The largest non-streamed body accepted (bytes).
MAX_BODY = 64 * 1024 * 1024
#: Retried statuses (as the openai client: request timeout, lock conflict, rate limit, server errors).
RETRY_STATUS = frozenset((408, 409, 429))


def usable(base_url: str) -> bool:
    """Whether requests to ``base_url`` can go through this client: ``http://`` with no proxy for its host."""
    parts = urlsplit(base_url)
    if parts.scheme != "http" or not parts.hostname:
        return False
    proxies = urllib.request.getproxies_environment()
    if not (proxies.get("http") or proxies.get("all")):
        return True
    bypass = getattr(urllib.request, "proxy_bypass_environment")  # noqa: B009 - (not in typeshed)
    return bool(bypass(parts.hostname, proxies))


class Http1Stream:
    """A response whose body is read as it arrives (:meth:`chunks`); :meth:`aclose` returns its connection to
    the pool when the body was read to its end, and closes it otherwise."""

    def __init__(self, client: Http1Client, conn: Conn, decoder: Decoder) -> None:
        self._client, self._conn, self._decoder = client, conn, decoder
        self._closed = False

    def chunks(self) -> AsyncIterator[bytes]:
        return self._decoder.chunks()

    def quiet(self) -> None:
        """From now on, :meth:`chunks` yields only once the body may be complete (or the connection is gone):
        for a reader that needs the rest of an answer but not its pieces as they come (one wake-up instead of
        one per streamed token)."""
        self._conn.hint = self._decoder.may_end

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        d = self._decoder
        self._client.release(self._conn, reuse=d.done and d.reusable and not self._conn.buf)


class Http1Client:
    """Requests to one server (``base_url``, e.g. ``http://127.0.0.1:8000/v1``); see the module's notes.

    Args:
        base_url: the server's URL, ``http://`` (credentials in it are dropped, never sent).
        api_key: sent as ``Authorization: Bearer``.
        max_retries: retries of a refused or dropped connection or a retried status (0: none).
        user_agent: the ``User-Agent`` header.

    Raises:
        ConfigError: not an ``http://`` URL, or a key that cannot be sent in a header.
    """

    def __init__(self, base_url: str, *, api_key: str, max_retries: int, user_agent: str) -> None:
        parts = urlsplit(base_url)
        try:
            port = parts.port
        except ValueError as exc:
            raise ConfigError(f"invalid port in the URL: {exc}") from None
        if parts.scheme != "http" or not parts.hostname:
            raise ConfigError(f"not an http:// URL: {parts.scheme}://{parts.hostname}")
        if any(c in api_key + user_agent for c in "\r\n\0") or not (api_key + user_agent).isascii():
            raise ConfigError("the API key or user agent holds a line break, NUL or non-ASCII character")
        self.base_url = base_url.rstrip("/") + "/"
        self.host = parts.hostname
        self.port = port or 80
        self._prefix = quote(parts.path.rstrip("/"), safe="/%;:@&=+$,!~*'()")
        self._query = f"?{parts.query}" if parts.query else ""
        host = f"[{self.host}]" if ":" in self.host else self.host
        authority = host if port in (None, 80) else f"{host}:{port}"
        self._headers = (f"Host: {authority}\r\nAuthorization: Bearer {api_key}\r\nUser-Agent: {user_agent}\r\n"
                         "Content-Type: application/json\r\nAccept-Encoding: identity\r\n").encode("latin-1")
        self.max_retries = max_retries
        self._idle: list[Conn] = []
        self._busy: set[Conn] = set()
        self.connections_opened = 0
        self.closed = False

    # -- public --------------------------------------------------------------------------------------

    async def post_json(self, route: str, body: Mapping[str, Any]) -> Any:
        """POST ``body`` as JSON to ``route`` (e.g. ``/chat/completions``) and return the answer's parsed JSON.

        Raises:
            ConnectionFault: refused or dropped, after the retries. StatusFault: an HTTP error status, after
            the retries. ValueError: the answer is not JSON.
        """
        stream = await self.open_stream(route, body, accept="application/json")
        try:
            data = bytearray()
            async for piece in stream.chunks():
                data += piece
                if len(data) > MAX_BODY:
                    raise ProtocolFault(f"answer larger than {MAX_BODY} bytes", received=True)
        finally:
            await stream.aclose()
        return decode_json(data)

    async def open_stream(self, route: str, body: Mapping[str, Any], *, accept: str = "text/event-stream"
                          ) -> Http1Stream:
        """POST ``body`` and return the response once a 2xx head arrived, its body unread (the caller reads
        :meth:`Http1Stream.chunks` and must :meth:`~Http1Stream.aclose` it). Raises as :meth:`post_json`."""
        payload = json.dumps(body, ensure_ascii=False).encode()
        request = b"".join((b"POST ", (self._prefix + route + self._query).encode("latin-1"), b" HTTP/1.1\r\n",
                            self._headers, b"Accept: ", accept.encode("latin-1"), b"\r\nContent-Length: ",
                            str(len(payload)).encode(), b"\r\n\r\n", payload))
        attempt = 0
        while True:
            try:
                return await self._send(request)
            except ConnectionFault as exc:
                if attempt >= self.max_retries:
                    raise
                wait = _backoff(attempt, {})
                fault: Exception = exc
            except StatusFault as exc:
                should = exc.headers.get("x-should-retry", "").lower()
                retried = exc.status in RETRY_STATUS or exc.status >= 500
                if attempt >= self.max_retries or should == "false" or not (retried or should == "true"):
                    raise
                wait = _backoff(attempt, exc.headers)
                fault = exc
            attempt += 1
            del fault
            await asyncio.sleep(wait)

    def release(self, conn: Conn, *, reuse: bool) -> None:
        """Take ``conn`` back: idle in the pool when ``reuse`` (and it is still open), else closed."""
        self._busy.discard(conn)
        conn.hint = None
        if reuse and not conn.lost and not self.closed:
            conn.idle_since = time.monotonic()
            self._idle.append(conn)
        else:
            conn.close()

    async def aclose(self) -> None:
        """Close every connection (a stream still being read fails)."""
        self.forget()

    def forget(self) -> None:
        """Close every connection now, without awaiting (also for a pool whose event loop is gone)."""
        self.closed = True
        for conn in (*self._idle, *self._busy):
            conn.close()
        self._idle.clear()
        self._busy.clear()

    # -- one attempt ---------------------------------------------------------------------------------

    async def _send(self, request: bytes) -> Http1Stream:
        conn, reused = await self._connection()
        try:
            return await self._exchange(conn, request)
        except ConnectionFault as exc:
            self.release(conn, reuse=False)
            if not reused or exc.received:
                raise
        except BaseException:  # a status error, a cancelled request: its connection is not reused
            self.release(conn, reuse=False)
            raise
        conn, _ = await self._connection(fresh=True)  # a stale pooled connection: once more on a new one
        try:
            return await self._exchange(conn, request)
        except BaseException:
            self.release(conn, reuse=False)
            raise

    async def _exchange(self, conn: Conn, request: bytes) -> Http1Stream:
        conn.received = 0
        assert conn.transport is not None
        conn.transport.write(request)
        head = await read_head(conn)
        decoder = Decoder(conn, head)
        if 200 <= head.status < 300:
            return Http1Stream(self, conn, decoder)
        text = bytearray()
        async for piece in decoder.chunks():
            text += piece
            if len(text) > MAX_HEAD:
                break
        raise StatusFault(head.status, _server_message(bytes(text)), head.headers)

    async def _connection(self, *, fresh: bool = False) -> tuple[Conn, bool]:
        if self.closed:
            raise BackendError("the client was closed")
        now = time.monotonic()
        while self._idle and not fresh:
            conn = self._idle.pop()
            if conn.lost or conn.buf or now - conn.idle_since > KEEPALIVE_S:
                conn.close()
                continue
            self._busy.add(conn)
            return conn, True
        loop = asyncio.get_running_loop()
        try:
            _, conn = await loop.create_connection(Conn, self.host, self.port)
        except OSError as exc:
            raise ConnectionFault(f"cannot connect to {self.host}:{self.port}: {exc.strerror or exc}") from exc
        self.connections_opened += 1
        self._busy.add(conn)
        return conn, False


def _backoff(attempt: int, headers: Mapping[str, str]) -> float:
    """Seconds before the next attempt: the server's ``Retry-After`` when it gives one within 60 s, else
    0.5 s doubling per attempt, at most 8 s, less up to 25% jitter (the openai client's schedule)."""
    for name, scale in (("retry-after-ms", 0.001), ("retry-after", 1.0)):
        value = headers.get(name)
        if value is not None:
            with contextlib.suppress(ValueError):
                wait = float(value) * scale
                if 0 < wait <= 60:
                    return wait
    return min(0.5 * 2.0 ** attempt, 8.0) * (1.0 - 0.25 * random.random())


def _server_message(body: bytes) -> str:
    """The error message of an error answer: an OpenAI-style JSON error's ``message``, else the body's text."""
    text = body.decode("utf-8", "replace").strip()
    with contextlib.suppress(ValueError):
        data = json.loads(text)
        inner = data.get("error", data) if isinstance(data, dict) else None
        if isinstance(inner, dict) and isinstance(inner.get("message"), str):
            return str(inner["message"])
        if isinstance(inner, str):
            return inner
    return text[:500] or "(no body)"
