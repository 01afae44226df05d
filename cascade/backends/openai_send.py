"""How tier requests are sent: :class:`OpenAISender` (the openai client's low-level ``post``) or the small
HTTP/1.1 client of :mod:`cascade.backends.http1` for plain-``http://`` servers (:func:`make_sender` picks).

Both have one face: ``post_json(route, body)`` returns the parsed answer, ``open_stream(route, body)`` a
response with ``chunks()`` (its body's bytes as they arrive), ``quiet()`` (the rest in one piece, when it may)
and ``aclose()``, plus ``aclose()`` and
``forget()`` (drop the connections of an event loop that is gone) for the sender itself.

Through the openai client, the client still adds the key, the default headers and the idempotency key, applies its
timeout, retries connection errors, timeouts, 408, 409, 429 and 5xx with backoff, and raises its own errors for HTTP
errors (mapped by :func:`cascade.backends.openai_request.map_errors`), and serialises the body. What it is spared is
the per-request work of ``chat.completions.create``: its ~40 keyword arguments turned into a body by its TypedDict
transform, and the options built around them (5-8% of the gateway's CPU per request, profiled); the body is the one
:func:`~cascade.backends.openai_request.request_body` built, sent as it is (``post(body=...)``, which every openai
release since 1.0 takes). Answers come back as the HTTP library's raw response (``httpx``, or ``httpx2`` in newer
openai releases), read as JSON bytes.

Used by :class:`~cascade.backends.openai_compat.OpenAIBackend`.
"""

from __future__ import annotations

import functools
import importlib
import sys
from collections.abc import AsyncIterator, Mapping
from typing import Any

from cascade.backends.openai_answer import decode_json

__all__ = ["ROUTES", "OpenAISender", "make_sender"]

#: The path of each API under the client's base URL.
ROUTES = {"chat": "/chat/completions", "completions": "/completions"}


def _response_type(client: Any) -> type:
    """The ``Response`` class of the HTTP library under ``client`` (``cast_to`` it for the raw response)."""
    http_client: type = type(getattr(client, "_client", None))
    return _response_class(http_client)


@functools.cache
def _response_class(http_client: type) -> type:
    """The ``Response`` of the library whose ``AsyncClient`` ``http_client`` is (or subclasses)."""
    for cls in http_client.__mro__:
        module = sys.modules.get(cls.__module__.partition(".")[0])
        if isinstance(getattr(module, "Response", None), type):
            return module.Response  # type: ignore[union-attr,no-any-return]
    return importlib.import_module("httpx").Response  # type: ignore[no-any-return]


def make_sender(base_url: str | None, *, api_key: str, timeout_s: float, max_retries: int) -> Any:
    """The sender for one server: :class:`~cascade.backends.http1.Http1Client` when
    :func:`~cascade.backends.http1.usable` says so (``http://``, no proxy), else an :class:`OpenAISender`
    (``https://``, a proxy from the environment, or no URL: ``OPENAI_BASE_URL`` or OpenAI's own)."""
    from cascade.backends import http1

    if base_url is not None and http1.usable(base_url):
        return http1.Http1Client(base_url, api_key=api_key, max_retries=max_retries, user_agent=_user_agent())
    from openai import AsyncOpenAI

    return OpenAISender(AsyncOpenAI(api_key=api_key, base_url=base_url, timeout=timeout_s, max_retries=max_retries))


@functools.cache
def _user_agent() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f"uncertainty-cascade/{version('uncertainty-cascade')}"
    except PackageNotFoundError:  # (run from a source tree)
        return "uncertainty-cascade"


class OpenAISender:
    """Requests through an ``openai.AsyncOpenAI`` client (which adds the key and its headers, applies its timeout
    and retries, and raises its own errors: :func:`cascade.backends.openai_request.map_errors` maps them)."""

    def __init__(self, client: Any) -> None:
        self.client = client
        self.base_url = str(client.base_url)

    async def post_json(self, route: str, body: Mapping[str, Any]) -> Any:
        """POST ``body`` to ``route`` (e.g. ``/chat/completions``) and return the answer's parsed JSON.

        Raises:
            openai.OpenAIError: as the client raises it (HTTP error after its retries, connection, timeout).
            ValueError: the answer is not JSON.
        """
        raw = await self.client.post(route, cast_to=_response_type(self.client), body=dict(body))
        return decode_json(raw.content)

    async def open_stream(self, route: str, body: Mapping[str, Any]) -> _Stream:
        """POST ``body`` and return the response once its headers arrived, its body unread (read ``chunks()``,
        then ``aclose()``). HTTP errors raise as in :meth:`post_json`."""
        resp = await self.client.post(route, cast_to=_response_type(self.client), body=dict(body), stream=True)
        return _Stream(resp)

    async def aclose(self) -> None:
        await self.client.close()

    def forget(self) -> None:
        """Nothing to do: the default transport's connections go with their event loop."""


class _Stream:
    def __init__(self, resp: Any) -> None:
        self._resp = resp

    def chunks(self) -> AsyncIterator[bytes]:
        """The body's bytes: undecoded when the server sent them without a content encoding (one layer of
        httpx's per-chunk iterators fewer), else decoded."""
        resp = self._resp
        if resp.headers.get("content-encoding", "identity").strip().lower() in ("", "identity"):
            return resp.aiter_raw()  # type: ignore[no-any-return]
        return resp.aiter_bytes()  # type: ignore[no-any-return]

    def quiet(self) -> None:
        """(The openai client's transport wakes its reader at every network read: nothing to change.)"""

    async def aclose(self) -> None:
        await self._resp.aclose()
