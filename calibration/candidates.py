"""Tables of candidate thresholds evaluated on held-out data (arrays as in :mod:`calibration.metrics`).

- :func:`common_sweep` evaluates every common threshold exactly (one threshold for every stage; for two
  tiers, every threshold).
- :func:`evaluate` evaluates any given list of per-stage threshold vectors; :func:`grid_search` the joint
  grid over per-stage score quantiles (:func:`stage_axes`).
- :func:`pareto_index` finds the (cost, accuracy) Pareto front of a table.

Costs follow :func:`calibration.metrics.reach_costs`: a tier whose threshold is ``-inf`` is skipped, so the
candidate "every stage ``-inf``" costs exactly what always using the last tier costs. Harm and help counts
come from :class:`calibration.certify.LossIndicators` (labelled accuracy loss unless another is given).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from calibration.certify import LossIndicators, accuracy_loss
from calibration.metrics import (
    CascadeStats,
    FloatArray,
    IntArray,
    answering_tier,
    check_data,
    pareto_front,
)
from cascade.errors import InvalidRequestError

__all__ = ["Candidates", "common_sweep", "cost_axis", "evaluate", "grid_search", "pareto_index", "stage_axes"]


@dataclass(frozen=True, eq=False)
class Candidates:
    """A table of P candidate threshold combinations evaluated on the same data.

    Attributes:
        thresholds: ``(P, N-1)`` thresholds of each candidate.
        accuracy: ``(P,)`` accuracy.
        mean_cost: ``(P,)`` mean cost per request.
        counts: ``(P, N)`` int, number of requests answered by each tier.
        harmed: ``(P,)`` int, examples whose kept answer counts as a loss (labelled: the cascade is wrong and
            the last tier right).
        helped: ``(P,)`` int, examples whose kept answer counts as a gain (labelled: right where the last tier
            is wrong).
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

    @property
    def loss(self) -> FloatArray:
        """``(P,)`` measured loss against always using the last tier, ``(harmed - helped) / n``."""
        return (self.harmed - self.helped) / self.n

    def stats(self, i: int) -> CascadeStats:
        """The summary of candidate ``i``."""
        return CascadeStats.from_counts(self.n, self.accuracy[i], self.mean_cost[i], self.counts[i])

    def subset(self, idx: npt.ArrayLike) -> Candidates:
        """The candidates at indices ``idx``, in that order."""
        i = np.asarray(idx, dtype=np.int64)
        return Candidates(self.thresholds[i], self.accuracy[i], self.mean_cost[i], self.counts[i],
                          self.harmed[i], self.helped[i], self.n)


def _loss(loss: LossIndicators | None, c: npt.NDArray[np.bool_]) -> LossIndicators:
    if loss is None:
        return accuracy_loss(c)
    if loss.harm.shape != c.shape:
        raise InvalidRequestError(f"loss indicators of shape {loss.harm.shape} do not match the data {c.shape}")
    return loss


def common_sweep(scores: npt.ArrayLike, correct: npt.ArrayLike, costs: npt.ArrayLike | None = None, *,
                 loss: LossIndicators | None = None) -> Candidates:
    """Evaluate every distinct common threshold ``lam`` (the same for all stages) in one sorted pass.

    Example i is answered by the first tier j with ``min(scores[i, :j+1]) <= lam``, so its contribution
    changes only at those running minima: each is an event carrying the change of the example's values.
    Candidates are ``-inf`` (escalate everything: only the last tier is called) followed by every distinct
    running minimum, ascending, so the last-tier share never increases along the table; for two tiers this is
    every distinct score.

    Returns:
        :class:`Candidates` with ``P = 1 + number of distinct running-minimum values``; O(n N log(n N)).
    """
    s, c, k = check_data(scores, correct, costs)
    ind = _loss(loss, c)
    n, tiers = c.shape
    feats = np.concatenate(
        [np.stack([c, np.cumsum(k, axis=1), ind.harm, ind.help], axis=2),
         np.broadcast_to(np.eye(tiers), (n, tiers, tiers))], axis=2,
    ).astype(np.float64)  # (n, N, F): value of each feature if tier j answers example i
    delta = (feats[:, :-1, :] - feats[:, 1:, :]).reshape(-1, feats.shape[2])
    events = np.minimum.accumulate(s, axis=1).ravel()
    order = np.argsort(events, kind="stable")
    events = events[order]
    ends = np.flatnonzero(np.r_[events[1:] != events[:-1], True])
    sums = feats[:, -1, :].sum(axis=0) + np.vstack([np.zeros(feats.shape[2]), np.cumsum(delta[order], 0)[ends]])
    sums[0, 1] = k[:, -1].sum()  # lam = -inf skips every lower tier
    lam = np.r_[-np.inf, events[ends]]
    whole = np.rint(sums).astype(np.int64)
    return Candidates(np.repeat(lam[:, None], tiers - 1, axis=1), sums[:, 0] / n, sums[:, 1] / n,
                      whole[:, 4:], whole[:, 2], whole[:, 3], n)


def stage_axes(scores: npt.ArrayLike, per_stage: int) -> list[FloatArray]:
    """Each stage's candidate thresholds: ``-inf`` plus up to ``per_stage - 1`` of its own score values.

    The values are the stage's scores at evenly spaced quantile levels (all distinct values when there are
    fewer), ascending.
    """
    s = np.asarray(scores, dtype=np.float64)
    axes = []
    for j in range(s.shape[1]):
        u = np.unique(s[:, j])
        if u.size > per_stage - 1:
            u = np.unique(np.quantile(s[:, j], np.linspace(0.0, 1.0, per_stage - 1), method="inverted_cdf"))
        axes.append(np.r_[-np.inf, u])
    return axes


def evaluate(thresholds: npt.ArrayLike, scores: npt.ArrayLike, correct: npt.ArrayLike,
             costs: npt.ArrayLike | None = None, *, loss: LossIndicators | None = None) -> Candidates:
    """Evaluate P given threshold vectors ``(P, N-1)`` on the data (chunked, O(P n N))."""
    s, c, k = check_data(scores, correct, costs)
    ind = _loss(loss, c)
    grid = np.asarray(thresholds, dtype=np.float64).reshape(-1, s.shape[1])
    n, tiers = c.shape
    rows, cum_cost = np.arange(n), np.cumsum(k, axis=1)
    p = len(grid)
    acc, cost = np.empty(p), np.empty(p)
    counts = np.empty((p, tiers), dtype=np.int64)
    harmed, helped = np.empty(p, dtype=np.int64), np.empty(p, dtype=np.int64)
    chunk = max(1, 2_000_000 // (n * tiers))
    for a in range(0, p, chunk):
        t = grid[a:a + chunk]
        tier = answering_tier(t, s)  # (g, n)
        g = len(tier)
        acc[a:a + g] = c[rows, tier].mean(axis=1)
        spent = cum_cost[rows, tier]
        for j in np.flatnonzero(np.isneginf(t).any(axis=0)):  # skipped stages cost nothing
            spent -= np.isneginf(t[:, j])[:, None] * (tier > j) * k[:, j]
        cost[a:a + g] = spent.mean(axis=1)
        counts[a:a + g] = np.bincount((tier + tiers * np.arange(g)[:, None]).ravel(),
                                      minlength=g * tiers).reshape(g, tiers)
        harmed[a:a + g] = ind.harm[rows, tier].sum(axis=1)
        helped[a:a + g] = ind.help[rows, tier].sum(axis=1)
    return Candidates(grid, acc, cost, counts, harmed, helped, n)


def grid_search(scores: npt.ArrayLike, correct: npt.ArrayLike, costs: npt.ArrayLike | None = None, *,
                max_grid: int = 4096, loss: LossIndicators | None = None) -> Candidates:
    """Evaluate a grid of per-stage threshold combinations (joint search for N tiers).

    Each stage gets ``-inf`` plus up to ``floor(max_grid ** (1/(N-1))) - 1`` of its own score values at evenly
    spaced quantile levels (:func:`stage_axes`); the grid is their Cartesian product.

    Returns:
        :class:`Candidates` with ``P <= max(max_grid, 2 ** (N-1))`` rows.
    """
    s, c, k = check_data(scores, correct, costs)
    if not isinstance(max_grid, int) or max_grid < 2:
        raise InvalidRequestError(f"max_grid must be an integer >= 2, got {max_grid!r}")
    stages = s.shape[1]
    per = max(2, int(max_grid ** (1.0 / stages) + 1e-9))
    axes = stage_axes(s, per)
    grid = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1).reshape(-1, stages)
    return evaluate(grid, s, c, k, loss=loss)


def cost_axis(cand: Candidates) -> FloatArray:
    """What "cheaper" means: the mean cost, or the last-tier share when nothing is priced (all costs 0)."""
    return cand.mean_cost if bool(np.any(cand.mean_cost != 0)) else cand.large_share


def pareto_index(cand: Candidates) -> IntArray:
    """Indices of the candidates on the (cost, accuracy) Pareto front, cost ascending.

    The cost is the mean cost, or the last-tier share when nothing is priced; among equal points the one with
    the smaller last-tier share is kept.
    """
    x = cost_axis(cand)
    order = np.lexsort((cand.large_share, -cand.accuracy, x))  # equal points: smallest share first (kept)
    return np.asarray(order[pareto_front(x[order], cand.accuracy[order])], dtype=np.int64)
