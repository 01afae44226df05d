"""The simulated server's request checks: the fields it shares with ``cascade serve``, declared once.

The decoding, choice and streaming fields are the models of :mod:`cascade.request_fields` with the same limits
as the cascade server (a request the server accepts and forwards is accepted here), except ``max_tokens``, whose
limit stands for a real model's context (:data:`MAX_TOKENS`) rather than the server's configured cap. Only the
simulator answers ``logprobs`` / ``top_logprobs``, declared here for each endpoint. Messages and prompts stay
hand-written: the simulator renders them into one text per answer. An error names its top-level field in
``param`` (``"structured_outputs"``, ``"messages"``), as vLLM does.
"""

from __future__ import annotations

from dataclasses import dataclass

from pydantic import Field

from cascade.request_fields import FieldError, RequestFields, validated
from cascade.simulate.model import MAX_TOP_LOGPROBS, SimConfig
from cascade.types import ROLES, chat_lines

__all__ = ["MAX_BODY_BYTES", "MAX_TOKENS", "ApiError", "SimRequest", "parse"]

MAX_BODY_BYTES = 1_000_000
MAX_TOKENS = 1_000_000  # the largest max_tokens: a simulated model's context, far above any server's cap


class ApiError(Exception):
    """An error answered as an OpenAI-style JSON body with this status, ``param`` and ``code``."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


@dataclass(frozen=True)
class SimRequest:
    """A checked request: what the simulated answer needs."""

    chat: bool
    keys: tuple[str, ...]  # one prompt text per choice
    max_tokens: int
    stop: tuple[str, ...]
    stream: bool
    include_usage: bool
    top_n: int | None  # None: no logprobs
    choices: tuple[str, ...] | None = None  # guided choice
    echo: bool = False


class ChatFields(RequestFields):
    """A chat request's shared fields and its logprobs (``logprobs: true`` and ``top_logprobs: k``)."""

    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)


class CompletionFields(RequestFields):
    """A completions request's shared fields and its logprobs (``logprobs: k``)."""

    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)


def _render_messages(messages: object) -> str:
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "'messages' must be a non-empty array", "messages")
    lines = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise ApiError(400, f"messages[{i}] needs a role in {sorted(ROLES)}", "messages")
        content = m.get("content")
        parts = content if isinstance(content, list) else None
        if parts is not None and all(isinstance(p, dict) and p.get("type") == "text" for p in parts):
            content = "".join(str(p.get("text", "")) for p in parts)
        if not isinstance(content, str):
            raise ApiError(400, f"messages[{i}].content must be a string or text parts", "messages")
        lines.append({"role": m["role"], "content": content})
    return chat_lines(lines)


def _keys(body: dict[str, object], chat: bool, config: SimConfig) -> tuple[str, ...]:
    if chat:
        return (_render_messages(body.get("messages")),)
    prompt = body.get("prompt")
    items = [prompt] if isinstance(prompt, str) else prompt if isinstance(prompt, list) else []
    keys = tuple(k for k in items if isinstance(k, str))
    if not items or len(keys) != len(items) or len(keys) > 128:
        raise ApiError(400, "'prompt' must be a string or an array of 1 to 128 strings", "prompt")
    if body.get("echo") and not config.echo:
        raise ApiError(400, "'echo' is not supported by this server", "echo")
    return keys


def parse(body: object, chat: bool, config: SimConfig) -> SimRequest:
    """Check a decoded request body against the simulated server's config.

    Raises:
        ApiError: 400 for a bad field (``param`` names it), 404 for another model.
    """
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str):
        raise ApiError(400, "'model' is required and must be a string", "model")
    if model != config.model:
        raise ApiError(404, f"The model `{model}` does not exist.", "model", "model_not_found")
    keys = _keys(body, chat, config)
    if sum(len(k) for k in keys) > MAX_BODY_BYTES:
        raise ApiError(400, "the prompt is too long", "prompt")
    guided = [k for k in ("guided_choice", "structured_outputs") if body.get(k) is not None]
    if guided and not config.guided_choice:
        raise ApiError(400, f"Unrecognized request argument supplied: {guided[0]}", guided[0])
    try:
        return _checked(body, chat, config, keys)
    except FieldError as exc:
        raise ApiError(400, str(exc), exc.param.partition(".")[0]) from None


def _checked(body: dict[str, object], chat: bool, config: SimConfig, keys: tuple[str, ...]) -> SimRequest:
    fields: ChatFields | CompletionFields
    if chat:
        fields = validated(ChatFields, body, MAX_TOKENS)
        if fields.top_logprobs is not None and not fields.logprobs:
            raise FieldError("top_logprobs", "needs 'logprobs': true")
        top_n = (fields.top_logprobs or 0) if fields.logprobs else None
    else:
        fields = validated(CompletionFields, body, MAX_TOKENS)
        top_n = fields.logprobs
    include_usage, choices = fields.include_usage(), fields.choices()
    echo = bool(not chat and body.get("echo"))
    if (choices is not None or echo) and fields.stream:
        raise FieldError("stream", "this server does not stream guided choice or echo")
    default = config.max_answer_tokens if chat else 16  # as OpenAI: completions default to 16 tokens
    limit = fields.overrides().get("max_tokens", default)
    return SimRequest(chat, keys, limit, tuple(fields.stop or ()), bool(fields.stream), include_usage,
                      top_n if config.logprobs else None, choices, echo)
