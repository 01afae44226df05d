"""Fitting cascade thresholds on held-out data (pure numpy/scipy; arrays as in :mod:`calibration.metrics`).

Methods, each returning a :class:`FitResult`:

- :func:`fit_budget` -- at most a share R of requests reach the last tier (RouteLLM-style quantile).
- :func:`fit_quality` -- the cheapest thresholds such that, with probability >= 1 - delta over the draw of the
  held-out set, the population accuracy loss against always using the last tier is <= eps (Learn-then-Test),
  or, without labels, the share of answers differing from the last tier's (:mod:`calibration.certify`);
  :func:`fit_quality_measures` does it for several measures and keeps the one certifying the least escalation;
  :func:`fit_levels` certifies several targets at once, for per-request levels.
- :func:`fit_min_cost` -- maximise ``value_per_correct * accuracy - mean_cost``.

Candidate tables (:mod:`calibration.candidates`, re-exported here): :func:`common_sweep` evaluates every
common threshold exactly (all two-tier thresholds); :func:`grid_search` is the bounded joint search over
per-stage combinations for N tiers, whose (mean cost, accuracy) Pareto front the budget and minimum-cost fits
report. The quality fit's candidates come from a family (:mod:`calibration.family`) and are certified by
:mod:`calibration.certify`.

:func:`measured_curve` builds the :class:`~cascade.curve.Curve` stored in an artifact, from which
:func:`cascade.curve.threshold_for_target` picks thresholds for a per-request target.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from calibration.candidates import Candidates, common_sweep, cost_axis, evaluate, grid_search, pareto_index
from calibration.certify import Bound, Claim, accepted_prefix, accuracy_loss, check_agreement, claim_text, default_bound
from calibration.family import CandidateSequence, Family, Order, candidate_sequence
from calibration.metrics import CascadeStats, check_data, pareto_front, simulate
from cascade.curve import Curve, check_fraction
from cascade.errors import InvalidRequestError

__all__ = [
    "Candidates",
    "FitResult",
    "common_sweep",
    "fit_budget",
    "fit_levels",
    "fit_levels_measures",
    "fit_min_cost",
    "fit_quality",
    "fit_quality_measures",
    "grid_search",
    "measured_curve",
    "pareto_index",
]


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
        cand, i = ok, int(np.lexsort((ok.large_share, cost_axis(ok), -ok.accuracy))[0])
    st = cand.stats(i)
    msg = (f"budget: at most {r:.1%} of requests may reach the last tier; the fitted thresholds send "
           f"{st.large_share:.1%} there ({_describe(st)}).")
    return FitResult(tuple(cand.thresholds[i].tolist()), "budget", {"max_large_share": r}, st, True, msg, pareto)


def fit_quality(scores: npt.ArrayLike, correct: npt.ArrayLike, costs: npt.ArrayLike | None = None, *,
                max_quality_loss: float, delta: float = 0.1, bound: Bound | None = None, claim: Claim = "accuracy",
                family: Family = "auto", fix_share: float = 0.25, seed: int = 0,
                order: Order | None = None) -> FitResult:
    """The cheapest thresholds such that, with probability >= 1 - delta, the claim's loss is <= eps
    (Learn-then-Test).

    The claims, the per-candidate bounds and fixed-sequence testing, with the proof, are in
    :mod:`calibration.certify`. ``claim="accuracy"``: ``acc(always last) - acc(cascade) <= eps`` from labels.
    ``claim="disagreement"``: the share of answers differing from the last tier's is <= eps (so is the accuracy
    loss, for any labels); then ``correct`` is the agreement matrix (tier j's answer is the same as the last
    tier's; last column all True), and "accuracy" in the result means agreement with the last tier.

    **Family.** The candidates and their testing order come from :func:`calibration.family.candidate_sequence`:
    for two tiers every threshold (one common threshold, all examples certify); for N >= 3 tiers per-stage
    thresholds, the sequence fixed on one part of the data and certified on the other (why that keeps the
    guarantee is in :mod:`calibration.family`). The sequence starts at always-last-tier; each candidate is
    tested at level delta until the first failure. Every candidate accepted before it is certified at once,
    so the cheapest of them on all the calibration data is returned (the fewest last-tier calls when nothing
    is priced; always-last itself when the certified cascades cost more, since skipped tiers cost nothing).

    If no candidate passes, the always-last-tier fallback (all ``-inf``) is returned with ``feasible=False``.

    Args:
        scores: ``(n, N-1)`` or ``(n,)``; correct: ``(n, N)`` (agreement for the disagreement claim);
            costs: ``(n, N)``, ``(N,)`` or None.
        max_quality_loss: eps in [0, 1).
        delta: allowed probability of missing the target, in (0, 1).
        bound: the per-candidate upper confidence bound (default: the claim's, see
            :func:`calibration.certify.default_bound`).
        claim: ``"accuracy"`` or ``"disagreement"``.
        family: ``"auto"``, ``"common"`` or ``"per_stage"``.
        fix_share: per-stage family: share of the examples that fixes the testing sequence.
        seed: per-stage family: seed of the split.
        order: per-stage family: the testing order (default :func:`calibration.family.predicted_order`).
    """
    return fit_levels(scores, correct, costs, levels=[max_quality_loss], delta=delta, bound=bound, claim=claim,
                      family=family, fix_share=fix_share, seed=seed, order=order)[0]


def fit_levels(scores: npt.ArrayLike, correct: npt.ArrayLike, costs: npt.ArrayLike | None = None, *,
               levels: Sequence[float], delta: float = 0.1, bound: Bound | None = None, claim: Claim = "accuracy",
               family: Family = "auto", fix_share: float = 0.25, seed: int = 0,
               order: Order | None = None) -> list[FitResult]:
    """Certify several quality targets at once: every returned level holds with probability >= 1 - delta.

    Each level is fitted as by :func:`fit_quality` (the same family and split; a per-stage sequence may differ
    per level), at ``delta / L`` (Bonferroni over the L levels; the proof is in :mod:`calibration.certify`), so
    that a deployment serving requests at any of the levels meets all of them at once. One level is exactly
    :func:`fit_quality`.

    Returns:
        One :class:`FitResult` per level, in the order given (``params["delta_per_level"]`` is ``delta / L``
        when L > 1).
    """
    eps = [check_fraction("max_quality_loss", x, 0.0, 1.0) for x in levels]
    dlt = check_fraction("delta", delta, 0.0, 1.0)
    bnd = default_bound(claim) if bound is None else bound
    if not eps or max(eps) >= 1.0 or dlt in (0.0, 1.0) or bnd not in ("discordant", "harm"):
        raise InvalidRequestError("need levels 0 <= max_quality_loss < 1, 0 < delta < 1, bound 'discordant' or 'harm'")
    if len(set(eps)) != len(eps):
        raise InvalidRequestError(f"quality levels must be distinct, got {list(levels)}")
    s, c, k = check_data(scores, correct, costs)
    if claim == "disagreement":
        check_agreement(c)
    loss = accuracy_loss(c)  # the disagreement claim: the agreement matrix in place of the labels
    dl = dlt / len(eps)
    out = []
    for e in eps:
        seq = candidate_sequence(s, c, k, eps=e, delta=dl, bound=bnd, family=family, loss=loss,
                                 fix_share=fix_share, seed=seed, order=order)
        stop, upper = accepted_prefix(seq.cert.harmed, seq.cert.helped, seq.cert.n, e, dl, bnd)
        ok = evaluate(seq.cert.thresholds[: stop + 1], s, c, k)
        i = int(np.lexsort((-np.arange(stop + 1), ok.large_share, cost_axis(ok)))[0])  # cheapest; ties: later
        out.append(_quality_result(seq, i, stop, upper, e, dlt, len(eps), bnd, claim, s, c, k))
    return out


def _quality_result(seq: CandidateSequence, i: int, stop: int, upper: npt.NDArray[np.float64], eps: float,
                    delta: float, n_levels: int, bound: str, claim: str, s: npt.NDArray[np.float64],
                    c: npt.NDArray[np.bool_], k: npt.NDArray[np.float64]) -> FitResult:
    """The FitResult of candidate ``i`` of ``seq`` (accepted prefix ``0..stop``) certified for ``eps``."""
    thresholds = tuple(float(t) for t in seq.cert.thresholds[i])
    st = simulate(thresholds, s, c, k).stats()
    dl = delta / n_levels
    params: dict[str, float | int | str] = {
        "max_quality_loss": eps, "delta": delta, "bound": bound, "claim": claim, "family": seq.family,
        "family_why": seq.why, "n_fix": len(seq.fix_index), "n_certify": seq.cert.n,
        "candidates_certified": stop, "certified_loss_bound": float(upper[i]) if i else 0.0,
        **({"levels": n_levels, "delta_per_level": dl} if n_levels > 1 else {}),
    }
    what = claim_text(claim)
    on = f"{seq.cert.n} certifying examples, family {seq.family}: {seq.why}"
    if stop == 0:
        first = float(upper[1]) if len(upper) > 1 else float("nan")
        msg = (f"quality: no thresholds are certified to keep the {what} at most {eps:.2%} with confidence "
               f"{1 - dl:.0%} on {on} (the first candidate's upper bound is {first:.2%}); falling back to always "
               f"escalating. Use more {'prompts' if claim == 'disagreement' else 'held-out data'} or a looser "
               "target.")
        return FitResult(thresholds, "quality", params, st, False, msg)
    if i == 0:
        msg = (f"quality: {stop} cascade(s) are certified to keep the {what} at most {eps:.2%} with confidence "
               f"{1 - dl:.0%} on {on}, but always using the last tier costs less than each of them (the lower "
               "tiers' calls cost more than the escalations they save), so the thresholds escalate everything "
               "and the lower tiers are skipped.")
        return FitResult(thresholds, "quality", params, st, True, msg)
    measured = float(c[:, -1].mean()) - st.accuracy
    msg = (f"quality: with confidence {1 - dl:.0%}, the {what} is <= {eps:.2%} (certified upper bound "
           f"{upper[i]:.2%}, the cheapest of {stop} certified candidates on {on}; measured {measured:.2%} on all "
           f"{st.n}); {st.large_share:.1%} of requests reach the last tier ({_describe(st, claim)}).")
    return FitResult(thresholds, "quality", params, st, True, msg)


def fit_quality_measures(scores: Mapping[str, npt.ArrayLike], correct: npt.ArrayLike,
                         costs: npt.ArrayLike | None = None, *, max_quality_loss: float, delta: float = 0.1,
                         bound: Bound | None = None, claim: Claim = "accuracy", family: Family = "auto",
                         seed: int = 0) -> tuple[str, FitResult]:
    """A quality fit for each of M measures at level ``delta / M``; the one certifying the least escalation.

    *Validity* (Bonferroni): each measure's fit misses its target with probability <= delta / M, so all of them
    hold at once with probability >= 1 - delta, and so does the one kept, whatever rule picks it. Choosing the
    measure by AUC on the same data needed the same ``delta / M``; keeping the measure whose own sequence
    certifies the smallest last-tier share therefore certifies no more escalation at the same confidence.
    Ties go to the lower mean cost, then to the earlier measure in ``scores``; when none is feasible, the first
    measure's fallback (always escalate) is returned.

    Args:
        scores: measure name -> ``(n, N-1)`` scores of the same examples (M >= 1 measures).
        correct, costs, max_quality_loss, delta, bound, claim, family, seed: as in :func:`fit_quality`.

    Returns:
        ``(measure, fit)``; ``fit.params`` adds ``delta_overall``, ``tested_measures`` and each measure's
        certified last-tier share (``share_<measure>``, 1.0 where it fell back).
    """
    measure, fits = fit_levels_measures(scores, correct, costs, levels=[max_quality_loss], delta=delta, bound=bound,
                                        claim=claim, family=family, seed=seed)
    return measure, fits[0]


def fit_levels_measures(scores: Mapping[str, npt.ArrayLike], correct: npt.ArrayLike,
                        costs: npt.ArrayLike | None = None, *, levels: Sequence[float], delta: float = 0.1,
                        bound: Bound | None = None, claim: Claim = "accuracy", family: Family = "auto",
                        seed: int = 0) -> tuple[str, list[FitResult]]:
    """:func:`fit_levels` for each of M measures at ``delta / M``; the measure whose *first* level certifies the
    least escalation (as :func:`fit_quality_measures` picks it) and its levels.

    *Validity:* each (measure, level) pair is tested at ``delta / (M L)``, so every level of every measure holds
    at once with probability >= 1 - delta (Bonferroni over the M L pairs), and so do the levels of the measure
    kept, whatever picked it.

    Returns:
        ``(measure, fits)``, one fit per level in the order given; each ``params`` adds ``delta_overall``,
        ``tested_measures`` and the first level's certified last-tier share per measure (``share_<measure>``).
    """
    dlt = check_fraction("delta", delta, 0.0, 1.0)
    if not scores:
        raise InvalidRequestError("fitting several measures needs at least one measure")
    fits = {m: fit_levels(s, correct, costs, levels=levels, delta=dlt / len(scores), bound=bound, claim=claim,
                          family=family, seed=seed) for m, s in scores.items()}
    order = list(fits)

    def rank(m: str) -> tuple[bool, float, float, int]:
        f = fits[m][0]
        return (not f.feasible, f.stats.large_share if f.feasible else 0.0, f.stats.mean_cost if f.feasible else 0.0,
                order.index(m))

    best = min(order, key=rank)
    shares = {f"share_{m}": f[0].stats.large_share for m, f in fits.items()}
    out = []
    for f in fits[best]:
        msg = (f"{f.message} Measure {best!r} of {len(fits)} compared, each tested at confidence "
               f"{1 - dlt / len(fits):.2%}, so all of them hold together with confidence {1 - dlt:.0%}.")
        params = {**dict(f.params), "delta_overall": dlt, "tested_measures": len(fits), **shares}
        out.append(FitResult(f.thresholds, f.method, params, f.stats, f.feasible, msg, f.pareto))
    return best, out


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
        idx = idx[np.lexsort((grid.large_share[idx], cost_axis(grid)[idx]))]
        return _to_curve(grid.subset(idx), "pareto", last_acc)
    cand = common_sweep(s, c, k)
    p = len(cand.accuracy)
    keep = np.unique(np.rint(np.linspace(0, p - 1, min(p, max_points))).astype(np.int64))
    return _to_curve(cand.subset(keep[::-1]), "sweep", last_acc)
