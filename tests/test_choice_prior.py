"""A model's prior over a choice set, fitted without labels, and constrained answers corrected for it."""

from __future__ import annotations

import math

import pytest
import torch

from cascade.choice_prior import apply_prior, choice_set_key, fit_prior, prior_table
from cascade.errors import InvalidRequestError
from cascade.types import Generation
from cascade.uncertainty import choice_measures

CHOICES = ["negative", "positive"]


def answer(logliks: list[float]) -> Generation:
    best = max(range(len(logliks)), key=logliks.__getitem__)
    scores = {k: float(v[0]) for k, v in choice_measures(torch.tensor([logliks])).items()}
    scores.update(margin_first=0.3, entropy_first=1.2, margin_mean=0.4, logprob_mean=0.7)
    return Generation(CHOICES[best], "m", token_ids=(7,), scores=scores, choice_logprobs=tuple(logliks))


def test_a_biased_model_is_corrected_by_its_mean_loglik() -> None:
    # the model always favours "negative" by 1.0 nat; the inputs move the difference by +-0.6
    rows = [[-0.5, -1.5 + d] for d in (0.6, -0.6, 0.6, -0.6)]
    prior = fit_prior(rows)
    assert prior == pytest.approx((0.5, -0.5)) and sum(prior) == pytest.approx(0.0)
    raw = [answer(r) for r in rows]
    assert [g.text for g in raw] == ["negative"] * 4
    fixed = [apply_prior(g, CHOICES, prior) for g in raw]
    assert [g.text for g in fixed] == ["positive", "negative", "positive", "negative"]
    for g, r in zip(fixed, rows, strict=True):
        corrected = torch.tensor([[r[0] - prior[0], r[1] - prior[1]]])
        assert g.scores["choice_margin"] == pytest.approx(float(choice_measures(corrected)["choice_margin"][0]))
        assert g.choice_logprobs == tuple(r) and g.scores["margin_first"] == 0.3  # raw values, first token kept
    assert "margin_mean" not in fixed[0].scores and fixed[0].token_ids == ()  # the answer changed
    assert fixed[1].scores["margin_mean"] == 0.4 and fixed[1].token_ids == (7,)  # it did not


def test_prior_tables_and_bad_input() -> None:
    table = prior_table({choice_set_key(CHOICES): [[-1.0, -2.0]], choice_set_key(["a", "b", "c"]): []})
    assert list(table) == [choice_set_key(CHOICES)]
    with pytest.raises(InvalidRequestError):
        fit_prior([])
    with pytest.raises(InvalidRequestError):
        fit_prior([[0.0, math.inf]])
    with pytest.raises(InvalidRequestError):
        apply_prior(answer([-1.0, -2.0]), ["a", "b", "c"], (0.0, 0.0, 0.0))
