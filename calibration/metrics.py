"""Measuring cascades on labelled held-out data: simulation, candidate tables, curves and their metrics.

Data model (N tiers, cheapest first, N >= 2; shapes use n = number of examples):

- ``scores`` ``(n, N-1)`` float: uncertainty of tier j's answer on example i (higher = less sure). A 1-D
  ``(n,)`` array is read as the two-tier case. Scores must be finite.
- ``correct`` ``(n, N)`` bool (or 0/1): whether tier j's answer to example i is right.
- ``costs`` ``(n, N)`` float >= 0, or ``(N,)`` per-tier constants, or None (all zero): cost of calling tier j.

A cascade with thresholds ``t`` ``(N-1,)`` answers example i with the first tier j whose score is within its
threshold (``scores[i, j] <= t[j]``; escalate iff strictly above), the last tier otherwise. Its cost is the
sum of the costs of the tiers it called. ``t[j] = -inf`` always escalates, ``+inf`` never does; a tier whose
threshold is ``-inf`` is skipped (not called: its answer would never be kept), as the engine does.

The two-tier curve metrics (AUC, APGR, CPT) follow RouteLLM: the x axis is the share of requests sent to the
large (last) tier, from 0 to 1.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from cascade.errors import InvalidRequestError

__all__ = [
    "CascadeStats",
    "CurveMetrics",
    "Interval",
    "ShareCurve",
    "Simulation",
    "answering_tier",
    "apgr",
    "auc",
    "bootstrap_ci",
    "check_data",
    "check_thresholds",
    "cpt",
    "curve_metrics",
    "oracle_curve",
    "pareto_front",
    "random_curve",
    "reach_costs",
    "share_curve",
    "simulate",
]

FloatArray = npt.NDArray[np.float64]
BoolArray = npt.NDArray[np.bool_]
IntArray = npt.NDArray[np.int64]

_GAP_EPS = 1e-12  # accuracy gaps at or below this count as "no gap"


def check_data(
    scores: npt.ArrayLike, correct: npt.ArrayLike, costs: npt.ArrayLike | None = None
) -> tuple[FloatArray, BoolArray, FloatArray]:
    """Validate and normalise the three arrays of the data model.

    Returns:
        ``scores`` ``(n, N-1)`` float64, ``correct`` ``(n, N)`` bool, ``costs`` ``(n, N)`` float64.

    Raises:
        InvalidRequestError: wrong shapes, non-finite scores, non-0/1 correctness, negative or non-finite costs.
    """
    try:
        s = np.array(scores, dtype=np.float64)
        c = np.asarray(correct)
    except (TypeError, ValueError) as e:
        raise InvalidRequestError(f"scores and correct must be numeric arrays: {e}") from e
    if s.ndim == 1:
        s = s[:, None]
    if s.ndim != 2 or s.shape[0] < 1 or s.shape[1] < 1:
        raise InvalidRequestError(f"scores must have shape (n, N-1) with n >= 1, got {s.shape}")
    n, stages = s.shape
    bad = np.flatnonzero(~np.isfinite(s).all(axis=1))
    if bad.size:
        raise InvalidRequestError(f"scores must be finite; example {int(bad[0])} is {s[bad[0]].tolist()}")
    if c.shape != (n, stages + 1):
        raise InvalidRequestError(f"correct must have shape {(n, stages + 1)} to match scores, got {c.shape}")
    if c.dtype != np.bool_:
        if c.dtype.kind not in "iuf" or not np.isin(c, (0, 1)).all():
            raise InvalidRequestError("correct must hold booleans or 0/1 values")
        c = c.astype(np.bool_)
    if costs is None:
        k = np.zeros((n, stages + 1))
    else:
        try:
            k = np.array(costs, dtype=np.float64)
        except (TypeError, ValueError) as e:
            raise InvalidRequestError(f"costs must be numeric: {e}") from e
        if k.shape == (stages + 1,):
            k = np.broadcast_to(k, (n, stages + 1)).copy()
        if k.shape != (n, stages + 1):
            raise InvalidRequestError(f"costs must have shape {(n, stages + 1)} or {(stages + 1,)}, got {k.shape}")
        if not (np.isfinite(k).all() and (k >= 0).all()):
            raise InvalidRequestError("costs must be finite and >= 0")
    return s, c, k


def check_thresholds(thresholds: float | Sequence[float] | npt.ArrayLike, stages: int) -> FloatArray:
    """Return thresholds as a ``(stages,)`` float array (a scalar is allowed for one stage); NaN is an error."""
    try:
        t = np.atleast_1d(np.asarray(thresholds, dtype=np.float64))
    except (TypeError, ValueError) as e:
        raise InvalidRequestError(f"thresholds must be numbers: {e}") from e
    if t.shape != (stages,) or np.isnan(t).any():
        raise InvalidRequestError(f"need {stages} non-NaN threshold(s), got {np.asarray(thresholds).tolist()!r}")
    return t


def answering_tier(t: FloatArray, s: FloatArray) -> IntArray:
    """Tier index answering each example: ``t`` ``(..., N-1)``, ``s`` ``(n, N-1)`` -> ``(..., n)``."""
    accept = s <= t[..., None, :]
    ones = np.ones((*accept.shape[:-1], 1), dtype=np.bool_)
    return np.asarray(np.argmax(np.concatenate([accept, ones], axis=-1), axis=-1), dtype=np.int64)


def reach_costs(thresholds: npt.ArrayLike, costs: FloatArray) -> FloatArray:
    """What a request costs when tier j answers it, tiers with a ``-inf`` threshold skipped.

    Args:
        thresholds: ``(..., N-1)``.
        costs: ``(n, N)``.

    Returns:
        ``(..., n, N)``: the sum of the costs of the tiers called up to and including tier j (a tier with a
        ``-inf`` threshold never answers, so its own column is only reached by skipping it).
    """
    t = np.asarray(thresholds, dtype=np.float64)
    called = np.concatenate([t > -np.inf, np.ones((*t.shape[:-1], 1), dtype=np.bool_)], axis=-1)
    return np.asarray(np.cumsum(costs * called[..., None, :], axis=-1), dtype=np.float64)


@dataclass(frozen=True)
class CascadeStats:
    """Summary of a cascade on a data set.

    Attributes:
        n: number of examples.
        accuracy: share of examples answered correctly.
        mean_cost: mean cost per request.
        answered: share of requests answered by each tier, length N (sums to 1).
        reached: share of requests that called each tier, length N (``reached[0] == 1``).
    """

    n: int
    accuracy: float
    mean_cost: float
    answered: tuple[float, ...]
    reached: tuple[float, ...]

    @property
    def large_share(self) -> float:
        """Share of requests that reached (and so were answered by) the last tier."""
        return self.answered[-1]

    @classmethod
    def from_counts(cls, n: int, accuracy: float, mean_cost: float, counts: npt.ArrayLike) -> CascadeStats:
        """Build from per-tier answer counts ``(N,)``."""
        share = np.asarray(counts, dtype=np.float64) / n
        reached = np.cumsum(share[::-1])[::-1]
        return cls(n, float(accuracy), float(mean_cost), tuple(share.tolist()), tuple(reached.tolist()))


@dataclass(frozen=True, eq=False)
class Simulation:
    """Per-example outcome of a cascade: ``tier``, ``correct`` and ``cost`` are ``(n,)`` arrays."""

    tier: IntArray
    correct: BoolArray
    cost: FloatArray
    n_tiers: int

    def stats(self) -> CascadeStats:
        """Accuracy, mean cost and per-tier shares."""
        counts = np.bincount(self.tier, minlength=self.n_tiers)
        return CascadeStats.from_counts(len(self.tier), self.correct.mean(), self.cost.mean(), counts)


def simulate(
    thresholds: float | Sequence[float] | npt.ArrayLike,
    scores: npt.ArrayLike,
    correct: npt.ArrayLike,
    costs: npt.ArrayLike | None = None,
) -> Simulation:
    """Run a cascade with fixed thresholds over pre-computed answers.

    Args:
        thresholds: ``(N-1,)`` (a scalar for two tiers).
        scores: ``(n, N-1)`` or ``(n,)``; correct: ``(n, N)``; costs: ``(n, N)``, ``(N,)`` or None (zero).

    Returns:
        A :class:`Simulation` with the answering tier, correctness and cost of every example.
    """
    s, c, k = check_data(scores, correct, costs)
    t = check_thresholds(thresholds, s.shape[1])
    tier = answering_tier(t, s)
    rows = np.arange(len(s))
    return Simulation(tier, c[rows, tier], reach_costs(t, k)[rows, tier], c.shape[1])


def pareto_front(cost: npt.ArrayLike, accuracy: npt.ArrayLike) -> IntArray:
    """Indices of the points not dominated in (lower cost, higher accuracy), sorted by cost ascending.

    A point is dominated when another has cost <= and accuracy >= with one strict; of identical points the
    first is kept.
    """
    x, y = np.asarray(cost, dtype=np.float64), np.asarray(accuracy, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 1:
        raise InvalidRequestError(f"cost and accuracy must be 1-D of equal length, got {x.shape}, {y.shape}")
    order = np.lexsort((-y, x))
    ys = y[order]
    best_before = np.r_[-np.inf, np.maximum.accumulate(ys)[:-1]]
    return np.asarray(order[ys > best_before], dtype=np.int64)


@dataclass(frozen=True, eq=False)
class ShareCurve:
    """Accuracy against the share of requests sent to the large tier, share ascending from 0 to 1.

    Attributes:
        share: ``(P,)`` large-tier share.
        accuracy: ``(P,)`` cascade accuracy at that share.
        threshold: ``(P,)`` the threshold giving each point (NaN for reference curves).
    """

    share: FloatArray
    accuracy: FloatArray
    threshold: FloatArray


def _two_tier(correct: npt.ArrayLike) -> BoolArray:
    c = np.asarray(correct)
    if c.ndim != 2 or c.shape[1] != 2:
        raise InvalidRequestError(f"curve metrics need two tiers: correct of shape (n, 2), got {c.shape}")
    return check_data(np.zeros(len(c)), c)[1]


def share_curve(scores: npt.ArrayLike, correct: npt.ArrayLike) -> ShareCurve:
    """The accuracy-vs-large-share curve of a two-tier cascade over every distinct threshold.

    Args:
        scores: ``(n,)`` or ``(n, 1)`` small-model uncertainty; correct: ``(n, 2)``.
    """
    _two_tier(correct)
    s, c, _ = check_data(scores, correct)
    order = np.argsort(s[:, 0], kind="stable")
    sv, ok = s[order, 0], c[order].astype(np.float64)
    ends = np.flatnonzero(np.r_[sv[1:] != sv[:-1], True])  # accept every score <= sv[end]
    n = len(sv)
    kept = np.cumsum(ok[:, 0] - ok[:, 1])[ends]  # gain of the small answer over the large one, accepted
    share = np.r_[1.0, 1.0 - (ends + 1) / n][::-1]
    acc = (np.r_[0.0, kept] + ok[:, 1].sum())[::-1] / n
    return ShareCurve(share, acc, np.r_[-np.inf, sv[ends]][::-1].copy())


def random_curve(correct: npt.ArrayLike) -> ShareCurve:
    """Expected accuracy of routing a random share of requests to the large tier: a straight line."""
    c = _two_tier(correct)
    small, large = c.mean(axis=0)
    return ShareCurve(np.array([0.0, 1.0]), np.array([small, large]), np.full(2, np.nan))


def oracle_curve(correct: npt.ArrayLike) -> ShareCurve:
    """The best accuracy at every large share: escalate small-wrong/large-right first, small-right/large-wrong last.

    It is piecewise linear with knots at ``g/n`` and ``(n-h)/n`` (g = examples the large tier fixes, h =
    examples it breaks), so linear interpolation between its points is exact at every ``k/n``.
    """
    c = _two_tier(correct)
    n = len(c)
    small = float(c[:, 0].mean())
    fixes, breaks = int((~c[:, 0] & c[:, 1]).sum()), int((c[:, 0] & ~c[:, 1]).sum())
    top = small + fixes / n
    share = np.array([0.0, fixes / n, (n - breaks) / n, 1.0])
    return ShareCurve(share, np.array([small, top, top, small + (fixes - breaks) / n]), np.full(4, np.nan))


def _curve_arrays(share: npt.ArrayLike, accuracy: npt.ArrayLike) -> tuple[FloatArray, FloatArray]:
    x, y = np.asarray(share, dtype=np.float64), np.asarray(accuracy, dtype=np.float64)
    if x.ndim != 1 or x.shape != y.shape or x.size < 2 or not (np.isfinite(x).all() and np.isfinite(y).all()):
        raise InvalidRequestError("share and accuracy must be finite 1-D arrays of equal length >= 2")
    order = np.argsort(x, kind="stable")
    x, y = x[order], y[order]
    if abs(x[0]) > 1e-12 or abs(x[-1] - 1.0) > 1e-12:
        raise InvalidRequestError(f"a share curve must span shares 0 to 1, got {x[0]:g} to {x[-1]:g}")
    return x, y


def auc(share: npt.ArrayLike, accuracy: npt.ArrayLike) -> float:
    """Area under the accuracy-vs-large-share curve (trapezoid rule over share in [0, 1])."""
    x, y = _curve_arrays(share, accuracy)
    return float(np.sum(np.diff(x) * (y[1:] + y[:-1]) / 2.0))


def apgr(share: npt.ArrayLike, accuracy: npt.ArrayLike) -> float:
    """Average performance gap recovered: ``(AUC - small_acc) / (large_acc - small_acc)``.

    Small- and large-only accuracies are the curve's values at share 0 and 1. Random routing scores 0.5 in
    expectation; no score beats the oracle curve's value. NaN when the large tier is not more accurate (no gap).
    """
    x, y = _curve_arrays(share, accuracy)
    gap = y[-1] - y[0]
    return float((auc(x, y) - y[0]) / gap) if gap > _GAP_EPS else float("nan")


def cpt(share: npt.ArrayLike, accuracy: npt.ArrayLike, percent: float) -> float:
    """Call-performance threshold: the smallest large share whose accuracy reaches ``small + percent% * gap``.

    Measured on the curve's points (no interpolation). NaN when there is no gap or the level is never reached.
    """
    x, y = _curve_arrays(share, accuracy)
    gap = y[-1] - y[0]
    if gap <= _GAP_EPS:
        return float("nan")
    hit = np.flatnonzero(y >= y[0] + percent / 100.0 * gap - 1e-12)
    return float(x[hit].min()) if hit.size else float("nan")


@dataclass(frozen=True)
class CurveMetrics:
    """Metrics of one score's two-tier curve.

    Attributes:
        small_accuracy: accuracy of the small tier alone.
        large_accuracy: accuracy of the large tier alone.
        auc: area under the accuracy-vs-large-share curve.
        oracle_auc: the oracle curve's area (an upper bound for any score).
        apgr: average performance gap recovered (NaN without a gap).
        cpt: ``{percent: smallest large share reaching that share of the gap}`` (NaN without a gap).
        note: empty, or why APGR/CPT are undefined.
    """

    small_accuracy: float
    large_accuracy: float
    auc: float
    oracle_auc: float
    apgr: float
    cpt: Mapping[float, float]
    note: str


def curve_metrics(scores: npt.ArrayLike, correct: npt.ArrayLike,
                  cpt_levels: Sequence[float] = (50.0, 80.0)) -> CurveMetrics:
    """AUC, APGR and CPT of a two-tier score, with the oracle AUC for reference."""
    curve = share_curve(scores, correct)
    small, large = float(curve.accuracy[0]), float(curve.accuracy[-1])
    oracle = oracle_curve(correct)
    note = ""
    if large - small <= _GAP_EPS:
        note = (f"no quality gap: the large tier ({large:.4f}) is not more accurate than the small one "
                f"({small:.4f}), so APGR and CPT are undefined (NaN)")
    return CurveMetrics(small, large, auc(curve.share, curve.accuracy), auc(oracle.share, oracle.accuracy),
                        apgr(curve.share, curve.accuracy),
                        {float(p): cpt(curve.share, curve.accuracy, p) for p in cpt_levels}, note)


@dataclass(frozen=True)
class Interval:
    """A point estimate with a bootstrap percentile interval (NaN bounds when every replicate was NaN)."""

    estimate: float
    low: float
    high: float


def bootstrap_ci(scores: npt.ArrayLike, correct: npt.ArrayLike, *, n_boot: int = 1000, level: float = 0.95,
                 seed: int = 0, cpt_levels: Sequence[float] = (50.0, 80.0)) -> dict[str, Interval]:
    """Seeded percentile-bootstrap intervals for AUC, APGR and CPT of a two-tier score.

    Examples are resampled with replacement; each replicate reuses one sort of the scores through
    multiplicity weights ``(B, n)``, so the cost is O(n_boot * n).

    Returns:
        ``{"auc": ..., "apgr": ..., "cpt50": ..., "cpt80": ...}`` (CPT keys as ``f"cpt{percent:g}"``).
        Replicates with no gap give NaN and are left out of the APGR/CPT percentiles.
    """
    if not isinstance(n_boot, int) or n_boot < 1 or not 0.0 < level < 1.0:
        raise InvalidRequestError(f"need n_boot >= 1 and 0 < level < 1, got {n_boot!r}, {level!r}")
    point = curve_metrics(scores, correct, cpt_levels)
    s, c, _ = check_data(scores, correct)
    n = len(s)
    order = np.argsort(s[:, 0], kind="stable")
    sv, c0, c1 = s[order, 0], c[order, 0].astype(np.float64), c[order, 1].astype(np.float64)
    ends = np.flatnonzero(np.r_[sv[1:] != sv[:-1], True])
    rng = np.random.default_rng(seed)
    reps: dict[str, list[FloatArray]] = {"auc": [], "apgr": [], **{f"cpt{p:g}": [] for p in cpt_levels}}
    chunk = max(1, 4_000_000 // n)
    for a in range(0, n_boot, chunk):
        b = min(chunk, n_boot - a)
        idx = rng.integers(0, n, size=(b, n)) + n * np.arange(b)[:, None]
        w = np.bincount(idx.ravel(), minlength=b * n).reshape(b, n)[:, order].astype(np.float64)
        small, large = w @ c0 / n, w @ c1 / n
        share = np.hstack([np.ones((b, 1)), 1.0 - np.cumsum(w, 1)[:, ends] / n])
        acc = np.hstack([large[:, None],
                         (np.cumsum(w * c0, 1)[:, ends] + (large * n)[:, None] - np.cumsum(w * c1, 1)[:, ends]) / n])
        area = np.sum((share[:, :-1] - share[:, 1:]) * (acc[:, :-1] + acc[:, 1:]) / 2.0, axis=1)
        gap = large - small
        has_gap = gap > _GAP_EPS
        reps["auc"].append(area)
        reps["apgr"].append(np.where(has_gap, (area - small) / np.where(has_gap, gap, 1.0), np.nan))
        for p in cpt_levels:
            hit = acc >= (small + p / 100.0 * gap)[:, None] - 1e-12
            first = np.where(hit, share, np.inf).min(axis=1)
            reps[f"cpt{p:g}"].append(np.where(has_gap & np.isfinite(first), first, np.nan))
    estimates = {"auc": point.auc, "apgr": point.apgr, **{f"cpt{p:g}": point.cpt[float(p)] for p in cpt_levels}}
    out = {}
    q = [50.0 * (1.0 - level), 50.0 * (1.0 + level)]
    for name, parts in reps.items():
        vals = np.concatenate(parts)
        lo, hi = np.nanpercentile(vals, q) if np.isfinite(vals).any() else (np.nan, np.nan)
        out[name] = Interval(float(estimates[name]), float(lo), float(hi))
    return out
