"""The versioned calibration artifact: fitted thresholds plus everything needed to trust and reuse them.

JSON layout (``schema_version`` 1)::

    {"schema_version": 1, "created": "2025-01-01T12:00:00+00:00",
     "models": ["small-model", "large-model"],          # tier identities, cheapest first (N >= 2)
     "measure": "margin_first",                         # one of cascade.types.MEASURES
     "thresholds": [0.42],                              # N-1 floats
     "cluster_thresholds": {"3": [0.5]},                # optional, router mode: cluster id -> N-1 floats
     "method": "quality", "params": {...},              # fitting method and its parameters (finite JSON)
     "data_fingerprint": "<sha256 hex>", "n": 872,      # held-out data identity and size
     "curve": {...} | null,                             # measured points, see Curve
     "feasible": true, "message": "..."}

Non-finite floats: JSON has no infinity, so in ``thresholds``, ``cluster_thresholds`` and ``curve`` the value
``+inf`` (never escalate) is written as the string ``"inf"`` and ``-inf`` (always escalate) as ``"-inf"``
(``"Infinity"``/``"-Infinity"`` are also read). NaN is never valid there. ``params`` must be finite JSON.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import math
import os
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cascade.errors import ArtifactError
from cascade.types import MEASURES

if TYPE_CHECKING:
    import numpy.typing as npt

    from calibration.fit import FitResult

__all__ = ["SCHEMA_VERSION", "Artifact", "Curve", "CurvePoint", "data_fingerprint", "load"]

SCHEMA_VERSION = 1
_REQUIRED = ("schema_version", "created", "models", "measure", "thresholds", "method", "params",
             "data_fingerprint", "n", "feasible", "message")
_INF = {"inf": math.inf, "Infinity": math.inf, "-inf": -math.inf, "-Infinity": -math.inf}


def _num(x: object, what: str) -> float:
    """Decode one float of the artifact (numbers or the infinity strings); NaN and anything else is an error."""
    if isinstance(x, str) and x in _INF:
        return _INF[x]
    if isinstance(x, bool) or not isinstance(x, (int, float)) or math.isnan(x):
        raise ArtifactError(f"{what} must be a number or 'inf'/'-inf', got {x!r}")
    return float(x)


def _enc(x: float) -> float | str:
    return x if math.isfinite(x) else ("inf" if x > 0 else "-inf")


def _floats(xs: object, what: str, length: int | None = None) -> tuple[float, ...]:
    if isinstance(xs, (str, bytes)) or not isinstance(xs, Sequence):
        raise ArtifactError(f"{what} must be a list of numbers, got {xs!r}")
    out = tuple(_num(x, what) for x in xs)
    if length is not None and len(out) != length:
        raise ArtifactError(f"{what} must have {length} values, got {len(out)}")
    return out


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
        return {"kind": self.kind, "thresholds": [[_enc(x) for x in t] for t in self.thresholds],
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
        return cls(str(d["kind"]), tuple(_floats(t, "curve thresholds") for t in ts),
                   _floats(d["large_share"], "curve large_share"), _floats(d["accuracy"], "curve accuracy"),
                   _floats(d["mean_cost"], "curve mean_cost"), _num(d["last_accuracy"], "curve last_accuracy"))


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


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


@dataclass(frozen=True)
class Artifact:
    """A calibration result as saved to and loaded from JSON (see the module docstring for the layout).

    Attributes:
        models: tier model identities, cheapest first.
        measure: the uncertainty measure the thresholds apply to.
        thresholds: N-1 thresholds (``-inf`` always escalates, ``inf`` never does).
        method: fitting method name (``"budget"``, ``"quality"``, ``"min_cost"``, ...).
        params: the method's parameters (target, confidence, ...), finite JSON values.
        data_fingerprint: sha256 hex of the held-out data (:func:`data_fingerprint`).
        n: number of held-out examples.
        feasible: False when the target could not be met and a fallback was stored.
        message: human explanation of the fit.
        curve: measured operating points for per-request targets, or None.
        cluster_thresholds: router mode: cluster id -> N-1 thresholds, or None.
        created: ISO-8601 creation time (UTC, now by default).
        schema_version: always :data:`SCHEMA_VERSION` for artifacts this code writes.
    """

    models: tuple[str, ...]
    measure: str
    thresholds: tuple[float, ...]
    method: str
    params: Mapping[str, Any]
    data_fingerprint: str
    n: int
    feasible: bool
    message: str
    curve: Curve | None = None
    cluster_thresholds: Mapping[int, tuple[float, ...]] | None = None
    created: str = field(default_factory=_now)
    schema_version: int = SCHEMA_VERSION

    def __post_init__(self) -> None:
        if self.schema_version != SCHEMA_VERSION:
            raise ArtifactError(f"unknown artifact schema_version {self.schema_version!r}; "
                                f"this version reads {SCHEMA_VERSION}")
        models = self.models
        if isinstance(models, str) or not isinstance(models, Sequence) or len(models) < 2 or not all(
                isinstance(m, str) and m for m in models):
            raise ArtifactError(f"models must list at least two non-empty model names, got {models!r}")
        object.__setattr__(self, "models", tuple(models))
        if self.measure not in MEASURES:
            raise ArtifactError(f"unknown measure {self.measure!r}; expected one of {list(MEASURES)}")
        stages = len(models) - 1
        object.__setattr__(self, "thresholds", _floats(self.thresholds, "thresholds", stages))
        if self.cluster_thresholds is not None:
            if not isinstance(self.cluster_thresholds, Mapping):
                raise ArtifactError("cluster_thresholds must map cluster ids to threshold lists")
            clusters = {}
            for key, ts in self.cluster_thresholds.items():
                try:
                    cid = int(key)
                except (TypeError, ValueError):
                    raise ArtifactError(f"cluster id {key!r} is not an integer") from None
                clusters[cid] = _floats(ts, f"cluster_thresholds[{cid}]", stages)
            object.__setattr__(self, "cluster_thresholds", clusters)
        if not isinstance(self.method, str) or not self.method:
            raise ArtifactError("method must be a non-empty string")
        if not isinstance(self.params, Mapping):
            raise ArtifactError("params must be an object")
        try:
            json.dumps(dict(self.params), allow_nan=False)
        except (TypeError, ValueError) as e:
            raise ArtifactError(f"params must be finite JSON values: {e}") from e
        fp = self.data_fingerprint
        if not (isinstance(fp, str) and len(fp) == 64 and all(ch in "0123456789abcdef" for ch in fp)):
            raise ArtifactError(f"data_fingerprint must be a sha256 hex digest, got {fp!r}")
        if isinstance(self.n, bool) or not isinstance(self.n, int) or self.n < 1:
            raise ArtifactError(f"n must be a positive integer, got {self.n!r}")
        if not isinstance(self.feasible, bool) or not isinstance(self.message, str):
            raise ArtifactError("feasible must be a boolean and message a string")
        if self.curve is not None and (not isinstance(self.curve, Curve) or len(self.curve.thresholds[0]) != stages):
            raise ArtifactError(f"curve must be a Curve whose points have {stages} threshold(s)")
        try:
            dt.datetime.fromisoformat(self.created)
        except (TypeError, ValueError):
            raise ArtifactError(f"created must be an ISO-8601 time, got {self.created!r}") from None

    @classmethod
    def from_fit(cls, fit: FitResult, *, models: Sequence[str], measure: str, data_fingerprint: str,
                 curve: Curve | None = None,
                 cluster_thresholds: Mapping[int, Sequence[float]] | None = None) -> Artifact:
        """Wrap a :class:`calibration.fit.FitResult` with the identity of the models, measure and data."""
        clusters = None if cluster_thresholds is None else {k: tuple(v) for k, v in cluster_thresholds.items()}
        return cls(tuple(models), measure, fit.thresholds, fit.method, dict(fit.params), data_fingerprint,
                   fit.stats.n, fit.feasible, fit.message, curve, clusters)

    def thresholds_for(self, cluster: int | None = None) -> tuple[float, ...]:
        """The cluster's thresholds in router mode, else (or for an unknown cluster) the global ones."""
        if cluster is not None and self.cluster_thresholds and cluster in self.cluster_thresholds:
            return self.cluster_thresholds[cluster]
        return self.thresholds

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form, keys in schema order, infinities encoded as strings."""
        return {
            "schema_version": self.schema_version, "created": self.created, "models": list(self.models),
            "measure": self.measure, "thresholds": [_enc(t) for t in self.thresholds],
            "cluster_thresholds": None if self.cluster_thresholds is None else {
                str(k): [_enc(t) for t in v] for k, v in sorted(self.cluster_thresholds.items())},
            "method": self.method, "params": dict(self.params), "data_fingerprint": self.data_fingerprint,
            "n": self.n, "curve": None if self.curve is None else self.curve.to_dict(),
            "feasible": self.feasible, "message": self.message,
        }

    def to_json(self) -> str:
        """Strict JSON text (no NaN/Infinity tokens)."""
        return json.dumps(self.to_dict(), indent=2, allow_nan=False) + "\n"

    @classmethod
    def from_json(cls, text: str | bytes) -> Artifact:
        """Parse an artifact, raising :class:`ArtifactError` on bad JSON, schema or fields."""
        def no_constants(name: str) -> None:
            raise ArtifactError(f"artifact JSON contains {name}; write infinities as 'inf'/'-inf'")

        try:
            d = json.loads(text, parse_constant=no_constants)
        except (ValueError, UnicodeDecodeError) as e:
            if isinstance(e, ArtifactError):
                raise
            raise ArtifactError(f"artifact is not valid JSON: {e}") from e
        if not isinstance(d, dict):
            raise ArtifactError("artifact JSON must be an object")
        if "schema_version" in d and d["schema_version"] != SCHEMA_VERSION:
            raise ArtifactError(f"unknown artifact schema_version {d['schema_version']!r}; "
                                f"this version reads {SCHEMA_VERSION}")
        missing = [k for k in _REQUIRED if k not in d]
        if missing:
            raise ArtifactError(f"artifact is missing field(s) {missing}")
        unknown = set(d) - {*_REQUIRED, "curve", "cluster_thresholds"}
        if unknown:
            raise ArtifactError(f"artifact has unknown field(s) {sorted(unknown)}")
        curve = None if d.get("curve") is None else Curve.from_dict(d["curve"])
        models = d["models"]
        if not isinstance(models, list):
            raise ArtifactError(f"models must be a list, got {models!r}")
        return cls(tuple(models), d["measure"], d["thresholds"], d["method"], d["params"], d["data_fingerprint"],
                   d["n"], d["feasible"], d["message"], curve, d.get("cluster_thresholds"), d["created"],
                   d["schema_version"])

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write atomically: a temporary file in the same directory, fsync, then ``os.replace``.

        A failed write leaves no partial file and an existing artifact at ``path`` untouched.

        Raises:
            ArtifactError: the file could not be written.
        """
        target = Path(path)
        text = self.to_json()
        fd, tmp = -1, ""
        try:
            fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                fd = -1
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, target)
            tmp = ""
        except OSError as e:
            raise ArtifactError(f"cannot write artifact {target}: {e}") from e
        finally:
            if fd >= 0:
                os.close(fd)
            if tmp:
                Path(tmp).unlink(missing_ok=True)
        return target

    @classmethod
    def load(cls, path: str | os.PathLike[str], *, expect_models: Sequence[str] | None = None,
             expect_measure: str | None = None) -> Artifact:
        """Read an artifact and check it was fitted for the given models and measure.

        Raises:
            ArtifactError: unreadable file, bad JSON, unknown schema version, missing or malformed fields,
                or models/measure other than expected (the message names what differs).
        """
        try:
            text = Path(path).read_bytes()
        except OSError as e:
            raise ArtifactError(f"cannot read artifact {path}: {e}") from e
        art = cls.from_json(text)
        art.check(expect_models=expect_models, expect_measure=expect_measure, source=str(path))
        return art

    def check(self, *, expect_models: Sequence[str] | None = None, expect_measure: str | None = None,
              source: str = "artifact") -> None:
        """Raise :class:`ArtifactError` naming the difference when models or measure are not as expected."""
        if expect_models is not None:
            want = tuple(expect_models)
            if want != self.models:
                diffs = [f"tier {i}: artifact {a!r} vs cascade {b!r}"
                         for i, (a, b) in enumerate(zip(self.models, want)) if a != b]
                if len(want) != len(self.models):
                    diffs.append(f"artifact has {len(self.models)} tiers, cascade has {len(want)}")
                raise ArtifactError(f"{source} was fitted for other models ({'; '.join(diffs)})")
        if expect_measure is not None and expect_measure != self.measure:
            raise ArtifactError(f"{source} was fitted for measure {self.measure!r}, "
                                f"but the cascade uses {expect_measure!r}")


def load(path: str | os.PathLike[str], *, expect_models: Sequence[str] | None = None,
         expect_measure: str | None = None) -> Artifact:
    """Read and check an artifact; see :meth:`Artifact.load`."""
    return Artifact.load(path, expect_models=expect_models, expect_measure=expect_measure)
