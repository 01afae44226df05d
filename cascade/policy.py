"""The escalation policy: plain functions of (uncertainty, thresholds) -> which tier answers.

Thresholds never live in a backend. A :class:`Policy` holds the measure and the thresholds of every stage
(one fewer than the tiers), optionally per router cluster, and, when it comes from a calibration artifact,
the measured curve from which a per-request quality target picks its own thresholds.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cascade.artifact import Artifact
from cascade.combined import COMBINED, Combination
from cascade.curve import threshold_for_target
from cascade.errors import ArtifactError, InvalidRequestError
from cascade.uncertainty import check_measure

__all__ = ["Policy", "Resolved", "Target", "escalates"]


def escalates(uncertainty: float, threshold: float) -> bool:
    """The one rule: escalate iff the uncertainty is strictly above the threshold (NaN escalates)."""
    return not uncertainty <= threshold


@dataclass(frozen=True)
class Target:
    """A per-request quality level; at most one field may be set.

    Attributes:
        max_large_share: escalate at most this share of traffic to the last tier, in [0, 1].
        max_quality_loss: accept at most this accuracy loss against always using the last tier, in [0, 1].
    """

    max_large_share: float | None = None
    max_quality_loss: float | None = None

    def __post_init__(self) -> None:
        given = [v for v in (self.max_large_share, self.max_quality_loss) if v is not None]
        if len(given) != 1:
            raise InvalidRequestError("a target sets exactly one of max_large_share, max_quality_loss")
        value = given[0]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
            raise InvalidRequestError(f"a target must be a number in [0, 1], got {value!r}")

    @classmethod
    def parse(cls, raw: object) -> Target | None:
        """Build a target from a JSON-like mapping (``None`` passes through), raising InvalidRequestError."""
        if raw is None or isinstance(raw, Target):
            return raw
        if not isinstance(raw, Mapping) or set(raw) - {"max_large_share", "max_quality_loss"}:
            raise InvalidRequestError("target must be an object with max_large_share or max_quality_loss")
        return cls(**dict(raw))

    def label(self) -> str:
        """A short description such as ``max_large_share=0.3``."""
        if self.max_large_share is not None:
            return f"max_large_share={self.max_large_share:g}"
        return f"max_quality_loss={self.max_quality_loss:g}"


@dataclass(frozen=True)
class Policy:
    """Measure and thresholds of a cascade.

    Attributes:
        measure: the uncertainty measure the thresholds apply to.
        thresholds: one threshold per stage (tiers minus one); ``inf`` never escalates, ``-inf`` always does.
        cluster_thresholds: per router cluster thresholds overriding ``thresholds``.
        models: tier model identities the thresholds were fitted for (empty for hand-set thresholds).
        artifact: the calibration artifact this policy came from (enables per-request targets), or None.
        choice_priors: tier index -> choice set key -> offsets: each tier's prior over a set of allowed
            answers, subtracted from its constrained answers (:mod:`cascade.choice_prior`); empty = none.
        combination: with measure ``"combined"``, each stage's fitted combination of its measures and answers
            (:mod:`cascade.combined`); empty otherwise.
    """

    measure: str
    thresholds: tuple[float, ...]
    cluster_thresholds: Mapping[int, tuple[float, ...]] = field(default_factory=dict)
    models: tuple[str, ...] = ()
    artifact: Artifact | None = None
    choice_priors: Mapping[int, Mapping[str, tuple[float, ...]]] = field(default_factory=dict)
    combination: tuple[Combination, ...] = ()

    def __post_init__(self) -> None:
        if not self.thresholds:
            raise InvalidRequestError("a policy needs at least one threshold")
        if self.measure == COMBINED:
            if len(self.combination) != len(self.thresholds):
                raise InvalidRequestError(f"measure {COMBINED!r} needs fitted weights for each stage: load it from "
                                          "an artifact written by cascade-calibrate --measure combined")
        else:
            check_measure(self.measure)
            if self.combination:
                raise InvalidRequestError(f"a combination goes with measure {COMBINED!r} only")
        for t in (*self.thresholds, *(x for ts in self.cluster_thresholds.values() for x in ts)):
            if isinstance(t, bool) or not isinstance(t, (int, float)) or math.isnan(t):
                raise InvalidRequestError(f"thresholds must be numbers, got {t!r}")
        for cluster, ts in self.cluster_thresholds.items():
            if len(ts) != len(self.thresholds):
                raise InvalidRequestError(f"cluster {cluster} has {len(ts)} thresholds, expected {len(self)}")

    def __len__(self) -> int:
        return len(self.thresholds)

    @classmethod
    def fixed(cls, threshold: float | Sequence[float], measure: str = "margin_first") -> Policy:
        """A hand-set threshold (or one per stage for more than two tiers)."""
        ts = (float(threshold),) if isinstance(threshold, (int, float)) else tuple(float(t) for t in threshold)
        return cls(measure=measure, thresholds=ts)

    @classmethod
    def from_artifact(cls, path_or_artifact: str | Path | Artifact, *, models: Sequence[str] | None = None,
                      measure: str | None = None) -> Policy:
        """Load thresholds from a calibration artifact, refusing one fitted for other models or measure.

        Raises:
            ArtifactError: unreadable artifact, or fitted for other models or another measure.
        """
        if not isinstance(path_or_artifact, Artifact):
            art = Artifact.load(Path(str(path_or_artifact)), expect_models=models, expect_measure=measure)
        else:
            art = path_or_artifact
            if models is not None and tuple(art.models) != tuple(models):
                raise ArtifactError(f"artifact fitted for models {list(art.models)}, cascade has {list(models)}")
            if measure is not None and art.measure != measure:
                raise ArtifactError(f"artifact fitted for measure {art.measure!r}, cascade uses {measure!r}")
        clusters = {int(k): tuple(float(x) for x in v) for k, v in (art.cluster_thresholds or {}).items()}
        return cls(measure=art.measure, thresholds=tuple(float(t) for t in art.thresholds),
                   cluster_thresholds=clusters, models=tuple(art.models), artifact=art,
                   choice_priors=dict(art.choice_priors or {}), combination=art.combination or ())

    @property
    def scorer(self) -> str | None:
        """The scorer named by the artifact (what "the same answer" means in shadow checks), or None."""
        name = self.artifact.params.get("scorer") if self.artifact is not None else None
        return name if isinstance(name, str) else None

    def check_replaces(self, old: Policy, models: Sequence[str]) -> None:
        """Refuse to replace ``old`` in a running cascade with tiers ``models`` unless only thresholds change.

        Raises:
            ArtifactError: another measure, another number of stages, or fitted for other models.
        """
        if self.measure != old.measure or len(self) != len(old):
            raise ArtifactError(f"the new thresholds are for measure {self.measure!r} with {len(self)} stage(s); "
                                f"the cascade uses {old.measure!r} with {len(old)}")
        if self.models and tuple(self.models) != tuple(models):
            raise ArtifactError(f"the new artifact was fitted for models {list(self.models)}, "
                                f"the tiers are {list(models)}")

    def uncertainty(self, stage: int, scores: Mapping[str, float], answer: str | None = None) -> float:
        """The policy's measure for one answer of stage ``stage`` from the answer's own measures (NaN when it
        has none): the named score, or for ``"combined"`` the stage's combination of its measures and of the
        answer's text (an answer with none of the combined measures gives NaN)."""
        if self.measure != COMBINED:
            return float(scores.get(self.measure, math.nan))
        c = self.combination[stage]
        if not any(m in scores for m in c.measures):
            return math.nan
        return c.score(scores, answer)

    def prior_for(self, tier: int, choices: Sequence[str]) -> tuple[float, ...] | None:
        """The offsets of tier ``tier`` for this choice set (in this order), or None when it has none."""
        from cascade.choice_prior import choice_set_key

        table = self.choice_priors.get(tier)
        return None if table is None else table.get(choice_set_key(choices))

    def thresholds_for(self, cluster: int | None = None, target: Target | None = None) -> tuple[float, ...]:
        """The thresholds that apply to one request (see :meth:`resolve`, which also says where they came from)."""
        return self.resolve(cluster, target).thresholds

    def resolve(self, cluster: int | None = None, target: Target | None = None) -> Resolved:
        """The thresholds that apply to one request, and where they come from.

        A ``max_quality_loss`` target on an artifact with certified levels gets the loosest stored level at or
        below it (:meth:`cascade.levels.Levels.for_target`, source ``"certified"``); otherwise a target reads
        the measured curve (source ``"curve"``, a point estimate). Without a target: the cluster's thresholds
        (``"cluster"``), else the artifact's (``"artifact"``) or the hand-set ones (``"fixed"``).

        Args:
            cluster: router cluster id, or None.
            target: a per-request quality level; needs a policy loaded from an artifact.

        Raises:
            InvalidRequestError: a target on a policy without an artifact, a target below every certified level,
                or one the curve cannot meet.
        """
        if target is not None:
            if self.artifact is None:
                raise InvalidRequestError("per-request targets need thresholds from a calibration artifact")
            levels = self.artifact.levels
            if target.max_quality_loss is not None and levels is not None:
                level = levels.for_target(target.max_quality_loss)
                return Resolved(level.thresholds, "certified", level.max_quality_loss)
            point = threshold_for_target(self.artifact.curve, max_large_share=target.max_large_share,
                                         max_quality_loss=target.max_quality_loss)
            return Resolved(tuple(float(t) for t in point), "curve")
        if cluster is not None and cluster in self.cluster_thresholds:
            return Resolved(self.cluster_thresholds[cluster], "cluster")
        return Resolved(self.thresholds, "fixed" if self.artifact is None else "artifact")


@dataclass(frozen=True)
class Resolved:
    """The thresholds one request uses, and where they come from.

    Attributes:
        thresholds: one per stage.
        source: ``"certified"`` (a certified per-request level), ``"curve"`` (read off the measured curve: a
            point estimate), ``"cluster"`` (router cluster), ``"artifact"`` (the artifact's own) or ``"fixed"``
            (hand-set).
        level: the certified level's ``max_quality_loss`` (source ``"certified"``), else None.
    """

    thresholds: tuple[float, ...]
    source: str
    level: float | None = None
