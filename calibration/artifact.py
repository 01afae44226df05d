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

if TYPE_CHECKING:
    import numpy.typing as npt

    from calibration.fit import FitResult

__all__ = ["artifact_from_fit", "data_fingerprint"]


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
                      cluster_thresholds: Mapping[int, Sequence[float]] | None = None) -> Artifact:
    """Wrap a :class:`calibration.fit.FitResult` with the identity of the models, measure and data."""
    clusters = None if cluster_thresholds is None else {k: tuple(v) for k, v in cluster_thresholds.items()}
    return Artifact(tuple(models), measure, fit.thresholds, fit.method, dict(fit.params), data_fingerprint,
                    fit.stats.n, fit.feasible, fit.message, curve, clusters)
