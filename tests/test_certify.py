"""Certificates: the label-free (disagreement) guarantee and the measure-split sequences on synthetic draws.

Synthetic answers with known rates. Each example has a gold label among K = 4 and a last-tier answer that is
right with probability ``p_last``; tier j's answer (j below the last) agrees with the last tier's with
probability ``a_j - b_j s_j`` in its own score ``s_j ~ U(0, 1)`` and is otherwise another label. For a common
threshold ``lam`` the population disagreement of the cascade with the last tier is

    2 tiers: D(lam) = int_0^lam (1 - p_0(s)) ds
    3 tiers: D(lam) = int_0^lam (1 - p_0(s)) ds + (1 - lam) int_0^lam (1 - p_1(s)) ds

(with ``p(s) = a - b s``: ``int_0^lam (1 - p(s)) ds = lam (1 - a) + b lam^2 / 2``). The fit sees only answers,
compared by the choice scorer's "same"; the labels are used only to check that the accuracy loss stays
below the certified disagreement.
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import binom

from calibration.certify import accuracy_loss, cp_upper, disagreement_loss, fixed_sequence, upper_bounds
from calibration.fit import common_sweep, fit_quality, fit_quality_measures
from calibration.metrics import simulate
from cascade.errors import InvalidRequestError
from cascade.scorers import get_same

LABELS = ("a", "b", "c", "d")
Pop = tuple[list[tuple[float, float]], float]  # [(a_j, b_j) per lower tier], last-tier accuracy

TWO: Pop = ([(0.97, 0.5)], 0.8)
THREE: Pop = ([(0.9, 0.6), (0.97, 0.3)], 0.85)


def _part(lam: float, a: float, b: float) -> float:
    return lam * (1.0 - a) + b * lam**2 / 2


def true_disagreement(pop: Pop, lam: float) -> float:
    lam = min(max(lam, 0.0), 1.0)
    risk, reach = 0.0, 1.0
    for a, b in pop[0]:
        risk += reach * _part(lam, a, b)
        reach *= 1.0 - lam
    return risk


def _other(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return (x + rng.integers(1, len(LABELS), size=x.shape)) % len(LABELS)


def draw_answers(pop: Pop, n: int, rng: np.random.Generator) -> tuple[np.ndarray, list[list[str]], np.ndarray]:
    """Scores ``(n, N-1)``, answer texts per tier (tier-major) and gold label indices ``(n,)``."""
    lower, p_last = pop
    gold = rng.integers(0, len(LABELS), size=n)
    last = np.where(rng.uniform(size=n) < p_last, gold, _other(gold, rng))
    scores = rng.uniform(size=(n, len(lower)))
    answers = []
    for j, (a, b) in enumerate(lower):
        agree = rng.uniform(size=n) < a - b * scores[:, j]
        answers.append(np.where(agree, last, _other(last, rng)))
    answers.append(last)
    texts = [[f"The answer is {LABELS[k]}." for k in col] for col in answers]
    return scores, texts, gold


def agreement_of(texts: list[list[str]]) -> np.ndarray:
    same = get_same("choice")
    ex = {"choices": list(LABELS)}
    n = len(texts[0])
    return np.array([[same(texts[j][i], texts[-1][i], ex) for j in range(len(texts))] for i in range(n)])


@pytest.mark.parametrize("pop", [TWO, THREE])
def test_true_disagreement_formula_matches_a_large_sample(pop: Pop) -> None:
    rng = np.random.default_rng(3)
    s, texts, _ = draw_answers(pop, 60_000, rng)
    agree = agreement_of(texts)
    for lam in (0.3, 0.7):
        tier = simulate([lam] * s.shape[1], s, agree).tier
        d = 1.0 - agree[np.arange(len(s)), tier]
        assert abs(d.mean() - true_disagreement(pop, lam)) < 4 * d.std() / np.sqrt(len(d))


@pytest.mark.parametrize(("pop", "max_share"), [(TWO, 0.8), (THREE, 0.9)])
def test_label_free_guarantee_holds_over_many_draws(pop: Pop, max_share: float) -> None:
    """Over 300 seeded draws of n = 500 unlabeled examples, the certified disagreement misses eps in at most
    ~delta of them (one-sided binomial test at 0.001); the accuracy loss, computed from the hidden labels,
    never exceeds the disagreement; the plug-in rule on the same draws misses far more often."""
    eps, delta, draws, n = 0.05, 0.1, 300, 500
    rng = np.random.default_rng(2024)
    bad = naive_bad = 0
    escalated = 0.0
    labels = np.array(LABELS)
    for _ in range(draws):
        s, texts, gold = draw_answers(pop, n, rng)
        agree = agreement_of(texts)
        r = fit_quality(s, agree, max_quality_loss=eps, delta=delta, claim="disagreement")
        assert r.params["claim"] == "disagreement" and r.params["bound"] == "harm"
        lam = r.thresholds[0]
        risk = true_disagreement(pop, lam)
        bad += risk > eps
        escalated += r.stats.large_share / draws
        correct = np.array([[t.endswith(f"{labels[g]}.") for t, g in zip(col, gold)] for col in texts]).T
        tier = simulate(r.thresholds, s, agree).tier
        rows = np.arange(n)
        assert correct[:, -1].mean() - correct[rows, tier].mean() <= 1.0 - agree[rows, tier].mean() + 1e-12
        sw = common_sweep(s, agree)
        ok = np.flatnonzero(sw.harmed / n <= eps)
        naive_bad += true_disagreement(pop, sw.thresholds[ok[-1], 0]) > eps
    assert binom.sf(bad - 1, draws, delta) >= 0.001, f"{bad}/{draws} violations at delta={delta}"
    assert escalated < max_share
    assert naive_bad > 3 * max(bad, 10)


def test_disagreement_claim_needs_an_agreement_matrix() -> None:
    with pytest.raises(InvalidRequestError, match="agree with itself"):
        fit_quality(np.zeros(4), np.array([[1, 1], [1, 0], [0, 1], [1, 1]]), max_quality_loss=0.1,
                    claim="disagreement")
    with pytest.raises(InvalidRequestError, match="unknown claim"):
        fit_quality(np.zeros(2), np.ones((2, 2)), max_quality_loss=0.1, claim="other")  # type: ignore[arg-type]


def test_disagreement_fit_says_which_guarantee_it_gives() -> None:
    s, texts, _ = draw_answers(TWO, 2000, np.random.default_rng(0))
    r = fit_quality(s, agreement_of(texts), max_quality_loss=0.05, delta=0.1, claim="disagreement")
    assert r.feasible and "differ from the last tier" in r.message and "agreement with the last tier" in r.message
    assert float(r.params["certified_loss_bound"]) <= 0.05


def test_fixed_sequence_and_bounds_by_hand() -> None:
    assert fixed_sequence([0.9, 0.01, 0.02, 0.5, 0.0], 0.05) == 2
    assert fixed_sequence([0.0, 0.05], 0.05) == 1
    assert fixed_sequence([0.0, 0.06], 0.05) == 0
    with pytest.raises(InvalidRequestError):
        fixed_sequence([], 0.05)
    loss = disagreement_loss(np.array([[True, True], [False, True]]))
    assert loss.name == "disagreement" and loss.harm[:, 0].tolist() == [False, True] and not loss.help.any()
    assert (accuracy_loss(np.array([[True, True], [False, True]])).harm == loss.harm).all()
    # the harm bound is Clopper-Pearson; with no help the discordant bound is the harm count's bound at delta/4
    assert upper_bounds([3], [0], 100, 0.1, "harm")[0] == pytest.approx(cp_upper(3, 100, 0.1)[0])
    assert upper_bounds([3], [0], 100, 0.1, "discordant")[0] == pytest.approx(cp_upper(3, 100, 0.025)[0])
    assert cp_upper(5, 5, 0.1)[0] == 1.0


# ---------------------------------------------------------------------------------------------------------
# Several measures with the level split between them. Three score columns of the same two-tier examples:
# "good" drives the lower tier's correctness (p(s) = a - b s), "noise" is independent of it, "half" equals
# "good" for a random half of the examples and is independent noise otherwise. For each:
#   good: R(lam) = int_0^lam (pL - p(s)) ds;  noise: R(lam) = lam (pL - pbar);  half: their mean.
# ---------------------------------------------------------------------------------------------------------

A, B, PL = 0.98, 0.6, 0.8
PBAR = A - B / 2


def _risk(measure: str, lam: float) -> float:
    lam = min(max(lam, 0.0), 1.0)
    good, noise = lam * (PL - A) + B * lam**2 / 2, lam * (PL - PBAR)
    return {"good": good, "noise": noise, "half": (good + noise) / 2}[measure]


def _draw_measures(n: int, rng: np.random.Generator) -> tuple[dict[str, np.ndarray], np.ndarray]:
    good, noise = rng.uniform(size=n), rng.uniform(size=n)
    half = np.where(rng.uniform(size=n) < 0.5, good, rng.uniform(size=n))
    c = np.column_stack([rng.uniform(size=n) < A - B * good, rng.uniform(size=n) < PL])
    return {"noise": noise, "half": half, "good": good}, c


def test_measure_split_holds_and_certifies_no_more_than_the_auc_choice() -> None:
    """Over 300 draws the measure kept misses eps in at most ~delta of them; it never escalates more than the
    measure with the best AUC tested at the same delta / M."""
    from calibration.metrics import auc, share_curve

    eps, delta, draws, n = 0.03, 0.1, 300, 400
    rng = np.random.default_rng(77)
    bad = 0
    for _ in range(draws):
        scores, c = _draw_measures(n, rng)
        measure, fit = fit_quality_measures(scores, c, max_quality_loss=eps, delta=delta)
        bad += _risk(measure, fit.thresholds[0]) > eps
        assert fit.params["tested_measures"] == 3 and fit.params["delta"] == pytest.approx(delta / 3)
        by_auc = max(scores, key=lambda m: auc(share_curve(scores[m], c).share, share_curve(scores[m], c).accuracy))
        ref = fit_quality(scores[by_auc], c, max_quality_loss=eps, delta=delta / 3)
        assert fit.stats.large_share <= ref.stats.large_share + 1e-12
    assert binom.sf(bad - 1, draws, delta) >= 0.001, f"{bad}/{draws} violations at delta={delta}"
