"""Prometheus metrics of ``cascade serve``, kept per app (no global registry) and rendered by hand.

Text exposition format 0.0.4: requests by endpoint, status and answering tier; escalations; degraded
answers; tokens and cost by tier; an end-to-end latency histogram; requests in flight; queue depth. With a
``monitor:`` section, the live calibration checks (:mod:`cascade.monitor`): ``cascade_drift_*`` and
``cascade_shadow_*`` per stage (labels ``cascade``, the cascade's index, and ``tier``, the stage's tier).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

from cascade.types import CascadeResult

__all__ = ["Metrics"]


def _label(value: object) -> str:
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


class Metrics:
    """Counters and a latency histogram, rendered in the Prometheus text format (one per app)."""

    BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)

    def __init__(self) -> None:
        self.requests: Counter[tuple[str, str, str]] = Counter()
        self.tokens: Counter[tuple[str, str]] = Counter()
        self.cost: dict[str, float] = {}
        self.usage_estimated: dict[str, int] = {}  # calls whose server reported no prompt token count
        self.escalations = self.degraded = 0
        self.latency_buckets = [0] * len(self.BUCKETS)
        self.latency_sum: float = 0.0
        self.latency_count = 0

    def observe_request(self, endpoint: str, status: int, tiers: Sequence[str], seconds: float) -> None:
        """Count one HTTP request (one count per answer for multi-prompt completions)."""
        for tier in tiers:
            self.requests[(endpoint, str(status), tier)] += 1
        for i, le in enumerate(self.BUCKETS):
            if seconds <= le:
                self.latency_buckets[i] += 1
        self.latency_sum += seconds
        self.latency_count += 1

    def observe_results(self, results: Sequence[CascadeResult]) -> None:
        """Count escalations, degraded answers, tokens and cost per tier."""
        for r in results:
            self.escalations += int(r.escalated)
            self.degraded += int(r.degraded)
            for c in r.calls:
                self.usage_estimated[c.tier] = self.usage_estimated.get(c.tier, 0) + int(c.usage_estimated)
                self.tokens[(c.tier, "prompt")] += c.prompt_tokens
                self.tokens[(c.tier, "completion")] += c.completion_tokens
                self.cost[c.tier] = self.cost.get(c.tier, 0.0) + c.cost

    def render(self, in_flight: int, queue_depth: int, monitor: Mapping[str, Any] | None = None) -> str:
        """The Prometheus text exposition (format 0.0.4); ``monitor`` is the ``/v1/cascade/status`` body."""
        out: list[str] = []

        def metric(name: str, kind: str, help_: str, rows: Sequence[tuple[str, float]]) -> None:
            out.extend([f"# HELP {name} {help_}", f"# TYPE {name} {kind}"])
            out.extend(f"{name}{labels} {value:g}" if isinstance(value, float) else f"{name}{labels} {value}"
                       for labels, value in rows)

        metric("cascade_requests_total", "counter", "HTTP requests by endpoint, status and answering tier.",
               [(f'{{endpoint="{_label(e)}",status="{s}",tier="{_label(t)}"}}', n)
                for (e, s, t), n in sorted(self.requests.items())])
        metric("cascade_escalations_total", "counter", "Answers that called a tier above the first.",
               [("", self.escalations)])
        metric("cascade_degraded_total", "counter", "Answers returned from a lower tier after a failure.",
               [("", self.degraded)])
        metric("cascade_tokens_total", "counter", "Tokens billed by tier and kind.",
               [(f'{{tier="{_label(t)}",kind="{k}"}}', n) for (t, k), n in sorted(self.tokens.items())])
        metric("cascade_cost_total", "counter", "Money spent by tier, in the configured price unit.",
               [(f'{{tier="{_label(t)}"}}', float(c)) for t, c in sorted(self.cost.items())])
        metric("cascade_usage_estimated_total", "counter",
               "Tier calls whose server reported no prompt token count (prompt tokens and cost estimated).",
               [(f'{{tier="{_label(t)}"}}', n) for t, n in sorted(self.usage_estimated.items())])
        rows: list[tuple[str, float]] = [(f'_bucket{{le="{le:g}"}}', n)
                                         for le, n in zip(self.BUCKETS, self.latency_buckets)]
        rows += [('_bucket{le="+Inf"}', self.latency_count), ("_sum", self.latency_sum),
                 ("_count", self.latency_count)]
        metric("cascade_request_latency_seconds", "histogram", "End-to-end request latency.", rows)
        metric("cascade_in_flight_requests", "gauge", "Requests running in the engine.", [("", in_flight)])
        metric("cascade_queue_depth", "gauge", "Requests and prompts waiting (server queue + micro-batchers).",
               [("", queue_depth)])
        if monitor and monitor.get("enabled"):
            _monitor_metrics(metric, monitor["cascades"])
        return "\n".join(out) + "\n"


_STAGE_METRICS = (  # name, help, kind, path in a stage's status
    ("cascade_drift_statistic", "gauge", "Two-sample KS statistic of the stage's uncertainty window against "
     "calibration.", ("drift", "statistic")),
    ("cascade_drift_p_value", "gauge", "p-value of the KS statistic.", ("drift", "p_value")),
    ("cascade_drift_window", "gauge", "Uncertainties in the stage's drift window.", ("drift", "window")),
    ("cascade_drift_escalation_rate", "gauge", "Share of the window's answers escalated.",
     ("window_escalation_rate",)),
    ("cascade_drift_calibrated_escalation_rate", "gauge", "Share escalated on the calibration data.",
     ("calibrated_escalation_rate",)),
    ("cascade_shadow_pairs_total", "counter", "Shadow pairs of answers accepted at the stage.", ("shadow", "pairs")),
    ("cascade_shadow_disagreements_total", "counter", "Shadow pairs whose answers differ.",
     ("shadow", "disagreements")),
    ("cascade_shadow_loss_upper", "gauge", "Upper confidence bound of the stage's quality loss (accepted share "
     "x Clopper-Pearson bound of the disagreement).", ("shadow", "loss_upper")),
)


def _monitor_metrics(metric: Any, cascades: Sequence[Mapping[str, Any]]) -> None:
    stages = [(i, s) for i, c in enumerate(cascades) for s in c["stages"]]

    def labels(i: int, s: Mapping[str, Any]) -> str:
        return f'{{cascade="{i}",tier="{_label(s["tier"])}"}}'

    for name, kind, help_, path in _STAGE_METRICS:
        rows = []
        for i, s in stages:
            value: Any = s
            for key in path:
                value = value[key]
            if value is not None:
                rows.append((labels(i, s), float(value) if kind == "gauge" else int(value)))
        metric(name, kind, help_, rows)
    metric("cascade_drift_state", "gauge", "1 for the stage's current state (ok, drifting, violated).",
           [(f'{{cascade="{i}",tier="{_label(s["tier"])}",state="{st}"}}', int(s["state"] == st))
            for i, s in stages for st in ("ok", "drifting", "violated")])
    for key, help_ in (("calls", "Shadow calls made."), ("dropped", "Shadow checks dropped (all slots busy)."),
                       ("failed", "Shadow calls that failed.")):
        metric(f"cascade_shadow_{key}_total", "counter", help_,
               [(f'{{cascade="{i}"}}', c["shadow"][key]) for i, c in enumerate(cascades)])
    metric("cascade_shadow_cost_total", "counter", "Monitoring cost of shadow calls (not billed to requests).",
           [(f'{{cascade="{i}"}}', float(c["shadow"]["cost"])) for i, c in enumerate(cascades)])
