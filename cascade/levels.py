"""Certified per-request quality levels: several quality targets certified in one calibration run.

``cascade-calibrate --max-quality-loss 0.02 0.05 0.10 --confidence 0.9`` certifies one threshold set per level
(:func:`calibration.fit.fit_levels`: each level tested at ``(1 - confidence) / L``, so that with probability
>= confidence *every* level holds at once) and stores them in the artifact (``levels``). At request time
:meth:`Levels.for_target` gives a ``max_quality_loss`` target ``tau`` the set of the loosest stored level
``eps_l <= tau``. *Why the request's target holds:* on the event that every level holds (probability >=
confidence over the calibration draw), the loss of that set is <= ``eps_l`` <= ``tau``. A target below every
stored level is an :class:`~cascade.errors.InvalidRequestError` (HTTP 400): nothing is read off the measured
curve in its place, so a request never silently gets a weaker promise than the artifact states.

The lookup is a scan of a handful of stored levels: nothing measurable per request.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from cascade.curve import check_fraction, decode_float, decode_floats, encode_float
from cascade.errors import ArtifactError, InvalidRequestError

__all__ = ["Level", "Levels"]

_LEVEL_KEYS = ("max_quality_loss", "thresholds", "certified_loss_bound", "feasible", "large_share", "mean_cost")
_KEYS = ("confidence", "delta_per_level", "correction", "claim", "family", "items")


@dataclass(frozen=True)
class Level:
    """One certified level.

    Attributes:
        max_quality_loss: the target eps this threshold set is certified for.
        thresholds: N-1 thresholds (all ``-inf``: always the last tier, lower tiers skipped).
        certified_loss_bound: the upper confidence bound of the loss at those thresholds (0 for always-last).
        feasible: False when nothing cheaper than always-last was certified (the set then escalates everything).
        large_share: share of calibration requests answered by the last tier.
        mean_cost: mean cost per calibration request.
    """

    max_quality_loss: float
    thresholds: tuple[float, ...]
    certified_loss_bound: float
    feasible: bool
    large_share: float
    mean_cost: float

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (infinite thresholds as strings)."""
        return {"max_quality_loss": self.max_quality_loss, "thresholds": [encode_float(t) for t in self.thresholds],
                "certified_loss_bound": self.certified_loss_bound, "feasible": self.feasible,
                "large_share": self.large_share, "mean_cost": self.mean_cost}

    @classmethod
    def from_dict(cls, d: object, stages: int) -> Level:
        """Parse :meth:`to_dict` output for a chain of ``stages + 1`` tiers, raising :class:`ArtifactError`."""
        if not isinstance(d, Mapping) or set(d) != set(_LEVEL_KEYS):
            raise ArtifactError(f"each level needs exactly the fields {list(_LEVEL_KEYS)}")
        if not isinstance(d["feasible"], bool):
            raise ArtifactError("a level's feasible must be a boolean")
        numbers = {k: decode_float(d[k], f"level {k}") for k in ("max_quality_loss", "certified_loss_bound",
                                                                     "large_share", "mean_cost")}
        if not all(math.isfinite(v) for v in numbers.values()) or not 0.0 <= numbers["max_quality_loss"] < 1.0:
            raise ArtifactError(f"a level's numbers must be finite and its max_quality_loss in [0, 1): {numbers}")
        return cls(numbers["max_quality_loss"], decode_floats(d["thresholds"], "level thresholds", stages),
                   numbers["certified_loss_bound"], d["feasible"], numbers["large_share"], numbers["mean_cost"])


@dataclass(frozen=True)
class Levels:
    """The certified levels of an artifact.

    Attributes:
        items: the levels, ``max_quality_loss`` strictly ascending.
        confidence: every level holds at once with at least this probability over the calibration draw.
        delta_per_level: the level each one was tested at (``(1 - confidence) / L``, Bonferroni).
        correction: ``"bonferroni"`` (``"none"`` for one level).
        claim: what the levels bound (``"accuracy"`` loss against the last tier, or ``"disagreement"`` with it).
        family: the candidate family the thresholds came from (``"common"``, ``"per_stage"`` or ``"top_down"``).
    """

    items: tuple[Level, ...]
    confidence: float
    delta_per_level: float
    correction: str
    claim: str
    family: str

    def __post_init__(self) -> None:
        eps = [lv.max_quality_loss for lv in self.items]
        if not eps or any(b <= a for a, b in itertools.pairwise(eps)):
            raise ArtifactError(f"levels must be at least one, max_quality_loss strictly ascending, got {eps}")
        if not 0.0 < self.confidence < 1.0 or not 0.0 < self.delta_per_level < 1.0:
            raise ArtifactError("levels need 0 < confidence < 1 and 0 < delta_per_level < 1")
        if self.correction not in ("bonferroni", "none") or not self.claim or not self.family:
            raise ArtifactError(f"unknown levels correction {self.correction!r}, or an empty claim or family")

    @property
    def targets(self) -> tuple[float, ...]:
        """The stored ``max_quality_loss`` levels, ascending."""
        return tuple(lv.max_quality_loss for lv in self.items)

    def for_target(self, max_quality_loss: float) -> Level:
        """The loosest stored level at or below ``max_quality_loss``.

        Raises:
            InvalidRequestError: a bad number, or a target below every stored level.
        """
        tau = check_fraction("max_quality_loss", max_quality_loss)
        found = [lv for lv in self.items if lv.max_quality_loss <= tau + 1e-12]
        if not found:
            raise InvalidRequestError(
                f"max_quality_loss={max_quality_loss:g} is below every certified level of this artifact "
                f"({', '.join(f'{e:g}' for e in self.targets)}); ask for one of them or a looser target, or "
                "recalibrate with a tighter --max-quality-loss")
        return found[-1]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {"confidence": self.confidence, "delta_per_level": self.delta_per_level,
                "correction": self.correction, "claim": self.claim, "family": self.family,
                "items": [lv.to_dict() for lv in self.items]}

    @classmethod
    def from_dict(cls, d: object, stages: int) -> Levels:
        """Parse :meth:`to_dict` output, raising :class:`ArtifactError` on any malformed field."""
        if not isinstance(d, Mapping):
            raise ArtifactError(f"levels must be an object or null, got {type(d).__name__}")
        missing = [k for k in _KEYS if k not in d]
        if missing or set(d) - set(_KEYS):
            raise ArtifactError(f"levels is missing {missing} or has unknown fields {sorted(set(d) - set(_KEYS))}")
        if not isinstance(d["items"], list) or not all(isinstance(d[k], str) for k in ("correction", "claim",
                                                                                        "family")):
            raise ArtifactError("levels items must be a list; correction, claim and family strings")
        return cls(tuple(Level.from_dict(x, stages) for x in d["items"]),
                   decode_float(d["confidence"], "levels confidence"),
                   decode_float(d["delta_per_level"], "levels delta_per_level"), d["correction"], d["claim"],
                   d["family"])
