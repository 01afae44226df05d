"""Fitting methods: the finite-sample guarantee on synthetic populations, budgets with ties, cost optima."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from populations import THREE_TIER, TWO_TIER_HELPFUL, TWO_TIER_NESTED, Population
from scipy.stats import binom

from calibration.fit import (
    common_sweep,
    fit_budget,
    fit_min_cost,
    fit_quality,
    grid_search,
    measured_curve,
)
from calibration.metrics import simulate
from cascade.curve import point_for_target, threshold_for_target
from cascade.errors import InvalidRequestError

# Synthetic populations with known risk: see tests/populations.py. The common-threshold family is tested here;
# the per-stage family and the certified levels in tests/test_family.py.


def draw(pop: Population, n: int, rng: np.random.Generator, coupling: str) -> tuple[np.ndarray, np.ndarray]:
    return pop.draw(n, rng, coupling)


def true_risk(pop: Population, lam: float) -> float:
    return pop.true_risk([lam] * len(pop.stages))


@pytest.mark.parametrize("pop", [TWO_TIER_HELPFUL, THREE_TIER])
def test_true_risk_formula_matches_a_large_sample(pop: Population) -> None:
    rng = np.random.default_rng(1)
    s, c = draw(pop, 400_000, rng, "independent")
    for lam in (0.2, 0.5, 0.8):
        sim = simulate([lam] * s.shape[1], s, c)
        loss = c[:, -1].astype(float) - sim.correct
        assert abs(loss.mean() - true_risk(pop, lam)) < 4 * loss.std() / np.sqrt(len(loss))


def _violations(pop: Population, coupling: str, bound: str, *, eps: float, delta: float, n: int, draws: int,
                fit: Callable[..., tuple[float, ...]] | None = None) -> tuple[int, float]:
    rng = np.random.default_rng(12345)
    bad, escalated = 0, 0.0
    for _ in range(draws):
        s, c = draw(pop, n, rng, coupling)
        if fit is None:
            r = fit_quality(s, c, max_quality_loss=eps, delta=delta, bound=bound,  # type: ignore[arg-type]
                            family="common")
            thresholds, share = r.thresholds, r.stats.large_share
        else:
            thresholds = fit(s, c, eps)
            share = simulate(thresholds, s, c).stats().large_share
        assert len(set(thresholds)) == 1  # the common-threshold family
        bad += true_risk(pop, thresholds[0]) > eps
        escalated += share / draws
    return bad, escalated


def _naive(s: np.ndarray, c: np.ndarray, eps: float) -> tuple[float, ...]:
    """Plug-in rule without a guarantee: fewest escalations whose *measured* loss is <= eps."""
    sw = common_sweep(s, c)
    ok = np.flatnonzero((sw.harmed - sw.helped) / sw.n <= eps)
    return tuple(sw.thresholds[ok[-1]].tolist())


@pytest.mark.parametrize(
    ("pop", "coupling", "bound", "max_share"),
    [
        (TWO_TIER_HELPFUL, "independent", "discordant", 0.6),
        (TWO_TIER_NESTED, "nested", "harm", 0.9),
        (TWO_TIER_NESTED, "nested", "discordant", 0.9),
        (THREE_TIER, "independent", "discordant", 0.75),
        (THREE_TIER, "nested", "harm", 0.65),
    ],
)
def test_quality_guarantee_holds_over_many_draws(pop: Population, coupling: str, bound: str,
                                                 max_share: float) -> None:
    """Over 300 held-out draws of n = 500, the fitted threshold misses eps in at most ~delta of them.

    One-sided binomial test: fail if P(Binom(300, delta) >= violations) < 0.001. The plug-in rule on the same
    draws must violate far more often, so the check can tell a guarantee from its absence.
    """
    eps, delta, draws = 0.02, 0.1, 300
    bad, escalated = _violations(pop, coupling, bound, eps=eps, delta=delta, n=500, draws=draws)
    assert binom.sf(bad - 1, draws, delta) >= 0.001, f"{bad}/{draws} violations at delta={delta}"
    assert escalated < max_share  # it does more than escalate everything
    naive_bad, _ = _violations(pop, coupling, bound, eps=eps, delta=delta, n=500, draws=draws, fit=_naive)
    assert naive_bad > 3 * max(bad, 10)


def test_quality_infeasible_falls_back_to_always_last_tier() -> None:
    s, c = draw(TWO_TIER_NESTED, 30, np.random.default_rng(0), "nested")
    r = fit_quality(s, c, max_quality_loss=0.001, delta=0.05)
    assert not r.feasible
    assert r.thresholds == (-np.inf,)
    assert r.stats.large_share == 1.0 and r.stats.accuracy == c[:, 1].mean()
    assert "falling back to always escalating" in r.message


def test_quality_zero_loss_target_with_a_perfect_small_tier() -> None:
    s = np.linspace(0, 1, 400)
    c = np.ones((400, 2), dtype=bool)
    r = fit_quality(s, c, max_quality_loss=0.01, delta=0.1)
    assert r.feasible and r.stats.large_share == 0.0 and float(r.params["certified_loss_bound"]) <= 0.01


@pytest.mark.parametrize("kwargs", [{"max_quality_loss": -0.1}, {"max_quality_loss": 1.0},
                                    {"max_quality_loss": 0.1, "delta": 0.0}, {"max_quality_loss": 0.1, "delta": 1},
                                    {"max_quality_loss": 0.1, "bound": "hoeffding"}])
def test_quality_rejects_bad_parameters(kwargs: dict[str, object]) -> None:
    with pytest.raises(InvalidRequestError):
        fit_quality(np.zeros(3), np.ones((3, 2)), **kwargs)  # type: ignore[arg-type]


@settings(max_examples=100, deadline=None)
@given(data=st.data(), n=st.integers(1, 40), r=st.floats(0.0, 1.0))
def test_budget_never_exceeds_share_even_with_ties(data: st.DataObject, n: int, r: float) -> None:
    s = np.array(data.draw(st.lists(st.integers(0, 4), min_size=n, max_size=n)), dtype=float)
    c = np.array(data.draw(st.lists(st.tuples(st.booleans(), st.booleans()), min_size=n, max_size=n)))
    fit = fit_budget(s, c, max_large_share=r)
    sim = simulate(fit.thresholds, s, c).stats()
    assert sim.large_share <= r and sim == fit.stats
    # and it is the quantile: the next lower threshold would exceed the budget
    lower = s[s < fit.thresholds[0]]
    next_t = lower.max() if lower.size else -np.inf
    if fit.thresholds[0] > -np.inf:
        assert simulate([next_t], s, c).stats().large_share > r


def test_budget_with_heavy_ties_hand_case() -> None:
    s = np.array([0.5, 0.5, 0.5, 0.5, 0.1, 0.9])
    c = np.ones((6, 2), dtype=bool)
    assert fit_budget(s, c, max_large_share=0.5).stats.large_share == pytest.approx(1 / 6)
    assert fit_budget(s, c, max_large_share=0.85).stats.large_share == pytest.approx(5 / 6)
    assert fit_budget(s, c, max_large_share=0.0).thresholds == (0.9,)
    assert fit_budget(s, c, max_large_share=1.0).thresholds == (-np.inf,)
    with pytest.raises(InvalidRequestError):
        fit_budget(s, c, max_large_share=-0.1)


def test_budget_three_tiers_within_share_and_on_its_front() -> None:
    s, c = draw(THREE_TIER, 600, np.random.default_rng(3), "independent")
    costs = np.array([1.0, 3.0, 10.0])
    for r in (0.0, 0.1, 0.3):
        fit = fit_budget(s, c, costs, max_large_share=r, max_grid=900)
        assert fit.stats.large_share <= r
        assert fit.stats == simulate(fit.thresholds, s, c, costs).stats()
        assert fit.pareto is not None and fit.thresholds in fit.pareto.thresholds
        grid = grid_search(s, c, costs, max_grid=900)
        assert fit.stats.accuracy == grid.accuracy[grid.large_share <= r].max()


@pytest.mark.parametrize(("value", "expected"), [(30.0, 0.2), (10.0, 0.2), (5.0, 0.4), (0.0, 0.4)])
def test_min_cost_hand_case(value: float, expected: float) -> None:
    """Costs 1 (small) and 10 (large). At value 10 three thresholds tie at net 4: the most accurate wins."""
    s = np.array([0.1, 0.2, 0.3, 0.4])
    c = np.array([[1, 1], [1, 1], [0, 1], [0, 1]])
    fit = fit_min_cost(s, c, [1.0, 10.0], value_per_correct=value)
    assert fit.thresholds == (expected,)
    assert fit.pareto is not None and fit.thresholds in fit.pareto.thresholds


def test_min_cost_two_tiers_matches_brute_force() -> None:
    rng = np.random.default_rng(7)
    s = rng.integers(0, 30, 300).astype(float)
    c = rng.uniform(size=(300, 2)) < np.column_stack([1 - s / 40, np.full(300, 0.9)])
    costs = rng.uniform(0.5, 1.5, size=(300, 2)) * [1.0, 8.0]
    fit = fit_min_cost(s, c, costs, value_per_correct=25.0)
    best = max(25.0 * st.accuracy - st.mean_cost
               for st in (simulate([t], s, c, costs).stats() for t in [-np.inf, *np.unique(s)]))
    assert 25.0 * fit.stats.accuracy - fit.stats.mean_cost == pytest.approx(best, abs=1e-12)


def test_min_cost_three_tiers_is_the_grid_optimum_on_the_front() -> None:
    s, c = draw(THREE_TIER, 500, np.random.default_rng(5), "independent")
    costs = np.array([1.0, 4.0, 20.0])
    fit = fit_min_cost(s, c, costs, value_per_correct=60.0, max_grid=400)
    grid = grid_search(s, c, costs, max_grid=400)
    assert 60.0 * fit.stats.accuracy - fit.stats.mean_cost == pytest.approx(
        (60.0 * grid.accuracy - grid.mean_cost).max())
    assert fit.pareto is not None and fit.thresholds in fit.pareto.thresholds
    cost, acc = np.array(fit.pareto.mean_cost), np.array(fit.pareto.accuracy)
    assert (np.diff(cost) > 0).all() and (np.diff(acc) > 0).all()
    dominated = (grid.mean_cost <= fit.stats.mean_cost) & (grid.accuracy >= fit.stats.accuracy) & (
        (grid.mean_cost < fit.stats.mean_cost) | (grid.accuracy > fit.stats.accuracy))
    assert not dominated.any()


def test_threshold_for_target_two_tiers() -> None:
    rng = np.random.default_rng(11)
    s, c = draw(TWO_TIER_HELPFUL, 400, rng, "independent")
    curve = measured_curve(s, c)
    assert curve.kind == "sweep" and list(curve.large_share) == sorted(curve.large_share)
    for r in (0.0, 0.25, 0.5, 1.0):
        assert threshold_for_target(curve, max_large_share=r) == fit_budget(s, c, max_large_share=r).thresholds
    point = point_for_target(curve, max_quality_loss=0.0)
    meets = [curve.point(i) for i in range(len(curve)) if curve.point(i).quality_loss <= 1e-12]
    assert point.large_share == min(p.large_share for p in meets)
    assert simulate(point.thresholds, s, c).stats().accuracy == pytest.approx(point.accuracy)
    both = point_for_target(curve, max_large_share=0.9, max_quality_loss=0.05)
    assert both.large_share <= 0.9 and both.quality_loss <= 0.05 + 1e-12
    with pytest.raises(InvalidRequestError, match="max_large_share"):
        threshold_for_target(curve, max_large_share=-0.1)
    with pytest.raises(InvalidRequestError, match="smallest measured quality loss"):
        threshold_for_target(curve, max_quality_loss=-0.5)
    with pytest.raises(InvalidRequestError):
        threshold_for_target(curve)
    with pytest.raises(InvalidRequestError, match="measured curve"):
        threshold_for_target(None, max_large_share=0.2)


def test_threshold_for_target_thinned_curve_stays_on_the_safe_side() -> None:
    s, c = draw(TWO_TIER_HELPFUL, 3000, np.random.default_rng(2), "independent")
    curve = measured_curve(s, c, max_points=50)
    assert len(curve) <= 50 and curve.large_share[0] == 0.0 and curve.large_share[-1] == 1.0
    for r in (0.05, 0.33, 0.71):
        t = threshold_for_target(curve, max_large_share=r)
        assert simulate(t, s, c).stats().large_share <= r


def test_threshold_for_target_three_tiers_picks_a_stored_pareto_point() -> None:
    s, c = draw(THREE_TIER, 500, np.random.default_rng(4), "independent")
    curve = measured_curve(s, c, [1.0, 3.0, 9.0], max_grid=400)
    assert curve.kind == "pareto"
    p = point_for_target(curve, max_large_share=0.2)
    assert p.thresholds in curve.thresholds and p.large_share <= 0.2
    assert p.accuracy == max(a for a, sh in zip(curve.accuracy, curve.large_share) if sh <= 0.2)
    q = point_for_target(curve, max_quality_loss=0.02)
    assert q.quality_loss <= 0.02 + 1e-12
    assert q.mean_cost == min(cost for cost, a in zip(curve.mean_cost, curve.accuracy)
                              if curve.last_accuracy - a <= 0.02 + 1e-12)


def test_three_tiers_without_prices_use_the_large_share_as_the_cost() -> None:
    s, c = draw(THREE_TIER, 500, np.random.default_rng(5), "independent")
    grid = grid_search(s, c, None, max_grid=400)
    curve = measured_curve(s, c, None, max_grid=400)
    assert len(curve.large_share) > 3 and min(curve.large_share) == 0.0  # not collapsed onto one point
    for r in (0.0, 0.1, 0.3):
        p = point_for_target(curve, max_large_share=r)
        best = grid.accuracy[grid.large_share <= r].max()
        assert p.large_share <= r and p.accuracy == best  # the whole front is stored, not only the cost front
        fit = fit_budget(s, c, None, max_large_share=r, max_grid=400)
        assert fit.stats.accuracy == best
        assert fit.stats.large_share == grid.large_share[(grid.large_share <= r) & (grid.accuracy == best)].min()
    q = point_for_target(curve, max_quality_loss=0.05)  # the fewest last-tier calls meeting the loss
    assert q.large_share == min(sh for sh, a in zip(curve.large_share, curve.accuracy)
                                if curve.last_accuracy - a <= 0.05 + 1e-9)


@pytest.mark.parametrize(("scores", "correct"), [
    (np.zeros(3), np.ones((4, 2))),  # n mismatch
    (np.zeros((3, 2)), np.ones((3, 2))),  # N mismatch
    (np.array([0.1, np.nan, 0.2]), np.ones((3, 2))),  # NaN score
    (np.zeros(3), np.full((3, 2), 2)),  # not 0/1
    (np.zeros(0), np.ones((0, 2))),  # empty
])
def test_bad_data_raises_invalid_request(scores: np.ndarray, correct: np.ndarray) -> None:
    for call in (lambda: fit_budget(scores, correct, max_large_share=0.5),
                 lambda: fit_quality(scores, correct, max_quality_loss=0.1),
                 lambda: fit_min_cost(scores, correct, value_per_correct=1.0)):
        with pytest.raises(InvalidRequestError):
            call()
