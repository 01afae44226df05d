"""The simulated target: a two-tier :class:`~cascade.engine.Cascade` whose tiers are ``OpenAIBackend`` clients of
two :mod:`cascade.simulate` servers on 127.0.0.1, plus fault injection into the large tier while under load.

The servers run either in threads of this process (``mode="thread"``: they share the GIL and the CPU with the
load generator and the engine, which inflates the measured engine overhead) or as child processes
(``mode="process"``, the default: the engine's event loop only pays for its own work and the HTTP clients).
``mode="local"`` replaces both HTTP hops by :class:`~eval.loadtest.simbackends.LocalSimBackend` (same answers
and sleeps, no sockets, no OpenAI SDK): it measures the engine and the harness alone.

Faults (from ``fault_at_s`` seconds into the run):

* ``large-slow``: the large tier's calls go to a second large server ``slow_factor`` times slower;
* ``large-failing``: they go to a second large server answering HTTP 500 with probability ``fail_rate``;
* ``large-down``: the large tier's server is stopped (its process terminated or its thread shut down);
* ``small-drift``: the small tier's calls go to a second small server whose model is less sure of every
  answer (``confidence_scale``): the drift the monitor (:mod:`cascade.monitor`) must flag.

With ``monitor`` on, the cascade runs its live checks: the first stage's calibration distribution is the
simulated small model's uncertainty on 1,000 held-out generated prompts (computed in-process before the run),
and every state change is recorded with the number of requests the stage had seen. ``reload_at_s`` swaps the
threshold to ``reload_threshold`` in the middle of the run, as ``POST /v1/cascade/artifact`` would; every
answer's thresholds are recorded to check that none mixes the two.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from cascade.backends.base import Backend
from cascade.errors import ConfigError
from cascade.simulate import SimConfig, SimServer
from cascade.types import GenerationParams
from eval.loadtest.simbackends import LocalSimBackend, SimProcess, SwitchBackend, TimedBackend
from eval.loadtest.targets import CascadeTarget, Started

__all__ = ["FAULTS", "SimOptions", "SimulatedCascade", "beyond_server"]

FAULTS = ("large-slow", "large-failing", "large-down", "small-drift")


@dataclass(frozen=True)
class SimOptions:
    """The simulated two-tier cascade."""

    mode: str = "process"  # servers in child processes ("process") or threads ("thread"); "local": no HTTP
    small: SimConfig = field(default_factory=lambda: SimConfig(  # the small tier's server
        model="sim-small", latency_per_request_s=0.02, latency_per_token_s=0.004, seed=1))
    large: SimConfig = field(default_factory=lambda: SimConfig(  # the large tier's server
        model="sim-large", latency_per_request_s=0.05, latency_per_token_s=0.015, seed=2))
    threshold: float = 0.35  # margin_first threshold: escalate when 1 - margin(first token) is above it
    measure: str = "margin_first"  # the cascade's uncertainty measure
    max_tokens: int = 16  # new tokens per answer
    early_exit: bool = True  # the engine's early exit (small answers streamed, cut after one unsure token)
    api: str = "chat"  # OpenAI API of the backends: "chat" or "completions"
    backend_concurrency: int = 64  # requests in flight per backend (OpenAIBackend max_concurrency; <= 100 keeps
    # every connection in the openai client's keep-alive pool)
    backend_retries: int = 2  # retries per backend request (openai client, exponential backoff from 0.5 s)
    backend_timeout_s: float = 30.0  # seconds per backend HTTP attempt
    large_timeout_s: float | None = 3.0  # the large tier's Tier.timeout_s: a slower answer is degraded
    on_error: str = "degrade"  # the cascade's on_error: "degrade" or "raise" (a failed large call fails the request)
    batching: bool = True  # wrap each tier's backend in cascade.batching.MicroBatcher
    batch_size: int = 16  # MicroBatcher max_batch_size
    batch_wait_ms: float = 5.0  # MicroBatcher max_wait_ms
    batch_queue: int = 1024  # MicroBatcher max_queue (prompts waiting; more raise OverloadedError)
    batch_concurrency: int = 16  # MicroBatcher max_concurrent_batches (1 serialises calls to a remote server)
    fault: str | None = None  # one of FAULTS, or None
    fault_at_s: float = 10.0  # seconds after the load starts
    slow_factor: float = 10.0  # large-slow: latency multiplier of the slow server
    fail_rate: float = 0.5  # large-failing: HTTP 500 probability of the failing server
    drift_scale: float = 0.5  # small-drift: the drifted small model's confidence_scale
    monitor: bool = False  # live calibration checks (cascade.monitor) with a reference from held-out prompts
    shadow_rate: float = 0.0  # share of accepted answers also sent to the large tier (implies monitor)
    reload_at_s: float | None = None  # seconds into the run: swap the threshold to reload_threshold
    reload_threshold: float | None = None  # the threshold swapped in (default: threshold + 0.1)

    def __post_init__(self) -> None:
        if self.mode not in ("process", "thread", "local"):
            raise ConfigError(f"simulated mode must be 'process', 'thread' or 'local', got {self.mode!r}")
        if self.fault is not None and self.fault not in FAULTS:
            raise ConfigError(f"fault must be one of {', '.join(FAULTS)}, got {self.fault!r}")
        if self.fault_at_s < 0 or self.slow_factor < 1 or not 0 <= self.fail_rate <= 1:
            raise ConfigError("fault_at_s must be >= 0, slow_factor >= 1 and fail_rate in [0, 1]")
        if self.max_tokens < 1 or self.backend_concurrency < 1:
            raise ConfigError("max_tokens and backend_concurrency must be >= 1")


class SimulatedCascade(Started):
    """Starts the servers, builds the cascade and injects the fault. Use ``async with``; then ``.target``."""

    def __init__(self, options: SimOptions) -> None:
        self.options = options
        self.servers: dict[str, Any] = {}
        self.target: CascadeTarget | None = None
        self.batching = "off"
        self.probes: dict[str, TimedBackend] = {}
        self._cpu0: dict[str, float | None] = {}
        self._switch: SwitchBackend | None = None
        self.cascade: Any = None
        self.transitions: list[dict[str, Any]] = []  # monitor state changes
        self.thresholds: list[tuple[float, ...]] = []  # per answer: its threshold, then each tier call's
        self.seen_at_fault: int | None = None

    def _server(self, config: SimConfig) -> Any:
        return SimProcess(config) if self.options.mode == "process" else SimServer(config)

    async def start(self) -> None:
        from cascade.backends.openai_compat import OpenAIBackend
        from cascade.engine import Cascade, Price, Tier

        o = self.options
        wanted = {"small": o.small, "large": o.large}
        if o.fault == "large-slow":
            wanted["large-faulty"] = replace(o.large, latency_per_token_s=o.large.latency_per_token_s * o.slow_factor,
                                             latency_per_request_s=o.large.latency_per_request_s * o.slow_factor)
        elif o.fault == "large-failing" or (o.fault == "large-down" and o.mode == "local"):
            wanted["large-faulty"] = replace(o.large, error_rate=o.fail_rate if o.fault == "large-failing" else 1.0)
        elif o.fault == "small-drift":
            wanted["small-faulty"] = replace(o.small, confidence_scale=o.drift_scale)

        def backend(name: str) -> Backend:
            if o.mode == "local":
                return LocalSimBackend(wanted[name])
            return OpenAIBackend(model=wanted[name].model, base_url=self.servers[name].base_url, api_key="sim",
                                 api=o.api, timeout_s=o.backend_timeout_s, max_retries=o.backend_retries,
                                 max_concurrency=o.backend_concurrency)

        if o.mode != "local":
            for name, config in wanted.items():
                self.servers[name] = await asyncio.to_thread(self._server(config).start)
        backends: dict[str, Backend] = {"small": backend("small"), "large": backend("large")}
        for name in ("small", "large"):
            if f"{name}-faulty" in wanted:
                self._switch = SwitchBackend(backends[name], backend(f"{name}-faulty"))
                backends[name] = self._switch
        batchers: list[Any] = []
        if o.batching:
            from cascade.batching import MicroBatcher

            for name in backends:
                self.probes[name] = TimedBackend(backends[name])
                batcher = MicroBatcher(self.probes[name], o.batch_size, o.batch_wait_ms, o.batch_queue,
                                       o.batch_concurrency)
                batchers.append(batcher)
                backends[name] = batcher
            self.batching = (f"MicroBatcher(max_batch_size={o.batch_size}, max_wait_ms={o.batch_wait_ms:g}, "
                             f"max_queue={o.batch_queue}, max_concurrent_batches={o.batch_concurrency}) per tier")
        cascade = Cascade([Tier("small", backends["small"], Price(0.135, 0.135)),
                           Tier("large", backends["large"], Price(0.5, 0.5), o.large_timeout_s)],
                          measure=o.measure, threshold=o.threshold,
                          params=GenerationParams(max_tokens=o.max_tokens), on_error=o.on_error,  # type: ignore[arg-type]
                          early_exit=o.early_exit, monitor=self._monitor())
        self.cascade = cascade
        if cascade.monitor is not None:
            await self._set_reference()

        def depth() -> int:
            return sum(int(b.queue_depth) for b in batchers)

        where = {"local": "local: no HTTP", "process": "servers in processes", "thread": "servers in threads"}[o.mode]
        run = self._run if o.reload_at_s is not None else cascade.run
        self.target = CascadeTarget(run, f"simulated cascade ({where}, batching {'on' if batchers else 'off'}"
                                    f", early exit {'on' if o.early_exit else 'off'})", depth if batchers else None,
                                    (cascade.aclose,))

    def _monitor(self) -> Any:
        """The monitor settings (None when off)."""
        from cascade.monitor import MonitorConfig

        o = self.options
        return MonitorConfig(shadow_rate=o.shadow_rate, seed=0) if o.monitor or o.shadow_rate > 0 else None

    async def _set_reference(self) -> None:
        """The first stage's calibration distribution: the small model's uncertainty on held-out prompts."""
        from cascade.monitor import Reference
        from eval.loadtest.prompts import generated_prompts

        held_out = generated_prompts(1000, seed=10_001)
        gens = await LocalSimBackend(replace(self.options.small, latency_per_request_s=0.0,
                                             latency_per_token_s=0.0)).generate(
            held_out, GenerationParams(max_tokens=self.options.max_tokens))
        ref = Reference.from_sample([g.scores.get(self.options.measure, float("nan")) for g in gens])
        self.cascade.monitor.set_reference(0, ref, self.options.threshold)

        def record(stage: int, old: str, new: str) -> None:
            seen = self.cascade.monitor.stages[stage].seen
            self.transitions.append({"stage": stage, "from": old, "to": new, "requests_seen": seen,
                                     "after_fault": None if self.seen_at_fault is None else seen - self.seen_at_fault})

        self.cascade.monitor.on_change = record

    async def _run(self, prompt: Any, **kwargs: Any) -> Any:
        result = await self.cascade.run(prompt, **kwargs)
        self.thresholds.append((result.threshold, *(c.threshold for c in result.calls if c.threshold is not None)))
        return result

    async def reload(self) -> str:
        """Swap the threshold now (as a hot reload does); returns a one-line description for the report."""
        from cascade.policy import Policy

        o = self.options
        new = o.reload_threshold if o.reload_threshold is not None else o.threshold + 0.1
        self.cascade.swap_policy(Policy.fixed(new, o.measure))
        return f"threshold swapped {o.threshold:g} -> {new:g}"

    def monitor_report(self) -> dict[str, Any] | None:
        """What the monitor saw: state changes (with requests seen after the fault), final status, and with a
        reload the thresholds answers used."""
        if self.cascade is None or self.cascade.monitor is None:
            return None
        out: dict[str, Any] = {"transitions": self.transitions, "seen_at_fault": self.seen_at_fault,
                               "status": self.cascade.monitor.status()}
        flagged = [t for t in self.transitions if t["to"] != "ok" and t["after_fault"] is not None]
        out["flagged_after_requests"] = flagged[0]["after_fault"] if flagged else None
        out["false_alarms"] = sum(t["to"] != "ok" and t["after_fault"] is None for t in self.transitions)
        if self.options.reload_at_s is not None:
            first = [t[0] for t in self.thresholds]
            out["reload"] = {"answers": len(self.thresholds),
                             "by_threshold": {f"{k:g}": first.count(k) for k in sorted(set(first))},
                             "mixed_within_a_request": sum(len(set(t)) > 1 for t in self.thresholds)}
        return out

    def reset_counters(self) -> None:
        """Forget the warm-up: clear the probes' records, the in-thread servers' counters, the children's CPU."""
        for probe in self.probes.values():
            probe.calls.clear()
        for name, server in self.servers.items():
            stats = getattr(server, "stats", None)
            if stats is not None:
                stats.reset()
            if isinstance(server, SimProcess):
                self._cpu0[name] = server.cpu_s()

    def batching_stats(self, outcomes: Sequence[Any] = ()) -> dict[str, Any]:
        """Per tier: inner calls under the batcher, prompts, mean batch size, inner-call latency (ms), and the
        mean wait in the batcher's queue.

        ``TierCall.latency_s`` is measured around the batcher, so it includes the queue wait (and the engine
        overhead does not); the mean wait is estimated as the mean tier-call latency minus the
        prompt-weighted mean inner-call latency (None when some tier calls failed or timed out).

        Args:
            outcomes: the run's outcomes (for the mean tier-call latency).
        """
        from eval.loadtest.stats import percentiles

        out: dict[str, Any] = {}
        for name, probe in self.probes.items():
            sizes = [n for _, n in probe.calls]
            weighted = [d for d, n in probe.calls for _ in range(n)]
            inner = 1000 * sum(weighted) / len(weighted) if weighted else None
            calls = [c for o in outcomes for c in o.calls if c.tier == name and c.latency_s is not None]
            # A failed or timed-out tier call stops waiting while its inner call runs on: no estimate then.
            clean = calls and all(c.error is None for c in calls)
            outer = 1000 * sum(c.latency_s for c in calls) / len(calls) if clean else None
            out[name] = {"inner_calls": len(sizes), "prompts": sum(sizes),
                         "mean_batch_size": round(sum(sizes) / len(sizes), 3) if sizes else None,
                         "inner_call_ms_per_prompt": percentiles(weighted, scale=1000.0),
                         "inner_call_mean_ms_per_prompt": None if inner is None else round(inner, 3),
                         "mean_batch_wait_ms": None if inner is None or outer is None else round(outer - inner, 3)}
        return out

    async def inject(self) -> str:
        """Inject the configured fault now; returns a one-line description for the report."""
        o = self.options
        if o.fault == "large-down" and o.mode != "local":
            await asyncio.to_thread(self.servers["large"].stop)
            return f"large tier's server stopped ({o.mode} mode)"
        if o.fault == "large-down" and self._switch is not None:
            self._switch.switch()
            return "large tier down (local mode: every call fails)"
        if self._switch is not None:
            if o.fault == "small-drift" and self.cascade.monitor is not None:
                self.seen_at_fault = self.cascade.monitor.stages[0].seen
            self._switch.switch()
            if o.fault == "small-drift":
                return f"small tier's model less sure of every answer (confidence x {o.drift_scale:g})"
            if o.fault == "large-slow":
                return f"large tier {o.slow_factor:g}x slower (large tier timeout {o.large_timeout_s} s)"
            return f"large tier answers HTTP 500 with probability {o.fail_rate:g} ({o.backend_retries} retries)"
        return "no fault"

    def server_stats(self) -> dict[str, Any]:
        """Counters of the in-thread servers; CPU seconds used by child-process servers since the warm-up."""
        out: dict[str, Any] = {}
        for name, server in self.servers.items():
            stats = getattr(server, "stats", None)
            if stats is not None:
                out[name] = {"requests": stats.requests, "errors": stats.errors,
                             "max_in_flight": stats.max_in_flight}
            if isinstance(server, SimProcess):
                now, before = server.cpu_s(), self._cpu0.get(name)
                out[name] = {"cpu_s": round(now - before, 3) if now is not None and before is not None else None}
        return out

    async def aclose(self) -> None:
        """Close the target and stop every server."""
        if self.target is not None:
            await self.target.aclose()
            self.target = None
        for server in self.servers.values():
            await asyncio.to_thread(server.stop)
        self.servers.clear()


def beyond_server(outcomes: Sequence[Any], options: SimOptions) -> dict[str, Any]:
    """Per tier: client-side time of each successful tier call beyond what the simulated server slept for.

    The server sleeps ``latency_per_request_s + n * latency_per_token_s`` for an answer of n tokens
    (an early-exited stream stops after its first token), so the rest of ``TierCall.latency_s`` is spent
    in the HTTP client, the OpenAI SDK, scoring, micro-batching waits and event-loop delays. Computed
    with the normal (not the faulty) server's latency.

    Args:
        outcomes: the run's :class:`~eval.loadtest.stats.Outcome` records.

    Returns:
        ``{tier: {"p50", "p95", "p99", "max"}}`` in milliseconds.
    """
    from eval.loadtest.stats import percentiles

    configs = {"small": options.small, "large": options.large}
    extra: dict[str, list[float]] = {name: [] for name in configs}
    for o in outcomes:
        for c in o.calls:
            cfg = configs.get(c.tier)
            if cfg is None or c.error is not None or c.latency_s is None:
                continue
            slept = cfg.latency_per_request_s + c.completion_tokens * cfg.latency_per_token_s
            extra[c.tier].append(c.latency_s - slept)
    out: dict[str, Any] = {}
    for name, values in extra.items():
        p = percentiles(values, (50, 95, 99, 100), scale=1000.0)
        p["max"] = p.pop("p100")
        out[name] = p
    return out
