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
