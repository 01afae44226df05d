"""Requests to an OpenAI-compatible server: request bodies, and the client's errors as the cascade's.

Used by :class:`~cascade.backends.openai_compat.OpenAIBackend`; pure functions, no state.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
from collections.abc import Awaitable, Iterator, Sequence
from typing import Any, TypeVar

from cascade.errors import BackendError, BackendTimeoutError
from cascade.types import GenerationParams, Prompt, chat_lines

__all__ = ["DUMMY_API_KEY", "estimated_prompt_tokens", "gather", "map_errors", "render_messages", "request_body"]

#: The key sent when none is configured (local servers such as vLLM or llama.cpp ignore it).
DUMMY_API_KEY = "sk-no-key-required"
_T = TypeVar("_T")


def render_messages(messages: Sequence[Any]) -> str:
    """Join chat messages into one completions prompt: ``"{role}: {content}"`` lines, then ``assistant:``."""
    return chat_lines(messages) + "\nassistant:"


def estimated_prompt_tokens(prompt: Prompt) -> int:
    """A rough prompt token count for a server that reports none: about 4 characters a token, plus a few
    tokens of chat template per message (good to ~20% on English text with the usual BPE vocabularies)."""
    if isinstance(prompt, str):
        return max(1, -(-len(prompt) // 4))
    return sum(4 + -(-len(str(m.get("content", ""))) // 4) for m in prompt) + 2


def request_body(model: str, api: str, top_logprobs: int, prompt: Prompt, params: GenerationParams,
                 scores: bool) -> dict[str, Any]:
    """The JSON body of one ``/chat/completions`` (``api="chat"``) or ``/completions`` request."""
    body: dict[str, Any] = {"model": model, "max_tokens": params.max_tokens,
                            "temperature": params.temperature, "top_p": params.top_p}
    if params.stop:
        body["stop"] = list(params.stop)
    if params.seed is not None:
        body["seed"] = params.seed
    if api == "chat":
        is_text = isinstance(prompt, str)
        body["messages"] = [{"role": "user", "content": prompt}] if is_text else list(prompt)
        if scores:
            body.update(logprobs=True, top_logprobs=top_logprobs)
    else:
        body["prompt"] = prompt if isinstance(prompt, str) else render_messages(prompt)
        if scores:
            body["logprobs"] = top_logprobs
    return body


@contextlib.contextmanager
def map_errors(name: str, where: str, timeout: float) -> Iterator[None]:
    """Map the senders' exceptions (the openai client's, :mod:`cascade.backends.http1`'s) and malformed answers
    to the cascade's error types.

    ``name`` is the model, ``where`` the server's URL without credentials, ``timeout`` the deadline in seconds.
    """
    from cascade.backends.http1_read import ConnectionFault, StatusFault

    try:
        yield
    except StatusFault as exc:  # (the HTTP/1.1 client's errors, after its retries)
        raise BackendError(f"{name}: HTTP {exc.status} from {where}: {exc.message}",
                           reason=f"HTTP {exc.status}") from exc
    except ConnectionFault as exc:
        if exc.received:  # the server answered, then the connection broke (mid-stream, or a garbled answer)
            raise BackendError(f"{name}: connection to {where} failed: {exc}", reason="the connection failed") from exc
        raise BackendError(f"{name}: cannot reach {where}: {exc}", reason="cannot connect") from exc
    except (AttributeError, TypeError, KeyError, IndexError, ValueError) as exc:
        raise BackendError(f"{name}: malformed answer from {where}: {exc!r}", reason="malformed answer") from exc
    except Exception as exc:
        openai = sys.modules.get("openai")  # (not imported: no openai client sent anything)
        if openai is not None and isinstance(exc, openai.OpenAIError):
            raise _openai_error(openai, exc, name, where, timeout) from exc
        kind = _transport_error(exc)  # a transport error while reading a streamed body (httpx or httpx2)
        if kind == "timeout":
            raise BackendTimeoutError(f"{name}: {where} stopped sending for {timeout} s",
                                      reason=f"no answer within {timeout} s") from exc
        if kind == "error":
            raise BackendError(f"{name}: connection to {where} failed: {exc!r}",
                               reason="the connection failed") from exc
        raise


def _openai_error(openai: Any, exc: Exception, name: str, where: str, timeout: float) -> BackendError:
    """The cascade's error for one of the openai client's."""
    if isinstance(exc, openai.APITimeoutError):
        return BackendTimeoutError(f"{name}: no answer from {where} within {timeout} s",
                                   reason=f"no answer within {timeout} s")
    if isinstance(exc, openai.APIStatusError):
        return BackendError(f"{name}: HTTP {exc.status_code} from {where}: {_message(exc)}",
                            reason=f"HTTP {exc.status_code}")
    if isinstance(exc, openai.APIConnectionError):
        return BackendError(f"{name}: cannot reach {where}: {exc.__cause__ or exc}", reason="cannot connect")
    return BackendError(f"{name}: {type(exc).__name__}: {exc}", reason=type(exc).__name__)


def _transport_error(exc: BaseException) -> str | None:
    """``"timeout"`` or ``"error"`` for an exception of the HTTP library under the openai client, else None.

    The client raises its own types for the request; a streamed body is read later, straight from the
    transport (``httpx``, or ``httpx2`` in newer openai releases), whose types are matched by name.
    """
    names = {(c.__module__.split(".")[0], c.__name__) for c in type(exc).__mro__}
    libs = {"httpx", "httpx2", "httpcore", "httpcore2"}
    if any(lib in libs and name in ("TimeoutException", "TimeoutError") for lib, name in names):
        return "timeout"
    if any(lib in libs and name in ("HTTPError", "RequestError", "StreamError", "NetworkError") for lib, name in names):
        return "error"
    return None


def _message(exc: Any) -> str:
    """The server's own error message when its body is OpenAI-style JSON, else the client's."""
    body = getattr(exc, "body", None)
    if isinstance(body, dict):
        inner = body.get("error", body)
        if isinstance(inner, dict) and isinstance(inner.get("message"), str):
            return str(inner["message"])
    return str(getattr(exc, "message", exc))


async def gather(calls: Sequence[Awaitable[_T]]) -> list[_T | BaseException]:
    """Run coroutines concurrently to their ends: each one's result or exception, in order.

    A failure does not cancel the others (their answers are kept); cancelling the caller cancels them all.
    One call is awaited in the caller's task (no task of its own).
    """
    if len(calls) == 1:
        try:
            return [await calls[0]]
        except Exception as exc:
            return [exc]
    return list(await asyncio.gather(*calls, return_exceptions=True))
