"""Metrics: simulation, sweeps and grids against brute force, curve metrics against hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from calibration.fit import common_sweep, grid_search
from calibration.metrics import (
    apgr,
    auc,
    bootstrap_ci,
    check_data,
    cpt,
    curve_metrics,
    oracle_curve,
    pareto_front,
    random_curve,
    share_curve,
    simulate,
)
from cascade.errors import InvalidRequestError

# scores, small right, large right: hand case used below
S = np.array([0.1, 0.2, 0.3, 0.4])
C = np.array([[1, 1], [1, 1], [0, 1], [0, 0]], dtype=bool)


def test_simulate_escalates_strictly_above_the_threshold_and_sums_costs() -> None:
    s = np.array([[0.2, 0.9], [0.5, 0.1], [0.5, 0.7]])
    c = np.array([[1, 0, 1], [0, 1, 1], [0, 0, 0]], dtype=bool)
    sim = simulate([0.2, 0.1], s, c, [1.0, 2.0, 5.0])
    assert sim.tier.tolist() == [0, 1, 2]  # a score equal to its threshold is accepted
    assert sim.correct.tolist() == [True, True, False]
    assert sim.cost.tolist() == [1.0, 3.0, 8.0]
    stats = sim.stats()
    assert stats.accuracy == pytest.approx(2 / 3) and stats.mean_cost == pytest.approx(4.0)
    assert stats.answered == pytest.approx((1 / 3, 1 / 3, 1 / 3))
    assert stats.reached == pytest.approx((1.0, 2 / 3, 1 / 3)) and stats.large_share == pytest.approx(1 / 3)
    assert simulate([-np.inf, -np.inf], s, c).tier.tolist() == [2, 2, 2]
    assert simulate([np.inf, 0.0], s, c).tier.tolist() == [0, 0, 0]
    assert simulate(0.3, S, C).tier.tolist() == [0, 0, 0, 1]  # two tiers: scalar threshold, 1-D scores


def test_check_data_normalises_and_rejects() -> None:
    s, c, k = check_data([0.1, 0.2], [[1, 0], [0, 1]], [1.0, 4.0])
    assert s.shape == (2, 1) and c.dtype == np.bool_ and k.tolist() == [[1.0, 4.0], [1.0, 4.0]]
    assert check_data([0.1], [[True, True]])[2].tolist() == [[0.0, 0.0]]
    for bad in ([-1.0, 1.0], [np.inf, 1.0], [[1.0, 1.0, 1.0]], ["a", "b"]):
        with pytest.raises(InvalidRequestError):
            check_data([0.1], [[True, True]], bad)
    with pytest.raises(InvalidRequestError, match="finite"):
        check_data([0.1, np.inf], [[1, 1], [1, 1]])
    with pytest.raises(InvalidRequestError):
        check_data([0.1], [["yes", "no"]])
    with pytest.raises(InvalidRequestError):
        simulate([0.1, 0.2], S, C)  # two thresholds for two tiers
    with pytest.raises(InvalidRequestError):
        simulate([np.nan], S, C)


@settings(max_examples=60, deadline=None)
@given(data=st.data(), n=st.integers(1, 25), tiers=st.integers(2, 4))
def test_sweep_and_grid_agree_with_simulate(data: st.DataObject, n: int, tiers: int) -> None:
    s = np.array(data.draw(st.lists(st.lists(st.integers(0, 3), min_size=tiers - 1, max_size=tiers - 1),
                                    min_size=n, max_size=n)), dtype=float)
    c = np.array(data.draw(st.lists(st.lists(st.booleans(), min_size=tiers, max_size=tiers),
                                    min_size=n, max_size=n)))
    k = np.array(data.draw(st.lists(st.floats(0, 10), min_size=tiers, max_size=tiers)))
    for table in (common_sweep(s, c, k), grid_search(s, c, k, max_grid=64)):
        for i in range(len(table.accuracy)):
            sim = simulate(table.thresholds[i], s, c, k)
            assert table.stats(i).accuracy == pytest.approx(sim.stats().accuracy)
            assert table.stats(i).mean_cost == pytest.approx(sim.stats().mean_cost)
            assert table.counts[i].tolist() == np.bincount(sim.tier, minlength=tiers).tolist()
            last = c[:, -1]
            assert table.harmed[i] == int((~sim.correct & last).sum())
            assert table.helped[i] == int((sim.correct & ~last).sum())
    sweep = common_sweep(s, c, k)
    assert (np.diff(sweep.counts[:, -1]) <= 0).all() and sweep.counts[0, -1] == n


def test_share_curve_and_metrics_hand_case() -> None:
    curve = share_curve(S, C)
    assert curve.share.tolist() == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert curve.accuracy.tolist() == [0.5, 0.5, 0.75, 0.75, 0.75]
    assert curve.threshold.tolist() == [0.4, 0.3, 0.2, 0.1, -np.inf]
    assert auc(curve.share, curve.accuracy) == pytest.approx(0.65625)
    assert apgr(curve.share, curve.accuracy) == pytest.approx((0.65625 - 0.5) / 0.25)
    assert cpt(curve.share, curve.accuracy, 50) == 0.5
    assert cpt(curve.share, curve.accuracy, 100) == 0.5
    assert math.isnan(cpt(curve.share, curve.accuracy, 150))
    oracle = oracle_curve(C)
    assert oracle.share.tolist() == [0.0, 0.25, 1.0, 1.0] and oracle.accuracy.tolist() == [0.5, 0.75, 0.75, 0.75]
    assert auc(oracle.share, oracle.accuracy) == pytest.approx(0.71875)
    rnd = random_curve(C)
    assert apgr(rnd.share, rnd.accuracy) == pytest.approx(0.5)
    m = curve_metrics(S, C, cpt_levels=(50, 80))
    assert (m.small_accuracy, m.large_accuracy, m.note) == (0.5, 0.75, "")
    assert m.auc == pytest.approx(0.65625) and m.oracle_auc == pytest.approx(0.71875)
    assert m.cpt == {50.0: 0.5, 80.0: 0.5}


def test_oracle_knots_with_breaks() -> None:
    c = np.array([[0, 1], [1, 0], [1, 1], [0, 0]], dtype=bool)  # one fix, one break
    o = oracle_curve(c)
    assert o.share.tolist() == [0.0, 0.25, 0.75, 1.0] and o.accuracy.tolist() == [0.5, 0.75, 0.75, 0.5]


def test_no_gap_is_reported_not_divided_by() -> None:
    c = np.array([[1, 0], [0, 1], [1, 1], [0, 0]], dtype=bool)  # equal accuracy
    m = curve_metrics([0.3, 0.1, 0.2, 0.4], c)
    assert math.isnan(m.apgr) and all(math.isnan(v) for v in m.cpt.values())
    assert "no quality gap" in m.note and math.isfinite(m.auc)
    worse = curve_metrics([0.1, 0.2], np.array([[1, 0], [1, 1]], dtype=bool))
    assert math.isnan(worse.apgr) and "no quality gap" in worse.note
    ci = bootstrap_ci([0.3, 0.1, 0.2, 0.4], c, n_boot=50)
    assert math.isnan(ci["apgr"].estimate) and math.isfinite(ci["auc"].low)


def test_auc_requires_a_full_share_range() -> None:
    with pytest.raises(InvalidRequestError, match="span"):
        auc([0.0, 0.5], [0.5, 0.6])
    with pytest.raises(InvalidRequestError):
        auc([0.0, 1.0], [0.5])
    assert auc([1.0, 0.0], [0.8, 0.6]) == pytest.approx(0.7)  # order does not matter


def test_random_routing_apgr_is_one_half_within_sampling_error() -> None:
    rng = np.random.default_rng(0)
    values = []
    for _ in range(40):
        n = 2000
        c = rng.uniform(size=(n, 2)) < [0.6, 0.8]
        values.append(curve_metrics(rng.uniform(size=n), c).apgr)
    v = np.array(values)
    assert abs(v.mean() - 0.5) < 4 * v.std(ddof=1) / np.sqrt(len(v))
    assert v.std() < 0.1


@settings(max_examples=200, deadline=None)
@given(data=st.data(), n=st.integers(1, 40))
def test_no_score_rises_above_the_oracle(data: st.DataObject, n: int) -> None:
    s = np.array(data.draw(st.lists(st.integers(0, 6), min_size=n, max_size=n)), dtype=float)
    c = np.array(data.draw(st.lists(st.tuples(st.booleans(), st.booleans()), min_size=n, max_size=n)))
    curve, oracle = share_curve(s, c), oracle_curve(c)
    assert curve.share[0] == 0.0 and curve.share[-1] == 1.0
    assert curve.accuracy[0] == c[:, 0].mean() and curve.accuracy[-1] == pytest.approx(c[:, 1].mean())
    assert (curve.accuracy <= np.interp(curve.share, oracle.share, oracle.accuracy) + 1e-12).all()
    assert auc(curve.share, curve.accuracy) <= auc(oracle.share, oracle.accuracy) + 1e-12


def test_pareto_front_hand_case() -> None:
    cost = [1.0, 2.0, 2.0, 3.0, 0.5, 4.0, 1.0]
    acc = [0.6, 0.7, 0.65, 0.7, 0.5, 0.9, 0.6]
    assert pareto_front(cost, acc).tolist() == [4, 0, 1, 5]
    with pytest.raises(InvalidRequestError):
        pareto_front([1.0], [0.5, 0.6])


def test_bootstrap_is_seeded_and_brackets_the_estimate() -> None:
    rng = np.random.default_rng(3)
    n = 800
    s = rng.uniform(size=n)
    c = rng.uniform(size=(n, 2)) < np.column_stack([0.95 - 0.6 * s, np.full(n, 0.85)])
    a = bootstrap_ci(s, c, n_boot=300, seed=1)
    assert a == bootstrap_ci(s, c, n_boot=300, seed=1)
    assert a != bootstrap_ci(s, c, n_boot=300, seed=2)
    assert set(a) == {"auc", "apgr", "cpt50", "cpt80"}
    for iv in a.values():
        assert iv.low <= iv.estimate <= iv.high
    assert a["auc"].high - a["auc"].low < 0.06
    # the bootstrap replicate of the whole sample (all weights 1) is the plain estimate: cross-check AUC
    assert a["auc"].estimate == pytest.approx(curve_metrics(s, c).auc)
    with pytest.raises(InvalidRequestError):
        bootstrap_ci(s, c, n_boot=0)
    with pytest.raises(InvalidRequestError, match="two tiers"):
        share_curve(np.zeros((n, 2)), np.zeros((n, 3)))
