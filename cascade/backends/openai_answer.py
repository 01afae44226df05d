"""What an OpenAI-compatible server answered: choices, streamed chunks, usage and finish reasons parsed
from raw JSON into an :class:`Answer` (scored by :mod:`cascade.backends.openai_scores`).

Used by :class:`~cascade.backends.openai_compat.OpenAIBackend`; no I/O.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from cascade.errors import BackendError, TruncatedAnswerError
from cascade.types import FinishReason

try:  # the `fast` extra: 3-4x faster on a streamed event (a tier sends one per token)
    from orjson import JSONDecodeError as _FastError
    from orjson import loads as _fast_loads
except ImportError:  # pragma: no cover - without the extra
    _fast_loads = None  # type: ignore[assignment]

__all__ = ["Answer", "Reader", "add_usage", "decode_json", "raise_for_error", "sse_chunks"]

#: The finish reasons the OpenAI protocol defines. Any other (vLLM's ``"abort"``), or none at all, means the
#: answer was cut off: :class:`~cascade.errors.TruncatedAnswerError`.
_FINISH_REASONS: dict[str, FinishReason] = {"stop": "stop", "length": "length", "content_filter": "stop",
                                            "tool_calls": "stop", "function_call": "stop"}


@dataclass
class Answer:
    """One parsed server answer (mutable while a stream is read)."""

    text: str = ""
    tokens: list[str] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)  # chosen token's logprob, per step
    top: list[list[float]] = field(default_factory=list)  # top-k logprobs, per step
    finish_reason: FinishReason = "stop"
    prompt_tokens: int | None = None  # None: the server did not say
    completion_tokens: int | None = None
    has_logprobs: bool = False

    @property
    def billed_tokens(self) -> int:
        """Generated tokens as the server billed them (counted from the logprobs when it did not say)."""
        return len(self.tokens) if self.completion_tokens is None else self.completion_tokens


@dataclass(frozen=True)
class Reader:
    """How one server's answers are read: ``name`` (the model) and ``where`` (its URL without credentials) for
    error messages, ``chat`` (``/chat/completions``, else ``/completions``) and ``k`` (``top_logprobs`` asked)."""

    name: str
    where: str
    chat: bool
    k: int

    def finish(self, raw: Any, answer: Answer) -> FinishReason:
        """The finish reason of an answer, or TruncatedAnswerError when it has none the protocol defines."""
        if isinstance(raw, str) and raw in _FINISH_REASONS:
            return _FINISH_REASONS[raw]
        why = "no finish_reason" if raw is None else f"finish_reason {str(raw)[:40]!r}, which the protocol lacks"
        raise TruncatedAnswerError(
            f"{self.name}: the answer from {self.where} was cut off ({why}) after {len(answer.tokens)} "
            f"tokens, {len(answer.text)} characters", reason=f"the answer was cut off ({why})")

    def add_choice(self, answer: Answer, choice: Mapping[str, Any], key: str) -> str:
        """Add one choice's text and logprobs (``key``: ``"message"``, or ``"delta"`` in a chat stream); return
        the text."""
        if self.chat:
            text = str((choice.get(key) or {}).get("content") or "")
            lp = choice.get("logprobs")
            if lp and lp.get("content") is not None:
                _add_chat_logprobs(answer, lp["content"])
        else:
            text = str(choice.get("text") or "")
            _add_text_logprobs(answer, choice.get("logprobs"))
        answer.text += text
        return text

    def whole(self, data: Any, scores: bool) -> Answer:
        """A non-streamed answer from its JSON body."""
        raise_for_error(data)
        answer = Answer()
        choice = data["choices"][0]
        self.add_choice(answer, choice, "message")
        answer.finish_reason = self.finish(choice.get("finish_reason"), answer)
        add_usage(answer, data.get("usage"))
        if scores:
            self.check_logprobs(answer)
        return answer

    def check_logprobs(self, answer: Answer) -> None:
        """Raise when a non-empty answer came without the per-token logprobs scoring needs."""
        if answer.text and not answer.has_logprobs:
            route = "/chat/completions" if self.chat else "/completions"
            raise BackendError(f"{self.name}: the server at {self.where} returned no logprobs; scoring "
                               f"needs a server that supports 'logprobs' and 'top_logprobs' on {route}",
                               reason="the server returned no logprobs")
        if any(not step for step in answer.top):
            raise BackendError(f"{self.name}: the server at {self.where} returned logprobs without "
                               f"'top_logprobs' alternatives; scoring needs top_logprobs >= 1",
                               reason="the server returned no top_logprobs")


def _add_chat_logprobs(answer: Answer, content: Sequence[Mapping[str, Any]]) -> None:
    for entry in content:
        answer.has_logprobs = True
        answer.tokens.append(str(entry["token"]))
        answer.logprobs.append(float(entry["logprob"]))
        answer.top.append([float(t["logprob"]) for t in entry.get("top_logprobs") or ()])


def _add_text_logprobs(answer: Answer, logprobs: Mapping[str, Any] | None) -> None:
    if not logprobs or logprobs.get("tokens") is None or logprobs.get("token_logprobs") is None:
        return
    tops = logprobs.get("top_logprobs") or [None] * len(logprobs["tokens"])
    for token, lp, top in zip(logprobs["tokens"], logprobs["token_logprobs"], tops, strict=True):
        answer.has_logprobs = True
        answer.tokens.append(str(token))
        answer.logprobs.append(float(lp))
        answer.top.append([float(v) for v in (top or {}).values()])


def add_usage(answer: Answer, usage: Mapping[str, Any] | None) -> None:
    """Take the token counts of a ``usage`` object, when there is one."""
    if usage:
        if isinstance(usage.get("prompt_tokens"), int):
            answer.prompt_tokens = int(usage["prompt_tokens"])
        answer.completion_tokens = int(usage["completion_tokens"])


def raise_for_error(data: Any) -> None:
    """Raise BackendError for an error object sent with HTTP 200 (some servers do so mid-stream)."""
    if not isinstance(data, dict):
        raise TypeError(f"expected a JSON object, got {type(data).__name__}")
    error = data.get("error")
    if error:
        message = error.get("message") if isinstance(error, dict) else None
        raise BackendError(f"error in the answer: {message or error}", reason="error in the answer")


async def sse_chunks(data: AsyncIterator[bytes]) -> AsyncIterator[dict[str, Any]]:
    """The JSON chunks of a server-sent event stream, from its raw bytes, up to ``data: [DONE]`` (error
    objects raise).

    Lines end with LF, CRLF or CR; each ``data:`` line is one JSON chunk; other lines (blank separators,
    comments, ``event:``) are skipped. After ``[DONE]`` the rest of the body is read (and ignored), so the
    connection can go back to its pool instead of being closed unread.
    """
    pending = b""
    async for piece in data:
        if b"\r" in piece:  # (a CRLF split between two pieces makes one more blank line: skipped)
            piece = piece.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        *lines, pending = (pending + piece).split(b"\n")
        for line in lines:
            if not line.startswith(b"data:"):
                continue
            payload = line[5:].strip()
            if payload == b"[DONE]":
                async for _ in data:
                    pass
                return
            yield _chunk(payload)
    if pending.startswith(b"data:") and pending[5:].strip() != b"[DONE]":  # a last line without its line break
        yield _chunk(pending[5:].strip())


def decode_json(data: bytes | bytearray) -> Any:
    """A tier's JSON, as :func:`json.loads` decodes it; with orjson (the ``fast`` extra) when it can.

    What orjson refuses (``NaN`` / ``Infinity``, which vLLM may send as a log-probability, UTF-16/32, lone
    surrogates, numbers past a double) goes to :func:`json.loads`, which decides and words any error as without
    the extra. (orjson reads an integer past 64 bits as a float: no field a tier sends is one.)
    """
    if _fast_loads is not None:
        try:
            return _fast_loads(data)
        except _FastError:
            pass
    return json.loads(data)


def _chunk(payload: bytes) -> dict[str, Any]:
    chunk = decode_json(payload)
    raise_for_error(chunk)
    return chunk  # type: ignore[no-any-return]
