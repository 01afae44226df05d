"""Load-test bookkeeping: percentiles, the per-request record, and the counters that must add up.

Every request the harness sends goes through :meth:`Recorder.begin` (counted as *sent*) and, exactly once,
through :meth:`Recorder.finish` (counted as *answered* or *failed*). ``lost = sent - answered - failed`` is
computed from these independent counters, so a request that vanished without an outcome shows up as lost.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

__all__ = ["Outcome", "Recorder", "Sample", "TierUse", "percentile", "percentiles"]

PercentileMethod = Literal["linear", "nearest"]
_NUMPY_METHOD = {"linear": "linear", "nearest": "inverted_cdf"}


def percentile(values: Sequence[float], q: float, method: PercentileMethod = "linear") -> float:
    """The q-th percentile of ``values`` (:func:`numpy.percentile`).

    Methods (both exact, no binning):

    * ``"linear"`` (default; Hyndman & Fan type 7, NumPy's default): sort the n values ``x[0..n-1]``, take the
      fractional rank ``h = (n - 1) * q / 100`` and interpolate ``x[floor(h)] + (h - floor(h)) *
      (x[floor(h) + 1] - x[floor(h)])``. p0 is the minimum, p100 the maximum.
    * ``"nearest"`` (nearest rank, NumPy's ``inverted_cdf``): the smallest value such that at least q% of the
      values are <= it, i.e. ``x[ceil(n * q / 100) - 1]`` (the minimum for q = 0). Always an observed value.

    Args:
        values: n observations (any order; NaN is not allowed).
        q: the percentile, in [0, 100].
        method: ``"linear"`` or ``"nearest"``.

    Returns:
        The percentile, or NaN when ``values`` is empty.

    Raises:
        ValueError: q outside [0, 100], an unknown method, or a NaN among the values.
    """
    return _percentiles(values, (q,), method)[0]


def _percentiles(values: Sequence[float], qs: Sequence[float], method: PercentileMethod = "linear") -> list[float]:
    """Several percentiles of ``values`` in one sort (see :func:`percentile`); NaNs when ``values`` is empty."""
    if not all(0.0 <= q <= 100.0 for q in qs):
        raise ValueError(f"percentile q must be in [0, 100], got {list(qs)!r}")
    if method not in _NUMPY_METHOD:
        raise ValueError(f"percentile method must be 'linear' or 'nearest', got {method!r}")
    xs = np.asarray(values, dtype=np.float64)
    if xs.size == 0:
        return [math.nan] * len(qs)
    if np.isnan(xs).any():
        raise ValueError("percentile of values containing NaN")
    return [float(v) for v in np.percentile(xs, list(qs), method=_NUMPY_METHOD[method])]


def percentiles(values: Sequence[float], qs: Sequence[float] = (50, 95, 99), *, scale: float = 1.0,
                method: PercentileMethod = "linear") -> dict[str, float | None]:
    """Several percentiles at once, as ``{"p50": ..., "p95": ...}`` (None when there are no values).

    Args:
        values: n observations.
        qs: the percentiles wanted, each in [0, 100].
        scale: multiply the results by this (1000 turns seconds into milliseconds).
        method: see :func:`percentile`.
    """
    found = _percentiles(values, qs, method) if len(values) else [None] * len(qs)
    return {f"p{q:g}": None if v is None else round(v * scale, 3) for q, v in zip(qs, found)}


@dataclass(frozen=True, slots=True)
class TierUse:
    """What one tier did for one request (from ``TierCall`` in process, or a server's report).

    Attributes:
        tier: tier name.
        prompt_tokens: prompt tokens billed.
        completion_tokens: generated tokens billed.
        cost: money spent, in the cascade's currency unit.
        latency_s: seconds spent in that tier (None when the target does not say).
        error: the error when the call failed (the request was then degraded), else None.
    """

    tier: str
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost: float = 0.0
    latency_s: float | None = None
    error: str | None = None


@dataclass(frozen=True, slots=True)
class Outcome:
    """The fate of one request, answered or failed.

    Attributes:
        id: the request's number (0, 1, ... in the order sent).
        start_s: when it was due, seconds since the run started (closed loop: when the user sent it; open
            loop: its scheduled arrival, so a late harness shows as latency, not hidden).
        end_s: when its answer (or failure) arrived, seconds since the run started.
        error_kind: None when answered; else a short kind such as ``"http_500"``, ``"BackendError"`` or
            ``"unfinished_at_stop"``.
        tier: the tier that answered (None if failed or unknown).
        escalated: any tier above the first was called.
        degraded: a higher tier failed and a lower tier's answer was returned.
        cost: total cost of the request.
        backend_s: seconds spent inside backends (sum over tiers), None when the target does not report it.
        engine_s: the engine's own end-to-end seconds as a server reports them (HTTP targets), else None.
        ttft_s: time to the first streamed token, seconds (None when not streaming).
        calls: one :class:`TierUse` per tier called.
        detail: the error message, when failed.
        sent_s: when the harness actually sent it (None: at ``start_s``); ``sent_s - start_s`` is how late
            the load generator was.
    """

    id: int
    start_s: float
    end_s: float
    error_kind: str | None = None
    tier: str | None = None
    escalated: bool = False
    degraded: bool = False
    cost: float = 0.0
    backend_s: float | None = None
    ttft_s: float | None = None
    calls: tuple[TierUse, ...] = ()
    engine_s: float | None = None
    sent_s: float | None = None
    detail: str = ""

    @property
    def ok(self) -> bool:
        """True when the request got an answer (possibly degraded)."""
        return self.error_kind is None

    @property
    def latency_s(self) -> float:
        """End-to-end seconds as the user saw them (from when the request was due)."""
        return self.end_s - self.start_s

    @property
    def service_s(self) -> float:
        """Seconds from the actual send to the answer (what the target took, without harness lateness)."""
        return self.end_s - (self.start_s if self.sent_s is None else self.sent_s)

    @property
    def overhead_s(self) -> float | None:
        """Engine overhead: service time minus the time spent in backends (None when unknown)."""
        return None if self.backend_s is None else self.service_s - self.backend_s


@dataclass(frozen=True, slots=True)
class Sample:
    """One point of the time series, taken every sampling interval.

    Attributes:
        t_s: seconds since the run started.
        in_flight: requests sent and not yet finished.
        sent: requests sent so far.
        answered: requests answered so far.
        failed: requests failed so far.
        queue_depth: requests waiting inside the target (e.g. the micro-batcher's queue), None if unknown.
        loop_lag_ms: how late the sampler woke up: a measure of how busy the harness's event loop is.
    """

    t_s: float
    in_flight: int
    sent: int
    answered: int
    failed: int
    queue_depth: int | None
    loop_lag_ms: float


@dataclass
class Recorder:
    """Counts requests in and out and keeps their outcomes. Single event loop only (no locking).

    Attributes:
        sent: requests sent.
        answered: requests answered (including degraded answers).
        failed: requests that ended in an error.
        failures: failed requests by error kind.
        duplicates: outcomes recorded twice for one request (must stay 0).
        outcomes: every outcome, in order of completion.
        samples: the time series.
    """

    sent: int = 0
    answered: int = 0
    failed: int = 0
    failures: Counter[str] = field(default_factory=Counter)
    duplicates: int = 0
    outcomes: list[Outcome] = field(default_factory=list)
    samples: list[Sample] = field(default_factory=list)
    _open: set[int] = field(default_factory=set)

    def begin(self) -> int:
        """Count one request as sent; returns its id."""
        rid = self.sent
        self.sent += 1
        self._open.add(rid)
        return rid

    def finish(self, outcome: Outcome) -> None:
        """Record the one outcome of a request sent with :meth:`begin`."""
        if outcome.id not in self._open:
            self.duplicates += 1
            return
        self._open.discard(outcome.id)
        self.outcomes.append(outcome)
        if outcome.ok:
            self.answered += 1
        else:
            self.failed += 1
            self.failures[outcome.error_kind or "unknown"] += 1

    @property
    def in_flight(self) -> int:
        """Requests sent and not yet finished."""
        return len(self._open)

    @property
    def lost(self) -> int:
        """Requests with no outcome: ``sent - answered - failed`` (0 unless the harness has a bug)."""
        return self.sent - self.answered - self.failed
