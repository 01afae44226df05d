"""The measured curve of a calibrated cascade, and the thresholds it gives for a per-request target.

A :class:`Curve` is stored in a calibration artifact (:mod:`cascade.artifact`); at request time
:func:`threshold_for_target` picks the stored point that meets a ``max_large_share`` or ``max_quality_loss``
target. Fitting a curve is :func:`calibration.fit.measured_curve`.

Non-finite floats: JSON has no infinity, so thresholds ``+inf`` (never escalate) and ``-inf`` (always
escalate) are written as the strings ``"inf"`` and ``"-inf"`` (``"Infinity"``/``"-Infinity"`` are also read);
NaN is never valid. :func:`decode_float`, :func:`decode_floats` and :func:`encode_float` do that for the
curve and the artifact.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from cascade.errors import ArtifactError, InvalidRequestError

__all__ = ["Curve", "CurvePoint", "check_fraction", "decode_float", "decode_floats", "encode_float",
           "point_for_target", "threshold_for_target"]

_INF = {"inf": math.inf, "Infinity": math.inf, "-inf": -math.inf, "-Infinity": -math.inf}


def decode_float(x: object, what: str) -> float:
    """Decode one stored float (a number or an infinity string); NaN and anything else is an ArtifactError."""
    if isinstance(x, str) and x in _INF:
        return _INF[x]
    if isinstance(x, bool) or not isinstance(x, (int, float)) or math.isnan(x):
        raise ArtifactError(f"{what} must be a number or 'inf'/'-inf', got {x!r}")
    return float(x)


def encode_float(x: float) -> float | str:
    """A float as stored: itself when finite, else ``"inf"`` or ``"-inf"``."""
    return x if math.isfinite(x) else ("inf" if x > 0 else "-inf")


def decode_floats(xs: object, what: str, length: int | None = None) -> tuple[float, ...]:
    """Decode a stored list of floats (of ``length`` values when given), raising ArtifactError."""
    if isinstance(xs, (str, bytes)) or not isinstance(xs, Sequence):
        raise ArtifactError(f"{what} must be a list of numbers, got {xs!r}")
    out = tuple(decode_float(x, what) for x in xs)
    if length is not None and len(out) != length:
        raise ArtifactError(f"{what} must have {length} values, got {len(out)}")
    return out


def check_fraction(name: str, value: object, low: float = 0.0, high: float = 1.0) -> float:
    """``value`` as a float when it is a number in ``[low, high]``, else InvalidRequestError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise InvalidRequestError(f"{name} must be a number in [{low:g}, {high:g}], got {value!r}")
    return float(value)


@dataclass(frozen=True)
class CurvePoint:
    """One measured operating point.

    Attributes:
        thresholds: the N-1 thresholds.
        large_share: share of requests answered by the last tier.
        accuracy: cascade accuracy.
        mean_cost: mean cost per request.
        quality_loss: accuracy of always-last-tier minus ``accuracy`` (negative when the cascade is better).
    """

    thresholds: tuple[float, ...]
    large_share: float
    accuracy: float
    mean_cost: float
    quality_loss: float


@dataclass(frozen=True)
class Curve:
    """Measured operating points of a fitted cascade, enough to choose thresholds for a per-request target.

    Attributes:
        kind: ``"sweep"`` (two tiers: every distinct threshold, large share ascending, possibly thinned) or
            ``"pareto"`` (N tiers: the (mean cost, accuracy) Pareto front of a joint grid, cost ascending).
        thresholds: P tuples of N-1 thresholds.
        large_share: P shares of requests answered by the last tier.
        accuracy: P accuracies.
        mean_cost: P mean costs.
        last_accuracy: accuracy of always using the last tier on the same data.
    """

    kind: str
    thresholds: tuple[tuple[float, ...], ...]
    large_share: tuple[float, ...]
    accuracy: tuple[float, ...]
    mean_cost: tuple[float, ...]
    last_accuracy: float

    def __post_init__(self) -> None:
        if self.kind not in ("sweep", "pareto"):
            raise ArtifactError(f"curve kind must be 'sweep' or 'pareto', got {self.kind!r}")
        p = len(self.thresholds)
        if p < 1 or not len(self.large_share) == len(self.accuracy) == len(self.mean_cost) == p:
            raise ArtifactError("curve needs >= 1 point and equal lengths of thresholds/large_share/accuracy/cost")
        if len({len(t) for t in self.thresholds}) != 1 or not self.thresholds[0]:
            raise ArtifactError("every curve point needs the same number (>= 1) of thresholds")
        for name in ("large_share", "accuracy", "mean_cost", "last_accuracy"):
            v = getattr(self, name)
            if not all(math.isfinite(x) for x in (v if isinstance(v, tuple) else (v,))):
                raise ArtifactError(f"curve {name} must be finite")

    def __len__(self) -> int:
        return len(self.thresholds)

    def point(self, i: int) -> CurvePoint:
        """The i-th measured point."""
        return CurvePoint(self.thresholds[i], self.large_share[i], self.accuracy[i], self.mean_cost[i],
                          self.last_accuracy - self.accuracy[i])

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (infinite thresholds as strings)."""
        return {"kind": self.kind, "thresholds": [[encode_float(x) for x in t] for t in self.thresholds],
                "large_share": list(self.large_share), "accuracy": list(self.accuracy),
                "mean_cost": list(self.mean_cost), "last_accuracy": self.last_accuracy}

    @classmethod
    def from_dict(cls, d: object) -> Curve:
        """Parse :meth:`to_dict` output, raising :class:`ArtifactError` on any malformed field."""
        if not isinstance(d, Mapping):
            raise ArtifactError(f"curve must be an object, got {type(d).__name__}")
        missing = {"kind", "thresholds", "large_share", "accuracy", "mean_cost", "last_accuracy"} - set(d)
        if missing:
            raise ArtifactError(f"curve is missing {sorted(missing)}")
        ts = d["thresholds"]
        if not isinstance(ts, list):
            raise ArtifactError("curve thresholds must be a list of lists")
        return cls(str(d["kind"]), tuple(decode_floats(t, "curve thresholds") for t in ts),
                   decode_floats(d["large_share"], "curve large_share"),
                   decode_floats(d["accuracy"], "curve accuracy"), decode_floats(d["mean_cost"], "curve mean_cost"),
                   decode_float(d["last_accuracy"], "curve last_accuracy"))


def point_for_target(curve: Curve | None, max_large_share: float | None = None,
                     max_quality_loss: float | None = None) -> CurvePoint:
    """Pick the stored point that meets a per-request target (see :func:`threshold_for_target`)."""
    import numpy as np
    import numpy.typing as npt

    if curve is None:
        raise InvalidRequestError("per-request targets need an artifact with a measured curve")
    if max_large_share is None and max_quality_loss is None:
        raise InvalidRequestError("give max_large_share and/or max_quality_loss")
    share, acc = np.array(curve.large_share), np.array(curve.accuracy)
    cost, loss = np.array(curve.mean_cost), curve.last_accuracy - acc
    ok = np.ones(len(share), dtype=np.bool_)
    if max_large_share is not None:
        ok &= share <= check_fraction("max_large_share", max_large_share)
    if max_quality_loss is not None:
        ok &= loss <= check_fraction("max_quality_loss", max_quality_loss, -1.0, 1.0) + 1e-9
    if not ok.any():
        raise InvalidRequestError(
            f"no measured operating point meets max_large_share={max_large_share}, max_quality_loss="
            f"{max_quality_loss}: the smallest measured large share is {share.min():.4g} and the smallest "
            f"measured quality loss is {loss.min():.4g}; the caller may fall back to the artifact's thresholds "
            "or to always escalating")
    idx = np.flatnonzero(ok)
    cheap = cost if curve.kind == "pareto" and np.any(cost != 0) else share  # unpriced: the share is the cost
    key: tuple[npt.NDArray[np.float64], ...]
    if max_quality_loss is None and curve.kind == "sweep":
        key = (acc[idx], share[idx])  # use the whole budget: largest share <= R (the quantile rule)
    elif max_quality_loss is None:
        key = (-share[idx], -cheap[idx], acc[idx])  # N tiers: most accurate within the budget, then cheapest
    else:
        key = (-share[idx], acc[idx], -cheap[idx])  # the cheapest point meeting the loss, then most accurate
    return curve.point(int(idx[np.lexsort(key)[-1]]))


def threshold_for_target(curve: Curve | None, max_large_share: float | None = None,
                         max_quality_loss: float | None = None) -> tuple[float, ...]:
    """The thresholds a stored curve gives for a per-request target.

    Rules: with only ``max_large_share`` R, the same choice as :func:`calibration.fit.fit_budget` among stored
    points (two tiers: the largest measured share <= R; N tiers: the most accurate point with last-tier share
    <= R). With ``max_quality_loss`` eps (optionally also R as a cap), the cheapest point (smallest share for
    two tiers, smallest mean cost for N tiers) whose *measured* loss against the last tier is <= eps. This is
    a point estimate on the calibration data, not the finite-sample guarantee of
    :func:`calibration.fit.fit_quality`.

    Fallback: when no stored point meets the target -- a negative or out-of-range share, or a loss below the
    smallest measured one -- this raises :class:`InvalidRequestError` and nothing is chosen silently; the
    caller decides (the engine reports the error; always escalating is the safe manual fallback).

    Returns:
        The N-1 thresholds.
    """
    return point_for_target(curve, max_large_share, max_quality_loss).thresholds
