"""Making a calibration artifact from a fit: the fit result plus the identity of the models, measure and data.

The artifact itself (:class:`cascade.artifact.Artifact`: its JSON layout, loading, checks and atomic save) lives
in the engine's package, which reads it at request time; this module adds what only fitting needs.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from cascade.artifact import Artifact
from cascade.curve import Curve
from cascade.levels import Level, Levels

if TYPE_CHECKING:
    import numpy.typing as npt

    from calibration.fit import FitResult
    from cascade.combined import Combination

__all__ = ["artifact_from_fit", "data_fingerprint", "levels_from_fits"]


def data_fingerprint(*parts: npt.ArrayLike | bytes | str) -> str:
    """sha256 hex digest of the held-out data: for each part its dtype, shape and C-order bytes.

    ``bytes`` and ``str`` parts (e.g. a data file's content) are hashed as given (``str`` as UTF-8).
    """
    import numpy as np

    h = hashlib.sha256()
    for part in parts:
        if isinstance(part, (bytes, str)):
            raw = part.encode() if isinstance(part, str) else part
            h.update(b"bytes:%d:" % len(raw) + raw)
        else:
            a = np.ascontiguousarray(np.asarray(part))
            a = a.astype(a.dtype.newbyteorder("<")) if a.dtype.byteorder == ">" else a
            h.update(f"array:{a.dtype.str}:{a.shape}:".encode() + a.tobytes())
    return h.hexdigest()


def artifact_from_fit(fit: FitResult, *, models: Sequence[str], measure: str, data_fingerprint: str,
                      curve: Curve | None = None,
                      cluster_thresholds: Mapping[int, Sequence[float]] | None = None,
                      combination: tuple[Combination, ...] | None = None) -> Artifact:
    """Wrap a :class:`calibration.fit.FitResult` with the identity of the models, measure and data (and, for
    the measure ``"combined"``, its fitted weights)."""
    clusters = None if cluster_thresholds is None else {k: tuple(v) for k, v in cluster_thresholds.items()}
    return Artifact(tuple(models), measure, fit.thresholds, fit.method, dict(fit.params), data_fingerprint,
                    fit.stats.n, fit.feasible, fit.message, curve, clusters, combination=combination)


def levels_from_fits(fits: Sequence[FitResult], thresholds: Sequence[Sequence[float]], *, confidence: float) -> Levels:
    """The certified levels to store, from :func:`calibration.fit.fit_levels` results.

    Args:
        fits: one quality fit per level (any order; stored ascending).
        thresholds: each fit's thresholds as stored (moved off the data values, as the artifact's own are).
        confidence: the probability that every level holds at once (1 - the overall delta).
    """
    rows = sorted(zip(fits, thresholds), key=lambda ft: float(ft[0].params["max_quality_loss"]))
    first = rows[0][0].params
    items = tuple(Level(float(f.params["max_quality_loss"]), tuple(float(x) for x in t),
                        float(f.params["certified_loss_bound"]), f.feasible, f.stats.large_share, f.stats.mean_cost)
                  for f, t in rows)
    per_level = float(first.get("delta_per_level", first["delta"]))
    split = abs(per_level - (1.0 - confidence)) > 1e-12  # over levels and/or measures
    return Levels(items, float(confidence), per_level, "bonferroni" if split else "none",
                  str(first.get("claim", "accuracy")), str(first.get("family", "common")))
