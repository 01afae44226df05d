"""The OpenAI wire format of ``cascade serve``: request parsing, response bodies and SSE chunks.

Pure functions and plain classes, no I/O: :mod:`cascade.server.app` does the HTTP. Every client mistake
raises :class:`HTTPError` (a 4xx) with a message naming the offending field.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import re
import time
import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from cascade.errors import (
    BackendError,
    BackendTimeoutError,
    CascadeError,
    InvalidRequestError,
    OverloadedError,
)
from cascade.policy import Target
from cascade.request_fields import FieldError, ServerFields, validated
from cascade.types import CascadeChunk, CascadeResult, GenerationParams, Message, Prompt

__all__ = ["HTTPError", "ParsedRequest", "as_http", "decision", "parse_request", "render_response", "request_id",
           "sse_events", "sse_stream"]

_COMMON = {"model", "max_tokens", "temperature", "top_p", "stop", "seed", "n", "stream", "stream_options",
           "logprobs", "top_logprobs", "presence_penalty", "frequency_penalty", "logit_bias", "user",
           "metadata", "store", "service_tier", "cascade", "guided_choice", "structured_outputs"}
_KEYS = {"chat": _COMMON | {"messages", "max_completion_tokens"},
         "completions": _COMMON | {"prompt", "echo", "best_of", "suffix"}}
_UNSUPPORTED = {"tools", "tool_choice", "functions", "function_call", "response_format", "audio", "modalities",
                "prediction", "parallel_tool_calls", "reasoning_effort", "web_search_options"}
_MAX_MESSAGES = 1024


class HTTPError(Exception):
    """An error answered as an OpenAI-style JSON body ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error",
                 code: str | None = None, headers: Mapping[str, str] | None = None, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.kind, self.code, self.param = status, message, kind, code, param
        self.headers = dict(headers or {})

    def body(self) -> dict[str, Any]:
        """The JSON error body."""
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


def _bad(param: str, message: str) -> HTTPError:
    return HTTPError(400, f"{param}: {message}", param=param)


@dataclass(frozen=True)
class ParsedRequest:
    """A validated request.

    Attributes:
        prompts: one prompt for chat; one or more for completions.
        params: decoding parameters (server defaults where the request gives none).
        target: the per-request quality target, or None.
        stream: answer with server-sent events.
        include_usage: streaming only: send a final usage chunk.
        overrides: the decoding parameters the request set itself; the engine applies them over its own
            defaults (in expert-router mode, over each expert's).
        choices: the answers the request allows (``cascade.choices``, or vLLM's ``guided_choice`` /
            ``structured_outputs.choice``), the same for every prompt of the request; None for free answers.
    """

    prompts: tuple[Prompt, ...]
    params: GenerationParams
    target: Target | None
    stream: bool
    include_usage: bool
    overrides: Mapping[str, Any] = field(default_factory=dict)
    choices: tuple[str, ...] | None = None


def _content(i: int, content: object) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list) and content:
        texts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise _bad(f"messages[{i}].content", "only text parts {type: text, text: ...} are supported")
            texts.append(part["text"])
        return "".join(texts)
    raise _bad(f"messages[{i}].content", "must be a string or a non-empty list of text parts")


def _messages(raw: object) -> list[Message]:
    if not isinstance(raw, list) or not raw or len(raw) > _MAX_MESSAGES:
        raise _bad("messages", f"must be a non-empty list of at most {_MAX_MESSAGES} messages")
    out: list[Message] = []
    for i, m in enumerate(raw):
        if not isinstance(m, dict) or set(m) - {"role", "content", "name"}:
            raise _bad(f"messages[{i}]", "must be an object with role and content (and optionally name)")
        if not isinstance(m.get("role"), str) or not isinstance(m.get("name", ""), str):
            raise _bad(f"messages[{i}].role", "role and name must be strings")
        out.append({"role": m["role"], "content": _content(i, m.get("content"))})
    return out


def _prompt_list(raw: object, max_prompts: int) -> list[str]:
    if isinstance(raw, str):
        return [raw]
    if isinstance(raw, list) and 0 < len(raw) <= max_prompts and all(isinstance(p, str) for p in raw):
        return list(raw)
    raise _bad("prompt", f"must be a string or a list of 1 to {max_prompts} strings (token ids are not supported)")


def _check_unsupported(body: Mapping[str, Any]) -> None:
    for key in ("logprobs", "echo"):
        if body.get(key) not in (None, False, 0) or isinstance(body.get(key), float):
            raise _bad(key, "is not supported by the cascade server")
    for key in ("top_logprobs", "suffix"):
        if body.get(key) is not None:
            raise _bad(key, "is not supported by the cascade server")
    bias = body.get("logit_bias")
    if bias is not None and (not isinstance(bias, dict) or bias):
        raise _bad("logit_bias", "is not supported (give null or {})")


def parse_request(kind: str, body: object, defaults: GenerationParams, config: Any) -> ParsedRequest:
    """Validate an OpenAI request body (field values by :mod:`cascade.request_fields`, shared with the simulator).

    Args:
        kind: ``"chat"`` or ``"completions"``.
        body: the decoded JSON.
        defaults: decoding parameters used where the body gives none.
        config: the :class:`~cascade.server.config.ServerConfig` (model name and limits).

    Raises:
        HTTPError: 400 for a malformed body, 404 for an unknown model.
    """
    try:
        return _parse(kind, body, defaults, config)
    except FieldError as exc:
        raise _bad(exc.param, exc.message) from None


def _parse(kind: str, body: object, defaults: GenerationParams, config: Any) -> ParsedRequest:
    if not isinstance(body, dict):
        raise HTTPError(400, "the body must be a JSON object")
    unsupported = sorted(set(body) & _UNSUPPORTED)
    if unsupported:
        raise _bad(unsupported[0], "is not supported by the cascade server")
    unknown = sorted(set(body) - _KEYS[kind])
    if unknown:
        raise _bad(unknown[0], "unknown parameter")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise _bad("model", "is required (a string)")
    if model != config.model_name:
        raise HTTPError(404, f"the model {model!r} does not exist; this server serves {config.model_name!r}",
                        code="model_not_found", param="model")
    _check_unsupported(body)
    if kind == "chat":
        prompts: list[Prompt] = [_messages(body.get("messages"))]
    else:
        prompts = list(_prompt_list(body.get("prompt"), config.max_prompts))
    fields = validated(ServerFields, body, config.max_tokens_limit)
    changes = fields.overrides()
    include_usage, choices = fields.include_usage(), fields.choices()
    try:
        target = Target.parse(fields.cascade.target if fields.cascade else None)
        params = replace(defaults, **changes)
    except (CascadeError, TypeError, ValueError) as exc:
        raise HTTPError(400, str(exc)) from None
    return ParsedRequest(tuple(prompts), params, target, bool(fields.stream), include_usage, changes, choices)


def _finite(x: float | None) -> float | None:
    return x if x is not None and math.isfinite(x) else None


def decision(r: CascadeResult) -> dict[str, Any]:
    """The ``cascade`` field of a response: what the cascade decided and why (JSON-safe)."""
    calls = [{"tier": c.tier, "model": c.model, "prompt_tokens": c.prompt_tokens,
              "completion_tokens": c.completion_tokens, "cost": c.cost, "latency_s": c.latency_s,
              "uncertainty": _finite(c.uncertainty), "threshold": _finite(c.threshold),
              "finish_reason": c.finish_reason, "error": c.error, "usage_estimated": c.usage_estimated}
             for c in r.calls]
    return {"tier": r.tier, "model": _answer_call(r).model if r.calls else None,
            "uncertainty": _finite(r.uncertainty), "measure": r.measure, "threshold": _finite(r.threshold),
            "escalated": r.escalated, "cost": r.cost, "reason": r.reason, "degraded": r.degraded,
            "target": r.target, "cluster": r.cluster, "threshold_source": r.threshold_source,
            "certified_level": r.certified_level, "skipped": list(r.skipped), "latency_s": r.latency_s,
            "calls": calls}


def _answer_call(r: CascadeResult) -> Any:
    answered = [c for c in r.calls if c.tier == r.tier and c.error is None]
    return answered[-1] if answered else r.calls[-1]


def _finish(r: CascadeResult) -> str:
    reason = _answer_call(r).finish_reason if r.calls else "stop"
    return reason if reason in ("stop", "length") else "stop"


def _ascii(value: object) -> str:
    text = str(value)
    if text.isascii() and text.isprintable():  # every character in \x20-\x7e already: nothing to replace
        return text[:256]
    return re.sub(r"[^\x20-\x7e]", "?", text)[:256]


def request_id(prefix: str) -> str:
    """``prefix-`` and a random (version 4) UUID's 32 hex digits."""
    return f"{prefix}-{uuid.uuid4().hex}"


def render_response(kind: str, parsed: ParsedRequest, results: Sequence[CascadeResult],
                    model_name: str) -> tuple[dict[str, Any], dict[str, str]]:
    """The OpenAI response body and the ``x-cascade-*`` headers.

    The body's ``cascade`` field is the decision of the answer (a list of decisions when a completions
    request had several prompts); ``usage`` sums the tokens of every tier that was called.
    """
    chat = kind == "chat"
    choices = []
    for i, r in enumerate(results):
        choice: dict[str, Any] = {"index": i, "logprobs": None, "finish_reason": _finish(r)}
        if chat:
            choice["message"] = {"role": "assistant", "content": r.text}
        else:
            choice["text"] = r.text
        choices.append(choice)
    prompt_tokens = sum(r.prompt_tokens for r in results)
    completion_tokens = sum(r.completion_tokens for r in results)
    decisions = [decision(r) for r in results]
    payload = {
        "id": request_id("chatcmpl" if chat else "cmpl"),
        "object": "chat.completion" if chat else "text_completion",
        "created": int(time.time()),
        "model": model_name,
        "choices": choices,
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                  "total_tokens": prompt_tokens + completion_tokens},
        "system_fingerprint": None,
        "cascade": decisions[0] if len(decisions) == 1 else decisions,
    }
    headers = {"x-request-id": str(payload["id"])}
    if len(results) == 1:
        d = decisions[0]
        for key in ("tier", "model", "uncertainty", "measure", "threshold", "escalated", "degraded", "cost",
                    "cluster", "target", "threshold_source", "certified_level"):
            if d[key] is not None:
                value = str(d[key]).lower() if isinstance(d[key], bool) else d[key]
                headers[f"x-cascade-{key.replace('_', '-')}"] = _ascii(value)
    return payload, headers


def _pieces(text: str) -> list[str]:
    """Word-sized pieces whose concatenation is exactly ``text``."""
    return [p for p in re.split(r"(?<=\s)(?=\S)", text) if p]


#: compact JSON without NaN (a stateless encoder, made once: ``json.dumps`` with options builds one per call)
_COMPACT = json.JSONEncoder(separators=(",", ":"), allow_nan=False)


def _sse(base: Mapping[str, Any], choices: list[dict[str, Any]], include_usage: bool, **extra: Any) -> str:
    """One ``data:`` event; with ``include_usage`` every chunk but the usage one carries ``"usage": null``."""
    chunk = {**base, "choices": choices, **extra}
    if include_usage and "usage" not in extra:
        chunk["usage"] = None
    return f"data: {_COMPACT.encode(chunk)}\n\n"


def _chunk_base(kind: str, response_id: str, created: int, model: str) -> dict[str, Any]:
    return {"id": response_id, "object": "chat.completion.chunk" if kind == "chat" else "text_completion",
            "created": created, "model": model, "system_fingerprint": None}


def _piece(kind: str, index: int, text: str) -> dict[str, Any]:
    body = {"delta": {"content": text}} if kind == "chat" else {"text": text}
    return {"index": index, **body, "logprobs": None, "finish_reason": None}


def _final(kind: str, index: int, finish_reason: str) -> dict[str, Any]:
    body: dict[str, Any] = {"delta": {}} if kind == "chat" else {"text": ""}
    return {"index": index, **body, "logprobs": None, "finish_reason": finish_reason}


def _role(index: int) -> dict[str, Any]:
    return {"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}


async def sse_events(kind: str, parsed: ParsedRequest, payload: Mapping[str, Any]) -> AsyncIterator[str]:
    """The server-sent events of an answer already decided, as OpenAI sends them, ending with ``[DONE]``.

    Used for multi-prompt completions and engines without ``stream``: each answer is cut into word-sized
    pieces.
    """
    base = _chunk_base(kind, payload["id"], payload["created"], payload["model"])
    decisions = payload["cascade"] if isinstance(payload["cascade"], list) else [payload["cascade"]]
    usage = parsed.include_usage
    for choice, dec in zip(payload["choices"], decisions):
        i = choice["index"]
        if kind == "chat":
            yield _sse(base, [_role(i)], usage)
        for piece in _pieces(choice["message"]["content"] if kind == "chat" else choice["text"]):
            yield _sse(base, [_piece(kind, i, piece)], usage)
        yield _sse(base, [_final(kind, i, choice["finish_reason"])], usage, cascade=dec)
    if usage:
        yield _sse(base, [], usage, usage=payload["usage"])
    yield "data: [DONE]\n\n"


async def sse_stream(kind: str, parsed: ParsedRequest, response_id: str, model: str,
                     items: AsyncIterator[CascadeChunk | CascadeResult]) -> AsyncIterator[str]:
    """The server-sent events of a live :meth:`Cascade.stream`: one chunk per piece the engine yields.

    The last chunk with text is followed by one with ``finish_reason`` and the ``cascade`` decision, an
    optional usage chunk and ``data: [DONE]``. An error of ``items`` propagates (the caller reports it).
    """
    base = _chunk_base(kind, response_id, int(time.time()), model)
    usage = parsed.include_usage
    if kind == "chat":
        yield _sse(base, [_role(0)], usage)
    async for item in items:
        if isinstance(item, CascadeResult):
            yield _sse(base, [_final(kind, 0, _finish(item))], usage, cascade=decision(item))
            if usage:
                tokens = {"prompt_tokens": item.prompt_tokens, "completion_tokens": item.completion_tokens,
                          "total_tokens": item.prompt_tokens + item.completion_tokens}
                yield _sse(base, [], usage, usage=tokens)
            yield "data: [DONE]\n\n"
            return
        if item.text:
            yield _sse(base, [_piece(kind, 0, item.text)], usage)
    raise CascadeError("the engine's stream ended without a result")


def as_http(exc: BaseException) -> HTTPError:
    """Map library errors to HTTP statuses (client mistakes are 4xx)."""
    if isinstance(exc, HTTPError):
        return exc
    if isinstance(exc, InvalidRequestError):
        return HTTPError(400, str(exc))
    if isinstance(exc, OverloadedError):
        retry = max(1, math.ceil(exc.retry_after_s))
        return HTTPError(429, str(exc), "rate_limit_error", "overloaded", {"Retry-After": str(retry)})
    # A backend's failure reaches the client as the tier's name and a short reason; the detail (with URLs
    # stripped of their credentials) went to the log where the engine saw it.
    if isinstance(exc, BackendTimeoutError):
        return HTTPError(504, f"the model did not answer in time: {exc.public()}", "server_error", "timeout")
    if isinstance(exc, BackendError):
        return HTTPError(502, f"a model backend failed: {exc.public()}", "server_error", "backend_error")
    if isinstance(exc, asyncio.TimeoutError):
        return HTTPError(504, "the model did not answer in time", "server_error", "timeout")
    if isinstance(exc, CascadeError):
        return HTTPError(500, f"{type(exc).__name__}: {exc}", "server_error")
    logging.getLogger("cascade.server").exception("internal error", exc_info=exc)
    return HTTPError(500, "internal server error", "server_error")
