"""What the load test talks to: an in-process :class:`~cascade.engine.Cascade`, or an OpenAI-compatible HTTP
endpoint on this machine (loopback only: anything else is refused before a byte is sent).

A target's :meth:`send` answers one prompt with a :class:`Reply` or raises :class:`RequestFailed` carrying a
short error kind; the harness times the call itself.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from typing import Any, Protocol, Self
from urllib.parse import urlsplit, urlunsplit

from cascade.errors import CascadeError, ConfigError
from cascade.types import CascadeResult, Prompt
from eval.loadtest.stats import TierUse

__all__ = [
    "CascadeTarget",
    "HttpTarget",
    "LoadTarget",
    "Reply",
    "RequestFailed",
    "Started",
    "check_loopback",
    "reply_from_result",
]


def check_loopback(url: str) -> str:
    """Accept only a URL on this machine; return the OpenAI base URL (ending in ``/v1``).

    Allowed hosts: ``localhost``, any address of 127.0.0.0/8, ``::1`` (and IPv4-mapped ``::ffff:127.x.y.z``).
    Names are not resolved: a name other than ``localhost`` is refused even if it points at 127.0.0.1.

    Raises:
        ConfigError: not an http(s) URL, or a host outside the loopback range.
    """
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"target must be an http:// or https:// URL with a host, got {url!r}")
    host = parts.hostname
    loopback = host == "localhost"
    if not loopback:
        try:
            addr = ipaddress.ip_address(host)
        except ValueError:
            addr = None
        if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
            addr = addr.ipv4_mapped
        loopback = addr is not None and addr.is_loopback
    if not loopback:
        raise ConfigError(f"refusing to load-test {host!r}: only loopback targets are allowed "
                          "(localhost, 127.0.0.0/8, ::1)")
    try:
        _ = parts.port
    except ValueError as exc:
        raise ConfigError(f"bad port in target {url!r}: {exc}") from exc
    path = parts.path.rstrip("/")
    if not path.endswith("/v1"):
        path += "/v1"
    return urlunsplit((parts.scheme, parts.netloc, path, "", ""))


class RequestFailed(Exception):
    """A request ended without an answer.

    Attributes:
        kind: a short error kind for the report (``"http_429"``, ``"connect_error"``, ``"BackendError"``...).
    """

    def __init__(self, kind: str, message: str = "") -> None:
        super().__init__(message or kind)
        self.kind = kind


@dataclass(frozen=True, slots=True)
class Reply:
    """One answer as the user received it.

    Attributes:
        text: the answer.
        tier: the tier that answered (None when the target does not say).
        escalated: a tier above the first was called.
        degraded: a higher tier failed and a lower tier's answer came back.
        cost: the request's cost (0 when unknown).
        calls: what each tier did.
        backend_s: seconds spent in backends (None when unknown).
        ttft_s: seconds from sending to the first streamed token (None when not streaming).
        engine_s: the engine's end-to-end seconds as the server reports them (None when unknown).
    """

    text: str
    tier: str | None = None
    escalated: bool = False
    degraded: bool = False
    cost: float = 0.0
    calls: tuple[TierUse, ...] = ()
    backend_s: float | None = None
    ttft_s: float | None = None
    engine_s: float | None = None


class LoadTarget(Protocol):
    """Something the load generator can send prompts to."""

    name: str

    async def send(self, prompt: Prompt, *, stream: bool) -> Reply:
        """Answer one prompt; raise :class:`RequestFailed` (or anything else, classified by type name)."""
        ...

    def queue_depth(self) -> int | None:
        """Requests waiting inside the target right now, or None when it cannot be seen."""
        ...

    async def aclose(self) -> None:
        """Release connections."""
        ...


def reply_from_result(result: CascadeResult) -> Reply:
    """Turn an engine result into a :class:`Reply`; backend time is the sum of ``TierCall.latency_s``."""
    calls = tuple(TierUse(c.tier, c.prompt_tokens, c.completion_tokens, c.cost, c.latency_s, c.error)
                  for c in result.calls)
    return Reply(result.text, result.tier, result.escalated, result.degraded, result.cost, calls,
                 sum(c.latency_s for c in result.calls))


class CascadeTarget:
    """An in-process cascade (called directly, or through a micro-batcher's submit function).

    Args:
        run: answers one prompt, e.g. ``cascade.run`` or a batcher's submit coroutine function.
        name: label for the report.
        queue_depth: returns the batcher's queue depth, when there is one.
        closers: coroutines functions run by :meth:`aclose` (batcher, cascade), in order.
    """

    def __init__(self, run: Callable[[Prompt], Awaitable[CascadeResult]], name: str = "in-process cascade",
                 queue_depth: Callable[[], int] | None = None,
                 closers: tuple[Callable[[], Awaitable[None]], ...] = ()) -> None:
        self.name = name
        self._run = run
        self._depth = queue_depth
        self._closers = closers

    async def send(self, prompt: Prompt, *, stream: bool) -> Reply:
        """Run the cascade on one prompt (``stream`` is ignored: the engine answers whole)."""
        try:
            result = await self._run(prompt)
        except CascadeError as exc:
            raise RequestFailed(type(exc).__name__, str(exc)) from exc
        return reply_from_result(result)

    def queue_depth(self) -> int | None:
        """The batcher's queue depth, or None."""
        return self._depth() if self._depth is not None else None

    async def aclose(self) -> None:
        """Close the batcher and the cascade's backends."""
        for close in self._closers:
            await close()


class HttpTarget:
    """An OpenAI-compatible ``/v1/chat/completions`` endpoint on loopback (``cascade serve`` or any peer).

    Backend time is read from the response's ``cascade`` extra field when present (the sum of its calls'
    ``latency_s``); otherwise the engine overhead of this target is unknown and reported as such. When the
    server's ``/health`` reports ``queue_depth`` (``cascade serve`` does), it is polled every 0.5 s.

    Args:
        url: the server (``http://127.0.0.1:8000`` or ``.../v1``); refused unless loopback.
        model: model id to send; None asks ``/v1/models`` at :meth:`start` and takes the first.
        max_tokens: ``max_tokens`` of each request.
        timeout_s: seconds allowed to connect (at most 10) and between two reads of an answer before the
            request counts as a ``timeout`` failure.
        connections: most simultaneous connections (use at least the number of users).

    The client is aiohttp (the ``dev`` extra): its C HTTP parser and one connection pool take about a third
    of httpx's CPU per request, and the load generator shares the machine with the servers it measures.
    Streamed answers are read as raw bytes, one ``json.loads`` per ``data:`` line. No proxy or other setting
    is read from the environment (loopback traffic stays on loopback), and no cookie is kept.
    """

    def __init__(self, url: str, *, model: str | None = None, max_tokens: int = 16, timeout_s: float = 60.0,
                 connections: int = 1000) -> None:
        self.base_url = check_loopback(url)
        self.name = self.base_url
        self.model = model
        self.max_tokens = max_tokens
        self.timeout_s = timeout_s
        self.connections = connections
        self.health_interval_s = 0.5
        self._session: Any = None
        self._health_session: Any = None
        self._depth: int | None = None
        self._poller: asyncio.Task[None] | None = None
        self._chat_url: Any = None  # a yarl.URL, parsed once

    async def start(self) -> None:
        """Open the connection pool and find the model id if none was given.

        Raises:
            ConfigError: aiohttp is not installed, or the server cannot be reached or lists no model.
        """
        try:
            import aiohttp
            import yarl
        except ImportError as exc:
            raise ConfigError("the HTTP load generator needs aiohttp (in the dev extra)") from exc

        self._chat_url = yarl.URL(self.base_url + "/chat/completions")
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=min(10.0, self.timeout_s), sock_read=self.timeout_s)
        # trust_env=False: no proxy from the environment may carry loopback traffic elsewhere.
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=self.connections, limit_per_host=0), timeout=timeout,
            trust_env=False, cookie_jar=aiohttp.DummyCookieJar())
        self._health_session = aiohttp.ClientSession(  # /models and /health, never queued behind the load
            connector=aiohttp.TCPConnector(limit=2), timeout=aiohttp.ClientTimeout(total=10.0), trust_env=False,
            cookie_jar=aiohttp.DummyCookieJar())
        if self.model is None:
            try:
                async with self._health_session.get(self.base_url + "/models") as resp:
                    resp.raise_for_status()
                    self.model = str(json.loads(await resp.read())["data"][0]["id"])
            except (aiohttp.ClientError, TimeoutError, ValueError, KeyError, IndexError, TypeError) as exc:
                await self.aclose()
                raise ConfigError(f"cannot list models at {self.base_url}/models ({exc!r}); pass --model") from exc
        if await self._health() is not None:  # a server that reports its queue (cascade serve): watch it
            self._poller = asyncio.create_task(self._poll())

    def _root(self) -> str:
        """The server root (the base URL without its trailing ``/v1``)."""
        return self.base_url[: -len("/v1")]

    async def _health(self) -> int | None:
        """The ``queue_depth`` the server's ``/health`` reports, or None."""
        import aiohttp

        try:
            async with self._health_session.get(self._root() + "/health", timeout=aiohttp.ClientTimeout(total=2.0)
                                                ) as resp:
                depth = json.loads(await resp.read()).get("queue_depth")
        except (aiohttp.ClientError, TimeoutError, ValueError, AttributeError):
            return None
        self._depth = int(depth) if isinstance(depth, int) and not isinstance(depth, bool) else None
        return self._depth

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self.health_interval_s)
            await self._health()

    async def send(self, prompt: Prompt, *, stream: bool) -> Reply:
        """POST one chat completion (streamed with ``stream``) and parse what the user got."""
        import aiohttp

        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
        body: dict[str, Any] = {"model": self.model, "messages": messages, "max_tokens": self.max_tokens}
        if stream:
            body.update(stream=True, stream_options={"include_usage": True})
        t0 = time.perf_counter()
        try:
            async with self._session.post(self._chat_url, data=json.dumps(body).encode(), headers=_JSON) as resp:
                if resp.status != 200:
                    raise RequestFailed(f"http_{resp.status}", (await resp.read()).decode(errors="replace")[:300])
                if stream:
                    return await _streamed(resp, t0)
                data = json.loads(await resp.read())
            if len(data["choices"]) != 1:
                raise RequestFailed("bad_response", f"{len(data['choices'])} choices instead of exactly one")
            text = data["choices"][0]["message"]["content"] or ""
            return _reply(text, data)
        except TimeoutError as exc:  # aiohttp's connect and read timeouts are TimeoutErrors
            raise RequestFailed("timeout", repr(exc)) from exc
        except aiohttp.ClientConnectorError as exc:
            raise RequestFailed("connect_error", repr(exc)) from exc
        except aiohttp.ClientError as exc:
            raise RequestFailed("http_error", f"{type(exc).__name__}: {exc}") from exc
        except (ValueError, KeyError, IndexError, TypeError) as exc:
            raise RequestFailed("bad_response", repr(exc)) from exc

    def queue_depth(self) -> int | None:
        """The queue depth last read from the server's ``/health`` (None when it does not report one)."""
        return self._depth

    async def aclose(self) -> None:
        """Stop watching ``/health`` and close the connection pools."""
        if self._poller is not None:
            self._poller.cancel()
            await asyncio.gather(self._poller, return_exceptions=True)
            self._poller = None
        for session in (self._session, self._health_session):
            if session is not None:
                await session.close()
        self._session = self._health_session = None


_JSON = {"Content-Type": "application/json"}


async def _streamed(resp: Any, t0: float) -> Reply:
    """Read a server-sent event stream (an aiohttp response) up to ``data: [DONE]``."""
    ttft: float | None = None
    parts: list[str] = []
    last: dict[str, Any] = {}
    rest = b""
    async for data in resp.content.iter_any():
        lines = (rest + data).split(b"\n")
        rest = lines.pop()  # an incomplete line waits for the next read
        for line in lines:
            if not line.startswith(b"data:"):
                continue
            payload = line[5:].strip()
            if payload == b"[DONE]":
                await resp.read()  # the rest of the response (its end), so that the connection is kept
                return replace(_reply("".join(parts), last), ttft_s=ttft)
            chunk = json.loads(payload)
            if "error" in chunk:
                raise RequestFailed("stream_error", str(chunk["error"])[:300])
            for choice in chunk.get("choices") or ():
                piece = (choice.get("delta") or {}).get("content")
                if piece:
                    if ttft is None:
                        ttft = time.perf_counter() - t0
                    parts.append(piece)
            if "cascade" in chunk or chunk.get("usage"):
                last = {**last, **chunk}
    raise RequestFailed("stream_cut", "the stream ended before data: [DONE]")


def _num(value: Any, default: float = 0.0) -> float:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else default


def _reply(text: str, data: dict[str, Any]) -> Reply:
    """Build a reply from a response body, reading the ``cascade`` extra field when the server adds one."""
    info = data.get("cascade")
    if not isinstance(info, dict):
        return Reply(text)
    calls: list[TierUse] = []
    for c in info.get("calls") or ():
        if isinstance(c, dict):
            lat = c.get("latency_s")
            calls.append(TierUse(str(c.get("tier", "?")), int(_num(c.get("prompt_tokens"))),
                                 int(_num(c.get("completion_tokens"))), _num(c.get("cost")),
                                 _num(lat, math.nan) if lat is not None else None,
                                 str(c["error"]) if c.get("error") else None))
    latencies = [c.latency_s for c in calls]
    backend = None if not calls or any(x is None or math.isnan(x) for x in latencies) else (
        sum(x for x in latencies if x is not None))
    tier = info.get("tier")
    engine = info.get("latency_s")
    return Reply(text, str(tier) if tier is not None else None, bool(info.get("escalated", len(calls) > 1)),
                 bool(info.get("degraded", False)), _num(info.get("cost")), tuple(calls), backend,
                 engine_s=_num(engine) if isinstance(engine, int | float) else None)


class Started:
    """``async with`` for a target's setup: :meth:`start` on entry (:meth:`aclose` when it fails half-way, so
    nothing started is left running), :meth:`aclose` on exit."""

    async def start(self) -> None:
        """Start the servers and build the target."""
        raise NotImplementedError

    async def aclose(self) -> None:
        """Stop whatever was started (also after a partial start)."""
        raise NotImplementedError

    async def __aenter__(self) -> Self:
        try:
            await self.start()
        except BaseException:
            await self.aclose()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
