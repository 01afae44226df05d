"""Escalation signals of one setup (task x model pair), all measured on the same generations.

Signals are scores per test example, higher = escalate first: every uncertainty measure of the engine,
``random`` (seeded uniform scores), ``oracle`` (small-wrong/large-right first, small-right/large-wrong
last) and the trained routers of :mod:`eval.routers` (fitted on the calibration split only). The measure
the cascade would deploy (``best measure``) is chosen by APGR on the calibration split, never on test.
``combined`` (:mod:`cascade.combined`) is fitted as ``cascade-calibrate --measure combined`` fits it: on a
seeded half of the calibration split (the other half would certify the thresholds), then scored on test.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from calibration.metrics import apgr, auc, bootstrap_ci, curve_metrics, share_curve
from cascade.types import MEASURES, Generation

__all__ = ["SetupData", "choose_measure", "combined_scores", "evaluate_setup", "measures_of", "oracle_scores",
           "paired_apgr_diff", "router_scores", "setup_arrays"]

FloatArray = npt.NDArray[np.float64]
BoolArray = npt.NDArray[np.bool_]
Features = Callable[[Sequence[str]], FloatArray]
ROUTERS = ("router-logreg-minilm", "router-mlp-minilm", "router-logreg-bow")


@dataclass
class SetupData:
    """Arrays of one setup's split.

    Attributes:
        correct: ``(n, 2)`` bool, small and large answer right.
        scores: measure name -> ``(n,)`` small-model uncertainty (NaN replaced by the split's max + 1), for
            every measure the small model reported (the choice measures only for constrained answers).
        texts: the n raw inputs (router features).
        tokens: ``(n, 2)`` prompt + completion tokens of the small and large call.
        answers: the small model's n answers (the combined measure's answer offsets); empty: unknown.
    """

    correct: BoolArray
    scores: dict[str, FloatArray]
    texts: list[str]
    tokens: npt.NDArray[np.int64] = field(default_factory=lambda: np.zeros((0, 2), dtype=np.int64))
    answers: list[str] = field(default_factory=list)


def setup_arrays(examples: Sequence[Mapping[str, Any]], small: Sequence[Generation], large: Sequence[Generation],
                 scorer: Callable[[str, Mapping[str, Any]], bool]) -> SetupData:
    """Score both tiers' answers and collect every measure of the small tier."""
    correct = np.array([[scorer(s.text, ex), scorer(g.text, ex)] for ex, s, g in zip(examples, small, large)],
                       dtype=bool).reshape(-1, 2)
    scores = {}
    for m in measures_of(small):
        v = np.array([float(g.scores.get(m, math.nan)) for g in small])
        finite = np.isfinite(v)
        fill = float(v[finite].max()) + 1.0 if finite.any() else 0.0
        scores[m] = np.where(finite, v, fill)
    tokens = np.array([[s.prompt_tokens + s.completion_tokens, g.prompt_tokens + g.completion_tokens]
                       for s, g in zip(small, large)], dtype=np.int64).reshape(-1, 2)
    return SetupData(correct, scores, [str(ex.get("text", "")) for ex in examples], tokens, [g.text for g in small])


def measures_of(generations: Sequence[Generation]) -> list[str]:
    """The measures of :data:`cascade.types.MEASURES` that any of the generations reports, in that order."""
    have = {m for g in generations for m in g.scores}
    return [m for m in MEASURES if m in have]


def oracle_scores(correct: BoolArray) -> FloatArray:
    """Scores whose curve is the oracle's: fixes (small wrong, large right) first, breaks last."""
    fixes = ~correct[:, 0] & correct[:, 1]
    breaks = correct[:, 0] & ~correct[:, 1]
    return np.where(fixes, 2.0, np.where(breaks, 0.0, 1.0))


def _apgr_or_auc(scores: FloatArray, correct: BoolArray) -> float:
    cm = curve_metrics(scores, correct)
    return cm.apgr if math.isfinite(cm.apgr) else cm.auc


def choose_measure(cal: SetupData) -> tuple[str, dict[str, float]]:
    """The measure with the best APGR on the calibration split (AUC when there is no gap), and every value."""
    names = [m for m in MEASURES if m in cal.scores]
    values = {m: _apgr_or_auc(cal.scores[m], cal.correct) for m in names}
    best = max(names, key=lambda m: (values[m], -MEASURES.index(m)))
    return best, values


def combined_scores(cal: SetupData, test: SetupData, seed: int) -> tuple[FloatArray, dict[str, Any]] | None:
    """The combined measure's test scores, its weights fitted on a seeded half of the calibration split (the
    half ``cascade-calibrate --measure combined`` fits them on), and the fitted record; None without measures
    or when that half's answers are all right or all wrong. Its inputs are those of
    :func:`cascade.combined.default_measures` (the choice measures for constrained answers) and the answers."""
    from calibration.family import split_indices
    from cascade.combined import default_measures, fit_combination

    names = [m for m in default_measures(cal.scores) if m in test.scores]
    fix, _ = split_indices(len(cal.correct), 0.5, seed)
    wrong = ~cal.correct[fix, 0]
    if not names or len(fix) < 2 or wrong.all() or not wrong.any():
        return None
    answers = [cal.answers[i] for i in fix] if cal.answers else None
    combo = fit_combination({m: cal.scores[m][fix] for m in names}, wrong, measures=names, answers=answers)
    return combo.scores(test.scores, test.answers or None), {**combo.to_dict(), "n_fix": len(fix)}


def router_scores(cal: SetupData, test: SetupData, features: Mapping[str, Features], seed: int) -> tuple[
        dict[str, FloatArray], dict[str, str]]:
    """Fit every router on the calibration split; return its test scores and notes.

    Args:
        cal: calibration split (label: the small model was wrong).
        test: test split.
        features: feature name (``"minilm"``, ``"bow"``) -> ``texts -> (n, d)``; routers whose features are
            missing are skipped with a note.
        seed: seed of the MLP.
    """
    from eval.routers import LogisticRouter, MLPRouter

    y = (~cal.correct[:, 0]).astype(np.float64)
    out: dict[str, FloatArray] = {}
    notes: dict[str, str] = {}
    cache: dict[str, tuple[FloatArray, FloatArray]] = {}
    for name in ROUTERS:
        kind, feat = name.split("-")[1], name.split("-")[2]
        if feat not in features:
            notes[name] = f"skipped: no {feat} features"
            continue
        if feat not in cache:
            xs = features[feat](cal.texts + test.texts)
            cache[feat] = (xs[: len(cal.texts)], xs[len(cal.texts):])
        x_cal, x_test = cache[feat]
        if y.min() == y.max():
            out[name] = np.zeros(len(test.texts))
            notes[name] = "calibration labels are all one class: constant score (random routing)"
            continue
        model = LogisticRouter(l2=1.0) if kind == "logreg" else MLPRouter(seed=seed)
        out[name] = model.fit(x_cal, y).predict_proba(x_test)
    return out, notes


def paired_apgr_diff(a: FloatArray, b: FloatArray, correct: BoolArray, *, n_boot: int = 500,
                     seed: int = 0) -> tuple[float, float, float]:
    """APGR(a) - APGR(b) on the same examples, with a paired percentile-bootstrap 95% interval."""

    def one(idx: npt.NDArray[np.int64]) -> float:
        c = correct[idx]
        ca, cb = share_curve(a[idx], c), share_curve(b[idx], c)
        return apgr(ca.share, ca.accuracy) - apgr(cb.share, cb.accuracy)

    n = len(a)
    point = one(np.arange(n))
    rng = np.random.default_rng(seed)
    reps = np.array([one(rng.integers(0, n, n)) for _ in range(n_boot)])
    reps = reps[np.isfinite(reps)]
    if not reps.size:
        return point, math.nan, math.nan
    lo, hi = np.percentile(reps, [2.5, 97.5])
    return point, float(lo), float(hi)


def _interval(iv: Any) -> list[float]:
    return [iv.estimate, iv.low, iv.high]


def evaluate_setup(cal: SetupData, test: SetupData, features: Mapping[str, Features], *, seed: int = 0,
                   n_boot: int = 1000) -> dict[str, Any]:
    """Every signal's test metrics (with bootstrap CIs) and the verdict "uncertainty beats every router".

    Returns:
        A JSON-ready dict: ``signals`` (name -> metrics, curve), ``best_measure``, ``cal_values``,
        ``routers_notes``, ``best_router``, ``uncertainty_wins`` and ``diff`` (paired APGR difference).
    """
    best, cal_values = choose_measure(cal)
    rng = np.random.default_rng(seed)
    signals: dict[str, FloatArray] = {m: test.scores[m] for m in MEASURES if m in cal.scores and m in test.scores}
    combined = combined_scores(cal, test, seed)
    if combined is not None:
        signals["combined"] = combined[0]
    signals["random"] = rng.random(len(test.correct))
    signals["oracle"] = oracle_scores(test.correct)
    routed, notes = router_scores(cal, test, features, seed)
    signals.update(routed)
    result: dict[str, Any] = {"signals": {}, "best_measure": best, "cal_values": cal_values,
                              "router_notes": notes, "combined": None if combined is None else combined[1]}
    for name, s in signals.items():
        cm = curve_metrics(s, test.correct)
        ci = bootstrap_ci(s, test.correct, n_boot=n_boot, seed=seed)
        curve = share_curve(s, test.correct)
        result["signals"][name] = {
            "auc": _interval(ci["auc"]), "apgr": _interval(ci["apgr"]), "cpt50": _interval(ci["cpt50"]),
            "cpt80": _interval(ci["cpt80"]), "oracle_auc": cm.oracle_auc, "note": cm.note,
            "curve": {"share": curve.share.tolist(), "accuracy": curve.accuracy.tolist()},
        }
    result["small_accuracy"] = float(test.correct[:, 0].mean())
    result["large_accuracy"] = float(test.correct[:, 1].mean())
    result["cal_small_accuracy"] = float(cal.correct[:, 0].mean())
    result["cal_large_accuracy"] = float(cal.correct[:, 1].mean())
    result["n_cal"], result["n_test"] = len(cal.correct), len(test.correct)
    result["tokens_per_request"] = test.tokens.mean(axis=0).tolist() if len(test.tokens) else [0.0, 0.0]
    if routed:
        key = "apgr" if math.isfinite(result["signals"][best]["apgr"][0]) else "auc"
        best_router = max(routed, key=lambda r: result["signals"][r][key][0])
        result["best_router"] = best_router
        result["uncertainty_wins"] = bool(
            result["signals"][best][key][0] > max(result["signals"][r][key][0] for r in routed))
        if key == "apgr":
            result["diff"] = list(paired_apgr_diff(signals[best], signals[best_router], test.correct,
                                                   n_boot=min(n_boot, 500), seed=seed))
        else:
            result["diff"] = [auc(share_curve(signals[best], test.correct).share,
                                  share_curve(signals[best], test.correct).accuracy)
                              - result["signals"][best_router]["auc"][0], math.nan, math.nan]
        result["compared_on"] = key
    return result
