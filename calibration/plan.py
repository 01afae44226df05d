"""The planner: what a quality guarantee can be expected to certify with more calibration data.

From a small pilot run (labelled, or unlabeled for the label-free claim), :func:`plan_quality` predicts the
share of requests a quality fit (:func:`calibration.fit.fit_quality`, or
:func:`calibration.fit.fit_quality_measures` for several measures) will send to the last tier if it is run
on n examples, for n = 100, 300, 1,000, 3,000 and 10,000 by default. So a user knows what more data buys
before paying for it.

**Method** (a bootstrap of the fit itself): the pilot's examples stand for the population. For each n, the
pilot is resampled with replacement to n examples ``replicates`` times; each resample is fitted exactly as
``cascade-calibrate`` would fit it (same target, confidence, claim, bound, sequence and level split; computed
on the resampling weights for all replicates at once), and the fitted thresholds are applied to the pilot,
whose last-tier share estimates the population share they give.
The prediction is the median over the replicates, with the 10th and 90th percentiles as its spread, and the
share of replicates in which no threshold was certified (always escalate).

It replays the common-threshold family (every threshold for two tiers). For N >= 3 tiers ``cascade-calibrate``
fits the per-stage family by default (:mod:`calibration.family`), whose split and ray choice it does not
replay: for those chains the prediction is what ``--family common`` would certify.

What it cannot know: how the pilot differs from the population. A small pilot's loss curve is itself noisy,
so predictions for large n (where the fit's own noise vanishes) carry the pilot's noise; the spread does not
include it. ``eval/RESULTS.md`` checks the predictions against real fits.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from calibration.certify import Bound, Claim, check_agreement, default_bound, upper_bounds
from calibration.metrics import check_data
from cascade.curve import check_fraction
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


@dataclass(frozen=True, eq=False)
class _Events:
    """The common-threshold candidates of a pilot, ready to be counted under resampling weights.

    Every example contributes N-1 events (its running-minimum scores); when the threshold passes an event, the
    example's answering tier moves down one tier and its features change by ``delta``. Events are sorted by
    value; ``ends`` are the last events of each distinct value (one candidate each, after ``-inf``).
    """

    row: npt.NDArray[np.int64]  # (E,) example of each event, in sorted order
    delta: npt.NDArray[np.float64]  # (E, 4) change of [harm, help, cost, answered by the last tier]
    ends: npt.NDArray[np.int64]  # (P-1,) last event index of each candidate
    base: npt.NDArray[np.float64]  # (n0, 4) features with every example answered by the last tier
    pilot_share: npt.NDArray[np.float64]  # (P,) last-tier share of each candidate on the pilot itself
    last_cost: npt.NDArray[np.float64]  # (n0,) cost of always-last (lower tiers skipped), candidate 0's cost

    @classmethod
    def of(cls, s: npt.NDArray[np.float64], c: npt.NDArray[np.bool_], k: npt.NDArray[np.float64]) -> _Events:
        n, tiers = c.shape
        last = c[:, -1:]
        feats = np.stack([~c & last, c & ~last, np.cumsum(k, axis=1),
                          np.broadcast_to(np.arange(tiers) == tiers - 1, (n, tiers))], axis=2).astype(np.float64)
        delta = (feats[:, :-1, :] - feats[:, 1:, :]).reshape(-1, 4)
        values = np.minimum.accumulate(s, axis=1).ravel()
        order = np.argsort(values, kind="stable")
        ends = np.flatnonzero(np.r_[values[order][1:] != values[order][:-1], True])
        rows = np.repeat(np.arange(n), tiers - 1)[order]
        share = np.r_[n, n + np.cumsum(delta[order, 3])[ends]] / n
        return cls(rows, delta[order], ends, feats[:, -1, :], share, k[:, -1].astype(np.float64))

    def counts(self, w: npt.NDArray[np.float64]) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.bool_]]:
        """Feature sums ``(B, P, 4)`` of every candidate under weights ``w`` ``(B, n0)``, and which candidates
        exist in each resample ``(B, P)`` (an event value of an example drawn at least once; ``-inf`` always)."""
        we = w[:, self.row]  # (B, E)
        run = np.cumsum(we[:, :, None] * self.delta[None, :, :], axis=1)[:, self.ends, :]
        sums = (w @ self.base)[:, None, :] + np.concatenate([np.zeros((len(w), 1, 4)), run], axis=1)
        sums[:, 0, 2] = w @ self.last_cost  # -inf skips every lower tier
        drawn = np.cumsum(we > 0, axis=1)[:, self.ends]
        present = np.concatenate([np.ones((len(w), 1), dtype=np.bool_),
                                  np.diff(np.concatenate([np.zeros((len(w), 1)), drawn], axis=1), axis=1) > 0], axis=1)
        return sums, present


def _fits(ev: _Events, w: npt.NDArray[np.float64], n: int, eps: float, delta: float,
          bound: Bound) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """:func:`calibration.fit.fit_quality` on B resamples at once: the chosen candidate, its share and mean cost
    on each resample. The same bounds and sequence (:mod:`calibration.certify`); the candidate accepted is the
    last one present in the resample before the first failure, or always-last (candidate 0, lower tiers skipped)
    when that is cheaper, as the fit on the resample itself would return (common-threshold family)."""
    sums, present = ev.counts(w)
    b, p = present.shape
    upper = upper_bounds(np.rint(sums[:, :, 0]), np.rint(sums[:, :, 1]), n, delta, bound).reshape(b, p)
    passed = upper <= eps
    passed[:, 0] = True
    failed = ~passed
    first = np.where(failed.any(axis=1), np.argmax(failed, axis=1), p)
    last_present = np.maximum.accumulate(np.where(present, np.arange(p), 0), axis=1)
    chosen = last_present[np.arange(b), first - 1]
    cost = sums[np.arange(b), chosen, 2]
    chosen = np.where(sums[:, 0, 2] < cost, 0, chosen)  # the fit keeps the cheapest accepted: always-last may be
    at = sums[np.arange(b), chosen]
    return chosen.astype(np.int64), at[:, 3] / n, at[:, 2] / n


def plan_quality(scores: npt.ArrayLike | Mapping[str, npt.ArrayLike], correct: npt.ArrayLike,
                 costs: npt.ArrayLike | None = None, *, max_quality_loss: float, delta: float = 0.1,
                 claim: Claim = "accuracy", bound: Bound | None = None, sizes: Sequence[int] = DEFAULT_SIZES,
                 replicates: int = 200, seed: int = 0) -> list[PlanRow]:
    """Predict the certified last-tier share at each calibration-set size (see the module docstring).

    The resamples are multinomial weights over the pilot's examples, and every resample's fit is computed on
    those weights (vectorised over the replicates); it returns what :func:`calibration.fit.fit_quality` (or
    :func:`calibration.fit.fit_quality_measures`, for several measures: each at ``delta / M``, the least
    escalation on the resample kept, ties to the lower mean cost, then the earlier measure) returns on the
    resample itself.

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
    by_measure = dict(scores.items()) if isinstance(scores, Mapping) else {"": scores}
    if not by_measure:
        raise InvalidRequestError("plan_quality needs at least one measure")
    eps = check_fraction("max_quality_loss", max_quality_loss, 0.0, 1.0)
    dlt = check_fraction("delta", delta, 0.0, 1.0)
    bnd = default_bound(claim) if bound is None else bound
    if eps >= 1.0 or dlt in (0.0, 1.0) or bnd not in ("discordant", "harm"):
        raise InvalidRequestError("need 0 <= max_quality_loss < 1, 0 < delta < 1, bound 'discordant' or 'harm'")
    if not isinstance(replicates, int) or isinstance(replicates, bool) or replicates < 1:
        raise InvalidRequestError(f"replicates must be an integer >= 1, got {replicates!r}")
    if not sizes or any(not isinstance(n, int) or isinstance(n, bool) or n < 1 for n in sizes):
        raise InvalidRequestError(f"sizes must be integers >= 1, got {list(sizes)!r}")
    events = []
    for v in by_measure.values():
        s, c, k = check_data(v, correct, costs)
        if claim == "disagreement":
            check_agreement(c)
        events.append(_Events.of(s, c, k))
    level = dlt / len(events) if isinstance(scores, Mapping) else dlt
    n0 = len(c)
    rng = np.random.default_rng(seed)
    rows = []
    for n in sizes:
        w = rng.multinomial(n, np.full(n0, 1.0 / n0), size=replicates).astype(np.float64)
        per = [_fits(ev, w, n, eps, level, bnd) for ev in events]
        chosen = np.stack([p[0] for p in per])  # (M, B)
        feasible = chosen > 0
        share = np.where(feasible, np.stack([p[1] for p in per]), np.inf)
        cost = np.where(feasible, np.stack([p[2] for p in per]), np.inf)
        order = np.arange(len(events))[:, None] * np.ones_like(share)
        best = np.lexsort((order, cost, share), axis=0)[0]  # (B,): least share, then cost, then measure order
        best = np.where(feasible.any(axis=0), best, 0)
        cols = np.arange(replicates)
        pilot = np.array([events[m].pilot_share[chosen[m, r]] for r, m in zip(cols, best)])
        low, mid, high = np.percentile(pilot, [10.0, 50.0, 90.0])
        rows.append(PlanRow(int(n), float(mid), float(low), float(high),
                            float((~feasible.any(axis=0)).mean()), replicates))
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
