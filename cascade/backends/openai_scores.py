"""Uncertainty of remote answers from their ``top_logprobs``, in plain Python.

A remote answer brings at most a few dozen steps of ``k + 1`` numbers (``k <= 20``): building tensors for so
little costs more than the arithmetic (torch scoring was 7-11% of the gateway's CPU per request, profiled).
The formulas are those of :func:`cascade.uncertainty.topk_stats` and :func:`cascade.uncertainty.aggregate`
(which stay the batched, on-device path of local models), computed in double precision; the two agree to
float32 rounding (tested).

Used by :class:`~cascade.backends.openai_compat.OpenAIBackend`; no I/O.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

from cascade.types import TokenStats
from cascade.uncertainty import REMOTE_VOCAB_SIZE

if TYPE_CHECKING:
    from cascade.backends.openai_answer import Answer

__all__ = ["first_token_scores", "score_answers", "step_stats"]


def step_stats(top: Sequence[float], width: int, vocab_size: int = REMOTE_VOCAB_SIZE) -> tuple[float, float]:
    """Margin and entropy (nats) of one step from its listed log-probabilities, as :func:`topk_stats` computes
    them for one row of ``width`` entries: the ``width`` largest of ``top`` (the rest ignored), ``-inf`` missing.

    An empty ``top`` is a step with nothing listed: margin 0, entropy ``log(vocab_size)``.
    """
    best = sorted(top, reverse=True)[:width]
    probs = [math.exp(lp) for lp in best]
    margin = (probs[0] if probs else 0.0) - (probs[1] if len(probs) > 1 else 0.0)
    listed = sum(1 for lp in best if math.isfinite(lp))
    unlisted = max(float(vocab_size) - listed, 1.0)
    rest = max(1.0 - sum(probs), 0.0)
    plogp = sum(p * lp for p, lp in zip(probs, best, strict=True) if p > 0)
    rest_term = rest * (math.log(unlisted) - math.log(max(rest, 1e-30))) if rest > 1e-12 else 0.0
    return margin, -plogp + rest_term


def score_answers(answers: Sequence[Answer], k: int) -> list[tuple[TokenStats, dict[str, float]]]:
    """Token statistics and every measure (:data:`cascade.types.MEASURES`) of each answer.

    ``k`` is the ``top_logprobs`` asked for (a server may return the chosen token beside the top-k, so each
    step keeps its ``k + 1`` largest). An answer without tokens is scored as one step with nothing listed
    (margin 0, the largest entropy) and the log-probability of a uniform choice among ``k + 1``.
    """
    width = k + 1
    out: list[tuple[TokenStats, dict[str, float]]] = []
    for a in answers:
        steps = max(len(a.tokens), 1)  # a step the server listed nothing for counts as nothing listed
        stats = [step_stats(t, width) for t in a.top[:steps]] + [step_stats((), width)] * (steps - len(a.top))
        margins = [m for m, _ in stats]
        entropies = [e for _, e in stats]
        chosen = a.logprobs if a.tokens else [-math.log(width)]
        measures = {
            "margin_first": 1.0 - margins[0],
            "margin_mean": 1.0 - sum(margins) / steps,
            "margin_min": 1.0 - min(margins),
            "entropy_first": entropies[0],
            "entropy_mean": sum(entropies) / steps,
            "entropy_max": max(entropies),
            "logprob_mean": -sum(chosen) / steps,
        }
        size = len(a.tokens)
        out.append((TokenStats(tuple(margins[:size]), tuple(entropies[:size]), tuple(a.logprobs),
                               entropy_exact=False), measures))
    return out


def first_token_scores(top: Sequence[float], k: int) -> dict[str, float]:
    """Both first-token measures (``margin_first``, ``entropy_first``) of one answer, exactly as
    :func:`score_answers` computes them."""
    margin, entropy = step_stats(top, k + 1)
    return {"margin_first": 1.0 - margin, "entropy_first": entropy}
