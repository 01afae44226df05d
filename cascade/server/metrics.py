"""Prometheus metrics of ``cascade serve`` through ``prometheus-client``, kept per app (no global registry).

Requests by endpoint, status and answering tier; escalations; degraded answers; tokens and cost by tier; an
end-to-end latency histogram; requests in flight; queue depth. With a ``monitor:`` section, the live
calibration checks (:mod:`cascade.monitor`): ``cascade_drift_*`` and ``cascade_shadow_*`` per stage (labels
``cascade``, the cascade's index, and ``tier``, the stage's tier).

With ``cascade serve --workers N`` every worker process writes its counters to the folder named by
``PROMETHEUS_MULTIPROC_DIR`` (prometheus-client's multiprocess mode, set by the supervisor before the workers
start) and ``/metrics``, whichever worker answers it, sums them over all workers (the in-flight and queue
gauges over the live ones). The drift and shadow series are the answering worker's own: each worker runs its
own monitor.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

from cascade.types import CascadeResult

__all__ = ["CONTENT_TYPE", "MULTIPROC_ENV", "Metrics"]

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class Metrics:
    """Counters, gauges and a latency histogram in a registry of their own (one per app).

    Args:
        monitor: returns the ``/v1/cascade/status`` body (the live checks), or None without a monitor.
    """

    BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)

    def __init__(self, monitor: Callable[[], Mapping[str, Any] | None] | None = None) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.multiprocess_dir = os.environ.get(MULTIPROC_ENV) or None
        self.registry = reg = CollectorRegistry()
        self.requests = Counter("cascade_requests", "HTTP requests by endpoint, status and answering tier.",
                                ("endpoint", "status", "tier"), registry=reg)
        self.escalations = Counter("cascade_escalations", "Answers that called a tier above the first.",
                                   registry=reg)
        self.degraded = Counter("cascade_degraded", "Answers returned from a lower tier after a failure.",
                                registry=reg)
        self.tokens = Counter("cascade_tokens", "Tokens billed by tier and kind.", ("tier", "kind"), registry=reg)
        self.cost = Counter("cascade_cost", "Money spent by tier, in the configured price unit.", ("tier",),
                            registry=reg)
        self.usage_estimated = Counter(
            "cascade_usage_estimated",
            "Tier calls whose server reported no prompt token count (prompt tokens and cost estimated).",
            ("tier",), registry=reg)
        self.latency = Histogram("cascade_request_latency_seconds", "End-to-end request latency.",
                                 buckets=self.BUCKETS, registry=reg)
        self.in_flight = Gauge("cascade_in_flight_requests", "Requests running in the engine.", registry=reg,
                               multiprocess_mode="livesum")
        self.queue_depth = Gauge("cascade_queue_depth",
                                 "Requests and prompts waiting (server queue + micro-batchers).", registry=reg,
                                 multiprocess_mode="livesum")
        self._requests: dict[tuple[str, int, str], Any] = {}  # labelled children, looked up once per label set
        self._tiers: dict[str, tuple[Any, Any, Any]] = {}  # per tier: prompt tokens, completion tokens, cost
        self._monitor = _MonitorCollector(monitor) if monitor is not None else None
        if self._monitor is not None and self.multiprocess_dir is None:
            reg.register(self._monitor)

    def observe_request(self, endpoint: str, status: int, tiers: Sequence[str], seconds: float) -> None:
        """Count one HTTP request (one count per answer for multi-prompt completions)."""
        for tier in tiers:
            child = self._requests.get((endpoint, status, tier))
            if child is None:
                child = self._requests[endpoint, status, tier] = self.requests.labels(endpoint, str(status), tier)
            child.inc()
        self.latency.observe(seconds)

    def observe_results(self, results: Sequence[CascadeResult]) -> None:
        """Count escalations, degraded answers, tokens and cost per tier."""
        for r in results:
            if r.escalated:
                self.escalations.inc()
            if r.degraded:
                self.degraded.inc()
            for c in r.calls:
                if c.usage_estimated:
                    self.usage_estimated.labels(c.tier).inc()
                children = self._tiers.get(c.tier)
                if children is None:
                    children = self._tiers[c.tier] = (
                        self.tokens.labels(c.tier, "prompt"), self.tokens.labels(c.tier, "completion"),
                        self.cost.labels(c.tier))
                children[0].inc(c.prompt_tokens)
                children[1].inc(c.completion_tokens)
                children[2].inc(c.cost)

    def set_load(self, in_flight: int, queue_depth: int) -> None:
        """Set the in-flight and queue gauges (at each scrape)."""
        self.in_flight.set(in_flight)
        self.queue_depth.set(queue_depth)

    def note_load(self, in_flight: int, queue_depth: Callable[[], int]) -> None:
        """With several workers, keep this worker's gauges current as requests end (a scrape answered by
        another worker reads them from the shared folder); in one process the scrape sets them (and
        ``queue_depth`` is not called)."""
        if self.multiprocess_dir is not None:
            self.set_load(in_flight, queue_depth())

    def render(self, in_flight: int, queue_depth: int) -> str:
        """The Prometheus text exposition (format 0.0.4), summed over all workers in multiprocess mode."""
        from prometheus_client import CollectorRegistry, generate_latest
        from prometheus_client.multiprocess import MultiProcessCollector

        self.set_load(in_flight, queue_depth)
        if self.multiprocess_dir is None:
            return generate_latest(self.registry).decode()
        registry = CollectorRegistry()
        MultiProcessCollector(registry, self.multiprocess_dir)  # type: ignore[no-untyped-call]
        if self._monitor is not None:
            registry.register(self._monitor)
        return generate_latest(registry).decode()


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


class _MonitorCollector:
    """The live checks' series, read from the monitor's status at each scrape (this process's monitor)."""

    def __init__(self, status: Callable[[], Mapping[str, Any] | None]) -> None:
        self.status = status

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        status = self.status()
        if not status or not status.get("enabled"):
            return
        cascades: Sequence[Mapping[str, Any]] = status["cascades"]
        stages = [(str(i), s) for i, c in enumerate(cascades) for s in c["stages"]]
        for name, kind, help_, path in _STAGE_METRICS:
            family: Any = (GaugeMetricFamily if kind == "gauge" else CounterMetricFamily)(
                name, help_, labels=("cascade", "tier"))
            for i, s in stages:
                value: Any = s
                for key in path:
                    value = value[key]
                if value is not None:
                    family.add_metric((i, str(s["tier"])), float(value))
            yield family
        state = GaugeMetricFamily("cascade_drift_state", "1 for the stage's current state (ok, drifting, violated).",
                                  labels=("cascade", "tier", "state"))
        for i, s in stages:
            for st in ("ok", "drifting", "violated"):
                state.add_metric((i, str(s["tier"]), st), float(s["state"] == st))
        yield state
        for key, help_ in (("calls", "Shadow calls made."), ("dropped", "Shadow checks dropped (all slots busy)."),
                           ("failed", "Shadow calls that failed."),
                           ("cost", "Monitoring cost of shadow calls (not billed to requests).")):
            counter = CounterMetricFamily(f"cascade_shadow_{key}_total", help_, labels=("cascade",))
            for n, c in enumerate(cascades):
                counter.add_metric((str(n),), float(c["shadow"][key]))
            yield counter
