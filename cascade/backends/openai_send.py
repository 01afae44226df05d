"""Requests to an OpenAI-compatible server sent through the openai client's low-level ``post``.

The client still adds the key, the default headers and the idempotency key, applies its timeout, retries
connection errors, timeouts, 408, 409, 429 and 5xx with backoff, and raises its own errors for HTTP errors
(mapped by :func:`cascade.backends.openai_request.map_errors`), and serialises the body. What it is spared is
the per-request work of ``chat.completions.create``: its ~40 keyword arguments turned into a body by its
TypedDict transform, and the options built around them (5-8% of the gateway's CPU per request, profiled); the
body is the one :func:`~cascade.backends.openai_request.request_body` built, sent as it is (``post(body=...)``,
which every openai release since 1.0 takes). Answers come back as the HTTP library's raw response (``httpx``,
or ``httpx2`` in newer openai releases), read as JSON bytes.

Used by :class:`~cascade.backends.openai_compat.OpenAIBackend`.
"""

from __future__ import annotations

import functools
import importlib
import json
import sys
from collections.abc import Mapping
from typing import Any

__all__ = ["ROUTES", "open_stream", "post_json"]

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


async def post_json(client: Any, api: str, body: Mapping[str, Any]) -> Any:
    """POST ``body`` to ``api`` (``"chat"`` or ``"completions"``) and return the answer's parsed JSON.

    Raises:
        openai.OpenAIError: as the client raises it (HTTP error after its retries, connection, timeout).
        ValueError: the answer is not JSON.
    """
    raw = await client.post(ROUTES[api], cast_to=_response_type(client), body=dict(body))
    return json.loads(raw.content)


async def open_stream(client: Any, api: str, body: Mapping[str, Any]) -> Any:
    """POST ``body`` to ``api`` and return the response once its headers arrived, its body unread.

    The caller reads it (``aiter_bytes``) and must close it (``aclose``). HTTP errors raise as in
    :func:`post_json`.
    """
    return await client.post(ROUTES[api], cast_to=_response_type(client), body=dict(body), stream=True)
