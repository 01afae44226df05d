"""The versioned calibration artifact: fitted thresholds plus everything needed to trust and reuse them.

The engine reads it (:meth:`Artifact.load`, then :class:`cascade.policy.Policy`); ``cascade-calibrate`` writes
it (:func:`calibration.artifact.artifact_from_fit`, then :meth:`Artifact.save`).

JSON layout (``schema_version`` 2)::

    {"schema_version": 2, "created": "2025-01-01T12:00:00+00:00",
     "models": ["small-model", "large-model"],          # tier identities, cheapest first (N >= 2)
     "measure": "margin_first",                         # one of cascade.types.MEASURES, or "combined"
     "combination": [{...}],                            # only with "combined": one per stage, see cascade.combined
     "thresholds": [0.42],                              # N-1 floats
     "cluster_thresholds": {"3": [0.5]},                # optional, router mode: cluster id -> N-1 floats
     "choice_priors": {"0": {"[\"neg\", \"pos\"]": [0.4, -0.4]}},  # optional: tier -> choice set -> offsets
     "method": "quality", "params": {...},              # fitting method and its parameters (finite JSON)
     "data_fingerprint": "<sha256 hex>", "n": 872,      # held-out data identity and size
     "curve": {...} | null,                             # measured points, see cascade.curve.Curve
     "levels": {...} | null,                            # certified per-request levels, see cascade.levels.Levels
     "feasible": true, "message": "..."}

Versions: 2 added ``levels`` (required, ``null`` when the fit certified none). Files of version 1 (no
``levels``) still load, as artifacts without certified levels; a version-2 file without ``levels``, or any
file without another required field, is an :class:`ArtifactError` naming the missing field(s). Saving always
writes the current version.

Non-finite floats: JSON has no infinity, so in ``thresholds``, ``cluster_thresholds`` and ``curve`` the value
``+inf`` (never escalate) is written as the string ``"inf"`` and ``-inf`` (always escalate) as ``"-inf"``
(``"Infinity"``/``"-Infinity"`` are also read). NaN is never valid there. ``params`` must be finite JSON.

The measure ``"combined"`` (:mod:`cascade.combined`) stores its fitted weights in ``combination``, one record per
stage; the field is optional, so files written before it load unchanged, and it is required exactly when the
measure is ``"combined"``.
"""

from __future__ import annotations

import datetime as dt
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cascade.atomic_files import write_text_atomic
from cascade.combined import COMBINED, Combination
from cascade.curve import Curve, decode_floats, encode_float
from cascade.errors import ArtifactError, CascadeError
from cascade.levels import Levels
from cascade.types import MEASURES

__all__ = ["READABLE_VERSIONS", "SCHEMA_VERSION", "Artifact", "load"]

SCHEMA_VERSION = 2
#: the schema versions :meth:`Artifact.from_json` reads, each with the fields it requires.
READABLE_VERSIONS: dict[int, tuple[str, ...]] = {
    1: ("schema_version", "created", "models", "measure", "thresholds", "method", "params", "data_fingerprint", "n",
        "feasible", "message"),
}
READABLE_VERSIONS[2] = (*READABLE_VERSIONS[1], "levels")


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
        data_fingerprint: sha256 hex of the held-out data (:func:`calibration.artifact.data_fingerprint`).
        n: number of held-out examples.
        feasible: False when the target could not be met and a fallback was stored.
        message: human explanation of the fit.
        curve: measured operating points for per-request targets, or None.
        cluster_thresholds: router mode: cluster id -> N-1 thresholds, or None.
        created: ISO-8601 creation time (UTC, now by default).
        schema_version: always :data:`SCHEMA_VERSION` (older files are read into the current form).
        choice_priors: tier index -> choice set (:func:`cascade.choice_prior.choice_set_key`) -> one offset
            per choice, the tier's prior over those answers (:mod:`cascade.choice_prior`); None: no correction.
        levels: certified per-request quality levels (:class:`cascade.levels.Levels`), or None.
        combination: with measure ``"combined"``, one fitted :class:`cascade.combined.Combination` per stage.
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
    choice_priors: Mapping[int, Mapping[str, tuple[float, ...]]] | None = None
    levels: Levels | None = None
    combination: tuple[Combination, ...] | None = None

    def __post_init__(self) -> None:
        if self.schema_version != SCHEMA_VERSION:
            raise ArtifactError(f"unknown artifact schema_version {self.schema_version!r}; "
                                f"this version reads {SCHEMA_VERSION}")
        models = self.models
        if isinstance(models, str) or not isinstance(models, Sequence) or len(models) < 2 or not all(
                isinstance(m, str) and m for m in models):
            raise ArtifactError(f"models must list at least two non-empty model names, got {models!r}")
        object.__setattr__(self, "models", tuple(models))
        if self.measure not in (*MEASURES, COMBINED):
            raise ArtifactError(f"unknown measure {self.measure!r}; expected one of {[*MEASURES, COMBINED]}")
        stages = len(models) - 1
        _check_combination(self.measure, self.combination, stages)
        object.__setattr__(self, "thresholds", decode_floats(self.thresholds, "thresholds", stages))
        if self.cluster_thresholds is not None:
            if not isinstance(self.cluster_thresholds, Mapping):
                raise ArtifactError("cluster_thresholds must map cluster ids to threshold lists")
            clusters = {}
            for key, ts in self.cluster_thresholds.items():
                try:
                    cid = int(key)
                except (TypeError, ValueError):
                    raise ArtifactError(f"cluster id {key!r} is not an integer") from None
                clusters[cid] = decode_floats(ts, f"cluster_thresholds[{cid}]", stages)
            object.__setattr__(self, "cluster_thresholds", clusters)
        if self.choice_priors is not None:
            object.__setattr__(self, "choice_priors", _check_priors(self.choice_priors, len(models)))
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
        if self.levels is not None and (not isinstance(self.levels, Levels) or any(
                len(lv.thresholds) != stages for lv in self.levels.items)):
            raise ArtifactError(f"levels must be Levels whose thresholds have {stages} value(s) each")
        try:
            dt.datetime.fromisoformat(self.created)
        except (TypeError, ValueError):
            raise ArtifactError(f"created must be an ISO-8601 time, got {self.created!r}") from None

    def thresholds_for(self, cluster: int | None = None) -> tuple[float, ...]:
        """The cluster's thresholds in router mode, else (or for an unknown cluster) the global ones."""
        if cluster is not None and self.cluster_thresholds and cluster in self.cluster_thresholds:
            return self.cluster_thresholds[cluster]
        return self.thresholds

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form, keys in schema order, infinities encoded as strings."""
        return {
            "schema_version": self.schema_version, "created": self.created, "models": list(self.models),
            "measure": self.measure, "thresholds": [encode_float(t) for t in self.thresholds],
            "cluster_thresholds": None if self.cluster_thresholds is None else {
                str(k): [encode_float(t) for t in v] for k, v in sorted(self.cluster_thresholds.items())},
            "method": self.method, "params": dict(self.params), "data_fingerprint": self.data_fingerprint,
            "n": self.n, "curve": None if self.curve is None else self.curve.to_dict(),
            "levels": None if self.levels is None else self.levels.to_dict(),
            "feasible": self.feasible, "message": self.message,
            **({} if self.choice_priors is None else {"choice_priors": {
                str(tier): {key: list(v) for key, v in sorted(table.items())}
                for tier, table in sorted(self.choice_priors.items())}}),
            **({} if self.combination is None else {"combination": [c.to_dict() for c in self.combination]}),
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
        version = d.get("schema_version")
        if "schema_version" in d and (isinstance(version, bool) or version not in READABLE_VERSIONS):
            raise ArtifactError(f"unknown artifact schema_version {version!r}; this version reads "
                                f"{', '.join(map(str, READABLE_VERSIONS))}")
        required = READABLE_VERSIONS[version] if version in READABLE_VERSIONS else READABLE_VERSIONS[SCHEMA_VERSION]
        missing = [k for k in required if k not in d]
        if missing:
            raise ArtifactError(f"artifact (schema_version {version!r}) is missing field(s) {missing}")
        unknown = set(d) - {*required, "curve", "cluster_thresholds", "choice_priors", "combination"}
        if unknown:
            raise ArtifactError(f"artifact (schema_version {version}) has unknown field(s) {sorted(unknown)}")
        curve = None if d.get("curve") is None else Curve.from_dict(d["curve"])
        models = d["models"]
        if not isinstance(models, list):
            raise ArtifactError(f"models must be a list, got {models!r}")
        levels = None if d.get("levels") is None else Levels.from_dict(d["levels"], len(models) - 1)
        return cls(tuple(models), d["measure"], d["thresholds"], d["method"], d["params"], d["data_fingerprint"],
                   d["n"], d["feasible"], d["message"], curve, d.get("cluster_thresholds"), d["created"],
                   SCHEMA_VERSION, d.get("choice_priors"), levels, _read_combination(d.get("combination")))

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write atomically: a temporary file in the same directory, fsync, then ``os.replace``.

        A failed write leaves no partial file and an existing artifact at ``path`` untouched.

        Raises:
            ArtifactError: the file could not be written.
        """
        target = Path(path)
        try:
            write_text_atomic(target, self.to_json(), fsync=True)
        except OSError as e:
            raise ArtifactError(f"cannot write artifact {target}: {e}") from e
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


def _read_combination(raw: object) -> tuple[Combination, ...] | None:
    """The ``combination`` field of an artifact file, or None when absent."""
    if raw is None:
        return None
    if not isinstance(raw, list) or not all(isinstance(r, Mapping) for r in raw):
        raise ArtifactError("combination must be a list of records, one per stage")
    try:
        return tuple(Combination.from_dict(r) for r in raw)
    except CascadeError as exc:
        raise ArtifactError(f"combination: {exc}") from exc


def _check_combination(measure: str, combination: object, stages: int) -> None:
    """``combination`` is one Combination per stage exactly when the measure is ``"combined"``."""
    if measure != COMBINED:
        if combination is not None:
            raise ArtifactError(f"combination is only stored with measure {COMBINED!r}, not {measure!r}")
        return
    if not isinstance(combination, tuple) or len(combination) != stages or not all(
            isinstance(c, Combination) for c in combination):
        raise ArtifactError(f"measure {COMBINED!r} needs a combination for each of the {stages} stage(s)")


def _check_priors(raw: object, tiers: int) -> dict[int, dict[str, tuple[float, ...]]]:
    """Validate ``choice_priors``: tier index -> JSON list of choices -> one finite offset per choice."""
    import math

    if not isinstance(raw, Mapping):
        raise ArtifactError("choice_priors must map tier indexes to tables of choice sets")
    out: dict[int, dict[str, tuple[float, ...]]] = {}
    for tier, table in raw.items():
        try:
            index = int(tier)
        except (TypeError, ValueError):
            raise ArtifactError(f"choice_priors: tier {tier!r} is not an integer") from None
        if not 0 <= index < tiers or not isinstance(table, Mapping):
            raise ArtifactError(f"choice_priors: tier {tier!r} must be in 0..{tiers - 1} and map choice sets")
        rows: dict[str, tuple[float, ...]] = {}
        for key, offsets in table.items():
            try:
                choices = json.loads(key)
            except (TypeError, ValueError):
                choices = None
            ok = isinstance(choices, list) and choices and all(isinstance(c, str) for c in choices)
            if not ok or not isinstance(offsets, Sequence) or len(offsets) != len(choices) or not all(
                    isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in offsets):
                raise ArtifactError(f"choice_priors[{tier}]: {key!r} must be a JSON list of choices with one "
                                    f"finite offset each")
            rows[key] = tuple(float(x) for x in offsets)
        out[index] = rows
    return out


def load(path: str | os.PathLike[str], *, expect_models: Sequence[str] | None = None,
         expect_measure: str | None = None) -> Artifact:
    """Read and check an artifact; see :meth:`Artifact.load`."""
    return Artifact.load(path, expect_models=expect_models, expect_measure=expect_measure)
