"""The ``combined`` measure: a fitted logistic combination of a tier's measures and of what it answered.

On free answers the first-token measures of a small model are weak where its first token is formatting
("The", "**", a space): the first step then says nothing about the label. Every other measure of the
answer is there too (means, minimum, maximum, the mean log-probability), and which of them carries the signal
differs by model and task. :class:`Combination` is a standardised logistic regression over the seven free
measures, predicting "the small tier's answer is wrong"; its score is the linear predictor (the log-odds of
being wrong), so higher = more uncertain like every other measure.

How sure a small model is tells only half of whether it is right; *what* it answered tells the other half.
On plain prompts SmolLM2 answers "negative" to almost every review, so a confident "negative" is right
about half the time and a confident "positive" almost always (``eval/RESULTS.md`` section 1c). The
combination therefore also learns one log-odds offset per frequent answer (normalised by
:func:`answer_key`; an answer not among them gets none). With constrained answers the inputs are the two
choice measures (the free measures of the chosen continuation add nothing there), otherwise the seven free
measures.

At request time it is a pure function of the measures the engine already computed for the request and of
the answer's text (:meth:`Combination.score`); a measure that is missing or not finite is replaced by its
stored ``fill`` (the fit data's maximum: treated as most uncertain). Fitting (:func:`fit_combination`) is
deterministic: Newton steps on the L2-penalised log-likelihood from zero, numpy only. Calibration fits it on
one part of the calibration data and certifies thresholds on the other (:mod:`calibration.combine`).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from cascade.errors import InvalidRequestError
from cascade.types import CHOICE_MEASURES, FREE_MEASURES, MEASURES

__all__ = ["COMBINED", "Combination", "answer_key", "default_measures", "fit_combination"]

#: The public name of the fitted combination.
COMBINED = "combined"


@dataclass(frozen=True)
class Combination:
    """Weights of a standardised logistic combination:
    ``score = bias + sum_i w_i (x_i - mean_i) / scale_i + answer_weight[answer]``.

    Attributes:
        measures: the input measure names, in weight order.
        mean, scale, fill: per measure: centring, scaling (> 0) and the value used when it is missing.
        weights: per measure weight on the standardised value.
        bias: intercept (log-odds of a wrong answer at the mean).
        answers: the answers (:func:`answer_key` form) that carry an offset of their own.
        answer_weights: the offset of each of ``answers`` (another answer: 0).
    """

    measures: tuple[str, ...]
    mean: tuple[float, ...]
    scale: tuple[float, ...]
    fill: tuple[float, ...]
    weights: tuple[float, ...]
    bias: float
    answers: tuple[str, ...] = ()
    answer_weights: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        d = len(self.measures)
        if d == 0 or any(len(v) != d for v in (self.mean, self.scale, self.fill, self.weights)):
            raise InvalidRequestError("a combination needs one mean, scale, fill and weight per measure")
        unknown = [m for m in self.measures if m not in MEASURES]
        if unknown:
            raise InvalidRequestError(f"a combination combines uncertainty measures only, not {unknown}")
        if len(self.answers) != len(self.answer_weights) or len(set(self.answers)) != len(self.answers):
            raise InvalidRequestError("a combination needs one weight per answer, each answer once")
        vals = (*self.mean, *self.scale, *self.fill, *self.weights, self.bias, *self.answer_weights)
        if not all(math.isfinite(v) for v in vals) or min(self.scale) <= 0:
            raise InvalidRequestError("a combination's numbers must be finite and its scales positive")

    def score(self, measures: Mapping[str, float], answer: str | None = None) -> float:
        """The combined score of one request from its measures (missing or non-finite ones filled) and its
        answer's text."""
        total = self.bias
        for name, mu, sd, fill, w in zip(self.measures, self.mean, self.scale, self.fill, self.weights):
            v = measures.get(name)
            x = float(v) if v is not None and math.isfinite(float(v)) else fill
            total += w * (x - mu) / sd
        if self.answers and answer is not None:
            total += self._offsets.get(answer_key(answer), 0.0)
        return total

    @functools.cached_property
    def _offsets(self) -> dict[str, float]:
        """Answer -> its offset, built once per combination (looked up per request)."""
        return dict(zip(self.answers, self.answer_weights))

    def scores(self, columns: Mapping[str, npt.ArrayLike], answers: Sequence[str] | None = None
               ) -> npt.NDArray[np.float64]:
        """Combined scores of many requests: ``columns`` maps each measure to an ``(n,)`` array; ``answers``
        are the n answers' texts (None: no answer offsets)."""
        x = np.stack([_filled(columns[m], f) for m, f in zip(self.measures, self.fill)], axis=-1)
        z = (x - np.asarray(self.mean)) / np.asarray(self.scale)
        out = self.bias + z @ np.asarray(self.weights)
        if self.answers and answers is not None:
            out = out + _one_hot(answers, self.answers) @ np.asarray(self.answer_weights)
        return np.asarray(out, dtype=np.float64)

    def to_dict(self) -> dict[str, Any]:
        """JSON form (stored in artifacts)."""
        return {"measures": list(self.measures), "mean": list(self.mean), "scale": list(self.scale),
                "fill": list(self.fill), "weights": list(self.weights), "bias": self.bias,
                **({"answers": list(self.answers), "answer_weights": list(self.answer_weights)}
                   if self.answers else {})}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Combination:
        """Inverse of :meth:`to_dict` (raises InvalidRequestError on a malformed record; a record written before
        answer offsets existed has none)."""
        try:
            mean, scale, fill, weights = (tuple(float(v) for v in d[k]) for k in ("mean", "scale", "fill", "weights"))
            answers = tuple(str(a) for a in d.get("answers", ()))
            answer_weights = tuple(float(v) for v in d.get("answer_weights", ()))
            return cls(tuple(str(m) for m in d["measures"]), mean, scale, fill, weights, float(d["bias"]), answers,
                       answer_weights)
        except (KeyError, TypeError, ValueError) as exc:
            raise InvalidRequestError(f"malformed combination record: {exc}") from exc


def answer_key(text: str) -> str:
    """The form in which answers are compared: whitespace collapsed, case folded."""
    return " ".join(str(text).split()).casefold()


def default_measures(columns: Mapping[str, object]) -> tuple[str, ...]:
    """The measures a combination uses by default: the choice measures where the answers were constrained
    (both present), else every free measure present."""
    if all(m in columns for m in CHOICE_MEASURES):
        return CHOICE_MEASURES
    return tuple(m for m in FREE_MEASURES if m in columns)


def _one_hot(answers: Sequence[str], vocab: Sequence[str]) -> npt.NDArray[np.float64]:
    index = {a: i for i, a in enumerate(vocab)}
    out = np.zeros((len(answers), len(vocab)))
    for row, a in enumerate(answers):
        col = index.get(answer_key(a))
        if col is not None:
            out[row, col] = 1.0
    return out


def _filled(values: npt.ArrayLike, fill: float) -> npt.NDArray[np.float64]:
    v = np.asarray(values, dtype=np.float64)
    return np.where(np.isfinite(v), v, fill)


def fit_combination(columns: Mapping[str, npt.ArrayLike], wrong: npt.ArrayLike, *, l2: float = 1.0,
                    measures: Sequence[str] | None = None, iterations: int = 50,
                    answers: Sequence[str] | None = None, min_answer_count: int = 5,
                    max_answers: int = 32) -> Combination:
    """Fit a standardised L2-penalised logistic regression of ``wrong`` on the measures (and the answers).

    Args:
        columns: measure name -> ``(n,)`` values of the same n examples.
        wrong: ``(n,)`` bool, the answer was wrong (the target).
        l2: ridge penalty on the weights and answer offsets (not the bias), in units of examples; keeps the
            fit finite when the classes separate or a measure is constant.
        measures: which columns to combine (default :func:`default_measures`).
        iterations: Newton steps at most (the fit stops earlier once the step is negligible).
        answers: the n answers' texts; the ``max_answers`` most frequent (by :func:`answer_key`) that occur
            at least ``min_answer_count`` times get an offset each (None: no offsets).
    """
    names = tuple(measures) if measures is not None else default_measures(columns)
    y = np.asarray(wrong, dtype=np.float64).reshape(-1)
    if not names or len(y) < 2:
        raise InvalidRequestError("fitting a combination needs at least one measure and two examples")
    if l2 <= 0 or not math.isfinite(l2):
        raise InvalidRequestError(f"l2 must be a positive number, got {l2!r}")
    raw = [np.asarray(columns[m], dtype=np.float64).reshape(-1) for m in names]
    if any(len(r) != len(y) for r in raw):
        raise InvalidRequestError("every measure needs one value per example")
    fill = [float(r[np.isfinite(r)].max()) + 1.0 if np.isfinite(r).any() else 0.0 for r in raw]
    x = np.stack([np.where(np.isfinite(r), r, f) for r, f in zip(raw, fill)], axis=1)
    mean = x.mean(axis=0)
    sd = x.std(axis=0)
    scale = np.where(sd > 1e-12, sd, 1.0)
    vocab = _frequent(answers, len(y), min_answer_count, max_answers)
    z = np.c_[np.ones(len(y)), (x - mean) / scale, _one_hot(answers, vocab) if answers is not None else x[:, :0]]
    beta = np.zeros(z.shape[1])
    pen = np.r_[0.0, np.full(z.shape[1] - 1, l2)]
    for _ in range(iterations):
        p = 1.0 / (1.0 + np.exp(-np.clip(z @ beta, -30.0, 30.0)))
        grad = z.T @ (p - y) + pen * beta
        hess = (z * (p * (1.0 - p))[:, None]).T @ z + np.diag(pen) + 1e-9 * np.eye(len(beta))
        step = np.linalg.solve(hess, grad)
        beta = beta - step
        if float(np.max(np.abs(step))) < 1e-10:
            break
    d = len(names)
    return Combination(names, tuple(float(v) for v in mean), tuple(float(v) for v in scale), tuple(fill),
                       tuple(float(v) for v in beta[1:d + 1]), float(beta[0]), vocab,
                       tuple(float(v) for v in beta[d + 1:]))


def _frequent(answers: Sequence[str] | None, n: int, min_count: int, most: int) -> tuple[str, ...]:
    """The answers (key form) that get an offset: the ``most`` most frequent with at least ``min_count``."""
    if answers is None:
        return ()
    if len(answers) != n:
        raise InvalidRequestError(f"answers: one per example needed, got {len(answers)} for {n}")
    counts: dict[str, int] = {}
    for a in answers:
        k = answer_key(a)
        counts[k] = counts.get(k, 0) + 1
    ranked = sorted((k for k, c in counts.items() if c >= min_count), key=lambda k: (-counts[k], k))
    return tuple(ranked[:most])
