"""Fitting cascade thresholds on held-out data (pure numpy/scipy; arrays as in :mod:`calibration.metrics`).

Methods, each returning a :class:`FitResult`:

- :func:`fit_budget` -- at most a share R of requests reach the last tier (RouteLLM-style quantile).
- :func:`fit_quality` -- fewest escalations such that, with probability >= 1 - delta over the draw of the
  held-out set, the population accuracy loss against always using the last tier is <= eps (Learn-then-Test),
  or, without labels, the share of answers differing from the last tier's (:mod:`calibration.certify`);
  :func:`fit_quality_measures` does it for several measures and keeps the one certifying the least escalation.
- :func:`fit_min_cost` -- maximise ``value_per_correct * accuracy - mean_cost``.

Candidate tables: :func:`common_sweep` evaluates every common threshold exactly (all two-tier thresholds);
:func:`grid_search` is the bounded joint search over per-stage combinations for N tiers, whose (mean cost,
accuracy) Pareto front the grid-based methods report.

:func:`measured_curve` builds the :class:`~cascade.curve.Curve` stored in an artifact, from which
:func:`cascade.curve.threshold_for_target` picks thresholds for a per-request target.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from calibration.certify import (
    Bound,
    Claim,
    accepted_prefix,
    check_agreement,
    claim_text,
    default_bound,
)
from calibration.metrics import (
    CascadeStats,
    FloatArray,
    IntArray,
    answering_tier,
    check_data,
    pareto_front,
)
from cascade.curve import Curve, check_fraction
from cascade.errors import InvalidRequestError

__all__ = [
    "Candidates",
    "FitResult",
    "common_sweep",
    "fit_budget",
    "fit_min_cost",
    "fit_quality",
    "fit_quality_measures",
    "grid_search",
    "measured_curve",
    "pareto_index",
]

@dataclass(frozen=True, eq=False)
class Candidates:
    """A table of P candidate threshold combinations evaluated on the same data.

    Attributes:
        thresholds: ``(P, N-1)`` thresholds of each candidate.
        accuracy: ``(P,)`` accuracy.
        mean_cost: ``(P,)`` mean cost per request.
        counts: ``(P, N)`` int, number of requests answered by each tier.
        harmed: ``(P,)`` int, examples where the cascade is wrong and the last tier right.
        helped: ``(P,)`` int, examples where the cascade is right and the last tier wrong.
        n: number of examples.
    """

    thresholds: FloatArray
    accuracy: FloatArray
    mean_cost: FloatArray
    counts: IntArray
    harmed: IntArray
    helped: IntArray
    n: int

    @property
    def large_share(self) -> FloatArray:
        """``(P,)`` share of requests answered by the last tier."""
        return self.counts[:, -1] / self.n

    def stats(self, i: int) -> CascadeStats:
        """The summary of candidate ``i``."""
        return CascadeStats.from_counts(self.n, self.accuracy[i], self.mean_cost[i], self.counts[i])

    def subset(self, idx: npt.ArrayLike) -> Candidates:
        """The candidates at indices ``idx``, in that order."""
        i = np.asarray(idx, dtype=np.int64)
        return Candidates(self.thresholds[i], self.accuracy[i], self.mean_cost[i], self.counts[i],
                          self.harmed[i], self.helped[i], self.n)


def common_sweep(scores: npt.ArrayLike, correct: npt.ArrayLike, costs: npt.ArrayLike | None = None) -> Candidates:
    """Evaluate every distinct common threshold ``lam`` (the same for all stages) in one sorted pass.

    Example i is answered by the first tier j with ``min(scores[i, :j+1]) <= lam``, so its contribution
    changes only at those running minima: each is an event carrying the change of the example's values.
    Candidates are ``-inf`` (escalate everything) followed by every distinct running minimum, ascending, so
    the last-tier share never increases along the table; for two tiers this is every distinct score.

    Returns:
        :class:`Candidates` with ``P = 1 + number of distinct running-minimum values``; O(n N log(n N)).
    """
    s, c, k = check_data(scores, correct, costs)
    n, tiers = c.shape
    last = c[:, -1:]
    feats = np.concatenate(
        [np.stack([c, np.cumsum(k, axis=1), ~c & last, c & ~last], axis=2),
         np.broadcast_to(np.eye(tiers), (n, tiers, tiers))], axis=2,
    ).astype(np.float64)  # (n, N, F): value of each feature if tier j answers example i
    delta = (feats[:, :-1, :] - feats[:, 1:, :]).reshape(-1, feats.shape[2])
    events = np.minimum.accumulate(s, axis=1).ravel()
    order = np.argsort(events, kind="stable")
    events = events[order]
    ends = np.flatnonzero(np.r_[events[1:] != events[:-1], True])
    sums = feats[:, -1, :].sum(axis=0) + np.vstack([np.zeros(feats.shape[2]), np.cumsum(delta[order], 0)[ends]])
    lam = np.r_[-np.inf, events[ends]]
    whole = np.rint(sums).astype(np.int64)
    return Candidates(np.repeat(lam[:, None], tiers - 1, axis=1), sums[:, 0] / n, sums[:, 1] / n,
                      whole[:, 4:], whole[:, 2], whole[:, 3], n)


def grid_search(scores: npt.ArrayLike, correct: npt.ArrayLike, costs: npt.ArrayLike | None = None, *,
                max_grid: int = 4096) -> Candidates:
    """Evaluate a grid of per-stage threshold combinations (joint search for N tiers).

    Each stage gets ``-inf`` plus up to ``floor(max_grid ** (1/(N-1))) - 1`` of its own score values at evenly
    spaced quantile levels (all distinct values when there are fewer); the grid is their Cartesian product.

    Returns:
        :class:`Candidates` with ``P <= max(max_grid, 2 ** (N-1))`` rows.
    """
    s, c, k = check_data(scores, correct, costs)
    if not isinstance(max_grid, int) or max_grid < 2:
        raise InvalidRequestError(f"max_grid must be an integer >= 2, got {max_grid!r}")
    n, tiers = c.shape
    per = max(2, int(max_grid ** (1.0 / (tiers - 1)) + 1e-9))
    axes = []
    for j in range(tiers - 1):
        u = np.unique(s[:, j])
        if u.size > per - 1:
            u = np.unique(np.quantile(s[:, j], np.linspace(0.0, 1.0, per - 1), method="inverted_cdf"))
        axes.append(np.r_[-np.inf, u])
    grid = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1).reshape(-1, tiers - 1)
    rows, cum_cost = np.arange(n), np.cumsum(k, axis=1)
    acc, cost = np.empty(len(grid)), np.empty(len(grid))
    counts = np.empty((len(grid), tiers), dtype=np.int64)
    harmed, helped = np.empty(len(grid), dtype=np.int64), np.empty(len(grid), dtype=np.int64)
    chunk = max(1, 2_000_000 // (n * (tiers - 1)))
    for a in range(0, len(grid), chunk):
        tier = answering_tier(grid[a:a + chunk], s)  # (g, n)
        ok = c[rows, tier]
        acc[a:a + chunk], cost[a:a + chunk] = ok.mean(axis=1), cum_cost[rows, tier].mean(axis=1)
        g = len(tier)
        counts[a:a + g] = np.bincount((tier + tiers * np.arange(g)[:, None]).ravel(),
                                      minlength=g * tiers).reshape(g, tiers)
        harmed[a:a + chunk] = (~ok & c[:, -1]).sum(axis=1)
        helped[a:a + chunk] = (ok & ~c[:, -1]).sum(axis=1)
    return Candidates(grid, acc, cost, counts, harmed, helped, n)


@dataclass(frozen=True)
class FitResult:
    """The outcome of one fitting method.

    Attributes:
        thresholds: the N-1 fitted thresholds (``-inf`` = always escalate).
        method: ``"budget"``, ``"quality"`` or ``"min_cost"``.
        params: the method's inputs plus derived numbers worth storing (e.g. the certified loss bound).
        stats: accuracy, mean cost and per-tier shares of the fitted cascade on the fit data.
        feasible: False when the target cannot be met and a fallback was returned.
        message: one human-readable paragraph explaining the result.
        pareto: the (mean cost, accuracy) Pareto front of the candidates searched (joint-search methods), or
            None; the chosen thresholds are one of its points.
    """

    thresholds: tuple[float, ...]
    method: str
    params: Mapping[str, float | int | str]
    stats: CascadeStats
    feasible: bool
    message: str
    pareto: Curve | None = None


def _to_curve(cand: Candidates, kind: str, last_accuracy: float) -> Curve:
    return Curve(kind, tuple(tuple(float(x) for x in t) for t in cand.thresholds),
                 tuple(cand.large_share.tolist()), tuple(cand.accuracy.tolist()),
                 tuple(cand.mean_cost.tolist()), float(last_accuracy))


def _cost_axis(cand: Candidates) -> FloatArray:
    """What "cheaper" means: the mean cost, or the last-tier share when nothing is priced (all costs 0)."""
    return cand.mean_cost if bool(np.any(cand.mean_cost != 0)) else cand.large_share


def pareto_index(cand: Candidates) -> IntArray:
    """Indices of the candidates on the (cost, accuracy) Pareto front, cost ascending.

    The cost is the mean cost, or the last-tier share when nothing is priced; among equal points the one with
    the smaller last-tier share is kept.
    """
    x = _cost_axis(cand)
    order = np.lexsort((cand.large_share, -cand.accuracy, x))  # equal points: smallest share first (kept)
    return np.asarray(order[pareto_front(x[order], cand.accuracy[order])], dtype=np.int64)


def _front(cand: Candidates, last_accuracy: float) -> Curve:
    return _to_curve(cand.subset(pareto_index(cand)), "pareto", last_accuracy)


def _describe(st: CascadeStats, claim: str = "accuracy") -> str:
    tiers = ", ".join(f"{a:.1%}" for a in st.answered)
    what = "agreement with the last tier" if claim == "disagreement" else "accuracy"
    return (f"{what} {st.accuracy:.1%}, mean cost {st.mean_cost:.4g}, answered per tier [{tiers}] "
            f"on {st.n} calibration examples")


def fit_budget(scores: npt.ArrayLike, correct: npt.ArrayLike, costs: npt.ArrayLike | None = None, *,
               max_large_share: float, max_grid: int = 4096) -> FitResult:
    """At most a share ``max_large_share`` of requests may reach the last tier.

    Two tiers: the quantile rule -- the smallest threshold (so the most escalation) whose escalated share on
    the fit data is <= R. Ties in the scores move together, so the share can fall below R but never exceeds it.
    N tiers: over the joint grid of :func:`grid_search`, the most accurate combination
    whose last-tier share is <= R (ties: cheaper); it lies on the Pareto front of the combinations within the
    budget, which is returned as ``pareto``.

    Args:
        scores: ``(n, N-1)`` or ``(n,)``; correct: ``(n, N)``; costs: ``(n, N)``, ``(N,)`` or None.
        max_large_share: R in [0, 1].
        max_grid: largest joint grid for N > 2 tiers.
    """
    r = check_fraction("max_large_share", max_large_share)
    s, c, k = check_data(scores, correct, costs)
    last_acc = float(c[:, -1].mean())
    pareto = None
    if c.shape[1] == 2:
        cand = common_sweep(s, c, k)
        i = int(np.flatnonzero(cand.counts[:, -1] / cand.n <= r)[0])  # the max-score candidate has share 0
    else:
        grid = grid_search(s, c, k, max_grid=max_grid)
        ok = grid.subset(np.flatnonzero(grid.large_share <= r))  # never empty: max thresholds escalate none
        pareto = _front(ok, last_acc)
        # The most accurate, then the cheapest, then the smallest last-tier share: a point of that front.
        cand, i = ok, int(np.lexsort((ok.large_share, _cost_axis(ok), -ok.accuracy))[0])
    st = cand.stats(i)
    msg = (f"budget: at most {r:.1%} of requests may reach the last tier; the fitted thresholds send "
           f"{st.large_share:.1%} there ({_describe(st)}).")
    return FitResult(tuple(cand.thresholds[i].tolist()), "budget", {"max_large_share": r}, st, True, msg, pareto)


def fit_quality(scores: npt.ArrayLike, correct: npt.ArrayLike, costs: npt.ArrayLike | None = None, *,
                max_quality_loss: float, delta: float = 0.1, bound: Bound | None = None,
                claim: Claim = "accuracy") -> FitResult:
    """Fewest escalations such that, with probability >= 1 - delta, the claim's loss is <= eps (Learn-then-Test).

    The claims, the per-candidate bounds and the testing sequence, with the proof, are in
    :mod:`calibration.certify`. ``claim="accuracy"``: ``acc(always last) - acc(cascade) <= eps`` from labels.
    ``claim="disagreement"``: the share of answers differing from the last tier's is <= eps (so is the accuracy
    loss, for any labels); then ``correct`` is the agreement matrix (tier j's answer is the same as the last
    tier's; last column all True), and "accuracy" in the result means agreement with the last tier.

    **Family.** Every stage uses one common threshold ``lam``; candidates run from ``lam = -inf`` (escalate
    everything: loss exactly 0, accepted without a test) upward through every distinct running-minimum score,
    so the last-tier share never increases along the sequence, and they are tested in that order
    (:func:`calibration.certify.fixed_sequence`). Per-stage quantile families would depend on the fit data
    and void the guarantee, so they are not used. For two tiers the family is every threshold.

    If no candidate passes, the always-last-tier fallback (all ``-inf``) is returned with ``feasible=False``.

    Args:
        scores: ``(n, N-1)`` or ``(n,)``; correct: ``(n, N)`` (agreement for the disagreement claim);
            costs: ``(n, N)``, ``(N,)`` or None.
        max_quality_loss: eps in [0, 1).
        delta: allowed probability of missing the target, in (0, 1).
        bound: the per-candidate upper confidence bound (default: the claim's, see
            :func:`calibration.certify.default_bound`).
        claim: ``"accuracy"`` or ``"disagreement"``.
    """
    eps = check_fraction("max_quality_loss", max_quality_loss, 0.0, 1.0)
    dlt = check_fraction("delta", delta, 0.0, 1.0)
    bnd = default_bound(claim) if bound is None else bound
    if eps >= 1.0 or dlt in (0.0, 1.0) or bnd not in ("discordant", "harm"):
        raise InvalidRequestError("need 0 <= max_quality_loss < 1, 0 < delta < 1, bound 'discordant' or 'harm'")
    s, c, k = check_data(scores, correct, costs)
    if claim == "disagreement":
        check_agreement(c)
    cand = common_sweep(s, c, k)
    n = cand.n
    i, upper = accepted_prefix(cand.harmed, cand.helped, n, eps, dlt, bnd)
    params: dict[str, float | int | str] = {
        "max_quality_loss": eps, "delta": dlt, "bound": bnd, "claim": claim,
        "family": "single threshold" if c.shape[1] == 2 else "common threshold for every stage",
    }
    st = cand.stats(i)
    what = claim_text(claim)
    measured = float(c[:, -1].mean()) - st.accuracy
    if i == 0:
        first = float(upper[1]) if len(upper) > 1 else float("nan")
        msg = (f"quality: no threshold is certified to keep the {what} at most {eps:.2%} with confidence "
               f"{1 - dlt:.0%} on {n} examples (the first candidate's upper bound is {first:.2%}); falling back "
               f"to always escalating. Use more {'prompts' if claim == 'disagreement' else 'held-out data'} "
               f"or a looser target.")
        params["certified_loss_bound"] = 0.0
        return FitResult(tuple(cand.thresholds[0].tolist()), "quality", params, st, False, msg)
    params["certified_loss_bound"] = float(upper[i])
    msg = (f"quality: with confidence {1 - dlt:.0%}, the {what} is <= {eps:.2%} (certified upper bound "
           f"{upper[i]:.2%}, measured {measured:.2%}); {st.large_share:.1%} of requests reach the last tier "
           f"({_describe(st, claim)}).")
    return FitResult(tuple(cand.thresholds[i].tolist()), "quality", params, st, True, msg)


def fit_quality_measures(scores: Mapping[str, npt.ArrayLike], correct: npt.ArrayLike,
                         costs: npt.ArrayLike | None = None, *, max_quality_loss: float, delta: float = 0.1,
                         bound: Bound | None = None, claim: Claim = "accuracy") -> tuple[str, FitResult]:
    """A quality fit for each of M measures at level ``delta / M``; the one certifying the least escalation.

    *Validity* (Bonferroni): each measure's fit misses its target with probability <= delta / M, so all of them
    hold at once with probability >= 1 - delta, and so does the one kept, whatever rule picks it. Choosing the
    measure by AUC on the same data needed the same ``delta / M``; keeping the measure whose own sequence
    certifies the smallest last-tier share therefore certifies no more escalation at the same confidence.
    Ties go to the lower mean cost, then to the earlier measure in ``scores``; when none is feasible, the first
    measure's fallback (always escalate) is returned.

    Args:
        scores: measure name -> ``(n, N-1)`` scores of the same examples (M >= 1 measures).
        correct, costs, max_quality_loss, delta, bound, claim: as in :func:`fit_quality`.

    Returns:
        ``(measure, fit)``; ``fit.params`` adds ``delta_overall``, ``tested_measures`` and each measure's
        certified last-tier share (``share_<measure>``, 1.0 where it fell back).
    """
    dlt = check_fraction("delta", delta, 0.0, 1.0)
    if not scores:
        raise InvalidRequestError("fit_quality_measures needs at least one measure")
    fits = {m: fit_quality(s, correct, costs, max_quality_loss=max_quality_loss, delta=dlt / len(scores),
                           bound=bound, claim=claim) for m, s in scores.items()}
    order = list(fits)
    best = min(order, key=lambda m: (not fits[m].feasible, fits[m].stats.large_share if fits[m].feasible else 0.0,
                                     fits[m].stats.mean_cost if fits[m].feasible else 0.0, order.index(m)))
    chosen = fits[best]
    params = {**dict(chosen.params), "delta_overall": dlt, "tested_measures": len(fits),
              **{f"share_{m}": f.stats.large_share for m, f in fits.items()}}
    msg = (f"{chosen.message} Measure {best!r} of {len(fits)} compared, each tested at confidence "
           f"{1 - dlt / len(fits):.2%}, so all of them hold together with confidence {1 - dlt:.0%}.")
    return best, FitResult(chosen.thresholds, chosen.method, params, chosen.stats, chosen.feasible, msg, chosen.pareto)


def fit_min_cost(scores: npt.ArrayLike, correct: npt.ArrayLike, costs: npt.ArrayLike | None = None, *,
                 value_per_correct: float, max_grid: int = 4096) -> FitResult:
    """Maximise ``value_per_correct * accuracy - mean_cost`` on the fit data.

    ``value_per_correct`` is what one correct answer is worth in the currency of ``costs`` (a value V per
    accuracy *percentage point* is ``value_per_correct = 100 * V``). Two tiers: over every distinct threshold;
    N tiers: over the joint grid of :func:`grid_search`. Ties go to the more accurate,
    then the cheaper candidate, so the choice is always on the returned (mean cost, accuracy) Pareto front.
    """
    value = check_fraction("value_per_correct", value_per_correct, 0.0, math.inf)
    if not math.isfinite(value):
        raise InvalidRequestError("value_per_correct must be finite")
    s, c, k = check_data(scores, correct, costs)
    cand = common_sweep(s, c, k) if c.shape[1] == 2 else grid_search(s, c, k, max_grid=max_grid)
    objective = value * cand.accuracy - cand.mean_cost
    i = int(np.lexsort((-cand.mean_cost, cand.accuracy, objective))[-1])
    pareto = _front(cand, float(c[:, -1].mean()))
    st = cand.stats(i)
    msg = (f"min-cost: net value {objective[i]:.4g} per request at {value:g} per correct answer "
           f"({_describe(st)}); searched {len(cand.accuracy)} candidates.")
    params: dict[str, float | int | str] = {"value_per_correct": value, "candidates": len(cand.accuracy),
                                            "net_value": float(objective[i])}
    return FitResult(tuple(cand.thresholds[i].tolist()), "min_cost", params, st, True, msg, pareto)


def measured_curve(scores: npt.ArrayLike, correct: npt.ArrayLike, costs: npt.ArrayLike | None = None, *,
                   max_points: int = 2001, max_grid: int = 4096) -> Curve:
    """The curve to store in an artifact for :func:`cascade.curve.threshold_for_target`.

    Two tiers: every distinct threshold (``kind="sweep"``), large share ascending; when there are more than
    ``max_points`` points, evenly spaced ones are kept (always both ends), so a target then resolves to the
    nearest stored point on its safe side. N tiers: the points of the joint grid on the (mean cost, accuracy)
    or the (last-tier share, accuracy) Pareto front (``kind="pareto"``), cost ascending; without prices the
    share is the cost.
    """
    if not isinstance(max_points, int) or max_points < 2:
        raise InvalidRequestError(f"max_points must be an integer >= 2, got {max_points!r}")
    s, c, k = check_data(scores, correct, costs)
    last_acc = float(c[:, -1].mean())
    if c.shape[1] > 2:  # the cost front and the last-tier-share front, so budget targets resolve finely too
        grid = grid_search(s, c, k, max_grid=max_grid)
        idx = np.union1d(pareto_index(grid), pareto_front(grid.large_share, grid.accuracy))
        idx = idx[np.lexsort((grid.large_share[idx], _cost_axis(grid)[idx]))]
        return _to_curve(grid.subset(idx), "pareto", last_acc)
    cand = common_sweep(s, c, k)
    p = len(cand.accuracy)
    keep = np.unique(np.rint(np.linspace(0, p - 1, min(p, max_points))).astype(np.int64))
    return _to_curve(cand.subset(keep[::-1]), "sweep", last_acc)
