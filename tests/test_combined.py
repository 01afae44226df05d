"""The combined measure: the fit recovers a known signal, and thresholds certified on the held-out part keep
the finite-sample guarantee over many seeded draws."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.stats import binom

from calibration.combine import fit_quality_combined
from calibration.metrics import apgr, share_curve
from cascade.combined import Combination, fit_combination
from cascade.errors import InvalidRequestError
from cascade.types import FREE_MEASURES

# Population: a latent difficulty u ~ U(0, 1); the small tier is wrong with probability u**2, the large tier
# right with probability 0.8 independently. Two measures see u through noise (one with the opposite sign, so
# the fit must learn signs); the other five are pure noise.
SIGNAL = ("margin_mean", "logprob_mean")


def draw(n: int, rng: np.random.Generator) -> tuple[dict[str, np.ndarray], np.ndarray]:
    u = rng.uniform(size=n)
    cols = {m: rng.normal(size=n) for m in FREE_MEASURES}
    cols["margin_mean"] = u + rng.normal(scale=0.3, size=n)
    cols["logprob_mean"] = -u + rng.normal(scale=0.3, size=n)
    correct = np.c_[rng.uniform(size=n) >= u**2, rng.uniform(size=n) < 0.8]
    return cols, correct


def test_fit_recovers_the_signal_and_ignores_noise() -> None:
    cols, correct = draw(4000, np.random.default_rng(0))
    c = fit_combination(cols, ~correct[:, 0])
    w = dict(zip(c.measures, c.weights))
    assert w["margin_mean"] > 0.5 and w["logprob_mean"] < -0.5
    assert all(abs(w[m]) < 0.15 for m in FREE_MEASURES if m not in SIGNAL)
    # deterministic, and beats each signal measure alone on fresh data
    assert fit_combination(cols, ~correct[:, 0]) == c
    tc, tcor = draw(4000, np.random.default_rng(1))
    comb = share_curve(c.scores(tc), tcor)
    single = share_curve(tc["margin_mean"], tcor)
    assert apgr(comb.share, comb.accuracy) > apgr(single.share, single.accuracy)


def test_score_of_one_request_matches_the_batch_and_fills_missing() -> None:
    cols, correct = draw(300, np.random.default_rng(2))
    c = fit_combination(cols, ~correct[:, 0])
    batch = c.scores(cols)
    one = {m: float(v[7]) for m, v in cols.items()}
    assert math.isclose(c.score(one), float(batch[7]), rel_tol=1e-9, abs_tol=1e-9)
    missing = dict(one)
    del missing["margin_mean"]
    filled = dict(one, margin_mean=c.fill[c.measures.index("margin_mean")])
    assert c.score(missing) == pytest.approx(c.score(filled))
    assert c.score(dict(one, margin_mean=math.nan)) == pytest.approx(c.score(filled))
    assert Combination.from_dict(c.to_dict()) == c


def test_bad_input_is_a_typed_error() -> None:
    with pytest.raises(InvalidRequestError):
        fit_combination({}, [True, False])
    with pytest.raises(InvalidRequestError):
        fit_combination({"margin_mean": [1.0, 2.0, 3.0]}, [True, False])
    with pytest.raises(InvalidRequestError):
        Combination.from_dict({"measures": ["margin_mean"], "mean": [0.0]})
    with pytest.raises(InvalidRequestError):
        Combination(("no_such_measure",), (0.0,), (1.0,), (0.0,), (1.0,), 0.0)
    with pytest.raises(InvalidRequestError):
        Combination(("choice_margin",), (0.0,), (1.0,), (0.0,), (1.0,), 0.0, ("a", "a"), (1.0, 2.0))
    with pytest.raises(InvalidRequestError):
        fit_combination({"margin_mean": [1.0, 2.0, 3.0]}, [True, False, True], answers=["x"])


def test_answer_offsets_learn_which_answer_is_unreliable() -> None:
    """A model that says "negative" to most inputs is wrong on half of them and almost never wrong when it
    says "positive"; its margin carries a weak signal. The answer offsets learn the difference, and the
    combination with them ranks wrong answers better than without (AUC on fresh draws)."""
    rng = np.random.default_rng(3)

    def draw(n: int) -> tuple[dict[str, np.ndarray], list[str], np.ndarray]:
        neg = rng.random(n) < 0.8
        wrong = np.where(neg, rng.random(n) < 0.5, rng.random(n) < 0.05)
        margin = rng.normal(size=n) + 0.5 * wrong
        cols = {"choice_margin": margin, "choice_entropy": margin + rng.normal(scale=0.1, size=n)}
        return cols, [" Negative\n" if x else "positive" for x in neg], wrong

    cols, answers, wrong = draw(600)
    with_answers = fit_combination(cols, wrong, answers=answers)
    without = fit_combination(cols, wrong)
    assert with_answers.measures == ("choice_margin", "choice_entropy") and without.answers == ()
    offsets = dict(zip(with_answers.answers, with_answers.answer_weights))
    assert set(offsets) == {"negative", "positive"} and offsets["negative"] > offsets["positive"] + 1.0
    test_cols, test_answers, test_wrong = draw(2000)

    def auc(s: np.ndarray) -> float:
        from scipy.stats import mannwhitneyu

        return float(mannwhitneyu(s[test_wrong], s[~test_wrong]).statistic / (test_wrong.sum() * (~test_wrong).sum()))

    assert auc(with_answers.scores(test_cols, test_answers)) > auc(without.scores(test_cols)) + 0.05
    one = {m: float(v[0]) for m, v in test_cols.items()}
    assert with_answers.score(one, test_answers[0]) == pytest.approx(
        with_answers.scores({m: v[:1] for m, v in test_cols.items()}, test_answers[:1])[0])
    assert with_answers.score(one, "something else") == pytest.approx(with_answers.score(one))  # no offset
    assert Combination.from_dict(with_answers.to_dict()) == with_answers
    old = {k: v for k, v in with_answers.to_dict().items() if not k.startswith("answer")}
    assert Combination.from_dict(old).answers == ()  # a record written before answer offsets still loads


def _true_loss(c: Combination, threshold: float, big: tuple[dict[str, np.ndarray], np.ndarray]) -> float:
    cols, correct = big
    small_answers = c.scores(cols) <= threshold
    return float(np.mean(small_answers * (correct[:, 1].astype(float) - correct[:, 0])))


def test_guarantee_holds_over_many_draws() -> None:
    """200 draws of n = 400: the loss on a large fresh sample exceeds eps in at most ~delta of them.

    One-sided binomial test (fail if P(Binom(200, delta) >= violations) < 0.001); the cascade must also do
    more than escalate everything.
    """
    eps, delta, draws = 0.03, 0.1, 200
    rng = np.random.default_rng(7)
    big = draw(100_000, np.random.default_rng(99))
    bad, escalated = 0, 0.0
    for seed in range(draws):
        cols, correct = draw(400, rng)
        combos, fit = fit_quality_combined(cols, correct, max_quality_loss=eps, delta=delta, seed=seed)
        assert fit.params["n_fix"] == 200 and fit.params["n_certify"] == 200
        bad += _true_loss(combos[0], fit.thresholds[0], big) > eps
        escalated += fit.stats.large_share / draws
    assert binom.sf(bad - 1, draws, delta) >= 0.001, f"{bad}/{draws} violations at delta={delta}"
    assert escalated < 0.8, escalated


def test_three_tiers_get_one_combination_per_lower_tier() -> None:
    rng = np.random.default_rng(3)
    cols, correct = draw(600, rng)
    cols3 = {m: np.c_[v, rng.normal(size=600)] for m, v in cols.items()}
    correct3 = np.c_[correct[:, :1], rng.uniform(size=600) < 0.7, correct[:, 1:]]
    combos, fit = fit_quality_combined(cols3, correct3, max_quality_loss=0.05, seed=1)
    assert len(combos) == 2 and len(fit.thresholds) == 2
