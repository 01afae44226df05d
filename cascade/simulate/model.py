"""The simulated model: deterministic answers with prompt-dependent confidence. Pure functions, no I/O."""

from __future__ import annotations

import functools
import hashlib
import math
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from cascade.errors import ConfigError

__all__ = ["MAX_TOP_LOGPROBS", "AnswerSteps", "SimAnswer", "SimConfig", "simulate_answer"]

MAX_TOP_LOGPROBS = 20  # most alternatives per step a request may ask for (vLLM's and OpenAI's chat limit)
_TAIL_TOKENS = 1000  # vocabulary entries outside the top 20, each with the same small probability
_CONFIDENCE_MARKER = re.compile(r"\[\[sim:confidence=([0-9]*\.?[0-9]+)\]\]")
_WORDS = (
    "the of and to in is was for on are with as at be by this had not but from or have an they which one "
    "you were her all she there would their we him been has when who will more no if out so said what up "
    "its about into than them can only other new some could time these two may then do first any my now "
    "such like our over man me even most made after also did many before must through back years where "
    "much your way well down should because each just those people how too little state good very make "
    "world still own see men work long get here between both life being under never day same another know "
    "while last might us great old year off come since against go came right used take three river stone "
    "light water green quiet answer number small large model token north south east west cloud paper"
)


@functools.cache
def _vocabulary() -> tuple[str, ...]:
    return tuple(_WORDS.split())


def _sample(rng: random.Random, population: Sequence[str], k: int) -> list[str]:
    """``rng.sample(population, k)``, the same draws and result, without its per-call overhead.

    CPython's ``Random.sample`` with a population larger than its pool threshold (``21 + 4 ** ceil(log4(3k))``,
    85 for k = 20) draws each index with ``getrandbits(n.bit_length())`` until it is below ``n`` and not taken
    yet; this does exactly that (``tests/test_simulate.py`` checks it against ``rng.sample``). Smaller
    populations go to ``rng.sample`` itself.
    """
    n = len(population)
    if n <= 21 + 4 ** math.ceil(math.log(3 * k, 4)) or k <= 5:
        return rng.sample(population, k)
    bits, getrandbits = n.bit_length(), rng.getrandbits
    taken: set[int] = set()
    out: list[str] = []
    while True:
        j = getrandbits(bits)
        if j < n and j not in taken:
            taken.add(j)
            out.append(population[j])
            if len(out) == k:
                return out


@dataclass(frozen=True)
class SimConfig:
    """How the simulated server behaves. Every field is validated; bad values raise ConfigError.

    Attributes:
        model: the one model id served; requests naming another model get 404 (default ``"sim-model"``).
        latency_per_token_s: seconds per generated token, per step of a request (default 0.0).
        latency_per_request_s: fixed seconds before the first token of every request (default 0.0).
        error_rate: probability in [0, 1] that a request fails with HTTP 500 (default 0.0).
        timeout_rate: probability in [0, 1] that a request hangs ``hang_s`` before answering (default 0.0).
        hang_s: seconds a hanging request waits, in (0, 600]; it then answers normally (default 30.0).
        seed: seed of the answers and of the error/hang draws (default 0).
        logprobs: False imitates a server without logprobs support: it ignores the request's
            ``logprobs``/``top_logprobs`` and returns ``null`` (default True).
        max_answer_tokens: longest natural answer, in tokens; each prompt's natural length is drawn in
            ``[max_answer_tokens // 4, max_answer_tokens]``, then cut by ``max_tokens`` (default 48).
        guided_choice: accept vLLM's guided choice (``guided_choice``, ``structured_outputs.choice``); False
            imitates a server without it: such a request is HTTP 400 (default True).
        echo: accept ``echo`` (with ``logprobs``, the prompt tokens' logprobs) on ``/completions``; False: HTTP
            400 (default True).
        stream_usage: honour ``stream_options.include_usage`` with a final usage chunk; False imitates
            llama.cpp's server, which sends none (default True).
        interrupt_requests: imitate llama.cpp's default ``--interrupt_requests True``: a stream in progress
            ends with a bare ``data: [DONE]`` (no finish reason, no usage) as soon as a newer generation request
            arrives (default False). :meth:`llamacpp` sets this and llama.cpp's other quirks.
        confidence_scale: every prompt's confidence is multiplied by this, in (0, 1]: below 1 imitates a
            worse model (less peaked distributions, so higher uncertainty; default 1.0).
        stop_reason: add vLLM's ``stop_reason`` to every choice: the stop string that ended the answer, else
            null (default False). :meth:`vllm` sets it.
        processed_logprobs: imitate vLLM's ``--logprobs-mode processed_logprobs`` for guided choice: the
            logprobs are taken after the guide's mask, so the allowed tokens are renormalised among themselves
            and every masked alternative is ``-9999.0`` (vLLM's stand-in for minus infinity; default False:
            raw logprobs, vLLM's default).
    """

    model: str = "sim-model"
    latency_per_token_s: float = 0.0
    latency_per_request_s: float = 0.0
    error_rate: float = 0.0
    timeout_rate: float = 0.0
    hang_s: float = 30.0
    seed: int = 0
    logprobs: bool = True
    max_answer_tokens: int = 48
    guided_choice: bool = True
    echo: bool = True
    stream_usage: bool = True
    interrupt_requests: bool = False
    confidence_scale: float = 1.0
    stop_reason: bool = False
    processed_logprobs: bool = False

    @classmethod
    def vllm(cls, **changes: Any) -> SimConfig:
        """vLLM's OpenAI server: ``stop_reason`` on every choice, guided choice in both spellings, at most 20
        ``top_logprobs`` (``--max-logprobs``), streamed usage on request; ``processed_logprobs=True`` for
        ``--logprobs-mode processed_logprobs``."""
        return cls(**{"stop_reason": True, **changes})

    @classmethod
    def llamacpp(cls, **changes: Any) -> SimConfig:
        """llama.cpp's Python server with its defaults: interrupts, no streamed usage, no guided choice."""
        return cls(**{"interrupt_requests": True, "stream_usage": False, "guided_choice": False, **changes})

    def __post_init__(self) -> None:
        if not isinstance(self.model, str) or not self.model.strip():
            raise ConfigError("model must be a non-empty string")
        for name in ("latency_per_token_s", "latency_per_request_s"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                raise ConfigError(f"{name} must be a finite number >= 0, got {value!r}")
        for name in ("error_rate", "timeout_rate"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ConfigError(f"{name} must be in [0, 1], got {value!r}")
        if not 0.0 < self.confidence_scale <= 1.0:
            raise ConfigError(f"confidence_scale must be in (0, 1], got {self.confidence_scale!r}")
        if not 0.0 < self.hang_s <= 600.0:
            raise ConfigError(f"hang_s must be in (0, 600], got {self.hang_s!r}")
        if not isinstance(self.max_answer_tokens, int) or not 1 <= self.max_answer_tokens <= 4096:
            raise ConfigError(f"max_answer_tokens must be in [1, 4096], got {self.max_answer_tokens!r}")


@dataclass(frozen=True)
class SimAnswer:
    """One simulated answer.

    Attributes:
        tokens: the T generated token strings; ``"".join(tokens)`` is the text.
        logprobs: log-probability of each generated token, length T.
        top: for each step, the 20 most likely ``(token, logprob)`` pairs, most likely first (the generated
            token is always first: decoding is greedy).
        finish_reason: ``"stop"`` (natural end or stop string) or ``"length"`` (``max_tokens`` reached).
        confidence: the prompt's confidence in [0, 1]; higher means more peaked distributions.
        stop: the stop string that ended the answer, or None.
    """

    tokens: tuple[str, ...]
    logprobs: tuple[float, ...]
    top: tuple[tuple[tuple[str, float], ...], ...]
    finish_reason: str
    confidence: float
    stop: str | None = None

    @property
    def text(self) -> str:
        """The answer text."""
        return "".join(self.tokens)


def simulate_answer(config: SimConfig, prompt: str, max_tokens: int, stop: Sequence[str] = ()) -> SimAnswer:
    """Compute the deterministic answer of the simulated model to ``prompt``.

    Each step's distribution has logits ``0, -g, -g - s, -g - 2s, ...`` over 20 words and a tail of 1000
    tokens below them; the gap ``g`` grows with the prompt's confidence, so margin and entropy follow it.

    Args:
        config: the server's configuration (its seed and ``max_answer_tokens`` matter).
        prompt: the prompt text (for chat, the rendered messages).
        max_tokens: the most tokens to generate, >= 1.
        stop: strings that end the answer; the text stops before the first token that reaches one.
    """
    steps = AnswerSteps(config, prompt, max_tokens)
    steps.ensure(steps.length - 1)
    tokens, logprobs, top, finish = steps.tokens, steps.logprobs, steps.top, steps.finish_reason
    text = "".join(tokens)
    found = {s: text.find(s) for s in stop if text.find(s) >= 0}
    cuts = list(found.values())
    matched = min(found, key=lambda s: found[s]) if found else None
    if cuts:
        end, kept = 0, 0
        while kept < len(tokens) and end + len(tokens[kept]) <= min(cuts):
            end += len(tokens[kept])
            kept += 1
        tokens, logprobs, top, finish = tokens[:kept], logprobs[:kept], top[:kept], "stop"
    return SimAnswer(tuple(tokens), tuple(logprobs), tuple(top), finish, steps.confidence, matched)


class AnswerSteps:
    """The answer of :func:`simulate_answer` without stop strings, computed a step at a time, when asked for:
    a stream cut short after its first token (an early exit) computes no more of it.

    Attributes:
        length: the answer's number of tokens T.
        finish_reason: ``"stop"`` or ``"length"``.
        confidence: the prompt's confidence in [0, 1].
        stop: always None (no stop strings).
        tokens: the first steps' tokens, as far as computed (all T after :meth:`ensure` ``(T - 1)``).
        logprobs: their log-probabilities.
        top: their 20 most likely ``(token, logprob)`` pairs.
    """

    stop: str | None = None

    def __init__(self, config: SimConfig, prompt: str, max_tokens: int) -> None:
        digest = hashlib.blake2b(f"{config.seed}\x00{prompt}".encode(), digest_size=8).digest()
        self._rng = rng = random.Random(int.from_bytes(digest, "big"))
        marker = _CONFIDENCE_MARKER.search(prompt)
        self.confidence = config.confidence_scale * (min(1.0, float(marker.group(1))) if marker else rng.random())
        natural = rng.randint(max(1, config.max_answer_tokens // 4), config.max_answer_tokens)
        self.length = min(natural, max_tokens)
        self.finish_reason = "stop" if natural <= max_tokens else "length"
        self.tokens: list[str] = []
        self.logprobs: list[float] = []
        self.top: list[tuple[tuple[str, float], ...]] = []

    def ensure(self, t: int) -> None:
        """Compute the steps up to ``t`` (at most ``length - 1``)."""
        rng, vocabulary, exp, confidence = self._rng, _vocabulary(), math.exp, self.confidence
        offsets = range(MAX_TOP_LOGPROBS - 1)
        for step_index in range(len(self.tokens), min(t + 1, self.length)):
            words = _sample(rng, vocabulary, MAX_TOP_LOGPROBS)
            gap = (0.05 + 7.0 * confidence) * (0.5 + rng.random())
            slope = 0.2 + 0.6 * rng.random()
            logits = [0.0, *[-gap - slope * j for j in offsets]]
            tail = logits[-1] - 1.0
            lse = math.log(sum(map(exp, logits)) + _TAIL_TOKENS * exp(tail))
            if step_index:
                words = [" " + w for w in words]
            step = tuple(zip(words, [z - lse for z in logits]))
            self.tokens.append(words[0])
            self.logprobs.append(step[0][1])
            self.top.append(step)
