"""The simulated server's ASGI app: routing, streaming and counters (requests are checked by
:mod:`cascade.simulate.request`, answers serialised by :mod:`cascade.simulate.formats`).

A plain ASGI callable, not a framework app: the simulator stands in for a model server next to the cascade
under load, so its own CPU per request must stay small (profiled: Starlette's routing, request object and
streaming task group cost more than the answer). A stream sends its bytes when they are due: headers at
once, then one write per generated step, the chat role event riding with the first token and the finish,
usage and ``[DONE]`` events with the last one (nothing waits between them). A client that disconnects ends
the stream at its next wait (counted in ``streams_cancelled``), as a real server notices a closed socket.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
from collections.abc import Awaitable, Callable, Iterator, MutableMapping, Sequence
from typing import Any

from cascade.simulate.choices import choose, masked
from cascade.simulate.formats import DONE, StreamEvents, TokenJson, error_body, full_body, json_bytes
from cascade.simulate.model import AnswerSteps, SimAnswer, SimConfig, simulate_answer
from cascade.simulate.request import MAX_BODY_BYTES, ApiError, parse

__all__ = ["ASGIApp", "SimStats", "create_app"]

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
#: An ASGI application (what :func:`create_app` returns and uvicorn runs).
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

_JSON = [(b"content-type", b"application/json")]
_SSE = [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache")]


class SimStats:
    """Counters of one server, readable from any thread (each field is a plain int).

    Attributes:
        requests: HTTP requests to the generation endpoints, valid or not.
        in_flight: generation requests being served now (a stream counts until its last byte).
        max_in_flight: the largest ``in_flight`` seen since the last :meth:`reset`.
        errors: simulated HTTP 500 answers.
        hangs: simulated hangs.
        streams_completed: streams sent to their ``[DONE]``.
        streams_cancelled: streams the client closed before the end.
        streams_interrupted: streams cut off by a newer request (``interrupt_requests``).
        tokens_sent: tokens sent in streams.
        started: generation streams started so far (each stream's sequence number).
    """

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        """Set every counter to zero."""
        self.requests = self.in_flight = self.max_in_flight = self.errors = self.hangs = 0
        self.streams_completed = self.streams_cancelled = self.tokens_sent = 0
        self.streams_interrupted = self.started = 0

    @contextlib.contextmanager
    def track(self) -> Iterator[None]:
        """Count one request in flight while the block runs."""
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            yield
        finally:
            self.in_flight -= 1


def _guided(config: SimConfig, key: str, choices: Sequence[str]) -> SimAnswer:
    picked = choose(config, key, choices)
    if config.processed_logprobs:
        picked = masked(picked, choices)
    return SimAnswer(picked.tokens, picked.logprobs, picked.top, "stop", 0.5)


async def _respond(send: Send, status: int, body: bytes) -> None:
    headers = [(b"content-length", str(len(body)).encode()), *_JSON]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def _read_body(receive: Receive) -> bytes | None:
    """The request body, or None when the client left before sending all of it."""
    parts = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        parts.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(parts)


class _Listener:
    """Waits that end early when the client disconnects (one task per stream reads ``http.disconnect``)."""

    def __init__(self, receive: Receive) -> None:
        self.gone = False
        self._waiter: asyncio.Future[None] | None = None
        self._task = asyncio.ensure_future(self._listen(receive))

    async def _listen(self, receive: Receive) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        self.gone = True
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def wait(self, seconds: float) -> bool:
        """Sleep ``seconds`` (none when 0); False when the client is gone (before or during the wait)."""
        if seconds and not self.gone:
            loop = asyncio.get_running_loop()
            self._waiter = waiter = loop.create_future()
            timer = loop.call_later(seconds, _wake, waiter)
            try:
                await waiter
            finally:
                timer.cancel()
                self._waiter = None
        return not self.gone

    def close(self) -> None:
        """Stop listening."""
        self._task.cancel()


def _wake(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


async def _stream(send: Send, receive: Receive, events: StreamEvents, config: SimConfig, stats: SimStats) -> None:
    """Send one stream: headers now, then each step's events after its latency (see the module docstring)."""
    await send({"type": "http.response.start", "status": 200, "headers": _SSE})
    stats.started += 1
    mine = stats.started
    listener = _Listener(receive)
    try:
        owed = b""  # events due but not sent yet: they go with the next write
        if not await listener.wait(config.latency_per_request_s):
            stats.streams_cancelled += 1
            return
        owed = events.role()
        for t in range(events.steps):
            if not await listener.wait(config.latency_per_token_s):
                stats.streams_cancelled += 1
                return
            if config.interrupt_requests and stats.started > mine:  # llama.cpp: a newer request wins
                stats.streams_interrupted += 1
                await send({"type": "http.response.body", "body": owed + DONE})
                return
            chunk = [owed, *events.step(t)]
            stats.tokens_sent += len(chunk) - 1
            if t + 1 < events.steps:
                await send({"type": "http.response.body", "body": b"".join(chunk), "more_body": True})
                owed = b""
            else:
                owed = b"".join(chunk)
        await send({"type": "http.response.body", "body": owed + events.tail()})
        stats.streams_completed += 1
    except asyncio.CancelledError:
        stats.streams_cancelled += 1
        raise
    finally:
        listener.close()


def create_app(config: SimConfig, stats: SimStats | None = None) -> ASGIApp:
    """Build the ASGI app of the simulated server.

    Args:
        config: the server's behaviour.
        stats: counters to update (a new :class:`SimStats` when None).
    """
    counters = stats if stats is not None else SimStats()
    draws = random.Random(config.seed)
    card = {"id": config.model, "object": "model", "created": 0, "owned_by": "cascade-simulate"}
    fixed = {"/v1/models": json_bytes({"object": "list", "data": [card]}), "/health": json_bytes({"status": "ok"})}
    generation = {"/v1/chat/completions": True, "/v1/completions": False}
    token_json = TokenJson()

    async def generate(receive: Receive, send: Send, chat: bool) -> None:
        counters.requests += 1
        with counters.track():
            raw = await _read_body(receive)
            if raw is None:
                return
            try:
                if len(raw) > MAX_BODY_BYTES:
                    raise ApiError(413, f"the request body is larger than {MAX_BODY_BYTES} bytes")
                try:
                    body = json.loads(raw)
                except (ValueError, UnicodeDecodeError) as exc:
                    raise ApiError(400, f"the request body is not valid JSON: {exc}") from None
                req = parse(body, chat, config)
            except ApiError as exc:
                return await _respond(send, exc.status, error_body(exc.status, exc.message, exc.param, exc.code))
            fail, hang = draws.random() < config.error_rate, draws.random() < config.timeout_rate
            if fail:
                counters.errors += 1
                return await _respond(send, 500, error_body(500, "simulated internal server error"))
            if hang:
                counters.hangs += 1
                await asyncio.sleep(config.hang_s)
            if req.stream and not req.stop:  # computed as the stream goes (an early exit computes one step)
                lazy = [AnswerSteps(config, key, req.max_tokens) for key in req.keys]
                return await _stream(send, receive, StreamEvents(req, lazy, config, token_json), config, counters)
            answers = [_guided(config, key, req.choices) if req.choices else
                       simulate_answer(config, key, req.max_tokens, req.stop) for key in req.keys]
            if req.stream:
                return await _stream(send, receive, StreamEvents(req, answers, config, token_json), config, counters)
            steps = max(len(a.tokens) for a in answers)
            delay = config.latency_per_request_s + steps * config.latency_per_token_s
            if delay:
                await asyncio.sleep(delay)
            await _respond(send, 200, json_bytes(full_body(req, answers, config)))

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            return await _lifespan(receive, send)
        if scope["type"] != "http":
            return None
        path, method = scope["path"], scope["method"]
        chat = generation.get(path)
        if chat is not None and method == "POST":
            return await generate(receive, send, chat)
        if path in fixed and method in ("GET", "HEAD"):
            return await _respond(send, 200, fixed[path])
        found = chat is not None or path in fixed
        status, reason = (405, "Method Not Allowed") if found else (404, "Not Found")
        await _respond(send, status, error_body(status, f"{method} {path}: {reason}"))

    return app


async def _lifespan(receive: Receive, send: Send) -> None:
    """Nothing to start or stop: acknowledge both."""
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return
