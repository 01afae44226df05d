"""Families of candidate thresholds for a certified quality target, and the testing sequence each gives.

A quality fit (:func:`calibration.fit.fit_quality`) certifies candidates one after the other by fixed-sequence
testing (:mod:`calibration.certify`), so it needs candidates in an order fixed before the data that tests
them. Three families provide that:

- ``"common"``: one threshold ``lam`` for every stage. Candidates run from ``lam = -inf`` (always the last
  tier) upward through every distinct running-minimum score (:func:`calibration.candidates.common_sweep`),
  all calibration examples certify. *Why the guarantee holds although the candidates are data values:* this
  is fixed-sequence testing over the continuum of ``lam``, a family and an order fixed before any data: the
  counts are constant between consecutive candidates, so the first failure over the continuum is the same as
  over the table, and the accepted candidates lie in the accepted region. For two tiers this family is every
  threshold, and it is what ``"auto"`` uses.
- ``"per_stage"``: every stage its own threshold. The calibration examples are split at random (seeded,
  independent of the data) into a *fix* part and a *certify* part. On the fix part, the family is a set of
  rays in per-stage quantile space (:func:`ray_candidates`): stage j accepts the share ``min(1, r_j a)`` of
  the fix part's stage-j scores, ``r_j`` in {0, 1/8, 1/4, 1/2, 1} (0: the stage is skipped), the step ``a``
  fine enough to move one fix-part order statistic at a time. ``order`` then picks the testing sequence on
  the fix part (default :func:`predicted_order`: the ray whose fixed-sequence test, replayed on the fix
  part's rates at the certify part's size, ends cheapest), and the certify part tests it.
  *Proof sketch:* conditional on the fix part, the sequence is a fixed list of threshold vectors (it may
  depend on the target and on delta, both fixed in advance) and the certify part is an i.i.d. sample
  independent of it, so the fixed-sequence argument of :mod:`calibration.certify` gives
  ``P(some accepted candidate has loss > eps | fix part) <= delta``; averaging over the fix part gives the
  same unconditionally. Choosing per-stage thresholds on the *same* data that certifies them would void this
  (the candidates would depend on the test data): the split is what pays for the freedom.

- ``"top_down"``: every stage its own threshold along one path fixed before any data, all examples certify.
  From always-last, the top stage (tier N-1, answering in front of tier N) opens first: its threshold runs
  from ``-inf`` through every distinct score of that stage on the data to ``+inf`` (tier N-1 answers
  everything), the stages below it skipped (``-inf``). Then stage N-2 opens the same way in front of tier N-1,
  the stages above it at ``+inf``, and so on down to the first stage (:func:`top_down_candidates`). Each step
  moves answers one tier down, the most accurate cheaper tier first, and no candidate calls a tier whose answer
  is never used. *Why the guarantee holds:* the path (a function of N alone) and its order are fixed before
  the data, and along each segment the counts are constant between consecutive data values, so the
  continuum argument of ``"common"`` applies segment by segment. The family contains the top pair's whole
  sweep (stage N-1 with every lower tier skipped, on the same examples at the same level), so its fit never
  costs more on the calibration data than that pair's; it holds no mixtures in which two stages answer part of
  the traffic each (the per-stage family does, at the price of the split).

For N >= 3 tiers ``"auto"`` uses ``"top_down"``: lower tiers whose uncertainty scores live on different scales
(SmolLM2's ``margin_first`` near 0.95, Qwen-0.5B's spread over [0, 1]) cannot share one threshold, and a stage
whose threshold is ``-inf`` is skipped at request time. On the evaluation's three-tier chains it cost what the
best pair costs in every setup and less than the per-stage family (whose sequence loses a quarter of the
examples to the split) in 5 of 12 (``eval/RESULTS.md`` section 3c); on synthetic populations where two lower
stages should each answer part of the traffic, per-stage is cheaper.

The seam: the loss (:class:`calibration.certify.LossIndicators`) and the choice of sequence within the
per-stage family (``order``: :class:`FixPart` -> candidate indices) are passed in, so another loss or another
ordering plugs in without touching the split or the certification.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import numpy as np
import numpy.typing as npt

from calibration.candidates import Candidates, common_sweep, cost_axis, evaluate
from calibration.certify import Bound, LossIndicators, accuracy_loss, fixed_sequence, upper_bounds
from calibration.metrics import FloatArray, IntArray, check_data
from cascade.curve import check_fraction
from cascade.errors import InvalidRequestError

__all__ = [
    "CandidateSequence",
    "Family",
    "FixPart",
    "Order",
    "candidate_sequence",
    "predicted_order",
    "ray_candidates",
    "split_indices",
    "top_down_candidates",
]

Family = Literal["auto", "common", "per_stage", "top_down"]
_RATIOS = (1.0, 0.5, 0.25, 0.125, 0.0)


@dataclass(frozen=True, eq=False)
class FixPart:
    """What the fix part knows when the per-stage testing sequence is chosen.

    Attributes:
        cand: every candidate of the family, evaluated on the fix part; row 0 is always-last (every stage
            ``-inf``).
        path: ``(P,)`` the ray each candidate lies on (-1 for row 0); a ray's candidates are contiguous, in step
            order (each accepts at least as much as the one before at every stage).
        eps: the target.
        delta: the level each candidate will be tested at.
        n_cert: the number of examples that will certify.
        bound: the upper bound that will be used.
    """

    cand: Candidates
    path: IntArray
    eps: float
    delta: float
    n_cert: int
    bound: Bound


#: fix part -> indices of the testing sequence (index 0 of the result must be row 0, always-last).
Order = Callable[[FixPart], IntArray]


@dataclass(frozen=True, eq=False)
class CandidateSequence:
    """Candidates in testing order, evaluated on the examples that certify them.

    Attributes:
        cert: the candidates in order (row 0: every stage ``-inf``, always the last tier), evaluated on the
            certification examples.
        family: ``"common"`` or ``"per_stage"``.
        why: one sentence: why this family (and, per-stage, the split).
        fix_index: indices of the examples that fixed the sequence (empty for ``"common"``).
        cert_index: indices of the examples that certify it.
    """

    cert: Candidates
    family: str
    why: str
    fix_index: IntArray
    cert_index: IntArray


def ray_candidates(scores: npt.ArrayLike) -> tuple[FloatArray, IntArray]:
    """The per-stage family on the fix part's scores: always-last, then every ray's steps.

    Ray ``r`` (one ratio per stage, the largest 1) at step ``a = k / m`` (m fix examples, k = 1, 2, ... until
    every stage with ``r_j > 0`` accepts everything) gives stage j the threshold at quantile level
    ``min(1, r_j a)`` of its fix-part scores (``+inf`` at level 1, ``-inf`` where ``r_j = 0``: skipped).

    Args:
        scores: ``(m, S)`` fix-part scores of the S stages.

    Returns:
        ``(thresholds (P, S), path (P,))``: row 0 every stage ``-inf`` (path -1); consecutive repeats dropped.
    """
    s = np.asarray(scores, dtype=np.float64)
    m, stages = s.shape
    rows: list[FloatArray] = [np.full((1, stages), -np.inf)]
    paths: list[IntArray] = [np.array([-1], dtype=np.int64)]
    rays = [r for r in itertools.product(_RATIOS, repeat=stages) if max(r) == 1.0]
    for p, ratio in enumerate(rays):
        r = np.asarray(ratio)
        steps = np.arange(1, int(np.ceil(m / r[r > 0].min())) + 1) / m
        q = np.minimum(1.0, np.outer(steps, r))
        t = np.empty_like(q)
        for j in range(stages):
            t[:, j] = np.quantile(s[:, j], np.clip(q[:, j], 0.0, 1.0), method="inverted_cdf")
        t = np.where(q >= 1.0, np.inf, np.where(r == 0.0, -np.inf, t))
        keep = np.r_[True, (t[1:] != t[:-1]).any(axis=1)]
        rows.append(t[keep])
        paths.append(np.full(int(keep.sum()), p, dtype=np.int64))
    return np.vstack(rows), np.concatenate(paths)


def top_down_candidates(scores: npt.ArrayLike) -> FloatArray:
    """The top-down path on the data's scores: always-last, then each stage from the top opening in turn.

    Args:
        scores: ``(n, S)`` scores of the S stages.

    Returns:
        ``(P, S)`` thresholds: row 0 every stage ``-inf``; then, for stage j = S-1 down to 0, stage j at each of its
        distinct scores ascending and then ``+inf``, the stages below ``-inf`` and the stages above ``+inf``.
    """
    s = np.asarray(scores, dtype=np.float64)
    stages = s.shape[1]
    rows: list[FloatArray] = [np.full((1, stages), -np.inf)]
    for j in reversed(range(stages)):
        lam = np.r_[np.unique(s[:, j]), np.inf]
        seg = np.empty((lam.size, stages))
        seg[:, :j] = -np.inf
        seg[:, j] = lam
        seg[:, j + 1:] = np.inf
        rows.append(seg)
    return np.vstack(rows)


def predicted_order(fix: FixPart) -> IntArray:
    """The default sequence: the ray that, replayed on the fix part, certifies the cheapest candidate.

    For each ray, its steps' harm and help counts on the fix part are scaled to the certify part's size
    (``n_cert / m``) and run through the same fixed-sequence test (target, level, bound) the certify part will
    face; the ray whose accepted prefix holds the cheapest candidate (fix-part cost) wins, ties to the earlier
    ray (all ratios 1 first). The sequence is always-last followed by that ray's steps.
    """
    c = fix.cand
    x = cost_axis(c)
    scale = fix.n_cert / c.n
    upper = upper_bounds(np.rint(c.harmed * scale), np.rint(c.helped * scale), fix.n_cert, fix.delta, fix.bound)
    best, best_cost = -1, np.inf
    for p in np.unique(fix.path[fix.path >= 0]):
        idx = np.r_[0, np.flatnonzero(fix.path == p)]
        stop = fixed_sequence(upper[idx], fix.eps)
        cost = float(x[idx[: stop + 1]].min())
        if cost < best_cost - 1e-12:
            best, best_cost = int(p), cost
    return np.asarray(np.r_[0, np.flatnonzero(fix.path == best)], dtype=np.int64)


def split_indices(n: int, fix_share: float, seed: int) -> tuple[IntArray, IntArray]:
    """A seeded random split of ``range(n)``: ``round(fix_share * n)`` fix indices (at least one on each side),
    the rest certify; both sorted."""
    k = min(max(round(fix_share * n), 1), n - 1)
    perm = np.random.default_rng(seed).permutation(n)
    return np.sort(perm[:k]).astype(np.int64), np.sort(perm[k:]).astype(np.int64)


def _choose(family: Family, tiers: int) -> tuple[str, str]:
    if family not in ("auto", "common", "per_stage", "top_down"):
        raise InvalidRequestError(f"family must be 'auto', 'common', 'per_stage' or 'top_down', got {family!r}")
    if family != "auto":
        return family, "asked for"
    if tiers == 2:
        return "common", "two tiers: every threshold is a candidate and all examples certify"
    return "top_down", (f"{tiers} tiers: each stage its own threshold (the stages' uncertainty scores need not "
                        "share a scale), opened one stage at a time from the top along a path fixed before the "
                        "data, all examples certify")


def candidate_sequence(scores: npt.ArrayLike, correct: npt.ArrayLike, costs: npt.ArrayLike | None = None, *,
                     eps: float, delta: float, bound: Bound = "discordant", family: Family = "auto",
                     loss: LossIndicators | None = None, fix_share: float = 0.25, seed: int = 0,
                     order: Order | None = None) -> CandidateSequence:
    """The candidates a quality fit tests for target ``eps`` at level ``delta``, in order, evaluated on the
    examples that certify them.

    Args:
        scores: ``(n, N-1)`` or ``(n,)``; correct: ``(n, N)``; costs: ``(n, N)``, ``(N,)`` or None.
        eps: the target (the per-stage sequence may depend on it).
        delta: the level each candidate will be tested at.
        bound: the upper bound that will be used.
        family: ``"auto"``, ``"common"``, ``"per_stage"`` or ``"top_down"`` (module docstring).
        loss: what counts as a loss (default: the labelled accuracy loss).
        fix_share: per-stage family: the share of examples that fixes the sequence, in (0, 1).
        seed: per-stage family: the seed of the split.
        order: per-stage family: :class:`FixPart` -> testing sequence (default :func:`predicted_order`).
    """
    s, c, k = check_data(scores, correct, costs)
    ind = accuracy_loss(c) if loss is None else loss
    n, tiers = c.shape
    chosen, why = _choose(family, tiers)
    everything = np.arange(n, dtype=np.int64)
    if chosen == "common":
        return CandidateSequence(common_sweep(s, c, k, loss=ind), "common", why, everything[:0], everything)
    if chosen == "top_down":
        top = evaluate(top_down_candidates(s), s, c, k, loss=ind)
        return CandidateSequence(top, "top_down", why, everything[:0], everything)
    share = check_fraction("fix_share", fix_share)
    if not 0.0 < share < 1.0 or n < 2:
        raise InvalidRequestError("the per-stage family needs 0 < fix_share < 1 and at least two examples")
    fix, cert = split_indices(n, share, seed)
    grid, path = ray_candidates(s[fix])
    on_fix = evaluate(grid, s[fix], c[fix], k[fix], loss=ind.subset(fix))
    seq = np.asarray((order or predicted_order)(FixPart(on_fix, path, eps, delta, len(cert), bound)), dtype=np.int64)
    if not seq.size or seq[0] != 0:
        raise InvalidRequestError("a testing sequence must start with the always-last candidate (row 0)")
    on_cert = evaluate(grid[seq], s[cert], c[cert], k[cert], loss=ind.subset(cert))
    return CandidateSequence(on_cert, "per_stage", why + f" ({len(fix)} fix, {len(cert)} certify)", fix, cert)
