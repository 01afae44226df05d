"""The openai client's HTTP transport over aiohttp, when aiohttp is installed (``pip install '...[fast]'``).

The openai client sends through an ``httpx``-style client (``httpx2`` in openai 2.x/3.x, ``httpx`` before). Its
default transport (httpcore on anyio) opens a cancel scope and a timer for every socket read, about twenty of them
per streamed tier answer, and probes every idle pooled connection on each request; profiled, that was the largest
cost left in ``cascade serve`` with remote tiers. :func:`aiohttp_client` returns the same client class with an
aiohttp transport under it (aiohttp's C HTTP parser, one future per read): the openai client above is unchanged
(key, headers, timeout, retries, its own errors), and so is everything this package does with it.

What the transport keeps of the default one:

* **Errors** are raised as the HTTP library's own types, so the openai client and
  :func:`cascade.backends.openai_request.map_errors` see what httpcore would have raised: a refused connection is
  ``ConnectError`` (not a timeout), a server that drops the connection ``RemoteProtocolError``, a read past the
  read timeout ``ReadTimeout``.
* **Pooling**: at most ``max_connections`` connections (the backend's ``max_concurrency``), idle ones kept 5 s
  (httpx's keep-alive expiry) and reused.
* **Closing**: a response closed before its body was read to the end closes its connection (the server sees
  the disconnect and stops generating: the early exit); one read to the end returns it to the pool.
* **Proxies** from the environment (``HTTPS_PROXY`` ...) still go through the library's own proxy transport.

Used by :class:`~cascade.backends.openai_compat.OpenAIBackend`.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.util
import warnings
import weakref
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import aiohttp

__all__ = ["KEEPALIVE_S", "aiohttp_client", "forget", "http_library"]

#: Seconds an idle pooled connection is kept (httpx's default keep-alive expiry, kept for the same servers).
KEEPALIVE_S = 5.0


def http_library() -> Any:
    """The HTTP library module the installed openai client sends through (``httpx2`` or ``httpx``)."""
    import openai

    limits = getattr(openai, "DEFAULT_CONNECTION_LIMITS", None)
    name = type(limits).__module__.partition(".")[0] if limits is not None else "httpx"
    return importlib.import_module(name if name in ("httpx", "httpx2") else "httpx")


def aiohttp_client(max_connections: int) -> Any | None:
    """An ``AsyncClient`` of :func:`http_library` whose transport is aiohttp, or None when aiohttp is missing.

    Args:
        max_connections: connections open at once at most (the pool's size).
    """
    if importlib.util.find_spec("aiohttp") is None:
        return None
    return _classes(http_library().__name__)[0](max_connections=max_connections)


def forget(client: Any) -> None:
    """Drop an aiohttp client whose event loop is no longer running, without awaiting anything.

    Its connections belong to that loop; this marks its session closed so that neither aiohttp nor the garbage
    collector complains about an unclosed session. A client of another transport is left as it is.
    """
    transport = getattr(client, "_transport", None)
    if isinstance(transport, _Transport):
        transport.forget()


def _mapped(lib: Any, exc: Exception) -> Exception | None:
    """The HTTP library's error for an aiohttp (or socket) error, as httpcore would raise it; None for others."""
    import aiohttp

    if isinstance(exc, getattr(aiohttp, "ConnectionTimeoutError", ())):
        return lib.ConnectTimeout(str(exc))  # type: ignore[no-any-return]
    if isinstance(exc, TimeoutError):  # aiohttp's read timeouts (asyncio.TimeoutError)
        return lib.ReadTimeout(str(exc) or "read timed out")  # type: ignore[no-any-return]
    if isinstance(exc, aiohttp.ClientConnectorError):
        return lib.ConnectError(str(exc))  # type: ignore[no-any-return]
    if isinstance(exc, aiohttp.ServerDisconnectedError | aiohttp.ClientPayloadError | aiohttp.ClientResponseError):
        return lib.RemoteProtocolError(str(exc) or type(exc).__name__)  # type: ignore[no-any-return]
    if isinstance(exc, aiohttp.ClientConnectionError | OSError):
        return lib.ReadError(str(exc) or type(exc).__name__)  # type: ignore[no-any-return]
    if isinstance(exc, aiohttp.ClientError):
        return lib.TransportError(str(exc) or type(exc).__name__)  # type: ignore[no-any-return]
    return None


class _Body:
    """A response body read as it arrives; closing it early closes the connection (mixed into the library's
    ``AsyncByteStream`` by :func:`_classes`)."""

    _lib: Any

    def __init__(self, resp: aiohttp.ClientResponse) -> None:
        self._resp = resp

    async def __aiter__(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self._resp.content.iter_any():
                yield chunk
        except Exception as exc:
            err = _mapped(self._lib, exc)
            if err is None:
                raise
            raise err from exc

    async def aclose(self) -> None:
        if self._resp.content.is_eof():
            self._resp.release()  # read to the end: the connection goes back to the pool
        else:
            self._resp.close()  # unread body: close the connection (the server stops generating)


class _Transport:
    """One aiohttp session, opened in the event loop of the first request (mixed into the library's
    ``AsyncBaseTransport`` by :func:`_classes`)."""

    _lib: Any
    _body: type

    def __init__(self, max_connections: int, ssl_context: Any) -> None:
        self._limit = max_connections
        self._ssl = ssl_context
        self._session: aiohttp.ClientSession | None = None
        self._dropper: weakref.finalize[Any, Any] | None = None
        self._timeouts: dict[tuple[Any, ...], aiohttp.ClientTimeout] = {}

    def _open(self) -> aiohttp.ClientSession:
        import aiohttp

        connector = aiohttp.TCPConnector(limit=self._limit, limit_per_host=0, keepalive_timeout=KEEPALIVE_S,
                                         ssl=self._ssl)
        self._session = aiohttp.ClientSession(connector=connector, auto_decompress=False, trust_env=False,
                                              cookie_jar=aiohttp.DummyCookieJar())
        # A backend dropped without aclose(): the session is marked closed when the transport goes (a weakref
        # callback runs before the session's own __del__ would complain, even when both are garbage in one cycle).
        self._dropper = weakref.finalize(self, _drop, self._session)
        return self._session

    def _timeout(self, t: dict[str, Any]) -> aiohttp.ClientTimeout:
        key = (t.get("connect"), t.get("read"), t.get("pool"))
        timeout = self._timeouts.get(key)
        if timeout is None:  # (one per distinct timeout: the backend uses one)
            import aiohttp

            timeout = self._timeouts[key] = aiohttp.ClientTimeout(total=None, connect=key[2], sock_connect=key[0],
                                                                  sock_read=key[1])
        return timeout

    async def handle_async_request(self, request: Any) -> Any:
        from yarl import URL

        lib = self._lib
        session = self._session or self._open()
        try:
            content = request.content
        except lib.RequestNotRead:
            content = await request.aread()
        url = URL(str(request.url), encoded=True)
        if request.url.userinfo:  # (the library made them an Authorization header unless the openai client set one)
            url = url.with_user(None)
        try:
            resp = await session.request(request.method, url, headers=request.headers.multi_items(),
                                         data=content or None, allow_redirects=False, compress=False,
                                         timeout=self._timeout(request.extensions.get("timeout", {})))
        except Exception as exc:
            err = _mapped(lib, exc)
            if err is None:
                raise
            raise err from exc
        extensions = {"http_version": b"HTTP/1.1"}
        if resp.reason:
            extensions["reason_phrase"] = resp.reason.encode("latin-1", "replace")
        return lib.Response(resp.status, headers=list(resp.raw_headers), stream=self._body(resp), request=request,
                            extensions=extensions)

    async def aclose(self) -> None:
        session, self._session = self._session, None
        if self._dropper is not None:
            self._dropper.detach()
        if session is not None:
            await session.close()

    def forget(self) -> None:
        """Mark the session closed and close its connector now, without awaiting (see :func:`forget`)."""
        self._session = None
        if self._dropper is not None:
            self._dropper()


def _drop(session: aiohttp.ClientSession) -> None:
    """Mark ``session`` closed and close its connector now, without awaiting anything."""
    if session.closed:
        return
    connector = session.connector
    session.detach()  # the session counts as closed from now on
    if connector is None:
        return
    # Close the connector now: its sockets when their loop is still open, else only its state. Its public close()
    # does the same and then schedules a task to await the sockets' closing, which a loop that no longer runs would
    # never run; aiohttp's own synchronous part is taken where it exists.
    close_now = getattr(connector, "_close", None)
    with warnings.catch_warnings(), contextlib.suppress(Exception):
        warnings.simplefilter("ignore")
        if close_now is not None:
            close_now()
        else:
            connector.close().__await__().close()


@functools.cache
def _classes(lib_name: str) -> tuple[type, type]:
    """The client and transport classes for one HTTP library (made once: they subclass that library's types)."""
    lib = importlib.import_module(lib_name)
    body = type("AiohttpBody", (_Body, lib.AsyncByteStream), {"_lib": lib})
    transport = type("AiohttpTransport", (_Transport, lib.AsyncBaseTransport), {"_lib": lib, "_body": body})

    class Client(lib.AsyncClient):  # type: ignore[misc,name-defined]
        """The library's ``AsyncClient`` with the aiohttp transport (proxies keep the library's own)."""

        def __init__(self, *, max_connections: int, **kwargs: Any) -> None:
            self._max_connections = max_connections
            kwargs.setdefault("follow_redirects", True)  # as the openai client's own default client
            super().__init__(**kwargs)

        def _init_transport(self, verify: Any = True, cert: Any = None, trust_env: bool = True,
                            transport: Any = None, **_: Any) -> Any:
            if transport is not None:
                return transport
            return transport_class(self._max_connections, lib.create_ssl_context(verify=verify, cert=cert,
                                                                                 trust_env=trust_env))

    transport_class = transport
    return Client, transport
