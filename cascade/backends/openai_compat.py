"""A tier behind any OpenAI-compatible server: OpenAI, vLLM, TGI, SGLang, llama.cpp, :mod:`cascade.simulate`.

Uncertainty comes from the server's ``logprobs``/``top_logprobs``: the margin from the top-1 and top-2
probabilities, the entropy over the returned top-k plus one bucket holding the remaining mass (so it is an
approximation and ``TokenStats.entropy_exact`` is False), and the chosen token's log-probability.

Prompts: a string goes to ``/chat/completions`` as one user message, or to ``/completions`` as it is. A
message list goes to chat as it is; to completions it is joined with this template (one line per message,
then the assistant's turn)::

    system: You are terse.
    user: What is 2+2?
    assistant:

A batch of B prompts is sent as B concurrent requests (at most ``max_concurrency`` in flight, at most
``rate_limit_per_s`` started per second). The openai client retries connection errors, timeouts, 408, 409,
429 and 5xx ``max_retries`` times with exponential backoff (0.5 s doubling, at most 8 s, 25% jitter).

``timeout_s`` is a hard deadline on each request: every attempt (retries included) and the whole answer, streamed
or not, must arrive within it. Errors name the model, and for logs the server's URL with its credentials removed;
their ``reason`` (what the cascade server tells its clients) has no URL at all. When some prompts of a batch fail,
the others keep their answers (:class:`~cascade.errors.BatchError`).

The client sends each request and maps HTTP errors; answers are read as raw JSON (and streamed answers as
raw server-sent event lines) instead of being built into the client's pydantic models, which took a fifth to a
quarter of the CPU per request under load (profiled). An ``{"error": ...}`` object in a 200 answer or mid-stream, and a
connection lost mid-stream, are :class:`~cascade.errors.BackendError` like any failed request.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import random
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

from cascade.errors import (
    BackendError,
    BackendTimeoutError,
    BatchError,
    ConfigError,
    InvalidRequestError,
    TruncatedAnswerError,
    redact,
)
from cascade.types import (
    EarlyExit,
    FinishReason,
    Generation,
    GenerationParams,
    Prompt,
    StreamEvent,
    TokenStats,
    validate_prompt,
)
from cascade.uncertainty import aggregate, topk_stats

if TYPE_CHECKING:
    import torch
    from openai import AsyncOpenAI

__all__ = ["DUMMY_API_KEY", "OpenAIBackend", "render_messages"]

#: The key sent when none is configured (local servers such as vLLM or llama.cpp ignore it).
DUMMY_API_KEY = "sk-no-key-required"
_T = TypeVar("_T")
log = logging.getLogger("cascade.backends.openai")
#: The finish reasons the OpenAI protocol defines. Any other (vLLM's ``"abort"``), or none at all, means the
#: answer was cut off: :class:`~cascade.errors.TruncatedAnswerError`.
_FINISH_REASONS: dict[str, FinishReason] = {"stop": "stop", "length": "length", "content_filter": "stop",
                                            "tool_calls": "stop", "function_call": "stop"}


def render_messages(messages: Sequence[Any]) -> str:
    """Join chat messages into one completions prompt: ``"{role}: {content}"`` lines, then ``assistant:``."""
    return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"


@dataclass
class _Answer:
    """One parsed server answer (mutable while a stream is read)."""

    text: str = ""
    tokens: list[str] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)  # chosen token's logprob, per step
    top: list[list[float]] = field(default_factory=list)  # top-k logprobs, per step
    finish_reason: FinishReason = "stop"
    prompt_tokens: int = 0
    completion_tokens: int | None = None
    has_logprobs: bool = False

    @property
    def billed_tokens(self) -> int:
        """Generated tokens as the server billed them (counted from the logprobs when it did not say)."""
        return len(self.tokens) if self.completion_tokens is None else self.completion_tokens


class OpenAIBackend:
    """A :class:`~cascade.backends.base.Backend` over the OpenAI HTTP API (``openai.AsyncOpenAI``).

    Attributes:
        name: the model id (recorded in results and calibration artifacts).
    """

    def __init__(
        self,
        *,
        model: str,
        base_url: str | None = None,
        api_key: str | None = None,
        api_key_env: str = "OPENAI_API_KEY",
        api: str = "chat",
        timeout_s: float = 60.0,
        max_retries: int = 2,
        max_concurrency: int = 64,
        rate_limit_per_s: float | None = None,
        top_logprobs: int = 5,
        choices: str = "auto",
    ) -> None:
        """Configure the client (no network traffic happens here).

        Args:
            model: the model id sent with every request; also this backend's ``name``.
            base_url: server URL including ``/v1``, e.g. ``http://127.0.0.1:8001/v1`` (default: OpenAI's).
            api_key: the API key; when None it is read from ``api_key_env`` (default None).
            api_key_env: environment variable holding the key; when unset a dummy key is sent, which local
                servers accept (default ``OPENAI_API_KEY``).
            api: ``"chat"`` (``/chat/completions``) or ``"completions"`` (``/completions``) (default chat).
            timeout_s: seconds one request may take in total from when it is sent: every attempt, and the whole
                answer, streamed or not (default 60).
            max_retries: retries of a failed request, with exponential backoff (default 2).
            max_concurrency: requests in flight at once, per backend (default 64).
            rate_limit_per_s: requests started per second at most; None = unlimited (default None).
            top_logprobs: alternatives per token asked for when scoring, 1..20; the margin needs >= 2, and
                OpenAI's own ``/completions`` allows at most 5 (default 5).
            choices: how requests with allowed answers are answered (see :mod:`cascade.backends.openai_choices`):
                ``"guided"`` (the server's guided choice, ``guided_choice`` / ``structured_outputs.choice``),
                ``"echo"`` (each choice scored from its prompt logprobs via ``echo`` on ``/completions``),
                ``"auto"`` (what the server accepts, found on the first constrained request) or ``"none"``
                (constrained requests fail) (default auto).

        Use one backend within one event loop (its connection pool and semaphore belong to that loop).

        Raises:
            ConfigError: a value is out of range.
        """
        if not isinstance(model, str) or not model.strip():
            raise ConfigError("model must be a non-empty string")
        if api not in ("chat", "completions"):
            raise ConfigError(f"api must be 'chat' or 'completions', got {api!r}")
        if not (isinstance(timeout_s, int | float) and math.isfinite(timeout_s) and timeout_s > 0):
            raise ConfigError(f"timeout_s must be a positive number of seconds, got {timeout_s!r}")
        if not isinstance(max_retries, int) or max_retries < 0:
            raise ConfigError(f"max_retries must be an integer >= 0, got {max_retries!r}")
        if not isinstance(max_concurrency, int) or max_concurrency < 1:
            raise ConfigError(f"max_concurrency must be an integer >= 1, got {max_concurrency!r}")
        if rate_limit_per_s is not None and not (math.isfinite(rate_limit_per_s) and rate_limit_per_s > 0):
            raise ConfigError(f"rate_limit_per_s must be a positive number or None, got {rate_limit_per_s!r}")
        if not isinstance(top_logprobs, int) or not 1 <= top_logprobs <= 20:
            raise ConfigError(f"top_logprobs must be an integer in 1..20, got {top_logprobs!r}")
        from cascade.backends.openai_choices import CHOICE_METHODS

        if choices not in CHOICE_METHODS:
            raise ConfigError(f"choices must be one of {list(CHOICE_METHODS)}, got {choices!r}")
        self.choices = choices
        self.choice_methods: dict[str, str] = {}  # method -> why it failed ("" = it works), found as requests go
        from openai import AsyncOpenAI

        self.name = model
        self.api = api
        self.max_retries = max_retries
        self.timeout_s = float(timeout_s)
        self.top_logprobs = top_logprobs
        key = api_key if api_key is not None else os.environ.get(api_key_env) or DUMMY_API_KEY
        self._make_client: Callable[[], AsyncOpenAI] = lambda: AsyncOpenAI(
            api_key=key, base_url=base_url, timeout=self.timeout_s, max_retries=max_retries)
        self._max_concurrency = max_concurrency
        self._rate = rate_limit_per_s
        self._loop: asyncio.AbstractEventLoop | None = None
        self._client: AsyncOpenAI = self._make_client()
        self._where = redact(str(self._client.base_url))  # for error messages: no credentials
        self._slots = asyncio.Semaphore(max_concurrency)
        self._throttle: Any = None
        self._closed = False

    def _bind(self) -> None:
        """Give the running event loop its own client, semaphore and throttle.

        Connection pools and asyncio primitives belong to one loop: a backend used from a second loop (each
        ``Cascade.run_sync`` call runs a new one) gets fresh ones; the old loop's connections went with it.
        """
        loop = asyncio.get_running_loop()
        if loop is self._loop:
            return
        if self._loop is not None:
            self._client = self._make_client()
        self._loop = loop
        self._slots = asyncio.Semaphore(self._max_concurrency)
        self._throttle = None
        if self._rate is not None:
            from asyncio_throttle.throttler import Throttler

            # Allow bursts of a tenth of a second's worth (at least one request), evenly over each period.
            burst = max(1, int(self._rate / 10))
            self._throttle = Throttler(rate_limit=burst, period=burst / self._rate,
                                       retry_interval=min(0.01, 0.25 / self._rate))

    async def generate(
        self,
        prompts: Sequence[Prompt],
        params: GenerationParams,
        *,
        scores: bool = True,
        early_exit: EarlyExit | None = None,
    ) -> list[Generation]:
        """Answer every prompt with one concurrent request each; see :class:`~cascade.backends.base.Backend`.

        With ``early_exit``, prompts whose threshold is finite are streamed; once the first token's score
        is above the threshold the stream is closed and the answer (that one token) has finish reason
        ``"early_exit"`` and ``prompt_tokens == 0`` (the server's usage only arrives at the stream's end).
        An empty answer is scored as a uniform first step over the top-k and the rest (margin 0, entropy
        ``log(k + 1)``), so it escalates under any sensible threshold.

        Raises:
            InvalidRequestError: a malformed prompt, or ``early_exit`` without ``scores`` or with one
                threshold per prompt missing.
            BackendError: HTTP or connection failure, malformed answer, or no logprobs when scores were asked.
            BackendTimeoutError: no complete answer within ``timeout_s`` (retries included).
            BatchError: some prompts failed and others were answered (its ``outcomes`` hold both; a call where
                every prompt failed raises the first failure instead).
        """
        if self._closed:
            raise BackendError(f"{self.name}: the backend was closed (aclose)")
        self._bind()
        for prompt in prompts:
            validate_prompt(prompt)
        if early_exit is not None:
            if not scores:
                raise InvalidRequestError("early_exit needs scores=True")
            if len(early_exit.thresholds) != len(prompts):
                raise InvalidRequestError(f"early_exit has {len(early_exit.thresholds)} thresholds for "
                                          f"{len(prompts)} prompts")
        if not prompts:
            return []
        started = time.perf_counter()
        thresholds = early_exit.thresholds if early_exit is not None else (math.inf,) * len(prompts)
        measure = early_exit.measure if early_exit is not None else ""
        outcomes = await _gather([self._request(p, params, scores, measure, t)
                                  for p, t in zip(prompts, thresholds, strict=True)])
        latency = time.perf_counter() - started
        answers = [a for a in outcomes if isinstance(a, _Answer)]
        if not answers:
            raise next(o for o in outcomes if isinstance(o, BaseException))
        stats: list[tuple[TokenStats | None, dict[str, float]]] = (
            self._score(answers) if scores else [(None, {})] * len(answers))
        gens = iter([
            Generation(text=a.text, model=self.name, prompt_tokens=a.prompt_tokens,
                       completion_tokens=a.billed_tokens,
                       finish_reason=a.finish_reason, scores=s, token_stats=ts, latency_s=latency)
            for a, (ts, s) in zip(answers, stats, strict=True)
        ])
        if len(answers) < len(outcomes):
            raise BatchError([next(gens) if isinstance(o, _Answer) else o for o in outcomes])
        return list(gens)

    async def choose(
        self,
        prompts: Sequence[Prompt],
        choices: Sequence[Sequence[str]],
        *,
        scores: bool = True,
        length_normalize: bool = False,
    ) -> list[Generation]:
        """Answer each prompt with one of its allowed answers, as the server allows (see ``choices`` above).

        Raises:
            ChoicesUnsupportedError: the server offers neither guided choice nor prompt logprobs (the message
                says what each attempt got); never a free answer instead.
            BackendError: HTTP or connection failure; BatchError when some prompts failed.
        """
        from cascade.backends.openai_choices import choose_remote

        if self._closed:
            raise BackendError(f"{self.name}: the backend was closed (aclose)")
        self._bind()
        return await choose_remote(self, prompts, choices, scores=scores, length_normalize=length_normalize)

    @property
    def where(self) -> str:
        """The server's URL without credentials (for error messages)."""
        return self._where

    def completion_prompt(self, prompt: Prompt) -> str:
        """The prompt as ``/completions`` gets it: a string as it is, messages by :func:`render_messages`."""
        return prompt if isinstance(prompt, str) else render_messages(prompt)

    def token_scores(self, logprobs: Sequence[float], top: Sequence[Sequence[float]]
                     ) -> tuple[TokenStats, dict[str, float]]:
        """Token statistics and measures of one answer from its tokens' logprobs and top alternatives."""
        answer = _Answer(tokens=[""] * len(logprobs), logprobs=list(logprobs), top=[list(t) for t in top],
                         has_logprobs=True)
        stats, measures = self._score([answer])[0]
        assert stats is not None
        return stats, measures

    async def post_json(self, route: str, body: Mapping[str, Any], extra: Mapping[str, Any] | None = None
                        ) -> dict[str, Any]:
        """One request to ``/chat/completions`` (``route="chat"``) or ``/completions``, answered as parsed JSON.

        Shares the backend's concurrency slots, rate limit, error mapping and deadline with ``generate``.
        ``extra`` holds fields the openai client does not know (sent as they are, e.g. ``guided_choice``).
        """
        async with self._slots:
            if self._throttle is not None:
                await self._throttle.acquire()
            with self._errors():
                endpoint = self._client.chat.completions if route == "chat" else self._client.completions
                call = endpoint.with_raw_response.create(**body, extra_body=dict(extra or {}))
                try:
                    raw: Any = await asyncio.wait_for(call, self.timeout_s)
                except asyncio.TimeoutError:
                    raise self._late() from None
                data = json.loads(raw.http_response.content)
                _raise_for_error(data)
                return dict(data)

    async def aclose(self) -> None:
        """Close the HTTP client and its connections; later ``generate`` calls raise BackendError."""
        self._closed = True
        if self._loop is None or self._loop is asyncio.get_running_loop():
            await self._client.close()  # (a client bound to a finished loop has no connections left to close)

    # -- one request ---------------------------------------------------------------------------------

    async def _request(self, prompt: Prompt, params: GenerationParams, scores: bool, measure: str,
                       threshold: float) -> _Answer:
        async with self._slots:
            if self._throttle is not None:
                await self._throttle.acquire()
            with self._errors():
                try:
                    return await asyncio.wait_for(self._attempts(prompt, params, scores, measure, threshold),
                                                  self.timeout_s)
                except asyncio.TimeoutError:
                    raise self._late() from None

    async def _attempts(self, prompt: Prompt, params: GenerationParams, scores: bool, measure: str,
                        threshold: float) -> _Answer:
        """One answer; a cut-off answer is logged and asked again, up to ``max_retries`` times, with backoff.

        (The openai client retries HTTP and connection failures itself; a cut-off answer arrives as HTTP 200.)
        """
        streamed = scores and measure and threshold != math.inf  # -inf exits early on any first token
        attempt = 0
        while True:
            try:
                return await (self._streamed(prompt, params, measure, threshold) if streamed
                              else self._plain(prompt, params, scores))
            except TruncatedAnswerError as exc:
                attempt += 1
                log.warning("%s (attempt %d of %d)", exc, attempt, self.max_retries + 1)
                if attempt > self.max_retries:
                    raise
                await asyncio.sleep(min(0.5 * 2 ** (attempt - 1), 8.0) * (1.0 - 0.25 * random.random()))

    def _finish(self, raw: Any, answer: _Answer) -> FinishReason:
        """The finish reason of an answer, or TruncatedAnswerError when it has none the protocol defines."""
        if isinstance(raw, str) and raw in _FINISH_REASONS:
            return _FINISH_REASONS[raw]
        why = "no finish_reason" if raw is None else f"finish_reason {str(raw)[:40]!r}, which the protocol lacks"
        raise TruncatedAnswerError(
            f"{self.name}: the answer from {self._where} was cut off ({why}) after {len(answer.tokens)} "
            f"tokens, {len(answer.text)} characters", reason=f"the answer was cut off ({why})")

    def _late(self) -> BackendTimeoutError:
        """The error of a request past its deadline (``timeout_s`` for the whole request, retries included)."""
        return BackendTimeoutError(f"{self.name}: no complete answer from {self._where} within {self.timeout_s} s",
                                   reason=f"no complete answer within {self.timeout_s} s")

    @contextlib.contextmanager
    def _errors(self) -> Iterator[None]:
        """Map the openai client's exceptions (and malformed answers) to the cascade's error types."""
        import openai

        name, where, timeout = self.name, self._where, self.timeout_s
        try:
            yield
        except openai.APITimeoutError as exc:
            raise BackendTimeoutError(f"{name}: no answer from {where} within {timeout} s",
                                      reason=f"no answer within {timeout} s") from exc
        except openai.APIStatusError as exc:
            raise BackendError(f"{name}: HTTP {exc.status_code} from {where}: {_message(exc)}",
                               reason=f"HTTP {exc.status_code}") from exc
        except openai.APIConnectionError as exc:
            raise BackendError(f"{name}: cannot reach {where}: {exc.__cause__ or exc}",
                               reason="cannot connect") from exc
        except openai.OpenAIError as exc:
            raise BackendError(f"{name}: {type(exc).__name__}: {exc}", reason=type(exc).__name__) from exc
        except (AttributeError, TypeError, KeyError, IndexError, ValueError) as exc:
            raise BackendError(f"{name}: malformed answer from {where}: {exc!r}", reason="malformed answer") from exc
        except Exception as exc:  # a transport error while reading a streamed body (httpx or httpx2)
            kind = _transport_error(exc)
            if kind == "timeout":
                raise BackendTimeoutError(f"{name}: {where} stopped sending for {timeout} s",
                                          reason=f"no answer within {timeout} s") from exc
            if kind == "error":
                raise BackendError(f"{name}: connection to {where} failed: {exc!r}",
                                   reason="the connection failed") from exc
            raise

    def _body(self, prompt: Prompt, params: GenerationParams, scores: bool) -> dict[str, Any]:
        body: dict[str, Any] = {"model": self.name, "max_tokens": params.max_tokens,
                                "temperature": params.temperature, "top_p": params.top_p}
        if params.stop:
            body["stop"] = list(params.stop)
        if params.seed is not None:
            body["seed"] = params.seed
        if self.api == "chat":
            is_text = isinstance(prompt, str)
            body["messages"] = [{"role": "user", "content": prompt}] if is_text else list(prompt)
            if scores:
                body.update(logprobs=True, top_logprobs=self.top_logprobs)
        else:
            body["prompt"] = prompt if isinstance(prompt, str) else render_messages(prompt)
            if scores:
                body["logprobs"] = self.top_logprobs
        return body

    def _endpoint(self) -> Any:
        return self._client.chat.completions if self.api == "chat" else self._client.completions

    async def _plain(self, prompt: Prompt, params: GenerationParams, scores: bool) -> _Answer:
        raw: Any = await self._endpoint().with_raw_response.create(**self._body(prompt, params, scores))
        data = json.loads(raw.http_response.content)
        _raise_for_error(data)
        answer = _Answer()
        choice = data["choices"][0]
        self._add_choice(answer, choice, "message")
        answer.finish_reason = self._finish(choice.get("finish_reason"), answer)
        _add_usage(answer, data.get("usage"))
        if scores:
            self._check_logprobs(answer)
        return answer

    def _add_choice(self, answer: _Answer, choice: Mapping[str, Any], key: str) -> str:
        """Add one choice's text and logprobs (``key``: ``"message"`` or ``"delta"`` for chat); return the text."""
        if self.api == "chat":
            text = str((choice.get(key) or {}).get("content") or "")
            lp = choice.get("logprobs")
            if lp and lp.get("content") is not None:
                _add_chat_logprobs(answer, lp["content"])
        else:
            text = str(choice.get("text") or "")
            _add_text_logprobs(answer, choice.get("logprobs"))
        answer.text += text
        return text

    async def _streamed(self, prompt: Prompt, params: GenerationParams, measure: str,
                        threshold: float) -> _Answer:
        answer = _Answer()
        async for kind, value in self._events(prompt, params, True, measure, threshold):
            if kind == "answer":
                answer = value
        return answer

    async def _events(self, prompt: Prompt, params: GenerationParams, scores: bool, measure: str,
                      threshold: float) -> AsyncGenerator[tuple[str, Any], None]:
        """Stream one answer: ``("first", scores)`` once the first token is scored, ``("delta", text)``, and
        ``("answer", _Answer)`` last. Above ``threshold`` on the first token the stream is closed at once.

        The server-sent events are read as raw lines and decoded with :func:`json.loads` (the openai client
        still sends the request, retries and maps HTTP errors; it does not build a model per chunk)."""
        body = self._body(prompt, params, scores)
        body.update(stream=True, stream_options={"include_usage": True})
        answer = _Answer()
        scored = not scores
        finished = False
        async with self._endpoint().with_streaming_response.create(**body) as resp:
            async for line in resp.iter_lines():
                if not line.startswith("data:"):
                    continue  # blank separators, comments, "event:" lines
                payload = line[5:].strip()
                if payload == "[DONE]":
                    break
                chunk = json.loads(payload)
                _raise_for_error(chunk)
                _add_usage(answer, chunk.get("usage"))
                if not chunk.get("choices"):
                    continue
                choice = chunk["choices"][0]
                delta = self._add_choice(answer, choice, "delta")
                if choice.get("finish_reason") is not None:
                    answer.finish_reason = self._finish(choice["finish_reason"], answer)
                    finished = True
                if not scored and answer.top:
                    scored = True
                    self._check_logprobs(answer)
                    first = {m: _first_token_score(m, answer.top[0], self.top_logprobs)
                             for m in ("margin_first", "entropy_first")}
                    yield "first", first
                    if measure and first[measure] > threshold:
                        await resp.close()  # stop generation now: the server sees the disconnect
                        yield "answer", _Answer(text=answer.tokens[0], tokens=answer.tokens[:1],
                                                logprobs=answer.logprobs[:1], top=answer.top[:1],
                                                finish_reason="early_exit", completion_tokens=1,
                                                has_logprobs=True)
                        return
                if delta:
                    yield "delta", delta
        if not finished:  # a bare [DONE] or a closed connection: the server cut the answer off
            self._finish(None, answer)
        if scores:
            self._check_logprobs(answer)
        yield "answer", answer

    async def stream(
        self,
        prompt: Prompt,
        params: GenerationParams,
        *,
        scores: bool = True,
        early_exit: EarlyExit | None = None,
    ) -> AsyncIterator[StreamEvent]:
        """Stream one answer as the server generates it (see :class:`~cascade.backends.base.StreamingBackend`).

        With ``early_exit`` (one threshold) the stream is closed after the first token when its score is
        above the threshold; the final generation then has finish reason ``"early_exit"``.
        """
        if self._closed:
            raise BackendError(f"{self.name}: the backend was closed (aclose)")
        self._bind()
        validate_prompt(prompt)
        if early_exit is not None and (not scores or len(early_exit.thresholds) != 1):
            raise InvalidRequestError("a streamed early exit needs scores=True and exactly one threshold")
        measure = early_exit.measure if early_exit is not None else ""
        threshold = early_exit.thresholds[0] if early_exit is not None else math.inf
        started = time.perf_counter()
        answer = _Answer()
        async with self._slots:
            if self._throttle is not None:
                await self._throttle.acquire()
            deadline = time.monotonic() + self.timeout_s
            events = self._events(prompt, params, scores, measure, threshold)
            try:
                with self._errors():
                    while True:
                        try:
                            kind, value = await asyncio.wait_for(events.__anext__(), deadline - time.monotonic())
                        except StopAsyncIteration:
                            break
                        except asyncio.TimeoutError:
                            raise self._late() from None
                        except TruncatedAnswerError as exc:  # text may be sent already: no retry here
                            log.warning("%s", exc)
                            raise
                        if kind == "first":
                            yield StreamEvent("first", scores=value)
                        elif kind == "delta":
                            yield StreamEvent("delta", text=value)
                        else:
                            answer = value
            finally:
                await events.aclose()
        ts, sc = self._score([answer])[0] if scores else (None, {})
        yield StreamEvent("done", generation=Generation(
            text=answer.text, model=self.name, prompt_tokens=answer.prompt_tokens,
            completion_tokens=answer.billed_tokens, finish_reason=answer.finish_reason, scores=sc,
            token_stats=ts, latency_s=time.perf_counter() - started))

    def _check_logprobs(self, answer: _Answer) -> None:
        """Raise when a non-empty answer came without the per-token logprobs scoring needs."""
        if answer.text and not answer.has_logprobs:
            route = "/chat/completions" if self.api == "chat" else "/completions"
            raise BackendError(f"{self.name}: the server at {self._where} returned no logprobs; scoring "
                               f"needs a server that supports 'logprobs' and 'top_logprobs' on {route}",
                               reason="the server returned no logprobs")
        if any(not step for step in answer.top):
            raise BackendError(f"{self.name}: the server at {self._where} returned logprobs without "
                               f"'top_logprobs' alternatives; scoring needs top_logprobs >= 1",
                               reason="the server returned no top_logprobs")

    # -- scores --------------------------------------------------------------------------------------

    def _score(self, answers: Sequence[_Answer]) -> list[tuple[TokenStats | None, dict[str, float]]]:
        """Token statistics and every measure for a batch, in one padded ``(B, T, k + 1)`` computation."""
        import torch

        width = self.top_logprobs + 1  # completions may return the chosen token beside the top-k
        steps = max(1, *(len(a.tokens) for a in answers))
        uniform = -math.log(width)
        top, chosen, mask = [], [], []
        for a in answers:
            n = len(a.tokens)
            rows = [_row(t, width) for t in a.top] if n else [[uniform] * (width - 1) + [-math.inf]]
            top.append(rows + [[-math.inf] * width] * (steps - len(rows)))
            chosen.append((a.logprobs if n else [uniform]) + [0.0] * (steps - max(n, 1)))
            mask.append([True] * max(n, 1) + [False] * (steps - max(n, 1)))
        margin, entropy = topk_stats(torch.tensor(top, dtype=torch.float32))
        logprob = torch.tensor(chosen, dtype=torch.float32)
        measures = aggregate(margin, entropy, logprob, torch.tensor(mask))
        columns = {name: values.tolist() for name, values in measures.items()}
        margins, entropies = margin.tolist(), entropy.tolist()
        out: list[tuple[TokenStats | None, dict[str, float]]] = []
        for b, a in enumerate(answers):
            n = len(a.tokens)
            ts = TokenStats(tuple(margins[b][:n]), tuple(entropies[b][:n]), tuple(a.logprobs),
                            entropy_exact=False)
            out.append((ts, {name: float(col[b]) for name, col in columns.items()}))
        return out


def _row(logprobs: Sequence[float], width: int) -> list[float]:
    """The ``width`` largest log-probabilities, largest first, padded with ``-inf``."""
    best = sorted(logprobs, reverse=True)[:width]
    return best + [-math.inf] * (width - len(best))


def _first_token_score(measure: str, top: Sequence[float], k: int) -> float:
    """The first-token measure of one answer, computed exactly as :meth:`OpenAIBackend._score` does."""
    import torch

    margin, entropy = topk_stats(torch.tensor([[_row(top, k + 1)]], dtype=torch.float32))
    value: torch.Tensor = (1.0 - margin[:, 0]) if measure == "margin_first" else entropy[:, 0]
    return float(value.item())


def _add_chat_logprobs(answer: _Answer, content: Sequence[Mapping[str, Any]]) -> None:
    for entry in content:
        answer.has_logprobs = True
        answer.tokens.append(str(entry["token"]))
        answer.logprobs.append(float(entry["logprob"]))
        answer.top.append([float(t["logprob"]) for t in entry.get("top_logprobs") or ()])


def _add_text_logprobs(answer: _Answer, logprobs: Mapping[str, Any] | None) -> None:
    if not logprobs or logprobs.get("tokens") is None or logprobs.get("token_logprobs") is None:
        return
    tops = logprobs.get("top_logprobs") or [None] * len(logprobs["tokens"])
    for token, lp, top in zip(logprobs["tokens"], logprobs["token_logprobs"], tops, strict=True):
        answer.has_logprobs = True
        answer.tokens.append(str(token))
        answer.logprobs.append(float(lp))
        answer.top.append([float(v) for v in (top or {}).values()])


def _add_usage(answer: _Answer, usage: Mapping[str, Any] | None) -> None:
    if usage:
        answer.prompt_tokens = int(usage.get("prompt_tokens") or 0)
        answer.completion_tokens = int(usage["completion_tokens"])


def _transport_error(exc: BaseException) -> str | None:
    """``"timeout"`` or ``"error"`` for an exception of the HTTP library under the openai client, else None.

    The client raises its own types for the request; a streamed body is read later, straight from the
    transport (``httpx``, or ``httpx2`` in newer openai releases), whose types are matched by name.
    """
    names = {(c.__module__.split(".")[0], c.__name__) for c in type(exc).__mro__}
    libs = {"httpx", "httpx2", "httpcore", "httpcore2"}
    if any(lib in libs and name in ("TimeoutException", "TimeoutError") for lib, name in names):
        return "timeout"
    if any(lib in libs and name in ("HTTPError", "RequestError", "StreamError", "NetworkError")
           for lib, name in names):
        return "error"
    return None


def _raise_for_error(data: Any) -> None:
    """Raise BackendError for an error object sent with HTTP 200 (some servers do so mid-stream)."""
    if not isinstance(data, dict):
        raise TypeError(f"expected a JSON object, got {type(data).__name__}")
    error = data.get("error")
    if error:
        message = error.get("message") if isinstance(error, dict) else None
        raise BackendError(f"error in the answer: {message or error}", reason="error in the answer")


def _message(exc: Any) -> str:
    """The server's own error message when its body is OpenAI-style JSON, else the client's."""
    body = getattr(exc, "body", None)
    if isinstance(body, dict):
        inner = body.get("error", body)
        if isinstance(inner, dict) and isinstance(inner.get("message"), str):
            return str(inner["message"])
    return str(getattr(exc, "message", exc))


async def _gather(calls: Sequence[Awaitable[_T]]) -> list[_T | BaseException]:
    """Run coroutines concurrently to their ends: each one's result or exception, in order.

    A failure does not cancel the others (their answers are kept); cancelling the caller cancels them all.
    """
    return list(await asyncio.gather(*calls, return_exceptions=True))
