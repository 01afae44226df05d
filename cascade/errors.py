"""The small error hierarchy of uncertainty-cascade.

Every error the library raises on purpose is a :class:`CascadeError`, so a service can catch one type.
Errors caused by the caller's input also subclass :class:`ValueError`; the HTTP server maps them to 4xx.
"""

from __future__ import annotations

__all__ = [
    "ArtifactError",
    "BackendError",
    "BackendTimeoutError",
    "CascadeError",
    "ConfigError",
    "InvalidRequestError",
    "ModelNotInstalledError",
    "OverloadedError",
]


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
    """A backend failed to produce an answer (HTTP error, model error, bad response)."""


class BackendTimeoutError(BackendError, TimeoutError):
    """A backend did not answer within its timeout."""


class OverloadedError(CascadeError, RuntimeError):
    """A bounded queue is full; retry after ``retry_after_s`` seconds."""

    def __init__(self, message: str, retry_after_s: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s
