"""The planner: what a quality guarantee can be expected to certify with more calibration data.

From a small pilot run (labelled, or unlabeled for the label-free claim), :func:`plan_quality` predicts the
share of requests a quality fit (:func:`calibration.fit.fit_quality`, or
:func:`calibration.fit.fit_quality_measures` for several measures) will send to the last tier if it is run
on n examples, for n = 100, 300, 1,000, 3,000 and 10,000 by default. So a user knows what more data buys
before paying for it.

**Method** (a bootstrap of the fit itself): the pilot's examples stand for the population. For each n, the
pilot is resampled with replacement to n examples ``replicates`` times; each resample is fitted exactly as
``cascade-calibrate`` would fit it (same target, confidence, claim, bound, sequence and level split), and the
fitted thresholds are applied to the pilot, whose last-tier share estimates the population share they give.
The prediction is the median over the replicates, with the 10th and 90th percentiles as its spread, and the
share of replicates in which no threshold was certified (always escalate).

What it cannot know: how the pilot differs from the population. A small pilot's loss curve is itself noisy,
so predictions for large n (where the fit's own noise vanishes) carry the pilot's noise; the spread does not
include it. ``eval/RESULTS.md`` checks the predictions against real fits.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from calibration.certify import Bound, Claim
from calibration.fit import fit_quality, fit_quality_measures
from calibration.metrics import check_data, simulate
from cascade.errors import InvalidRequestError

__all__ = ["DEFAULT_SIZES", "PlanRow", "plan_quality", "render_plan"]

#: Calibration-set sizes the planner predicts for by default.
DEFAULT_SIZES = (100, 300, 1000, 3000, 10000)


@dataclass(frozen=True)
class PlanRow:
    """The predicted outcome of a quality fit on n examples.

    Attributes:
        n: calibration examples.
        share: median predicted share of requests reaching the last tier (1.0 = always escalate).
        low: 10th percentile over the bootstrap replicates.
        high: 90th percentile.
        infeasible: share of replicates where no threshold was certified.
        replicates: bootstrap replicates behind the numbers.
    """

    n: int
    share: float
    low: float
    high: float
    infeasible: float
    replicates: int


def plan_quality(scores: npt.ArrayLike | Mapping[str, npt.ArrayLike], correct: npt.ArrayLike,
                 costs: npt.ArrayLike | None = None, *, max_quality_loss: float, delta: float = 0.1,
                 claim: Claim = "accuracy", bound: Bound | None = None, sizes: Sequence[int] = DEFAULT_SIZES,
                 replicates: int = 200, seed: int = 0) -> list[PlanRow]:
    """Predict the certified last-tier share at each calibration-set size (see the module docstring).

    Args:
        scores: the pilot's ``(n0, N-1)`` scores, or measure name -> scores to plan the several-measures fit.
        correct: ``(n0, N)`` correctness (the agreement matrix for the disagreement claim).
        costs: ``(n0, N)``, ``(N,)`` or None (they only break ties between measures).
        max_quality_loss, delta, claim, bound: the fit's target, as in :func:`calibration.fit.fit_quality`.
        sizes: calibration-set sizes to predict for (each >= 1).
        replicates: bootstrap replicates per size (>= 1).
        seed: seed of the resampling.

    Returns:
        One :class:`PlanRow` per size, in the order given.

    Raises:
        InvalidRequestError: bad data, target, sizes or replicates.
    """
    multi = isinstance(scores, Mapping)
    by_measure = {str(k): v for k, v in scores.items()} if isinstance(scores, Mapping) else {"": scores}
    if not by_measure:
        raise InvalidRequestError("plan_quality needs at least one measure")
    checked = {m: check_data(s, correct, costs) for m, s in by_measure.items()}
    _, c, k = next(iter(checked.values()))
    s_all = {m: v[0] for m, v in checked.items()}
    if not isinstance(replicates, int) or replicates < 1:
        raise InvalidRequestError(f"replicates must be an integer >= 1, got {replicates!r}")
    if not sizes or any(not isinstance(n, int) or isinstance(n, bool) or n < 1 for n in sizes):
        raise InvalidRequestError(f"sizes must be integers >= 1, got {list(sizes)!r}")
    n0 = len(c)
    rng = np.random.default_rng(seed)
    rows = []
    for n in sizes:
        shares = np.empty(replicates)
        fell_back = 0
        for r in range(replicates):
            idx = rng.integers(0, n0, size=n)
            if multi:
                m, fit = fit_quality_measures({m: s[idx] for m, s in s_all.items()}, c[idx], k[idx],
                                              max_quality_loss=max_quality_loss, delta=delta, bound=bound,
                                              claim=claim)
            else:
                m = ""
                fit = fit_quality(s_all[m][idx], c[idx], k[idx], max_quality_loss=max_quality_loss, delta=delta,
                                  bound=bound, claim=claim)
            fell_back += not fit.feasible
            shares[r] = simulate(fit.thresholds, s_all[m], c).stats().large_share
        low, mid, high = np.percentile(shares, [10.0, 50.0, 90.0])
        rows.append(PlanRow(int(n), float(mid), float(low), float(high), fell_back / replicates, replicates))
    return rows


def render_plan(rows: Sequence[PlanRow], *, what: str, n_pilot: int, pilot_share: float | None = None) -> str:
    """The planner's terminal table.

    Args:
        rows: the predictions.
        what: the target in words (e.g. "accuracy loss <= 5.00% at 90% confidence").
        n_pilot: examples in the pilot.
        pilot_share: the share the fit certifies on the pilot itself, when known.
    """
    lines = [f"plan: {what}; predicted share of requests reaching the last tier, from a pilot of {n_pilot} "
             "examples (median and 10th-90th percentile of bootstrap fits)"]
    if pilot_share is not None:
        lines.append(f"  the pilot itself (n={n_pilot}) certifies {pilot_share:.1%}")
    lines.append(f"  {'n':>7}  {'escalated':>9}  {'10%-90%':>15}  always-escalate fallback")
    for r in rows:
        lines.append(f"  {r.n:>7,}  {r.share:>9.1%}  {r.low:>6.1%} - {r.high:>6.1%}  {r.infeasible:>6.0%} of fits")
    return "\n".join(lines)
