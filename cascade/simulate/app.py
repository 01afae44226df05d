"""The simulated server's ASGI app: request validation, OpenAI response and SSE formats, counters."""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import re
import time
import uuid
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from cascade.simulate.choices import choose, echo_logprobs, masked, tokens
from cascade.simulate.model import MAX_TOP_LOGPROBS, SimAnswer, SimConfig, simulate_answer
from cascade.types import ROLES

if TYPE_CHECKING:
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import Response

__all__ = ["SimStats", "create_app"]

_MAX_BODY_BYTES = 1_000_000


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

class _ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


@dataclass(frozen=True)
class _Request:
    chat: bool
    keys: tuple[str, ...]  # one prompt text per choice
    max_tokens: int
    stop: tuple[str, ...]
    stream: bool
    include_usage: bool
    top_n: int | None  # None: no logprobs
    choices: tuple[str, ...] | None = None  # guided choice
    echo: bool = False


def _number(body: dict[str, Any], name: str, lo: float, hi: float, integer: bool = False) -> float | None:
    value = body.get(name)
    if value is None:
        return None
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds) or not lo <= value <= hi:
        kind = "an integer" if integer else "a number"
        raise _ApiError(400, f"'{name}' must be {kind} in [{lo}, {hi}], got {value!r}", name)
    return value


def _render_messages(messages: object) -> str:
    if not isinstance(messages, list) or not messages:
        raise _ApiError(400, "'messages' must be a non-empty array", "messages")
    lines = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise _ApiError(400, f"messages[{i}] needs a role in {sorted(ROLES)}", "messages")
        content = m.get("content")
        parts = content if isinstance(content, list) else None
        if parts is not None and all(isinstance(p, dict) and p.get("type") == "text" for p in parts):
            content = "".join(str(p.get("text", "")) for p in parts)
        if not isinstance(content, str):
            raise _ApiError(400, f"messages[{i}].content must be a string or text parts", "messages")
        lines.append(f"{m['role']}: {content}")
    return "\n".join(lines)


def _parse(body: object, chat: bool, config: SimConfig) -> _Request:
    if not isinstance(body, dict):
        raise _ApiError(400, "the request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str):
        raise _ApiError(400, "'model' is required and must be a string", "model")
    if model != config.model:
        raise _ApiError(404, f"The model `{model}` does not exist.", "model", "model_not_found")
    if chat:
        keys: tuple[str, ...] = (_render_messages(body.get("messages")),)
    else:
        prompt = body.get("prompt")
        keys = (prompt,) if isinstance(prompt, str) else tuple(prompt) if isinstance(prompt, list) else ()
        if not keys or not all(isinstance(k, str) for k in keys) or len(keys) > 128:
            raise _ApiError(400, "'prompt' must be a string or an array of 1 to 128 strings", "prompt")
        if body.get("echo") and not config.echo:
            raise _ApiError(400, "'echo' is not supported by this server", "echo")
    if sum(len(k) for k in keys) > _MAX_BODY_BYTES:
        raise _ApiError(400, "the prompt is too long", "prompt")
    _number(body, "temperature", 0.0, 2.0)
    _number(body, "top_p", 0.0, 1.0)
    _number(body, "seed", -(2**63), 2**63 - 1, integer=True)
    if _number(body, "n", 1, 128, integer=True) not in (None, 1):
        raise _ApiError(400, "only n=1 is supported", "n")
    limit = _number(body, "max_tokens", 1, 1_000_000, integer=True)
    if chat and limit is None:
        limit = _number(body, "max_completion_tokens", 1, 1_000_000, integer=True)
    stop = body.get("stop")
    stops = (stop,) if isinstance(stop, str) else tuple(stop) if isinstance(stop, list) else ()
    bad_stop = not all(isinstance(s, str) and s for s in stops)
    if (stop is not None and not stops) or len(stops) > 16 or bad_stop:
        raise _ApiError(400, "'stop' must be a non-empty string or an array of 1 to 16 of them", "stop")
    stream = body.get("stream", False)
    if not isinstance(stream, bool | None):
        raise _ApiError(400, "'stream' must be a boolean", "stream")
    options = body.get("stream_options")
    if options is not None and (not stream or not isinstance(options, dict)):
        raise _ApiError(400, "'stream_options' needs 'stream': true and must be an object", "stream_options")
    if chat:
        wants = body.get("logprobs")
        if not isinstance(wants, bool | None):
            raise _ApiError(400, "'logprobs' must be a boolean", "logprobs")
        top = _number(body, "top_logprobs", 0, MAX_TOP_LOGPROBS, integer=True)
        if top is not None and not wants:
            raise _ApiError(400, "'top_logprobs' needs 'logprobs': true", "top_logprobs")
        top_n = (int(top or 0) if wants else None)
    else:
        n = _number(body, "logprobs", 0, MAX_TOP_LOGPROBS, integer=True)
        top_n = None if n is None else int(n)
    default = config.max_answer_tokens if chat else 16  # as OpenAI: completions default to 16 tokens
    guided = _guided_choices(body, config)
    echo = bool(not chat and body.get("echo"))
    if (guided is not None or echo) and stream:
        raise _ApiError(400, "this server does not stream guided choice or echo", "stream")
    return _Request(chat, keys, int(limit or default), stops, bool(stream),
                    bool((options or {}).get("include_usage")), top_n if config.logprobs else None, guided, echo)


def _guided_choices(body: dict[str, Any], config: SimConfig) -> tuple[str, ...] | None:
    """The request's guided-choice list (``guided_choice`` or ``structured_outputs.choice``), or None."""
    outputs = body.get("structured_outputs")
    given = {"guided_choice": body.get("guided_choice"),
             "structured_outputs": outputs.get("choice") if isinstance(outputs, dict) else outputs}
    present = {k: v for k, v in given.items() if v is not None}
    if present and not config.guided_choice:
        raise _ApiError(400, f"Unrecognized request argument supplied: {next(iter(present))}", next(iter(present)))
    for field, value in present.items():
        if not isinstance(value, list) or not value or not all(isinstance(c, str) and c for c in value):
            raise _ApiError(400, f"'{field}' must hold a non-empty array of non-empty strings", field)
    lists = list(present.values())
    if len(lists) == 2 and lists[0] != lists[1]:
        raise _ApiError(400, "'guided_choice' and 'structured_outputs.choice' differ", "guided_choice")
    return tuple(lists[0]) if lists else None


def _prompt_tokens(key: str) -> int:
    return max(1, len(re.findall(r"\w+|[^\w\s]", key)))


def _usage(req: _Request, answers: Sequence[SimAnswer]) -> dict[str, int]:
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


def _logprobs(req: _Request, a: SimAnswer, steps: range) -> dict[str, Any] | None:
    if req.top_n is None:
        return None
    if req.chat:
        return _chat_logprobs(a, steps, req.top_n)
    return _text_logprobs(a, steps, req.top_n, sum(len(tok) for tok in a.tokens[: steps.start]))


def _full_body(req: _Request, answers: Sequence[SimAnswer], config: SimConfig) -> dict[str, Any]:
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


async def _stream(req: _Request, answers: Sequence[SimAnswer], config: SimConfig, stats: SimStats
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


def _with_echo(req: _Request, body: dict[str, Any], config: SimConfig) -> dict[str, Any]:
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
                if len(raw) > _MAX_BODY_BYTES:
                    raise _ApiError(413, f"the request body is larger than {_MAX_BODY_BYTES} bytes")
                try:
                    body = json.loads(raw)
                except (ValueError, UnicodeDecodeError) as exc:
                    raise _ApiError(400, f"the request body is not valid JSON: {exc}") from None
                req = _parse(body, chat, config)
            except _ApiError as exc:
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

