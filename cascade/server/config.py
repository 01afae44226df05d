"""The ``server`` section of a cascade config, and what binding an address implies for it."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace

from cascade.errors import ConfigError
from cascade.request_fields import MAX_TOKENS_LIMIT

__all__ = ["ServerConfig", "guard_binding"]

log = logging.getLogger("cascade.server")


@dataclass(frozen=True)
class ServerConfig:
    """The ``server`` section of a config (under ``extra``); host and port come from the command line."""

    model_name: str = "cascade"  # the model id clients ask for (and /v1/models lists)
    api_key_env: str | None = None  # env variable holding the bearer token; None = no auth
    max_body_bytes: int = 1_000_000  # largest request body, bytes (413 beyond)
    body_timeout_s: float = 30.0  # seconds a request body may take to arrive in full (408 beyond)
    max_bodies_reading: int = 256  # request bodies being received at once (503 beyond): bounds memory to this
    # times max_body_bytes whatever slow clients do (64 turned away 69 of 5,101 requests, HTTP 503, in the
    # ramp-up of a 1,000-user run on 2 cores: under load the loop is slow to finish even small bodies)
    max_in_flight: int = 64  # requests running in the engine at once
    max_queue: int = 256  # requests waiting for a running slot at most (429 beyond)
    request_timeout_s: float = 300.0  # seconds per request before a 504
    max_tokens_limit: int = MAX_TOKENS_LIMIT  # largest max_tokens a request may ask for (cascade run: the same)
    max_prompts: int = 16  # prompts per /v1/completions request at most (a list prompt)
    drain_timeout_s: float = 30.0  # seconds shutdown waits for requests in flight
    retry_after_s: float = 1.0  # Retry-After sent with 429 when the server queue is full, seconds
    keep_alive_s: float = 75.0  # idle seconds before a keep-alive connection is closed (longer than clients'
    # own idle expiry, 5 s in httpx and openai, so a client never reuses a connection as the server drops it)
    allowed_hosts: tuple[str, ...] | None = None  # Host header names accepted ("*": any); None: cascade serve
    # derives them from the bind address (loopback: localhost, 127.0.0.1, ::1), create_app checks none
    allowed_origins: tuple[str, ...] = ()  # browser Origins accepted ("*": any); requests without one always are

    def __post_init__(self) -> None:
        ints = ("max_body_bytes", "max_in_flight", "max_tokens_limit", "max_prompts", "max_bodies_reading")
        if any(isinstance(getattr(self, k), bool) or not isinstance(getattr(self, k), int)
               or getattr(self, k) < 1 for k in ints):
            raise ConfigError(f"server {', '.join(ints)} must be positive integers")
        if isinstance(self.max_queue, bool) or not isinstance(self.max_queue, int) or self.max_queue < 0:
            raise ConfigError("server max_queue must be a non-negative integer")
        times = (self.request_timeout_s, self.drain_timeout_s, self.retry_after_s, self.keep_alive_s,
                 self.body_timeout_s)
        if any(isinstance(t, bool) or not isinstance(t, (int, float)) or not 0 < t < 1e6 for t in times):
            raise ConfigError("server timeouts, retry_after_s, keep_alive_s and body_timeout_s must be positive "
                              "seconds (< 1e6)")
        if self.api_key_env is not None and (not isinstance(self.api_key_env, str) or not self.api_key_env):
            raise ConfigError("server api_key_env must be the name of an environment variable")
        if not isinstance(self.model_name, str) or not self.model_name:
            raise ConfigError("server model_name must be a non-empty string")
        for name in ("allowed_hosts", "allowed_origins"):
            value = getattr(self, name)
            if value is None and name == "allowed_hosts":
                continue
            if isinstance(value, str) or not isinstance(value, (list, tuple)) or not all(
                    isinstance(v, str) and v for v in value):
                raise ConfigError(f"server {name} must be a list of non-empty strings")
            object.__setattr__(self, name, tuple(v.lower() for v in value))

    @classmethod
    def from_mapping(cls, raw: object) -> ServerConfig:
        """Build from the config's ``extra["server"]`` mapping (None = defaults), rejecting unknown keys."""
        if raw is None:
            return cls()
        if not isinstance(raw, Mapping):
            raise ConfigError("the server section must be a mapping")
        unknown = set(raw) - {f.name for f in fields(cls)}
        if unknown:
            raise ConfigError(f"unknown key(s) in server section: {sorted(unknown)}")
        try:
            return cls(**dict(raw))
        except TypeError as exc:
            raise ConfigError(f"invalid server section: {exc}") from exc

    def api_key(self) -> str | None:
        """The bearer token, or None without auth. Raises ConfigError when the named variable is unset."""
        if self.api_key_env is None:
            return None
        key = os.environ.get(self.api_key_env, "")
        if not key:
            raise ConfigError(f"server.api_key_env names {self.api_key_env!r}, which is unset or empty")
        return key


_LOOPBACK = ("localhost", "127.0.0.1", "::1")


def is_loopback(host: str) -> bool:
    """True for a loopback bind address (``127.0.0.1``, ``::1``, ``localhost``)."""
    return host.lower().strip("[]") in _LOOPBACK


def guard_binding(config: ServerConfig, host: str) -> ServerConfig:
    """On a loopback bind, accept only loopback Host names (unless configured); warn loudly about open binds."""
    loopback = is_loopback(host)
    if config.allowed_hosts is None and loopback:
        config = replace(config, allowed_hosts=_LOOPBACK)
    if not loopback and config.api_key_env is None:
        log.warning("SECURITY: serving on %s without auth: anyone who can reach this address can send requests "
                    "that you pay for; set server.api_key_env (and server.allowed_hosts)", host)
    elif not loopback and config.allowed_hosts is None:
        log.warning("serving on %s with no Host check; set server.allowed_hosts to the names clients use", host)
    return config
