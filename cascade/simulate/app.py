"""The simulated server's ASGI app: OpenAI response and SSE formats, counters (requests are checked by
:mod:`cascade.simulate.request`)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import re
import time
import uuid
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import TYPE_CHECKING, Any

from cascade.simulate.choices import choose, echo_logprobs, masked, tokens
from cascade.simulate.model import SimAnswer, SimConfig, simulate_answer
from cascade.simulate.request import MAX_BODY_BYTES, ApiError, SimRequest, parse

if TYPE_CHECKING:
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import Response

__all__ = ["SimStats", "create_app"]

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

def _prompt_tokens(key: str) -> int:
    return max(1, len(re.findall(r"\w+|[^\w\s]", key)))


def _usage(req: SimRequest, answers: Sequence[SimAnswer]) -> dict[str, int]:
    prompt = sum(_prompt_tokens(k) for k in req.keys)
    completion = sum(len(a.tokens) for a in answers)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _chat_logprobs(a: SimAnswer, steps: range, n: int) -> dict[str, Any]:
    def entry(token: str, lp: float) -> dict[str, Any]:
        return {"token": token, "logprob": lp, "bytes": list(token.encode())}

    return {"content": [{**entry(a.tokens[t], a.logprobs[t]),
                         "top_logprobs": [entry(*p) for p in a.top[t][:n]]} for t in steps]}


def _text_logprobs(a: SimAnswer, steps: range, n: int, offset: int) -> dict[str, Any]:
    offsets = []
    for t in steps:
        offsets.append(offset)
        offset += len(a.tokens[t])
    return {"tokens": [a.tokens[t] for t in steps], "token_logprobs": [a.logprobs[t] for t in steps],
            "top_logprobs": [dict(a.top[t][: max(n, 1)]) for t in steps], "text_offset": offsets}


def _logprobs(req: SimRequest, a: SimAnswer, steps: range) -> dict[str, Any] | None:
    if req.top_n is None:
        return None
    if req.chat:
        return _chat_logprobs(a, steps, req.top_n)
    return _text_logprobs(a, steps, req.top_n, sum(len(tok) for tok in a.tokens[: steps.start]))


def _full_body(req: SimRequest, answers: Sequence[SimAnswer], config: SimConfig) -> dict[str, Any]:
    head = {"id": f"{'chatcmpl' if req.chat else 'cmpl'}-{uuid.uuid4().hex}", "created": int(time.time()),
            "model": config.model, "object": "chat.completion" if req.chat else "text_completion"}
    choices = []
    for i, a in enumerate(answers):
        lp = _logprobs(req, a, range(len(a.tokens)))
        body: dict[str, Any] = ({"message": {"role": "assistant", "content": a.text}} if req.chat
                                else {"text": a.text})
        choices.append({"index": i, **body, "logprobs": lp, "finish_reason": a.finish_reason,
                        **({"stop_reason": a.stop} if config.stop_reason else {})})
    return {**head, "choices": choices, "usage": _usage(req, answers)}


async def _stream(req: SimRequest, answers: Sequence[SimAnswer], config: SimConfig, stats: SimStats
                  ) -> AsyncIterator[bytes]:
    head = {"id": f"{'chatcmpl' if req.chat else 'cmpl'}-{uuid.uuid4().hex}", "created": int(time.time()),
            "model": config.model, "object": "chat.completion.chunk" if req.chat else "text_completion"}

    def event(choices: list[dict[str, Any]], **extra: Any) -> bytes:
        return b"data: " + json.dumps({**head, "choices": choices, **extra}).encode() + b"\n\n"

    def delta(i: int, text: str | None, finish: str | None, lp: dict[str, Any] | None) -> dict[str, Any]:
        body = ({"delta": {} if text is None else {"content": text}} if req.chat else {"text": text or ""})
        return {"index": i, **body, "logprobs": lp, "finish_reason": finish}

    stats.started += 1
    mine = stats.started

    def interrupted() -> bool:  # llama.cpp: a newer request makes the running one give up
        return config.interrupt_requests and stats.started > mine

    with stats.track():
        try:
            if config.latency_per_request_s:
                await asyncio.sleep(config.latency_per_request_s)
            if req.chat:
                yield event([{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                              "finish_reason": None}])
            for t in range(max(len(a.tokens) for a in answers)):
                if config.latency_per_token_s:
                    await asyncio.sleep(config.latency_per_token_s)
                if interrupted():
                    stats.streams_interrupted += 1
                    yield b"data: [DONE]\n\n"
                    return
                for i, a in enumerate(answers):
                    if t < len(a.tokens):
                        stats.tokens_sent += 1
                        yield event([delta(i, a.tokens[t], None, _logprobs(req, a, range(t, t + 1)))])
            yield event([{**delta(i, None, a.finish_reason, None), **({"stop_reason": a.stop} if config.stop_reason
                                                                       else {})} for i, a in enumerate(answers)])
            if req.include_usage and config.stream_usage:
                yield event([], usage=_usage(req, answers))
            yield b"data: [DONE]\n\n"
            stats.streams_completed += 1
        except (asyncio.CancelledError, GeneratorExit):
            stats.streams_cancelled += 1
            raise


def _guided(config: SimConfig, key: str, choices: Sequence[str]) -> SimAnswer:
    picked = choose(config, key, choices)
    if config.processed_logprobs:
        picked = masked(picked, choices)
    return SimAnswer(picked.tokens, picked.logprobs, picked.top, "stop", 0.5)


def _with_echo(req: SimRequest, body: dict[str, Any], config: SimConfig) -> dict[str, Any]:
    """Completions with ``echo``: each text starts with its prompt, and the prompt tokens' logprobs come first."""
    for choice, key in zip(body["choices"], req.keys):
        choice["text"] = key + choice["text"]
        if req.top_n is None:
            continue
        head = echo_logprobs(config, key, req.top_n)
        tail = choice["logprobs"] or {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        choice["logprobs"] = {name: list(head[name]) + list(tail[name])  # type: ignore[call-overload]
                              for name in ("tokens", "token_logprobs", "top_logprobs")}
        choice["logprobs"]["text_offset"] = list(head["text_offset"]) + [  # type: ignore[call-overload]
            len(key) + off for off in tail["text_offset"]]
    usage = body["usage"]
    usage["prompt_tokens"] = sum(len(tokens(k)) for k in req.keys)
    usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
    return body


def create_app(config: SimConfig, stats: SimStats | None = None) -> Starlette:
    """Build the ASGI app of the simulated server.

    Args:
        config: the server's behaviour.
        stats: counters to update (a new :class:`SimStats` when None).
    """
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.responses import JSONResponse, StreamingResponse
    from starlette.routing import Route

    counters = stats if stats is not None else SimStats()
    draws = random.Random(config.seed)

    def error(status: int, message: str, param: str | None = None, code: str | None = None) -> Response:
        kind = "server_error" if status >= 500 else "invalid_request_error"
        payload = {"error": {"message": message, "type": kind, "param": param, "code": code}}
        return JSONResponse(payload, status_code=status)

    async def generate(request: Request, chat: bool) -> Response:
        counters.requests += 1
        with counters.track():
            raw = await request.body()
            try:
                if len(raw) > MAX_BODY_BYTES:
                    raise ApiError(413, f"the request body is larger than {MAX_BODY_BYTES} bytes")
                try:
                    body = json.loads(raw)
                except (ValueError, UnicodeDecodeError) as exc:
                    raise ApiError(400, f"the request body is not valid JSON: {exc}") from None
                req = parse(body, chat, config)
            except ApiError as exc:
                return error(exc.status, exc.message, exc.param, exc.code)
            fail, hang = draws.random() < config.error_rate, draws.random() < config.timeout_rate
            if fail:
                counters.errors += 1
                return error(500, "simulated internal server error")
            if hang:
                counters.hangs += 1
                await asyncio.sleep(config.hang_s)
            answers = [_guided(config, key, req.choices) if req.choices else
                       simulate_answer(config, key, req.max_tokens, req.stop) for key in req.keys]
            if req.stream:
                events = _stream(req, answers, config, counters)
                return StreamingResponse(events, media_type="text/event-stream",
                                         headers={"Cache-Control": "no-cache"})
            steps = max(len(a.tokens) for a in answers)
            delay = config.latency_per_request_s + steps * config.latency_per_token_s
            if delay:
                await asyncio.sleep(delay)
            body = _full_body(req, answers, config)
            return JSONResponse(_with_echo(req, body, config) if req.echo else body)

    async def chat_endpoint(request: Request) -> Response:
        return await generate(request, chat=True)

    async def completions_endpoint(request: Request) -> Response:
        return await generate(request, chat=False)

    async def models(request: Request) -> Response:
        card = {"id": config.model, "object": "model", "created": 0, "owned_by": "cascade-simulate"}
        return JSONResponse({"object": "list", "data": [card]})

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def http_error(request: Request, exc: Exception) -> Response:
        status = exc.status_code if isinstance(exc, HTTPException) else 500
        return error(status, f"{request.method} {request.url.path}: {getattr(exc, 'detail', exc)}")

    routes = [
        Route("/v1/chat/completions", chat_endpoint, methods=["POST"]),
        Route("/v1/completions", completions_endpoint, methods=["POST"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/health", health, methods=["GET"]),
    ]
    return Starlette(routes=routes, exception_handlers={HTTPException: http_error})

