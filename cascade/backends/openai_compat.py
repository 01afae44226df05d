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

Requests to a plain ``http://`` server go through a small HTTP/1.1 client (:mod:`.http1`: a pool of keep-alive
connections, the openai client's retry schedule, far less CPU per request); ``https://`` servers and those behind a
proxy through the openai client's low-level ``post`` (:mod:`.openai_send`). Either way the body is built here and
sent as it is, and answers are read as raw JSON (streamed ones as raw server-sent event bytes) instead of being
built into the openai client's pydantic models. An ``{"error": ...}`` object in a 200 answer or mid-stream, and a
connection lost mid-stream, are :class:`~cascade.errors.BackendError` like any failed request; an answer without a
finish reason the protocol defines is a :class:`~cascade.errors.TruncatedAnswerError`, asked again up to
``max_retries`` times.

This module holds the backend; :mod:`cascade.backends.openai_request` builds requests and maps the client's
errors, :mod:`cascade.backends.openai_answer` parses answers, :mod:`cascade.backends.openai_stream`
reads streamed ones, :mod:`cascade.backends.openai_scores` scores them, :mod:`cascade.backends.openai_choices`
answers constrained requests.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import random
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Mapping, Sequence
from typing import Any

from cascade.backends.openai_answer import Answer, Reader, raise_for_error
from cascade.backends.openai_request import (
    DUMMY_API_KEY,
    estimated_prompt_tokens,
    gather,
    map_errors,
    render_messages,
    request_body,
)
from cascade.backends.openai_scores import score_answers
from cascade.backends.openai_send import ROUTES, make_sender
from cascade.backends.openai_stream import stream_events
from cascade.deadlines import within
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
    Generation,
    GenerationParams,
    Prompt,
    StreamEvent,
    TokenStats,
    validate_prompt,
)

__all__ = ["DUMMY_API_KEY", "OpenAIBackend", "render_messages"]

log = logging.getLogger("cascade.backends.openai")


def _prompt_usage(answer: Answer, prompt: Prompt) -> dict[str, Any]:
    """The prompt token count the server reported, or an estimate marked as such (never a silent 0)."""
    if answer.prompt_tokens is not None:
        return {"prompt_tokens": answer.prompt_tokens}
    return {"prompt_tokens": estimated_prompt_tokens(prompt), "usage_estimated": True}


class OpenAIBackend:
    """A :class:`~cascade.backends.base.Backend` over the OpenAI HTTP API.

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
        _check_settings(model, api, timeout_s, max_retries, max_concurrency, rate_limit_per_s, top_logprobs, choices)
        self.choices = choices
        self.choice_methods: dict[str, str] = {}  # method -> why it failed ("" = it works), found as requests go
        self.name = model
        self.api = api
        self.max_retries = max_retries
        self.timeout_s = float(timeout_s)
        self.top_logprobs = top_logprobs
        key = api_key if api_key is not None else os.environ.get(api_key_env) or DUMMY_API_KEY
        self._make_sender: Callable[[], Any] = lambda: make_sender(base_url, api_key=key, timeout_s=self.timeout_s,
                                                                   max_retries=max_retries)
        self._max_concurrency = max_concurrency
        self._rate = rate_limit_per_s
        self._loop: asyncio.AbstractEventLoop | None = None
        self._sender = self._make_sender()
        self._where = redact(self._sender.base_url)  # for error messages: no credentials
        self._reader = Reader(self.name, self._where, api == "chat", top_logprobs)
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
            self._sender.forget()  # its connections belong to the old loop
            self._sender = self._make_sender()
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
        outcomes = await gather([self._request(p, params, scores, measure, t)
                                  for p, t in zip(prompts, thresholds, strict=True)])
        latency = time.perf_counter() - started
        answers = [a for a in outcomes if isinstance(a, Answer)]
        if not answers:
            raise next(o for o in outcomes if isinstance(o, BaseException))
        stats: list[tuple[TokenStats | None, dict[str, float]]] = (
            list(score_answers(answers, self.top_logprobs)) if scores else [(None, {})] * len(answers))
        answered = [p for p, o in zip(prompts, outcomes, strict=True) if isinstance(o, Answer)]
        gens = iter([
            Generation(text=a.text, model=self.name, completion_tokens=a.billed_tokens,
                       finish_reason=a.finish_reason, scores=s, token_stats=ts, latency_s=latency,
                       **_prompt_usage(a, p))
            for a, p, (ts, s) in zip(answers, answered, stats, strict=True)
        ])
        if len(answers) < len(outcomes):
            raise BatchError([next(gens) if isinstance(o, Answer) else o for o in outcomes])
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
        answer = Answer(tokens=[""] * len(logprobs), logprobs=list(logprobs), top=[list(t) for t in top],
                         has_logprobs=True)
        return score_answers([answer], self.top_logprobs)[0]

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
                call = self._sender.post_json(ROUTES["chat" if route == "chat" else "completions"],
                                              {**body, **(extra or {})})
                try:
                    data = await within(call, self.timeout_s)
                except asyncio.TimeoutError:
                    raise self._late() from None
                raise_for_error(data)
                return dict(data)

    async def aclose(self) -> None:
        """Close the HTTP client and its connections; later ``generate`` calls raise BackendError."""
        self._closed = True
        if self._loop is None or self._loop is asyncio.get_running_loop():
            await self._sender.aclose()
        else:  # (a client bound to a finished loop: its connections went with it)
            self._sender.forget()

    # -- one request ---------------------------------------------------------------------------------

    async def _request(self, prompt: Prompt, params: GenerationParams, scores: bool, measure: str,
                       threshold: float) -> Answer:
        async with self._slots:
            if self._throttle is not None:
                await self._throttle.acquire()
            with self._errors():
                try:
                    return await within(self._attempts(prompt, params, scores, measure, threshold), self.timeout_s)
                except asyncio.TimeoutError:
                    raise self._late() from None

    async def _attempts(self, prompt: Prompt, params: GenerationParams, scores: bool, measure: str,
                        threshold: float) -> Answer:
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

    def _late(self) -> BackendTimeoutError:
        """The error of a request past its deadline (``timeout_s`` for the whole request, retries included)."""
        return BackendTimeoutError(f"{self.name}: no complete answer from {self._where} within {self.timeout_s} s",
                                   reason=f"no complete answer within {self.timeout_s} s")

    def _errors(self) -> contextlib.AbstractContextManager[None]:
        return map_errors(self.name, self._where, self.timeout_s)

    def _body(self, prompt: Prompt, params: GenerationParams, scores: bool) -> dict[str, Any]:
        return request_body(self.name, self.api, self.top_logprobs, prompt, params, scores)

    async def _plain(self, prompt: Prompt, params: GenerationParams, scores: bool) -> Answer:
        return self._reader.whole(await self._sender.post_json(ROUTES[self.api], self._body(prompt, params, scores)),
                                  scores)

    async def _streamed(self, prompt: Prompt, params: GenerationParams, measure: str,
                        threshold: float) -> Answer:
        answer = Answer()
        async for kind, value in self._events(prompt, params, True, measure, threshold, deltas=False):
            if kind == "answer":
                answer = value
        return answer

    def _events(self, prompt: Prompt, params: GenerationParams, scores: bool, measure: str,
                threshold: float, *, deltas: bool = True) -> AsyncGenerator[tuple[str, Any], None]:
        return stream_events(self._sender, ROUTES[self.api], self._body(prompt, params, scores), self._reader,
                             scores=scores, measure=measure, threshold=threshold, deltas=deltas)

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
        answer = Answer()
        async with self._slots:
            if self._throttle is not None:
                await self._throttle.acquire()
            deadline = time.monotonic() + self.timeout_s
            events = self._events(prompt, params, scores, measure, threshold)
            try:
                with self._errors():
                    while True:
                        try:
                            kind, value = await within(events.__anext__(), deadline - time.monotonic())
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
        ts, sc = score_answers([answer], self.top_logprobs)[0] if scores else (None, {})
        yield StreamEvent("done", generation=Generation(
            text=answer.text, model=self.name, completion_tokens=answer.billed_tokens,
            finish_reason=answer.finish_reason, scores=sc, token_stats=ts, latency_s=time.perf_counter() - started,
            **_prompt_usage(answer, prompt)))


def _check_settings(model: object, api: object, timeout_s: object, max_retries: object, max_concurrency: object,
                    rate_limit_per_s: float | None, top_logprobs: object, choices: object) -> None:
    """Raise ConfigError naming the first :class:`OpenAIBackend` setting that is out of range."""
    from cascade.backends.openai_choices import CHOICE_METHODS

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
    if choices not in CHOICE_METHODS:
        raise ConfigError(f"choices must be one of {list(CHOICE_METHODS)}, got {choices!r}")
