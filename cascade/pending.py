"""One request moving up a cascade's chain: its thresholds, what each tier did, and its result.

Shared by :meth:`cascade.engine.Cascade.run_batch` and :func:`cascade.streaming.stream_chain`.

**Tier skipping.** A stage whose threshold is ``-inf`` escalates every answer (``escalate iff uncertainty >
threshold`` holds for any uncertainty, NaN included), so its answer would never be kept: the request skips
that tier and is not charged for it. A per-request target whose certified set escalates everything at the
first stage enters the chain at a higher tier. The last tier is never skipped.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from cascade.policy import Policy, Target
from cascade.types import CascadeResult, Generation, Prompt, TierCall

__all__ = ["Pending"]


@dataclass
class Pending:
    """One request's state.

    Attributes:
        index: its position in the batch.
        prompt: the checked prompt.
        thresholds: one per stage.
        target: the label of its per-request target, or None.
        cluster: its router cluster, or None.
        source: where the thresholds came from (:class:`cascade.policy.Resolved`).
        level: the certified level used, or None.
        choices: its allowed answers, or None for a free answer.
        calls: one :class:`TierCall` per tier called so far.
        skipped: names of the tiers skipped.
        first_uncertainty: the first tier's uncertainty (NaN until it answers, or when skipped).
        policy: the policy the request started with (a policy swapped in meanwhile does not change it).
        first_answer: the first tier's answer, or None (kept for shadow checks, :mod:`cascade.shadow`).
        answer: the latest tier's answer (kept in case a higher tier fails).
        answer_tier: that tier's index (-1: none yet).
        reason: the decision so far, in words.
        degraded: a higher tier failed and a lower answer stands.
        error: why the request failed (it then has no result).
    """

    index: int
    prompt: Prompt
    thresholds: tuple[float, ...]
    target: str | None
    cluster: int | None
    source: str = "fixed"
    level: float | None = None
    choices: tuple[str, ...] | None = None
    calls: list[TierCall] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    first_uncertainty: float = math.nan
    policy: Policy | None = None
    first_answer: Generation | None = None
    answer: Generation | None = None
    answer_tier: int = -1
    reason: str = ""
    degraded: bool = False
    error: BaseException | None = None

    @classmethod
    def start(cls, index: int, prompt: Prompt, policy: Policy, cluster: int | None, target: Target | None,
              choices: tuple[str, ...] | None = None) -> Pending:
        """A request at the bottom of the chain, its thresholds resolved by the policy.

        Raises:
            InvalidRequestError: the target cannot be resolved (see :meth:`cascade.policy.Policy.resolve`).
        """
        got = policy.resolve(cluster, target)
        return cls(index, prompt, got.thresholds, target.label() if target else None, cluster, got.source,
                   got.level, choices, policy=policy)

    @property
    def on_own_thresholds(self) -> bool:
        """True when the request uses the policy's own thresholds (no per-request target, no router cluster's):
        the requests the live calibration checks count (:mod:`cascade.monitor`)."""
        return self.source in ("artifact", "fixed")

    def skips(self, level: int) -> bool:
        """True when stage ``level``'s answer would never be kept (threshold ``-inf``); never for the last tier."""
        return level < len(self.thresholds) and self.thresholds[level] == -math.inf

    def skip(self, tier: str) -> None:
        """Record that ``tier`` was skipped."""
        self.skipped.append(tier)
        self.reason += f"{tier!r} skipped (threshold -inf: its answer would never be kept); "

    def result(self, tiers: Sequence[str], measure: str, latency: float) -> CascadeResult:
        """The finished request's result (``tiers``: every tier's name, cheapest first)."""
        assert self.answer is not None
        return CascadeResult(
            text=self.answer.text,
            tier=tiers[self.answer_tier],
            tier_index=self.answer_tier,
            escalated=any(c.tier != tiers[0] for c in self.calls),
            uncertainty=self.first_uncertainty,
            measure=measure,
            threshold=self.thresholds[0],
            reason=self.reason.strip(),
            calls=tuple(self.calls),
            cost=sum(c.cost for c in self.calls),
            latency_s=latency,
            degraded=self.degraded,
            target=self.target,
            cluster=self.cluster,
            threshold_source=self.source,
            certified_level=self.level,
            skipped=tuple(self.skipped),
        )
