"""Per-stage threshold families and certified levels: their guarantees over many seeded synthetic draws, the
split fix/certify procedure, the seams (loss, order), and what skipped tiers cost."""

from __future__ import annotations

import numpy as np
import pytest
from populations import THREE_TIER, THREE_TIER_SCALES, TWO_TIER_HELPFUL, Population
from scipy.stats import binom

from calibration.candidates import common_sweep, evaluate, grid_search
from calibration.certify import LossIndicators, accepted_prefix, accuracy_loss, fixed_sequence, upper_bounds
from calibration.family import FixPart, candidate_sequence, ray_candidates, split_indices, top_down_candidates
from calibration.fit import fit_levels, fit_quality
from calibration.metrics import simulate
from cascade.errors import InvalidRequestError

COSTS3 = np.array([0.135, 0.5, 1.5])
COSTS2 = np.array([0.135, 1.5])


def _tolerated(bad: int, draws: int, delta: float) -> bool:
    """One-sided binomial test: is ``bad`` violations of ``draws`` compatible with a rate <= delta?"""
    return bool(binom.sf(bad - 1, draws, delta) >= 0.001)


def _plug_in(pop: Population, s: np.ndarray, c: np.ndarray, costs: np.ndarray, eps: float) -> tuple[float, ...]:
    """No guarantee: the cheapest grid point whose *measured* loss is <= eps, on the same data."""
    grid = grid_search(s, c, costs, max_grid=400)
    ok = np.flatnonzero(grid.loss <= eps)
    return tuple(grid.thresholds[ok[np.argmin(grid.mean_cost[ok])]].tolist())


@pytest.mark.parametrize(("pop", "costs", "coupling", "family"), [
    (THREE_TIER_SCALES, COSTS3, "independent", "per_stage"),
    (THREE_TIER, COSTS3, "nested", "per_stage"),
    (TWO_TIER_HELPFUL, COSTS2, "independent", "per_stage"),
    (THREE_TIER_SCALES, COSTS3, "independent", "top_down"),
    (THREE_TIER, COSTS3, "nested", "top_down"),
])
def test_per_stage_guarantee_holds_over_many_draws(pop: Population, costs: np.ndarray, coupling: str,
                                                   family: str) -> None:
    """Over 150 calibration draws of n = 400 from a population with known risk, the per-stage (or top-down)
    fit misses eps in at most delta of them (plus a binomial tolerance); the plug-in rule on the same draws
    misses far more often, so the check can tell a guarantee from its absence."""
    eps, delta, draws = 0.05, 0.1, 150
    rng = np.random.default_rng(2024)
    bad = naive_bad = 0
    fitted_cost = common_cost = 0.0
    for _ in range(draws):
        s, c = pop.draw(400, rng, coupling)
        fit = fit_quality(s, c, costs, max_quality_loss=eps, delta=delta, family=family)  # type: ignore[arg-type]
        assert fit.params["family"] == family and fit.params["n_fix"] == (100 if family == "per_stage" else 0)
        bad += pop.true_risk(fit.thresholds) > eps
        naive_bad += pop.true_risk(_plug_in(pop, s, c, costs, eps)) > eps
        fitted_cost += fit.stats.mean_cost / draws
        common_cost += fit_quality(s, c, costs, max_quality_loss=eps, delta=delta,
                                   family="common").stats.mean_cost / draws
    assert _tolerated(bad, draws, delta), f"{bad}/{draws} violations at delta={delta}"
    assert naive_bad > 3 * max(bad, 10)
    assert fitted_cost < costs[-1]  # it does more than always use the last tier
    if pop is THREE_TIER_SCALES:  # stages on different scales: per-stage thresholds beat one common threshold
        assert fitted_cost < 0.97 * common_cost


@pytest.mark.parametrize(("pop", "costs", "family"), [
    (TWO_TIER_HELPFUL, COSTS2, "auto"),
    (THREE_TIER_SCALES, COSTS3, "auto"),
    (THREE_TIER_SCALES, COSTS3, "per_stage"),
])
def test_levels_hold_together_over_many_draws(pop: Population, costs: np.ndarray, family: str) -> None:
    """Certified levels 2%, 5% and 10% at confidence 90%: over 150 draws, the share of draws in which *any*
    level misses its target is at most delta (plus tolerance); each level's bound is at delta / 3."""
    levels, delta, draws = (0.02, 0.05, 0.10), 0.1, 150
    rng = np.random.default_rng(77)
    bad = 0
    naive_bad = 0
    for _ in range(draws):
        s, c = pop.draw(400, rng)
        fits = fit_levels(s, c, costs, levels=levels, delta=delta, family=family)  # type: ignore[arg-type]
        assert [f.params["max_quality_loss"] for f in fits] == list(levels)
        assert all(f.params["delta_per_level"] == pytest.approx(delta / 3) for f in fits)
        bad += any(pop.true_risk(f.thresholds) > e for f, e in zip(fits, levels))
        naive_bad += any(pop.true_risk(_plug_in(pop, s, c, costs, e)) > e for e in levels)
        if len(pop.stages) == 1:  # one sequence for every level: a looser level is never dearer
            cost = [f.stats.mean_cost for f in fits]
            assert cost == sorted(cost, reverse=True)
    assert _tolerated(bad, draws, delta), f"{bad}/{draws} draws with a level missed at delta={delta}"
    assert naive_bad > 3 * max(bad, 10)


def test_fixed_sequence_stops_at_the_first_failure_and_the_prefix_is_certified() -> None:
    assert fixed_sequence([0.9, 0.01, 0.02, 0.2, 0.01], 0.05) == 2  # index 0 is accepted untested
    assert fixed_sequence([0.0, 0.3], 0.05) == 0
    assert fixed_sequence([0.0, 0.01, 0.02], 0.05) == 2
    stop, upper = accepted_prefix(np.array([0, 0, 1, 9]), np.array([0, 0, 0, 0]), 200, 0.05, 0.1, "harm")
    assert stop == 2 and upper.shape == (4,) and upper[3] > 0.05


def test_discordant_bound_uses_help_and_harm_bound_does_not() -> None:
    harmed, helped = np.array([10, 10]), np.array([0, 8])
    disc = upper_bounds(harmed, helped, 300, 0.1, "discordant")
    harm = upper_bounds(harmed, helped, 300, 0.1, "harm")
    assert harm[0] == harm[1] and disc[1] < disc[0]
    with pytest.raises(InvalidRequestError):
        upper_bounds(harmed, helped, 300, 0.1, "hoeffding")  # type: ignore[arg-type]


def test_split_is_seeded_disjoint_and_complete() -> None:
    fix, cert = split_indices(100, 0.25, seed=3)
    assert len(fix) == 25 and len(cert) == 75 and not set(fix) & set(cert) and len({*fix, *cert}) == 100
    again = split_indices(100, 0.25, seed=3)
    assert (again[0] == fix).all() and (split_indices(100, 0.25, seed=4)[0] != fix).any()
    assert [len(x) for x in split_indices(2, 0.01, 0)] == [1, 1]


def test_rays_start_at_always_last_and_only_accept_more_along_a_ray() -> None:
    s, _ = THREE_TIER_SCALES.draw(60, np.random.default_rng(0))
    grid, path = ray_candidates(s)
    assert np.isneginf(grid[0]).all() and path[0] == -1
    for p in np.unique(path[path >= 0]):
        t = grid[path == p]
        assert (t[1:] >= t[:-1]).all()  # each step accepts at least as much at every stage
        assert np.isposinf(t[-1][np.isfinite(t[0]) | np.isposinf(t[0])]).all()  # ends accepting everything
    skip_second = [p for p in np.unique(path[path >= 0]) if np.isneginf(grid[path == p][:, 1]).all()]
    assert skip_second  # a ray that skips the second stage: the pair first -> last tier is in the family


def test_top_down_path_opens_one_stage_at_a_time_from_the_top() -> None:
    s, _ = THREE_TIER_SCALES.draw(60, np.random.default_rng(0))
    t = top_down_candidates(s)
    assert np.isneginf(t[0]).all() and len(t) == 1 + sum(len(np.unique(s[:, j])) + 1 for j in range(2))
    assert ((t[1:] >= t[:-1]).all(axis=1) & (t[1:] != t[:-1]).any(axis=1)).all()  # each step accepts more
    top = t[1:len(np.unique(s[:, 1])) + 2]
    assert np.isneginf(top[:, 0]).all() and (np.diff(top[:, 1]) > 0).all() and np.isposinf(top[-1, 1])
    low = t[len(top) + 1:]
    assert np.isposinf(low[:, 1]).all() and (np.diff(low[:, 0]) > 0).all() and np.isposinf(low[-1]).all()


def test_top_down_never_costs_more_than_the_top_pair_on_the_same_data() -> None:
    """The chain's top-down fit contains the top pair's sweep (lower tier skipped), tested on the same
    examples at the same level, so on the calibration data it is never dearer than that pair's own fit."""
    rng = np.random.default_rng(11)
    for _ in range(20):
        s, c = THREE_TIER.draw(300, rng)
        for eps in (0.02, 0.05, 0.1):
            chain = fit_quality(s, c, COSTS3, max_quality_loss=eps)
            pair = fit_quality(s[:, 1:], c[:, 1:], COSTS3[1:], max_quality_loss=eps)
            assert chain.params["family"] == "top_down" and pair.params["family"] == "common"
            assert chain.stats.mean_cost <= pair.stats.mean_cost + 1e-12


def test_family_choice_and_report() -> None:
    s3, c3 = THREE_TIER_SCALES.draw(300, np.random.default_rng(1))
    s2, c2 = TWO_TIER_HELPFUL.draw(300, np.random.default_rng(1))
    assert fit_quality(s2, c2, max_quality_loss=0.05).params["family"] == "common"
    fit3 = fit_quality(s3, c3, COSTS3, max_quality_loss=0.05)
    assert fit3.params["family"] == "top_down" and fit3.params["n_fix"] == 0
    assert fit3.params["n_certify"] == 300 and "top_down" in fit3.message
    split = fit_quality(s3, c3, COSTS3, max_quality_loss=0.05, family="per_stage")
    assert split.params["n_fix"] == 75 and split.params["n_certify"] == 225 and "per_stage" in split.message
    with pytest.raises(InvalidRequestError, match="family"):
        fit_quality(s3, c3, max_quality_loss=0.05, family="diagonal")  # type: ignore[arg-type]
    with pytest.raises(InvalidRequestError, match="distinct"):
        fit_levels(s3, c3, levels=[0.05, 0.05])
    with pytest.raises(InvalidRequestError):
        fit_levels(s3, c3, levels=[])


def test_fit_is_the_cheapest_certified_candidate_and_reproducible() -> None:
    s, c = THREE_TIER_SCALES.draw(400, np.random.default_rng(5))
    a = fit_quality(s, c, COSTS3, max_quality_loss=0.1, seed=1)
    b = fit_quality(s, c, COSTS3, max_quality_loss=0.1, seed=1)
    assert a == b and a.feasible
    seq = candidate_sequence(s, c, COSTS3, eps=0.1, delta=0.1, seed=1)
    stop, _ = accepted_prefix(seq.cert.harmed, seq.cert.helped, seq.cert.n, 0.1, 0.1)
    all_data = evaluate(seq.cert.thresholds[: stop + 1], s, c, COSTS3)
    assert a.stats.mean_cost == pytest.approx(all_data.mean_cost.min())
    assert a.stats == simulate(a.thresholds, s, c, COSTS3).stats()


def test_order_and_loss_are_pluggable() -> None:
    s, c = THREE_TIER_SCALES.draw(300, np.random.default_rng(6))
    seen: list[FixPart] = []

    def only_start(fix: FixPart) -> np.ndarray:
        seen.append(fix)
        return np.array([0])

    fit = fit_quality(s, c, COSTS3, max_quality_loss=0.1, order=only_start, family="per_stage")
    assert not fit.feasible and fit.thresholds == (-np.inf, -np.inf) and seen[0].eps == 0.1
    assert seen[0].n_cert == 225 and seen[0].cand.n == 75
    with pytest.raises(InvalidRequestError, match="always-last"):
        fit_quality(s, c, max_quality_loss=0.1, order=lambda fix: np.array([1, 0]), family="per_stage")
    # the disagreement claim with tiers that always agree: every candidate is certified, the cheapest returned
    agree = np.ones_like(c)
    free = fit_quality(s, c * 0 + agree, COSTS3, max_quality_loss=0.05, claim="disagreement")
    assert free.feasible and free.params["certified_loss_bound"] < 0.05 and free.stats.mean_cost < 1.0
    with pytest.raises(InvalidRequestError, match="exclusive"):
        LossIndicators(np.ones_like(c), np.ones_like(c))
    assert (accuracy_loss(c).harm == (~c & c[:, -1:])).all()


def test_skipped_tiers_cost_nothing() -> None:
    s, c = THREE_TIER.draw(200, np.random.default_rng(8))
    sweep = common_sweep(s, c, COSTS3)
    assert np.isneginf(sweep.thresholds[0]).all() and sweep.mean_cost[0] == pytest.approx(1.5)
    table = evaluate([[-np.inf, -np.inf], [-np.inf, 0.5], [0.5, -np.inf], [0.5, 0.5]], s, c, COSTS3)
    for row in range(4):
        sim = simulate(table.thresholds[row], s, c, COSTS3)
        assert table.mean_cost[row] == pytest.approx(sim.stats().mean_cost)
    tier = simulate([-np.inf, 0.5], s, c, COSTS3).tier
    assert table.mean_cost[1] == pytest.approx(np.where(tier == 1, 0.5, 2.0).mean())  # the first tier skipped
