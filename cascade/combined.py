"""The ``combined`` measure: a fitted logistic combination of the seven free-form measures.

On free answers the first-token measures of a small model are weak where its first token is formatting
("The", "**", a space): the first step then says nothing about the label. Every other measure of the
answer is there too (means, minimum, maximum, the mean log-probability), and which of them carries the signal
differs by model and task. :class:`Combination` is a standardised logistic regression over the seven free
measures, predicting "the small tier's answer is wrong"; its score is the linear predictor (the log-odds of
being wrong), so higher = more uncertain like every other measure.

At request time it is a pure function of the measures the engine already computed for the request
(:meth:`Combination.score`); a measure that is missing or not finite is replaced by its stored ``fill`` (the
fit data's maximum: treated as most uncertain). Fitting (:func:`fit_combination`) is deterministic: Newton
steps on the L2-penalised log-likelihood from zero, numpy only. Calibration fits it on one part of the
calibration data and certifies thresholds on the other (:mod:`calibration.combine`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from cascade.errors import InvalidRequestError
from cascade.types import FREE_MEASURES

__all__ = ["COMBINED", "Combination", "fit_combination"]

#: The public name of the fitted combination.
COMBINED = "combined"


@dataclass(frozen=True)
class Combination:
    """Weights of a standardised logistic combination: ``score = bias + sum_i w_i (x_i - mean_i) / scale_i``.

    Attributes:
        measures: the input measure names, in weight order.
        mean, scale, fill: per measure: centring, scaling (> 0) and the value used when it is missing.
        weights: per measure weight on the standardised value.
        bias: intercept (log-odds of a wrong answer at the mean).
    """

    measures: tuple[str, ...]
    mean: tuple[float, ...]
    scale: tuple[float, ...]
    fill: tuple[float, ...]
    weights: tuple[float, ...]
    bias: float

    def __post_init__(self) -> None:
        d = len(self.measures)
        if d == 0 or any(len(v) != d for v in (self.mean, self.scale, self.fill, self.weights)):
            raise InvalidRequestError("a combination needs one mean, scale, fill and weight per measure")
        unknown = [m for m in self.measures if m not in FREE_MEASURES]
        if unknown:
            raise InvalidRequestError(f"a combination combines free measures only, not {unknown}")
        vals = (*self.mean, *self.scale, *self.fill, *self.weights, self.bias)
        if not all(math.isfinite(v) for v in vals) or min(self.scale) <= 0:
            raise InvalidRequestError("a combination's numbers must be finite and its scales positive")

    def score(self, measures: Mapping[str, float]) -> float:
        """The combined score of one request from its measures (missing or non-finite ones filled)."""
        total = self.bias
        for name, mu, sd, fill, w in zip(self.measures, self.mean, self.scale, self.fill, self.weights):
            v = measures.get(name)
            x = float(v) if v is not None and math.isfinite(float(v)) else fill
            total += w * (x - mu) / sd
        return total

    def scores(self, columns: Mapping[str, npt.ArrayLike]) -> npt.NDArray[np.float64]:
        """Combined scores of many requests: ``columns`` maps each measure to an ``(n, ...)`` array."""
        x = np.stack([_filled(columns[m], f) for m, f in zip(self.measures, self.fill)], axis=-1)
        z = (x - np.asarray(self.mean)) / np.asarray(self.scale)
        return np.asarray(self.bias + z @ np.asarray(self.weights), dtype=np.float64)

    def to_dict(self) -> dict[str, Any]:
        """JSON form (stored in artifacts)."""
        return {"measures": list(self.measures), "mean": list(self.mean), "scale": list(self.scale),
                "fill": list(self.fill), "weights": list(self.weights), "bias": self.bias}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Combination:
        """Inverse of :meth:`to_dict` (raises InvalidRequestError on a malformed record)."""
        try:
            mean, scale, fill, weights = (tuple(float(v) for v in d[k]) for k in ("mean", "scale", "fill", "weights"))
            return cls(tuple(str(m) for m in d["measures"]), mean, scale, fill, weights, float(d["bias"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise InvalidRequestError(f"malformed combination record: {exc}") from exc


def _filled(values: npt.ArrayLike, fill: float) -> npt.NDArray[np.float64]:
    v = np.asarray(values, dtype=np.float64)
    return np.where(np.isfinite(v), v, fill)


def fit_combination(columns: Mapping[str, npt.ArrayLike], wrong: npt.ArrayLike, *, l2: float = 1.0,
                    measures: Sequence[str] | None = None, iterations: int = 50) -> Combination:
    """Fit a standardised L2-penalised logistic regression of ``wrong`` on the measures.

    Args:
        columns: measure name -> ``(n,)`` values of the same n examples.
        wrong: ``(n,)`` bool, the answer was wrong (the target).
        l2: ridge penalty on the weights (not the bias), in units of examples; keeps the fit finite when
            the classes separate or a measure is constant.
        measures: which columns to combine (default every free measure present, in :data:`FREE_MEASURES`
            order).
        iterations: Newton steps at most (the fit stops earlier once the step is negligible).
    """
    names = tuple(measures) if measures is not None else tuple(m for m in FREE_MEASURES if m in columns)
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
    z = np.c_[np.ones(len(y)), (x - mean) / scale]
    beta = np.zeros(z.shape[1])
    pen = np.r_[0.0, np.full(len(names), l2)]
    for _ in range(iterations):
        p = 1.0 / (1.0 + np.exp(-np.clip(z @ beta, -30.0, 30.0)))
        grad = z.T @ (p - y) + pen * beta
        hess = (z * (p * (1.0 - p))[:, None]).T @ z + np.diag(pen) + 1e-9 * np.eye(len(beta))
        step = np.linalg.solve(hess, grad)
        beta = beta - step
        if float(np.max(np.abs(step))) < 1e-10:
            break
    return Combination(names, tuple(float(v) for v in mean), tuple(float(v) for v in scale), tuple(fill),
                       tuple(float(v) for v in beta[1:]), float(beta[0]))
