"""A model's prior over a set of allowed answers, and the constrained answer corrected for it.

Small models favour some answers whatever the input: SmolLM2-135M, asked "negative or positive?" for 300
SST-2 reviews, scored "negative" highest for 264 of them (half are positive). Such a bias shows in the
average log-likelihood of each choice over many inputs, which needs no labels. Subtracting it (the idea of
"calibrate before use", Zhao et al. 2021, with the prior estimated from unlabelled requests instead of a
content-free prompt) is a per-choice offset: the answer is the choice with the largest corrected
log-likelihood, and ``choice_margin`` / ``choice_entropy`` are recomputed from the corrected values.

The prior of one choice set is fitted from the ``choice_logprobs`` of requests carrying that set (in that
order): :func:`fit_prior`; :func:`apply_prior` corrects one answer.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import replace

from cascade.errors import InvalidRequestError
from cascade.types import CHOICE_MEASURES, FIRST_TOKEN_MEASURES, Generation

__all__ = ["apply_prior", "choice_set_key", "fit_prior", "prior_table"]


def choice_set_key(choices: Sequence[str]) -> str:
    """The key of one choice set (its choices, in order) in a table of priors."""
    return json.dumps(list(choices), ensure_ascii=False)


def fit_prior(logliks: Sequence[Sequence[float]]) -> tuple[float, ...]:
    """The prior offsets of one choice set: each choice's mean log-likelihood, centred to mean 0.

    Args:
        logliks: ``(n, K)`` the ``choice_logprobs`` of n requests with the same K choices (n >= 1).

    Raises:
        InvalidRequestError: no rows, rows of different lengths, or non-finite values.
    """
    import numpy as np

    a = np.asarray(logliks, dtype=np.float64)
    if a.ndim != 2 or a.shape[0] == 0 or a.shape[1] == 0 or not np.isfinite(a).all():
        raise InvalidRequestError("a choice prior needs a non-empty (n, K) table of finite log-likelihoods")
    mean = a.mean(axis=0)
    return tuple(float(x) for x in mean - mean.mean())


def apply_prior(generation: Generation, choices: Sequence[str], offsets: Sequence[float]) -> Generation:
    """The constrained answer corrected for the model's prior over ``choices``.

    The answer becomes the choice with the largest ``choice_logprobs - offsets`` (ties: the first), and the
    choice measures are recomputed from the corrected values. The first-token measures (the distribution
    before any answer token) are kept; the token measures of the previous answer are dropped when the answer
    changes (they described other tokens). ``choice_logprobs`` keeps the model's own values.

    Raises:
        InvalidRequestError: the generation has no choice log-likelihoods for these choices, or the
            offsets do not match them.
    """
    import torch

    from cascade.uncertainty import choice_measures

    raw = list(generation.choice_logprobs)
    if len(raw) != len(choices) or len(offsets) != len(choices):
        raise InvalidRequestError(f"a prior for {len(offsets)} choices cannot correct an answer among "
                                  f"{len(choices)} with {len(raw)} log-likelihoods")
    corrected = [x - o for x, o in zip(raw, offsets)]
    best = max(range(len(choices)), key=lambda k: (corrected[k], -k))
    scores = dict(generation.scores)
    if scores:
        measures = choice_measures(torch.tensor([corrected]))
        scores.update({k: float(v[0]) for k, v in measures.items()})
        if choices[best] != generation.text:
            keep = set(CHOICE_MEASURES) | set(FIRST_TOKEN_MEASURES)
            scores = {k: v for k, v in scores.items() if k in keep}
    changed = choices[best] != generation.text
    return replace(generation, text=choices[best], scores=scores,
                   token_ids=() if changed else generation.token_ids,
                   token_stats=None if changed else generation.token_stats)


def prior_table(rows: Mapping[str, Sequence[Sequence[float]]], min_requests: int = 1) -> dict[str, tuple[float, ...]]:
    """Priors of every choice set with at least ``min_requests`` rows: ``{choice_set_key: offsets}``."""
    return {key: fit_prior(r) for key, r in rows.items() if len(r) >= min_requests and all(map(_finite_row, r))}


def _finite_row(row: Sequence[float]) -> bool:
    return all(math.isfinite(x) for x in row)

