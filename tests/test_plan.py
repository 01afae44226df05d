"""The planner: its predictions against real fits on synthetic populations, and its input checks."""

from __future__ import annotations

import numpy as np
import pytest

from calibration.fit import fit_quality
from calibration.plan import PlanRow, plan_quality, render_plan
from cascade.errors import InvalidRequestError
from eval.sequences import POPULATIONS


@pytest.mark.parametrize("pop", [POPULATIONS[1], POPULATIONS[2]], ids=["equal", "large-better"])
def test_predictions_from_a_300_pilot_match_real_fits_at_1000(pop) -> None:
    """From five seeded pilots of 300, the predicted share at n = 1,000 is on average within 10 points of the
    median share that real fits on 1,000 fresh examples certify (shares measured on 100,000 examples)."""
    rng = np.random.default_rng(8)
    big = pop.draw(100_000, rng)[0]
    real = np.median([(big > fit_quality(*pop.draw(1000, rng), max_quality_loss=0.05, delta=0.1).thresholds[0]).mean()
                      for _ in range(40)])
    errors = []
    for seed in range(5):
        s, c = pop.draw(300, rng)
        (row,) = plan_quality(s, c, max_quality_loss=0.05, delta=0.1, sizes=[1000], replicates=60, seed=seed)
        assert row.n == 1000 and row.replicates == 60 and row.low <= row.share <= row.high
        errors.append(row.share - real)
    assert np.mean(np.abs(errors)) < 0.10, errors


def test_more_data_certifies_less_escalation_and_several_measures_plan_together() -> None:
    pop = POPULATIONS[2]
    rng = np.random.default_rng(0)
    s, c = pop.draw(400, rng)
    rows = plan_quality(s, c, max_quality_loss=0.05, delta=0.1, sizes=[100, 1000, 10000], replicates=40)
    shares = [r.share for r in rows]
    assert shares[0] > shares[1] > shares[2] and rows[0].high > rows[2].high
    noise = rng.uniform(size=len(s))
    multi = plan_quality({"noise": noise, "good": s}, c, max_quality_loss=0.05, delta=0.1, sizes=[1000],
                         replicates=40)
    assert multi[0].share <= 1.0 and abs(multi[0].share - rows[1].share) < 0.1  # noise rarely certifies less
    text = render_plan(rows, what="accuracy loss <= 5%", n_pilot=400, pilot_share=0.5)
    assert "10,000" in text and "pilot of 400" in text and "certifies 50.0%" in text


def test_disagreement_plan_needs_an_agreement_matrix_and_valid_sizes() -> None:
    s, c = POPULATIONS[0].draw(50, np.random.default_rng(1))
    with pytest.raises(InvalidRequestError, match="agree with itself"):
        plan_quality(s, c, max_quality_loss=0.05, claim="disagreement", sizes=[10], replicates=2)
    for bad in ({"sizes": []}, {"sizes": [0]}, {"replicates": 0}):
        with pytest.raises(InvalidRequestError):
            plan_quality(s, c, max_quality_loss=0.05, **bad)  # type: ignore[arg-type]
    with pytest.raises(InvalidRequestError):
        plan_quality({}, c, max_quality_loss=0.05)
    assert isinstance(plan_quality(s, c, max_quality_loss=0.05, sizes=[20], replicates=3)[0], PlanRow)


@pytest.mark.parametrize("tiers", [2, 3])
@pytest.mark.parametrize("claim", ["accuracy", "disagreement"])
def test_each_replicate_is_the_fit_on_the_resample_itself(tiers: int, claim: str) -> None:
    """The vectorised fits on resampling weights choose what fit_quality chooses on the materialised resample
    (ties and scores repeated many times included); several measures: what fit_quality_measures chooses."""
    from calibration.fit import fit_quality_measures
    from calibration.metrics import simulate
    from calibration.plan import _Events, _fits

    rng = np.random.default_rng(tiers)
    n0 = 120
    s = np.round(rng.uniform(size=(n0, tiers - 1)), 1)  # heavy ties
    c = rng.uniform(size=(n0, tiers)) < np.column_stack([0.95 - 0.5 * s, np.full(n0, 0.85)])
    if claim == "disagreement":
        c[:, -1] = True
    costs = np.arange(1.0, tiers + 1.0)
    ev = _Events.of(s, c, np.broadcast_to(costs, c.shape).copy())
    for n in (40, 400, 3000):
        idx = rng.integers(0, n0, size=(6, n))
        w = np.stack([np.bincount(i, minlength=n0) for i in idx]).astype(float)
        chosen, share, _ = _fits(ev, w, n, 0.05, 0.1, "discordant" if claim == "accuracy" else "harm")
        for r, i in enumerate(idx):
            fit = fit_quality(s[i], c[i], costs, max_quality_loss=0.05, delta=0.1, claim=claim,  # type: ignore[arg-type]
                              family="common")
            assert share[r] == pytest.approx(fit.stats.large_share)
            assert ev.pilot_share[chosen[r]] == pytest.approx(simulate(fit.thresholds, s, c).stats().large_share)
    other = np.round(rng.uniform(size=(n0, tiers - 1)), 2)
    idx = rng.integers(0, n0, size=400)
    m, fit = fit_quality_measures({"a": s[idx], "b": other[idx]}, c[idx], costs, max_quality_loss=0.1, delta=0.1,
                                  claim=claim, family="common")  # type: ignore[arg-type]
    want = simulate(fit.thresholds, {"a": s, "b": other}[m], c).stats().large_share
    w = np.bincount(idx, minlength=n0).astype(float)[None, :]
    per = {k: _fits(_Events.of(v, c, np.broadcast_to(costs, c.shape).copy()), w, 400, 0.1, 0.05,
                    "discordant" if claim == "accuracy" else "harm") for k, v in (("a", s), ("b", other))}
    assert per[m][0][0] > 0 or fit.stats.large_share == 1.0  # always-last: infeasible, or the cheapest certified
    if fit.feasible:
        assert per[m][1][0] == min(p[1][0] for p in per.values())
        assert _Events.of({"a": s, "b": other}[m], c, np.broadcast_to(costs, c.shape).copy()).pilot_share[
            per[m][0][0]] == pytest.approx(want)
