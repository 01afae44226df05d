"""Calibrating the ``combined`` measure: weights from one part of the data, thresholds certified on the other.

:func:`fit_quality_combined` splits the calibration examples at random (seeded, independent of the data) into
a *fix* part (share ``fix_share``) and a *certify* part. On the fix part, each lower tier j gets a
:class:`cascade.combined.Combination` of its measures (the choice measures for constrained answers, else the
free ones) and of its frequent answers, fitted to predict "tier j's answer is wrong".
The combinations then score the certify part, and :func:`calibration.fit.fit_quality` certifies thresholds on
those scores alone.

*Why the guarantee stays honest:* conditional on the fix part, the combinations are fixed functions, chosen
before the certify part is looked at, and the certify part is an i.i.d. sample independent of them. The
certify examples' combined scores are therefore i.i.d. draws of a fixed measure, which is exactly the
situation :func:`calibration.fit.fit_quality` certifies, so ``P(loss > eps | fix part) <= delta``; averaging
over the fix part gives the same unconditionally. The weights are *not* corrected for (no Bonferroni): they
are never chosen on the data that certifies. Fitting the weights on all of the data and certifying on the
same data would void this (the weights would be tuned to the very sample that tests them).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from calibration.certify import Bound, Claim
from calibration.family import Family, split_indices
from calibration.fit import FitResult, fit_quality
from cascade.combined import COMBINED, Combination, default_measures, fit_combination
from cascade.curve import check_fraction
from cascade.errors import InvalidRequestError
from cascade.types import MEASURES

if TYPE_CHECKING:
    from calibration.inputs import Arrays, Inputs

__all__ = ["combine_arrays", "combined_columns", "fit_quality_combined"]


def combined_columns(columns: Mapping[str, npt.ArrayLike], stage: int) -> dict[str, npt.NDArray[np.float64]]:
    """Stage ``stage``'s combined measures (:func:`cascade.combined.default_measures`) from ``(n, N-1)`` (or
    ``(n,)``) measure columns."""
    out = {}
    for m in default_measures(columns):
        v = np.asarray(columns[m], dtype=np.float64)
        out[m] = v.reshape(len(v), -1)[:, stage]
    if not out:
        raise InvalidRequestError(f"the combined measure needs at least one of {list(MEASURES)}")
    return out


def _stage_answers(answers: npt.ArrayLike | None, stage: int, rows: npt.ArrayLike | None = None
                   ) -> list[str] | None:
    if answers is None:
        return None
    a = np.asarray(answers, dtype=object)
    col = a.reshape(len(a), -1)[:, stage]
    return [str(x) for x in (col if rows is None else col[np.asarray(rows)])]


def _fit_stages(columns: Mapping[str, npt.ArrayLike], correct: npt.NDArray[np.bool_], rows: npt.NDArray[np.intp],
                l2: float, answers: npt.ArrayLike | None) -> tuple[Combination, ...]:
    """One combination per lower tier, fitted on ``rows`` to predict that the tier's answer is wrong."""
    return tuple(fit_combination({m: v[rows] for m, v in combined_columns(columns, j).items()}, ~correct[rows, j],
                                 l2=l2, answers=_stage_answers(answers, j, rows))
                 for j in range(correct.shape[1] - 1))


def _stage_scores(combos: tuple[Combination, ...], columns: Mapping[str, npt.ArrayLike],
                  answers: npt.ArrayLike | None, rows: npt.ArrayLike | None = None) -> npt.NDArray[np.float64]:
    """``(n, N-1)`` combined scores of every lower tier (on ``rows``, default all)."""
    out = []
    for j, c in enumerate(combos):
        cols = combined_columns(columns, j)
        if rows is not None:
            cols = {m: v[np.asarray(rows)] for m, v in cols.items()}
        out.append(c.scores(cols, _stage_answers(answers, j, rows)))
    return np.stack(out, axis=1)


def fit_quality_combined(columns: Mapping[str, npt.ArrayLike], correct: npt.ArrayLike,
                         costs: npt.ArrayLike | None = None, *, max_quality_loss: float, delta: float = 0.1,
                         bound: Bound | None = None, claim: Claim = "accuracy", family: Family = "auto",
                         fix_share: float = 0.5, seed: int = 0, l2: float = 1.0,
                         answers: npt.ArrayLike | None = None) -> tuple[tuple[Combination, ...], FitResult]:
    """Fit one combination per lower tier on the fix part; certify thresholds on the certify part.

    Args:
        columns: measure name -> ``(n, N-1)`` (or ``(n,)`` for two tiers) scores of the same examples.
        correct: ``(n, N)`` bool, each tier's answer right (agreement with the last tier for the
            disagreement claim).
        costs, max_quality_loss, delta, bound, claim, family, seed: as in :func:`calibration.fit.fit_quality`
            (applied to the certify part; ``seed`` also draws the split).
        fix_share: share of the examples that fit the weights, in (0, 1).
        l2: ridge penalty of :func:`cascade.combined.fit_combination`.
        answers: ``(n, N-1)`` (or ``(n,)``) the lower tiers' answer texts, for the answer offsets (None: none).

    Returns:
        ``(combinations, fit)``: one combination per lower tier and the certified fit; ``fit.stats`` are on
        the certify part, ``fit.params`` adds ``n_fix`` and ``n_certify``.
    """
    ok = np.asarray(correct, dtype=bool)
    if ok.ndim != 2 or ok.shape[1] < 2:
        raise InvalidRequestError("correct must be (n, N) with N >= 2 tiers")
    n = ok.shape[0]
    share = check_fraction("fix_share", fix_share, 0.0, 1.0)
    if n < 4:
        raise InvalidRequestError(f"the combined measure needs at least 4 calibration examples, got {n}")
    fix, cert = split_indices(n, share, seed)
    combos = _fit_stages(columns, ok, fix, l2, answers)
    scores = _stage_scores(combos, columns, answers, cert)
    cost_arr = None
    if costs is not None:
        cost_arr = np.asarray(costs, dtype=np.float64)
        cost_arr = cost_arr[cert] if cost_arr.ndim == 2 else cost_arr
    fit = fit_quality(scores, ok[cert], cost_arr, max_quality_loss=max_quality_loss, delta=delta, bound=bound,
                      claim=claim, family=family, seed=seed)
    msg = (f"{fit.message} The combined measure's weights were fitted on {len(fix)} of the {n} calibration "
           f"examples and the thresholds certified on the other {len(cert)}, so the weights cost no confidence.")
    params = {**dict(fit.params), "n_fix": len(fix), "n_certify": len(cert)}
    return combos, FitResult(fit.thresholds, fit.method, params, fit.stats, fit.feasible, msg, fit.pareto)


def combine_arrays(arrays: Arrays, inputs: Inputs, *, seed: int = 0, fix_share: float = 0.5, l2: float = 1.0
                   ) -> tuple[tuple[Combination, ...], Arrays, Inputs, str]:
    """``cascade-calibrate --measure combined``: fit the weights on a fix part of the fit examples, and hand
    every later step (thresholds, levels, curve, report, held-out check) only the rest.

    The fit examples (``arrays`` rows ``[0, len(inputs.fit))``) are split by :func:`split_indices` (seeded);
    each lower tier's combination is fitted on the fix part to predict that the tier's fit target
    (``correct``: the labels, or agreement with the last tier for a label-free fit) fails. The returned arrays
    and inputs keep the certify part as the fit examples and every held-out example, and gain the measure
    ``"combined"`` (the other measures stay, on the same rows, for comparison). Why certifying on the rest is
    honest is in this module's docstring.

    Returns:
        ``(combinations, arrays, inputs, note)``; ``note`` says what was fitted on how many examples.
    """
    from calibration.generation_cache import TierArrays

    n_fit = len(inputs.fit)
    if n_fit < 4:
        raise InvalidRequestError(f"the combined measure needs at least 4 fit examples, got {n_fit}")
    fix, cert = split_indices(n_fit, check_fraction("fix_share", fix_share, 0.0, 1.0), seed)
    used = default_measures(arrays.by_measure)
    free = {m: arrays.by_measure[m] for m in used}
    if not free:
        raise InvalidRequestError(f"the combined measure needs answers with measures {list(MEASURES)}; "
                                  f"these tiers gave {sorted(arrays.by_measure)}")
    first = next(iter(free.values()))
    columns = {m: arr.scores for m, arr in free.items()}
    combos = _fit_stages(columns, first.correct, fix, l2, arrays.answers)
    keep = np.r_[cert, np.arange(n_fit, len(first.scores))]
    scores = _stage_scores(combos, columns, arrays.answers)
    by_measure = {m: TierArrays(a.scores[keep], a.correct[keep], a.costs[keep], m) for m, a in free.items()}
    by_measure[COMBINED] = TierArrays(scores[keep], first.correct[keep], first.costs[keep], COMBINED)
    out = replace(arrays, by_measure=by_measure, labels=arrays.labels[keep], labelled=arrays.labelled[keep],
                  agreement=None if arrays.agreement is None else arrays.agreement[keep], combination=combos,
                  answers=None if arrays.answers is None else arrays.answers[keep])
    offsets = sum(len(c.answers) for c in combos)
    note = (f"combined measure: weights of {len(free)} measures and {offsets} answer offset(s) fitted on "
            f"{len(fix)} of the {n_fit} fit examples "
            f"(seed {seed}); thresholds fitted and certified on the other {len(cert)}")
    return combos, out, replace(inputs, fit=[inputs.fit[i] for i in cert]), note
