"""Plain data types shared by backends, the engine, calibration and the server.

Nothing here does I/O. Every type is a frozen dataclass (or a typing alias) so results can be logged,
compared in tests and serialised with :func:`dataclasses.asdict`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, TypedDict

from cascade.errors import InvalidRequestError

__all__ = [
    "CHOICE_MEASURES",
    "FIRST_TOKEN_MEASURES",
    "FREE_MEASURES",
    "MEASURES",
    "ROLES",
    "CascadeChunk",
    "CascadeResult",
    "EarlyExit",
    "FinishReason",
    "Generation",
    "GenerationParams",
    "Message",
    "Prompt",
    "StreamEvent",
    "TierCall",
    "TokenStats",
    "chat_lines",
    "check_text",
    "validate_choices",
    "validate_prompt",
]

#: Measures of a generated answer's tokens (free-form or the chosen one of constrained choices).
FREE_MEASURES: tuple[str, ...] = (
    "margin_first",
    "margin_mean",
    "margin_min",
    "entropy_first",
    "entropy_mean",
    "entropy_max",
    "logprob_mean",
)
#: Measures of the distribution over a request's allowed answers (only requests with ``choices`` have them).
CHOICE_MEASURES: tuple[str, ...] = ("choice_margin", "choice_entropy")
#: Every uncertainty measure, by its public name. Higher value = more uncertain for all of them.
MEASURES: tuple[str, ...] = FREE_MEASURES + CHOICE_MEASURES
#: Measures that only need the first generated token (they allow early exit).
FIRST_TOKEN_MEASURES: frozenset[str] = frozenset({"margin_first", "entropy_first"})

FinishReason = Literal["stop", "length", "early_exit"]


class Message(TypedDict):
    """One chat message, as in the OpenAI API."""

    role: str
    content: str


#: A request: a plain prompt string or a list of chat messages.
Prompt = str | Sequence[Message]

#: The chat roles a message may have (OpenAI's).
ROLES = frozenset({"system", "user", "assistant", "developer", "tool"})


def chat_lines(messages: Sequence[Mapping[str, Any]]) -> str:
    """Chat messages as plain text, one ``role: content`` line each: how a model without a chat template is
    prompted (followed by ``assistant:``) and the text the simulated server answers."""
    return "\n".join(f"{m['role']}: {m['content']}" for m in messages)


def check_text(text: str, what: str) -> str:
    """Return ``text`` if it can be encoded as UTF-8, else raise InvalidRequestError.

    JSON allows escapes such as ``"\\ud800"`` that decode to a lone surrogate, which no tokenizer or HTTP
    client can encode: such a request is the caller's mistake, not a model failure.
    """
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise InvalidRequestError(f"{what} is not valid Unicode text: a lone surrogate at position "
                                      f"{exc.start}") from None
    return text


def validate_prompt(prompt: object, max_chars: int = 200_000) -> Prompt:
    """Check a prompt's shape and size and return it unchanged.

    Args:
        prompt: a non-empty string, or a non-empty list of ``{"role", "content"}`` dicts.
        max_chars: the largest total number of characters accepted.

    Raises:
        InvalidRequestError: empty, oversized or malformed prompt.
    """
    if isinstance(prompt, str):
        if not prompt.strip():
            raise InvalidRequestError("prompt is empty")
        if len(prompt) > max_chars:
            raise InvalidRequestError(f"prompt has {len(prompt)} characters; the limit is {max_chars}")
        check_text(prompt, "prompt")
        return prompt
    if not isinstance(prompt, Sequence) or isinstance(prompt, (bytes, bytearray)) or not prompt:
        raise InvalidRequestError("prompt must be a non-empty string or a non-empty list of messages")
    total = 0
    for i, message in enumerate(prompt):
        if not isinstance(message, Mapping):
            raise InvalidRequestError(f"messages[{i}] is not an object")
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise InvalidRequestError(f"messages[{i}].role must be one of {sorted(ROLES)}, got {role!r}")
        if not isinstance(content, str):
            raise InvalidRequestError(f"messages[{i}].content must be a string")
        check_text(content, f"messages[{i}].content")
        total += len(content)
    if not any(str(m.get("content")).strip() for m in prompt if isinstance(m, Mapping)):
        raise InvalidRequestError("all messages are empty")
    if total > max_chars:
        raise InvalidRequestError(f"messages have {total} characters; the limit is {max_chars}")
    return prompt


#: Most allowed answers one request may carry.
MAX_CHOICES = 64
_MAX_CHOICE_CHARS = 1000


def validate_choices(choices: object) -> tuple[str, ...]:
    """Check a request's allowed answers and return them as a tuple.

    Args:
        choices: a list of 1 to 64 distinct, non-empty strings of at most 1,000 characters each.

    Raises:
        InvalidRequestError: not a list of strings, empty, too many, a blank, duplicate or oversized choice.
    """
    if isinstance(choices, (str, bytes)) or not isinstance(choices, Sequence):
        raise InvalidRequestError("choices must be a list of strings")
    if not 1 <= len(choices) <= MAX_CHOICES:
        raise InvalidRequestError(f"choices must have 1 to {MAX_CHOICES} entries, got {len(choices)}")
    out = []
    for i, c in enumerate(choices):
        if not isinstance(c, str) or not c.strip():
            raise InvalidRequestError(f"choices[{i}] must be a non-empty string")
        if len(c) > _MAX_CHOICE_CHARS:
            raise InvalidRequestError(f"choices[{i}] has {len(c)} characters; the limit is {_MAX_CHOICE_CHARS}")
        out.append(check_text(c, f"choices[{i}]"))
    if len(set(out)) != len(out):
        raise InvalidRequestError("choices must be distinct")
    return tuple(out)


@dataclass(frozen=True)
class GenerationParams:
    """Decoding parameters for one generate call.

    Attributes:
        max_tokens: largest number of new tokens per answer (default 64).
        temperature: 0 means greedy decoding; > 0 samples (default 0.0).
        top_p: nucleus sampling mass, in (0, 1] (default 1.0).
        stop: strings that end an answer; the stop string is not part of the text (default none). One
            string alone is taken as one stop string, as in the OpenAI API.
        seed: random seed for sampling; None leaves the generator as it is (default None).
    """

    max_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        elif isinstance(self.stop, list):
            object.__setattr__(self, "stop", tuple(self.stop))
        if not isinstance(self.max_tokens, int) or isinstance(self.max_tokens, bool) or self.max_tokens < 1:
            raise InvalidRequestError(f"max_tokens must be a positive integer, got {self.max_tokens!r}")
        for name in ("temperature", "top_p"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise InvalidRequestError(f"{name} must be a number, got {value!r}")
        if not 0.0 <= float(self.temperature) <= 2.0:
            raise InvalidRequestError(f"temperature must be in [0, 2], got {self.temperature!r}")
        if not 0.0 < float(self.top_p) <= 1.0:
            raise InvalidRequestError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise InvalidRequestError(f"seed must be an integer or None, got {self.seed!r}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise InvalidRequestError("stop must be a list of non-empty strings")
        for s in self.stop:
            check_text(s, "a stop string")
        if len(self.stop) > 8:
            raise InvalidRequestError("at most 8 stop strings")


@dataclass(frozen=True)
class EarlyExit:
    """Ask a backend to end a sequence after its first token when that token is too uncertain.

    The backend scores the first token of every sequence with ``measure`` and stops sequence ``i`` at once
    (finish reason ``"early_exit"``) when the score is above ``thresholds[i]`` (the policy's rule), so an
    answer that will be escalated does not cost a whole small-model generation.

    Attributes:
        measure: a first-token measure (``margin_first`` or ``entropy_first``).
        thresholds: one threshold per prompt of the call; ``inf`` never exits early.
    """

    measure: str
    thresholds: tuple[float, ...]

    def __post_init__(self) -> None:
        if self.measure not in FIRST_TOKEN_MEASURES:
            raise InvalidRequestError(f"early exit needs a first-token measure, got {self.measure!r}")


@dataclass(frozen=True)
class TokenStats:
    """Per-token statistics of one generated sequence (post-EOS steps removed).

    Attributes:
        margin: p(top-1) - p(top-2) of each step's next-token distribution, length T.
        entropy: entropy in nats of each step's distribution, length T (over the top-k when not exact).
        logprob: log-probability of the token that was chosen at each step, length T.
        entropy_exact: False when the entropy was computed over a truncated top-k distribution.
    """

    margin: tuple[float, ...]
    entropy: tuple[float, ...]
    logprob: tuple[float, ...]
    entropy_exact: bool = True


@dataclass(frozen=True)
class Generation:
    """One backend answer.

    Attributes:
        text: the answer text (stop strings and EOS removed).
        model: identity of the model that produced it.
        token_ids: generated token ids (may be empty for remote backends that do not return them).
        prompt_tokens: number of prompt tokens billed.
        completion_tokens: number of generated tokens billed.
        finish_reason: ``"stop"`` (EOS or stop string), ``"length"`` or ``"early_exit"``.
        scores: every uncertainty measure of :data:`MEASURES` that could be computed, by name.
        token_stats: the per-token statistics the scores came from (None when not requested).
        latency_s: wall-clock seconds of the call that produced it (shared by a batch).
        usage_estimated: True when the server reported no prompt token count (llama.cpp ignores
            ``stream_options.include_usage``; an early exit closes the stream before the usage chunk) and
            ``prompt_tokens`` is an estimate from the prompt's length (about 4 characters a token).
        choice_logprobs: for a constrained answer, the log-likelihood of every allowed answer, in the
            request's order (summed over its tokens, or their mean when length-normalised); empty otherwise.
    """

    text: str
    model: str
    token_ids: tuple[int, ...] = ()
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: FinishReason = "stop"
    scores: Mapping[str, float] = field(default_factory=dict)
    token_stats: TokenStats | None = None
    latency_s: float = 0.0
    choice_logprobs: tuple[float, ...] = ()
    usage_estimated: bool = False


@dataclass(frozen=True)
class TierCall:
    """What one tier did for one request.

    Attributes:
        tier: the tier's name (``"small"``, ``"large"`` or a configured name).
        model: the model identity.
        prompt_tokens: prompt tokens billed.
        completion_tokens: generated tokens billed.
        cost: money spent on this call, in the configured currency.
        latency_s: seconds spent in this tier.
        uncertainty: the tier's uncertainty under the cascade's measure (None for the last tier).
        threshold: the threshold it was compared with (None for the last tier).
        finish_reason: the backend's finish reason.
        error: the error message when the call failed (the request was then degraded or raised).
        usage_estimated: the server sent no prompt token count; ``prompt_tokens`` (and the cost) is an estimate.
    """

    tier: str
    model: str
    prompt_tokens: int
    completion_tokens: int
    cost: float
    latency_s: float
    uncertainty: float | None = None
    threshold: float | None = None
    finish_reason: str = "stop"
    error: str | None = None
    usage_estimated: bool = False


@dataclass(frozen=True)
class CascadeResult:
    """The answer to one request, explaining itself.

    Attributes:
        text: the answer.
        tier: name of the tier that answered.
        tier_index: its position in the chain (0 = cheapest).
        escalated: True when any tier above the first was called.
        uncertainty: the first tier's uncertainty under ``measure`` (NaN when it was skipped).
        measure: the uncertainty measure used.
        threshold: the first tier's threshold (``-inf``: it was skipped).
        reason: a one-line human explanation of the decision.
        calls: one :class:`TierCall` per tier that was called, cheapest first.
        cost: total cost of all calls.
        latency_s: end-to-end seconds.
        degraded: True when a higher tier failed and a lower tier's answer was returned instead.
        target: the per-request quality target the thresholds came from, if any (e.g. ``"max_large_share=0.3"``).
        cluster: the router cluster in expert-router mode, else None.
        threshold_source: where the thresholds came from: ``"certified"`` (a certified per-request level of the
            artifact), ``"curve"`` (read off its measured curve: a point estimate, no guarantee), ``"cluster"``,
            ``"artifact"`` or ``"fixed"`` (see :class:`cascade.policy.Resolved`).
        certified_level: the certified level used (its ``max_quality_loss``), else None.
        skipped: the tiers not called because their threshold was ``-inf`` (their answer would never be kept).
    """

    text: str
    tier: str
    tier_index: int
    escalated: bool
    uncertainty: float
    measure: str
    threshold: float
    reason: str
    calls: tuple[TierCall, ...]
    cost: float
    latency_s: float
    degraded: bool = False
    target: str | None = None
    cluster: int | None = None
    threshold_source: str = "fixed"
    certified_level: float | None = None
    skipped: tuple[str, ...] = ()

    @property
    def prompt_tokens(self) -> int:
        """Prompt tokens summed over tiers."""
        return sum(c.prompt_tokens for c in self.calls)

    @property
    def completion_tokens(self) -> int:
        """Generated tokens summed over tiers."""
        return sum(c.completion_tokens for c in self.calls)


@dataclass(frozen=True)
class StreamEvent:
    """One event of a backend's streamed generation (see ``StreamingBackend.stream``).

    Attributes:
        kind: ``"first"`` once the first token is scored (``scores`` holds the first-token measures, sent
            before that token's text), ``"delta"`` for new text, ``"done"`` last (``generation`` is the whole
            answer, exactly what ``generate`` would have returned).
        text: the new text of a ``"delta"``.
        scores: first-token measures of a ``"first"`` event.
        generation: the finished answer of a ``"done"`` event.
    """

    kind: Literal["first", "delta", "done"]
    text: str = ""
    scores: Mapping[str, float] = field(default_factory=dict)
    generation: Generation | None = None


@dataclass(frozen=True)
class CascadeChunk:
    """A piece of a streamed cascade answer; the tier that answers is decided before the first chunk.

    Attributes:
        text: new answer text.
        tier: the name of the answering tier.
    """

    text: str
    tier: str
