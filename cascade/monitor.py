"""Live checks that a calibration still holds: drift, escalation rate and shadow-pair disagreement per stage.

A threshold is fitted once, on held-out data. Traffic then drifts, and the cascade escalates too much (cost)
or too little (quality) without anything failing. :class:`Monitor` watches three things per stage (a stage
is a non-last tier with a threshold), all from data the engine already has:

* **Drift of the uncertainty distribution.** A sliding window of the stage's recent uncertainties is compared
  with its calibration distribution (:class:`Reference`) by the two-sample Kolmogorov-Smirnov statistic
  ``D = sup |F_ref(x) - F_window(x)|`` and its asymptotic p-value (the Kolmogorov distribution at the
  effective size ``n m / (n + m)``, as ``scipy.stats.ks_2samp(method="asymp")`` computes it). A reference read
  off an artifact's thinned sweep curve knows ``F_ref`` at its grid points only; ``D`` is then taken over
  those points, a lower bound of the full statistic, so the p-value is conservative (never too small).
* **Escalation rate** over the same window, next to the rate measured at calibration (``1 - F_ref(t)`` at the
  stage's threshold ``t``).
* **Shadow pairs** (:mod:`cascade.shadow`): a share of accepted answers is also sent to the last tier; the
  share of pairs that disagree gets a one-sided Clopper-Pearson upper bound at the configured confidence.
  Since an accepted answer can only lose accuracy against the last tier where the two disagree, ``accepted
  share x disagreement`` bounds the stage's contribution to the quality loss; the state compares that upper
  bound with the artifact's ``max_quality_loss``. For an artifact certified on accuracy this is conservative
  (a disagreement where the small answer was right is counted as a loss).

States per stage: ``violated`` (the loss bound is above the target, from at least ``min_pairs`` pairs),
``drifting`` (the window's p-value is below ``drift_alpha``), else ``ok``. A state change is logged.

Only requests on the policy's own thresholds count towards the escalation rate and the drift of stages above
the first (a per-request target or a router cluster changes which answers reach them); the first stage sees
every request, so its drift counts all of them. Pure statistics (:func:`ks_statistic`, :func:`ks_pvalue`,
:func:`cp_upper`) are plain functions; :class:`Monitor` holds the windows and counters of one cascade (one
event loop: no locks).
"""

from __future__ import annotations

import logging
import math
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from cascade.curve import Curve, check_fraction
from cascade.errors import ConfigError

__all__ = ["STATES", "Monitor", "MonitorConfig", "Reference", "cp_upper", "ks_pvalue", "ks_statistic",
           "worst_state"]

log = logging.getLogger("cascade.monitor")

STATES = ("ok", "drifting", "violated")


@dataclass(frozen=True)
class MonitorConfig:
    """The ``monitor:`` section of a config.

    Attributes:
        shadow_rate: share of accepted answers also sent to the last tier, in [0, 1] (default 0: none).
        shadow_concurrency: most shadow calls in flight; a check that finds them all busy is dropped
            (counted), so shadows never queue behind users (default 4).
        window: uncertainties per stage in the sliding drift window (default 500).
        min_window: fewest values in the window before drift is tested (default 100).
        check_every: observations per stage between state checks (default 50).
        drift_alpha: p-value below which a stage is ``drifting`` (default 0.001: the window is tested every
            ``check_every`` requests, so a small level keeps false alarms rare over a long run).
        confidence: confidence of the shadow disagreement bound (default 0.9).
        min_pairs: fewest shadow pairs before a stage can be ``violated`` (default 100).
        max_quality_loss: the target the shadow bound is compared with; None: the artifact's
            ``max_quality_loss`` (no target, no ``violated`` state).
        log_path: JSONL file shadow pairs are appended to (:mod:`cascade.shadow`), or None.
        log_escalated: also log escalated requests whose first answer was complete, with the last tier's
            answer (they cost nothing extra; ``"sampled": false`` marks them).
        seed: seed of the shadow sampling (None: unseeded).
    """

    shadow_rate: float = 0.0
    shadow_concurrency: int = 4
    window: int = 500
    min_window: int = 100
    check_every: int = 50
    drift_alpha: float = 0.001
    confidence: float = 0.9
    min_pairs: int = 100
    max_quality_loss: float | None = None
    log_path: str | None = None
    log_escalated: bool = False
    seed: int | None = None

    def __post_init__(self) -> None:
        try:
            check_fraction("monitor.shadow_rate", self.shadow_rate)
            check_fraction("monitor.drift_alpha", self.drift_alpha)
            check_fraction("monitor.confidence", self.confidence, 0.5, 0.999999)
            if self.max_quality_loss is not None:
                check_fraction("monitor.max_quality_loss", self.max_quality_loss)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        if self.log_path is not None and (not isinstance(self.log_path, str) or not self.log_path):
            raise ConfigError("monitor.log_path must be a file path")
        for name in ("shadow_concurrency", "window", "min_window", "check_every", "min_pairs"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"monitor.{name} must be an integer >= 1, got {value!r}")
        if self.min_window > self.window:
            raise ConfigError("monitor.min_window must be <= monitor.window")


@dataclass(frozen=True)
class Reference:
    """A stage's calibration distribution of the uncertainty, as its CDF on an ascending grid.

    Attributes:
        xs: grid points, ascending, finite.
        cdf: ``F(x_i) = P(u <= x_i)`` at each grid point, non-decreasing in [0, 1].
        n: size of the calibration sample.
        exact: the grid holds every distinct sample value (the KS statistic is then exact); False for a
            thinned grid (a lower bound of the statistic: conservative p-values).
    """

    xs: tuple[float, ...]
    cdf: tuple[float, ...]
    n: int
    exact: bool

    def __post_init__(self) -> None:
        if not self.xs or len(self.xs) != len(self.cdf) or self.n < 1:
            raise ConfigError("a reference needs >= 1 grid point, one CDF value per point and n >= 1")

    @classmethod
    def from_sample(cls, values: npt.ArrayLike) -> Reference:
        """The empirical distribution of a calibration sample (NaN and infinite values are left out)."""
        v = np.asarray(values, dtype=np.float64).ravel()
        v = np.sort(v[np.isfinite(v)])
        if v.size == 0:
            raise ConfigError("a reference sample needs at least one finite value")
        xs, counts = np.unique(v, return_counts=True)
        return cls(tuple(xs.tolist()), tuple((np.cumsum(counts) / v.size).tolist()), int(v.size), True)

    @classmethod
    def from_curve(cls, curve: Curve, n: int) -> Reference | None:
        """The first stage's distribution read off a two-tier sweep curve (None for other curves).

        A sweep point ``(t, large_share)`` says ``P(u > t) = large_share`` on the calibration data, so
        ``F(t) = 1 - large_share``. The curve may be thinned: the grid is then its points only.
        """
        if curve.kind != "sweep" or len(curve.thresholds[0]) != 1 or n < 1:
            return None
        pairs = sorted({(t[0], 1.0 - s) for t, s in zip(curve.thresholds, curve.large_share) if math.isfinite(t[0])})
        if not pairs:
            return None
        return cls(tuple(p[0] for p in pairs), tuple(min(1.0, max(0.0, p[1])) for p in pairs), n, False)

    def at(self, x: float) -> float:
        """``F(x)`` at the largest grid point <= x (0 below the grid)."""
        i = int(np.searchsorted(np.asarray(self.xs), x, side="right"))
        return 0.0 if i == 0 else self.cdf[i - 1]


def ks_statistic(reference: Reference, window: npt.ArrayLike) -> float:
    """The two-sample KS statistic between the reference and a window of finite values (0 for an empty one).

    With an exact reference this is ``sup_x |F_ref(x) - F_win(x)|``: between two grid points ``F_ref`` is
    constant, so the supremum is attained at a grid point or just below one (left limits are compared with
    the previous point's CDF). With a thinned grid only the grid points are compared.
    """
    w = np.sort(np.asarray(window, dtype=np.float64).ravel())
    if w.size == 0:
        return 0.0
    xs = np.asarray(reference.xs)
    f = np.asarray(reference.cdf)
    g = np.searchsorted(w, xs, side="right") / w.size  # F_win(x_i)
    d = float(np.max(np.abs(f - g)))
    if reference.exact:
        g_left = np.searchsorted(w, xs, side="left") / w.size  # F_win(x_i^-)
        f_prev = np.concatenate(([0.0], f[:-1]))  # F_ref just below x_i
        d = max(d, float(np.max(np.abs(f_prev - g_left))))
    return d


def ks_pvalue(d: float, n: int, m: int) -> float:
    """Asymptotic p-value of a two-sample KS statistic ``d`` for samples of sizes ``n`` and ``m``."""
    from scipy.stats import kstwo

    if n < 1 or m < 1:
        return 1.0
    en = max(1, round(n * m / (n + m)))
    return float(min(1.0, max(0.0, kstwo.sf(d, en))))


def cp_upper(k: int, n: int, confidence: float) -> float:
    """One-sided Clopper-Pearson upper bound for ``k`` events in ``n`` trials (1 when ``n == 0`` or ``k == n``)."""
    from scipy.stats import beta

    if n <= 0 or k >= n:
        return 1.0
    return float(beta.ppf(confidence, k + 1, n - k))


class _Stage:
    """Counters and windows of one stage."""

    def __init__(self, name: str, window: int, reference: Reference | None, expected_rate: float | None) -> None:
        self.name = name
        self.reference = reference
        self.expected_rate = expected_rate
        self.values: deque[float] = deque(maxlen=window)
        self.escalated: deque[bool] = deque(maxlen=window)
        self.seen = self.escalations = self.since_check = 0
        self.accepted = 0
        self.pairs = self.disagreements = 0
        self.state = "ok"


class Monitor:
    """Drift, escalation and shadow estimates of one cascade's stages (see the module docstring).

    Args:
        config: the ``monitor:`` settings.
        stages: names of the non-last tiers, in order.
        references: per stage, its calibration distribution or None (no drift test).
        target: the quality-loss target the shadow bound is compared with, or None.
    """

    def __init__(self, config: MonitorConfig, stages: Sequence[str], references: Sequence[Reference | None],
                 expected_rates: Sequence[float | None], target: float | None) -> None:
        if not len(stages) == len(references) == len(expected_rates):
            raise ConfigError("a monitor needs one reference and one expected rate per stage")
        self.config = config
        self.target = config.max_quality_loss if config.max_quality_loss is not None else target
        self.stages = [_Stage(s, config.window, r, e) for s, r, e in zip(stages, references, expected_rates)]
        self.shadow_calls = self.shadow_dropped = self.shadow_failed = 0
        self.shadow_cost = 0.0
        self.generation = 0  # bumped on every policy swap
        self.on_change: Callable[[int, str, str], None] | None = None  # called as (stage, old, new) on a change

    @classmethod
    def for_policy(cls, config: MonitorConfig, policy: Any, tier_names: Sequence[str]) -> Monitor:
        """A monitor for a cascade's policy (:class:`cascade.policy.Policy`): references and the target come
        from its artifact (a two-tier sweep curve gives the first stage's reference), none without one."""
        stages = list(tier_names[:-1])
        refs: list[Reference | None] = [None] * len(stages)
        rates: list[float | None] = [None] * len(stages)
        target = None
        art = policy.artifact
        if art is not None:
            if art.curve is not None:
                refs[0] = Reference.from_curve(art.curve, int(art.n))
            if refs[0] is not None and math.isfinite(policy.thresholds[0]):
                rates[0] = _calibrated_rate(art.curve, refs[0], policy.thresholds[0])
            raw = art.params.get("max_quality_loss")
            target = float(raw) if isinstance(raw, (int, float)) and not isinstance(raw, bool) else None
        return cls(config, stages, refs, rates, target)

    def set_reference(self, stage: int, reference: Reference, threshold: float | None = None) -> None:
        """Give ``stage`` a calibration distribution (e.g. :meth:`Reference.from_sample` of held-out
        uncertainties, for hand-set thresholds); with ``threshold``, its calibrated escalation rate too."""
        s = self.stages[stage]
        s.reference = reference
        s.expected_rate = None if threshold is None else 1.0 - reference.at(threshold)

    def replace_references(self, other: Monitor, thresholds: Sequence[float]) -> None:
        """Take the stages of a monitor built for a new policy (after a swap to ``thresholds``): counters,
        shadow pairs and the windows of higher stages restart, since they described the old thresholds. The
        first stage's window is kept (it sees every request whatever the thresholds), and a stage the new
        policy gives no reference keeps its old one, with the calibrated rate read at the new threshold."""
        for i, (new, old) in enumerate(zip(other.stages, self.stages)):
            if new.reference is None and old.reference is not None:
                new.reference = old.reference
                new.expected_rate = 1.0 - old.reference.at(thresholds[i]) if math.isfinite(thresholds[i]) else None
            if i == 0:
                new.values, new.state = old.values, old.state
        self.target = other.target
        self.stages = other.stages
        self.generation += 1

    def observe(self, stage: int, uncertainty: float, escalated: bool, own_thresholds: bool) -> None:
        """One answer of ``stage`` (not the last tier) was decided."""
        s = self.stages[stage]
        if (stage == 0 or own_thresholds) and math.isfinite(uncertainty):
            s.values.append(uncertainty)
        if own_thresholds:
            s.seen += 1
            s.escalations += int(escalated)
            s.accepted += int(not escalated)
            s.escalated.append(escalated)
        s.since_check += 1
        if s.since_check >= self.config.check_every:
            s.since_check = 0
            self._check(stage)

    def observe_pair(self, stage: int, agree: bool) -> None:
        """One shadow pair of an answer accepted at ``stage`` (compared with the last tier's)."""
        s = self.stages[stage]
        s.pairs += 1
        s.disagreements += int(not agree)
        if s.pairs % self.config.check_every == 0:
            self._check(stage)

    def _check(self, stage: int) -> None:
        s = self.stages[stage]
        status = self.stage_status(stage)
        new = status["state"]
        if new != s.state:
            level = logging.INFO if new == "ok" else logging.WARNING
            log.log(level, "stage %r: calibration state %s -> %s (%s)", s.name, s.state, new, _why(status))
            old, s.state = s.state, new
            if self.on_change is not None:
                self.on_change(stage, old, new)

    def stage_status(self, stage: int) -> dict[str, Any]:
        """The live estimates of one stage (JSON-ready)."""
        s = self.stages[stage]
        cfg = self.config
        drift: dict[str, Any] = {"window": len(s.values), "reference_n": None, "statistic": None, "p_value": None,
                                 "alpha": cfg.drift_alpha, "exact": None}
        if s.reference is not None:
            drift.update(reference_n=s.reference.n, exact=s.reference.exact)
            if len(s.values) >= cfg.min_window:
                d = ks_statistic(s.reference, np.fromiter(s.values, dtype=np.float64))
                drift.update(statistic=d, p_value=ks_pvalue(d, s.reference.n, len(s.values)))
        window_rate = sum(s.escalated) / len(s.escalated) if s.escalated else None
        accepted_share = s.accepted / s.seen if s.seen else None
        disagree = s.disagreements / s.pairs if s.pairs else None
        upper = cp_upper(s.disagreements, s.pairs, cfg.confidence)
        loss_upper = None if accepted_share is None else accepted_share * upper
        state = "ok"
        if drift["p_value"] is not None and drift["p_value"] < cfg.drift_alpha:
            state = "drifting"
        if (self.target is not None and loss_upper is not None and s.pairs >= cfg.min_pairs
                and loss_upper > self.target):
            state = "violated"
        return {
            "stage": stage, "tier": s.name, "state": state, "requests": s.seen, "escalations": s.escalations,
            "escalation_rate": s.escalations / s.seen if s.seen else None, "window_escalation_rate": window_rate,
            "calibrated_escalation_rate": s.expected_rate, "drift": drift,
            "shadow": {"pairs": s.pairs, "disagreements": s.disagreements, "disagreement_rate": disagree,
                       "disagreement_upper": upper if s.pairs else None, "accepted_share": accepted_share,
                       "loss_upper": loss_upper if s.pairs else None, "confidence": cfg.confidence,
                       "target": self.target, "min_pairs": cfg.min_pairs},
        }

    def status(self) -> dict[str, Any]:
        """Every stage's estimates and the shadow bookkeeping (JSON-ready; ``/v1/cascade/status``)."""
        stages = [self.stage_status(i) for i in range(len(self.stages))]
        return {"state": worst_state(s["state"] for s in stages), "stages": stages, "generation": self.generation,
                "shadow": {"rate": self.config.shadow_rate, "calls": self.shadow_calls,
                           "dropped": self.shadow_dropped, "failed": self.shadow_failed, "cost": self.shadow_cost}}


def worst_state(states: Iterable[str]) -> str:
    """The most serious of some states (``violated`` > ``drifting`` > ``ok``; ``ok`` for none)."""
    return STATES[max((STATES.index(s) for s in states), default=0)]


def _calibrated_rate(curve: Curve, reference: Reference, threshold: float) -> float:
    """The share escalated at ``threshold`` on the calibration data: the curve's point at it, else read off the
    reference's grid (the largest grid point at or below it)."""
    for t, share in zip(curve.thresholds, curve.large_share):
        if t[0] == threshold:
            return share
    return 1.0 - reference.at(threshold)


def _why(status: Mapping[str, Any]) -> str:
    drift, shadow = status["drift"], status["shadow"]
    parts = []
    if drift["p_value"] is not None:
        parts.append(f"KS D={drift['statistic']:.3f} p={drift['p_value']:.2g} over {drift['window']} values")
    if shadow["loss_upper"] is not None:
        parts.append(f"loss bound {shadow['loss_upper']:.3f} vs target {shadow['target']} "
                     f"from {shadow['pairs']} shadow pairs")
    return "; ".join(parts) or "no data"
