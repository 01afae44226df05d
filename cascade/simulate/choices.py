"""Constrained answers of the simulated model: guided choice and prompt logprobs (``echo``). Pure functions.

The simulated model gives every token a log-probability that depends on the text before it:
``-(0.05 + g * u)`` with ``u`` a seeded hash of (context, token) in [0, 1) and a spread ``g`` that grows with
the prompt's confidence (``[[sim:confidence=x]]`` in the text, else 0.5), so a confident prompt separates
its choices more. Tokens are words or single punctuation marks, each with the whitespace before it, so the
tokens of a text concatenate to the text exactly (``text_offset`` works as on a real server).

* Guided choice (vLLM's ``guided_choice`` / ``structured_outputs.choice``): the answer is the choice whose
  tokens (after the prompt) have the largest summed log-probability.
* Echo (``/completions`` with ``echo`` and ``logprobs``): the logprob of every prompt token but the first
  (``null``, as real servers send), then the generated tokens.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

from cascade.simulate.model import SimConfig

__all__ = ["SimChoice", "choose", "echo_logprobs", "masked", "token_logprob", "tokens"]

_TOKEN = re.compile(r"\s*(?:\w+|[^\w\s])|\s+")
_CONFIDENCE = re.compile(r"\[\[sim:confidence=([0-9]*\.?[0-9]+)\]\]")
_FILLERS = ("maybe", "perhaps", "the", "a", "it", "yes", "no", "not", "so", "well", "and", "or", "but", "then",
            "one", "two", "this", "that", "very", "quite")


def tokens(text: str) -> list[str]:
    """The simulated tokenizer: words and punctuation marks with their leading whitespace (they join to ``text``)."""
    return _TOKEN.findall(text)


def _confidence(text: str) -> float:
    marker = _CONFIDENCE.search(text)
    return min(1.0, float(marker.group(1))) if marker else 0.5


def token_logprob(config: SimConfig, context: str, token: str) -> float:
    """Log-probability of ``token`` after ``context`` (deterministic in ``config.seed``)."""
    digest = hashlib.blake2b(f"{config.seed}\x00{context}\x00{token}".encode(), digest_size=8).digest()
    u = int.from_bytes(digest, "big") / 2**64
    return -(0.05 + (0.5 + 8.0 * _confidence(context)) * u)


@dataclass(frozen=True)
class SimChoice:
    """A guided-choice answer.

    Attributes:
        text: the chosen answer.
        tokens: its tokens.
        logprobs: each token's log-probability.
        top: per step, up to 20 ``(token, logprob)`` alternatives, most likely first; the first step lists
            every choice's first token with its log-probability.
    """

    text: str
    tokens: tuple[str, ...]
    logprobs: tuple[float, ...]
    top: tuple[tuple[tuple[str, float], ...], ...]


def _score(config: SimConfig, prompt: str, choice: str) -> tuple[list[str], list[float]]:
    toks = tokens(choice)
    context, values = prompt, []
    for t in toks:
        values.append(token_logprob(config, context, t))
        context += t
    return toks, values


def _alternatives(config: SimConfig, context: str, listed: dict[str, float]) -> tuple[tuple[str, float], ...]:
    """``listed`` plus filler tokens, each below the least likely listed one, most likely first (20 at most)."""
    floor = min(listed.values())
    out = dict(listed)
    for i, word in enumerate(_FILLERS):
        if len(out) >= 20:
            break
        out.setdefault(word, floor - 1.0 - i * 0.25 + token_logprob(config, context, word) * 0.01)
    return tuple(sorted(out.items(), key=lambda kv: -kv[1]))


def choose(config: SimConfig, prompt: str, choices: Sequence[str]) -> SimChoice:
    """The guided-choice answer to ``prompt``: the choice with the largest summed token log-probability."""
    scored = [_score(config, prompt, c) for c in choices]
    best = max(range(len(choices)), key=lambda k: (sum(scored[k][1]), -k))
    toks, values = scored[best]
    firsts: dict[str, float] = {}
    for ts, vs in scored:
        firsts[ts[0]] = max(vs[0], firsts.get(ts[0], -1e9))
    top = [_alternatives(config, prompt, firsts)]
    context = prompt + toks[0]
    for t, v in zip(toks[1:], values[1:]):
        top.append(_alternatives(config, context, {t: v}))
        context += t
    return SimChoice(choices[best], tuple(toks), tuple(values), tuple(top))


def masked(choice: SimChoice, choices: Sequence[str]) -> SimChoice:
    """``choice`` with processed logprobs (vLLM's ``processed_logprobs``): at each step the tokens the guide
    allows after the tokens so far are renormalised among the listed ones, every other listed token gets
    ``-9999.0``."""
    split = [tokens(c) for c in choices]
    values: list[float] = []
    top: list[tuple[tuple[str, float], ...]] = []
    for i, step in enumerate(choice.top):
        allowed = {ts[i] for ts in split if len(ts) > i and ts[:i] == list(choice.tokens[:i])}
        kept = [(t, lp) for t, lp in step if t in allowed]
        lse = math.log(sum(math.exp(lp) for _, lp in kept))
        ranked = [(t, lp - lse) for t, lp in kept] + [(t, -9999.0) for t, _ in step if t not in allowed]
        top.append(tuple(ranked))
        values.append(dict(ranked)[choice.tokens[i]])
    return SimChoice(choice.text, choice.tokens, tuple(values), tuple(top))


def echo_logprobs(config: SimConfig, text: str, n: int) -> dict[str, object]:
    """The ``logprobs`` object of an echoed prompt: tokens, their logprobs (the first is ``null``), offsets and
    ``n`` top alternatives per token (OpenAI's completions format)."""
    toks = tokens(text)
    values: list[float | None] = [None]
    top: list[dict[str, float] | None] = [None]
    offsets, pos = [], 0
    for i, t in enumerate(toks):
        offsets.append(pos)
        if i:
            v = token_logprob(config, text[:pos], t)
            values.append(v)
            top.append(dict(_alternatives(config, text[:pos], {t: v})[: max(n, 1)]))
        pos += len(t)
    return {"tokens": toks, "token_logprobs": values, "top_logprobs": top, "text_offset": offsets}
