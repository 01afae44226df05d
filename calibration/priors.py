"""Choice priors in ``cascade-calibrate --choice-prior``: each tier's bias over a set of allowed answers.

A prior is fitted per tier and per choice set from that tier's constrained answers to *unlabelled* requests
(:func:`cascade.choice_prior.fit_prior`: the mean log-likelihood of each choice), then subtracted from every
constrained answer of that tier before the thresholds are fitted, and stored in the artifact so the cascade
corrects its answers the same way. The requests come from ``--prior-data`` or, by default, from a seeded
share of ``--data`` set aside for it: the thresholds are then fitted on examples the prior never saw, so the
finite-sample guarantee holds as stated (a prior fitted on the same examples would make their scores depend
on each other).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from cascade.choice_prior import apply_prior, choice_set_key, fit_prior
from cascade.errors import InvalidRequestError

if TYPE_CHECKING:
    from cascade.types import Generation

__all__ = ["MIN_PRIOR_REQUESTS", "apply_priors", "fit_priors"]

#: Fewer requests with a choice set give it no prior.
MIN_PRIOR_REQUESTS = 10


def _choices(example: Mapping[str, Any]) -> list[str] | None:
    raw = example.get("choices")
    return None if not raw else [str(c) for c in raw]


def fit_priors(examples: Sequence[Mapping[str, Any]], generations: Sequence[Sequence[Generation]],
               min_requests: int = MIN_PRIOR_REQUESTS) -> dict[int, dict[str, tuple[float, ...]]]:
    """Every tier's prior for every choice set seen at least ``min_requests`` times (answers are not read).

    Args:
        examples: n requests (those without ``choices`` are ignored).
        generations: per tier, the n constrained answers (with ``choice_logprobs``).
        min_requests: the fewest requests a choice set needs.

    Raises:
        InvalidRequestError: no choice set has enough requests.
    """
    rows: dict[str, list[int]] = {}
    for i, ex in enumerate(examples):
        choices = _choices(ex)
        if choices is not None:
            rows.setdefault(choice_set_key(choices), []).append(i)
    keep = {key: idx for key, idx in rows.items() if len(idx) >= min_requests}
    if not keep:
        raise InvalidRequestError(f"a choice prior needs at least {min_requests} requests with the same choices; "
                                  f"the largest choice set has {max(map(len, rows.values()), default=0)}")
    out: dict[int, dict[str, tuple[float, ...]]] = {}
    for tier, gens in enumerate(generations):
        out[tier] = {key: fit_prior([gens[i].choice_logprobs for i in idx]) for key, idx in keep.items()}
    return out


def apply_priors(examples: Sequence[Mapping[str, Any]], generations: Sequence[Sequence[Generation]],
                 priors: Mapping[int, Mapping[str, Sequence[float]]]) -> list[list[Generation]]:
    """Every tier's answers with its prior subtracted where the example's choice set has one."""
    out = []
    for tier, gens in enumerate(generations):
        table = priors.get(tier, {})
        fixed = []
        for ex, g in zip(examples, gens, strict=True):
            choices = _choices(ex)
            offsets = table.get(choice_set_key(choices)) if choices is not None and g.choice_logprobs else None
            fixed.append(apply_prior(g, choices, offsets) if choices is not None and offsets is not None else g)
        out.append(fixed)
    return out
