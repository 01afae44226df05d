"""The small error hierarchy of uncertainty-cascade.

Every error the library raises on purpose is a :class:`CascadeError`, so a service can catch one type.
Errors caused by the caller's input also subclass :class:`ValueError`; the HTTP server maps them to 4xx.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Sequence

__all__ = [
    "ArtifactError",
    "BackendError",
    "BackendTimeoutError",
    "BatchError",
    "CascadeError",
    "ChoicesUnsupportedError",
    "ConfigError",
    "InvalidRequestError",
    "ModelNotInstalledError",
    "OverloadedError",
    "TruncatedAnswerError",
    "public_reason",
    "redact",
]

_USERINFO = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)[^/?#\s]*@")
_URL = re.compile(r"(?i)\b[a-z][a-z0-9+.-]*://[^\s'\"<>]*")


def redact(text: str, *, hide_urls: bool = False) -> str:
    """Text fit for a log (or, with ``hide_urls``, for a client): credentials in URLs removed.

    Every URL's userinfo (``user:password@``) becomes ``***@``; with ``hide_urls`` every URL becomes ``<url>``
    (internal addresses are no business of a client). The one place where URLs are cleaned: backend errors
    apply it to their message, the server and the engine to what they log or answer.
    """
    text = _USERINFO.sub(r"\1***@", text)
    return _URL.sub("<url>", text) if hide_urls else text


class CascadeError(Exception):
    """Base class of every error raised by uncertainty-cascade."""


class InvalidRequestError(CascadeError, ValueError):
    """The request is malformed: empty or oversized prompt, bad parameter values, unknown fields."""


class ConfigError(CascadeError, ValueError):
    """A configuration value or file is invalid."""


class ArtifactError(CascadeError, ValueError):
    """A calibration artifact is malformed, of an unknown schema, or fitted for another model or measure."""


class ModelNotInstalledError(CascadeError, RuntimeError):
    """A model package that an embedded default needs is missing or its files fail their hash check."""


class BackendError(CascadeError, RuntimeError):
    """A backend failed to produce an answer (HTTP error, model error, bad response).

    ``str(error)`` is the full detail for logs (URLs with their credentials removed); :attr:`reason` is what a
    client may read.

    Attributes:
        reason: a short reason without URLs or server detail, e.g. ``"HTTP 500"`` (default: the message with
            its URLs hidden).
        tier: the name of the tier that failed, set by the engine when the error leaves a tier (else None).
    """

    def __init__(self, message: str, *, reason: str | None = None) -> None:
        message = redact(message)
        super().__init__(message)
        self.reason = redact(reason if reason is not None else message, hide_urls=True)
        self.tier: str | None = None

    def public(self) -> str:
        """The tier's name and the short reason: all a client is told about the failure."""
        return f"tier {self.tier!r}: {self.reason}" if self.tier else self.reason


class BackendTimeoutError(BackendError, TimeoutError):
    """A backend did not answer within its timeout."""


class BatchError(BackendError):
    """Some requests of a batch failed and the others were answered: each keeps its own outcome.

    Raised by a backend's ``generate`` (outcomes are generations) and by ``Cascade.run_batch`` (outcomes are
    results) only when answers and failures are mixed; a batch where everything failed raises the failure.

    Attributes:
        outcomes: one entry per request of the batch, in order: its answer, or the exception that failed it.
    """

    def __init__(self, outcomes: Sequence[object]) -> None:
        failures = [o for o in outcomes if isinstance(o, BaseException)]
        first = failures[0] if failures else None
        reason = public_reason(first) if first is not None else "no failure"
        super().__init__(f"{len(failures)} of {len(outcomes)} requests failed; the first: {first}",
                         reason=f"{len(failures)} of {len(outcomes)} requests failed; the first: {reason}")
        self.outcomes = list(outcomes)

class ChoicesUnsupportedError(BackendError):
    """A request carries allowed answers (``choices``) and a tier cannot score them.

    The message names what the tier lacks (e.g. a server without guided choice and without prompt
    logprobs); a constrained request is never answered freely instead.
    """


class TruncatedAnswerError(BackendError):
    """A server's answer ended without a finish reason (or with one the OpenAI protocol does not define).

    E.g. a stream closed by a bare ``data: [DONE]`` (llama.cpp's ``interrupt_requests`` does so when another
    request waits), or a non-streamed answer with ``finish_reason: null``. The answer was cut off, so it is a
    failure that is retried and then follows ``on_error``, never an accepted answer.
    """


class OverloadedError(CascadeError, RuntimeError):
    """A bounded queue is full; retry after ``retry_after_s`` seconds."""

    def __init__(self, message: str, retry_after_s: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


def public_reason(exc: BaseException) -> str:
    """A short description of a failure that is safe to send to a client (no URL, no credentials)."""
    if isinstance(exc, BackendError):
        return exc.public()
    text = redact(str(exc), hide_urls=True)
    if text:
        return text
    return "timed out" if isinstance(exc, (TimeoutError, asyncio.TimeoutError)) else type(exc).__name__
