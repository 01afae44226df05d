"""The simulated target: a two-tier :class:`~cascade.engine.Cascade` whose tiers are ``OpenAIBackend`` clients of
two :mod:`cascade.simulate` servers on 127.0.0.1, plus fault injection into the large tier while under load.

The servers run either in threads of this process (``mode="thread"``: they share the GIL and the CPU with the
load generator and the engine, which inflates the measured engine overhead) or as child processes
(``mode="process"``, the default: the engine's event loop only pays for its own work and the HTTP clients).

Faults (from ``fault_at_s`` seconds into the run):

* ``large-slow``: the large tier's calls go to a second large server ``slow_factor`` times slower;
* ``large-failing``: they go to a second large server answering HTTP 500 with probability ``fail_rate``;
* ``large-down``: the large tier's server is stopped (its process terminated or its thread shut down).
"""

from __future__ import annotations

import asyncio
import select
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from cascade.backends.base import Backend
from cascade.errors import ConfigError
from cascade.simulate import SimConfig, SimServer
from cascade.types import EarlyExit, Generation, GenerationParams, Prompt
from eval.loadtest_targets import CascadeTarget

__all__ = ["FAULTS", "SimOptions", "SimProcess", "SimulatedCascade", "SwitchBackend", "TimedBackend", "beyond_server"]

FAULTS = ("large-slow", "large-failing", "large-down")


@dataclass(frozen=True)
class SimOptions:
    """The simulated two-tier cascade."""

    mode: str = "process"  # "process": each server in a child process; "thread": in this process
    small: SimConfig = field(default_factory=lambda: SimConfig(  # the small tier's server
        model="sim-small", latency_per_request_s=0.02, latency_per_token_s=0.004, seed=1))
    large: SimConfig = field(default_factory=lambda: SimConfig(  # the large tier's server
        model="sim-large", latency_per_request_s=0.05, latency_per_token_s=0.015, seed=2))
    threshold: float = 0.35  # margin_first threshold: escalate when 1 - margin(first token) is above it
    measure: str = "margin_first"  # the cascade's uncertainty measure
    max_tokens: int = 16  # new tokens per answer
    early_exit: bool = True  # the engine's early exit (small answers streamed, cut after one unsure token)
    api: str = "chat"  # OpenAI API of the backends: "chat" or "completions"
    backend_concurrency: int = 1024  # requests in flight per backend (OpenAIBackend max_concurrency)
    backend_retries: int = 2  # retries per backend request (openai client, exponential backoff from 0.5 s)
    backend_timeout_s: float = 30.0  # seconds per backend HTTP attempt
    large_timeout_s: float | None = 3.0  # the large tier's Tier.timeout_s: a slower answer is degraded
    batching: bool = True  # wrap each tier's backend in cascade.batching.MicroBatcher
    batch_size: int = 16  # MicroBatcher max_batch_size
    batch_wait_ms: float = 5.0  # MicroBatcher max_wait_ms
    batch_queue: int = 1024  # MicroBatcher max_queue (prompts waiting; more raise OverloadedError)
    batch_concurrency: int = 16  # MicroBatcher max_concurrent_batches (1 serialises calls to a remote server)
    fault: str | None = None  # one of FAULTS, or None
    fault_at_s: float = 10.0  # seconds after the load starts
    slow_factor: float = 10.0  # large-slow: latency multiplier of the slow server
    fail_rate: float = 0.5  # large-failing: HTTP 500 probability of the failing server

    def __post_init__(self) -> None:
        if self.mode not in ("process", "thread"):
            raise ConfigError(f"simulated server mode must be 'process' or 'thread', got {self.mode!r}")
        if self.fault is not None and self.fault not in FAULTS:
            raise ConfigError(f"fault must be one of {', '.join(FAULTS)}, got {self.fault!r}")
        if self.fault_at_s < 0 or self.slow_factor < 1 or not 0 <= self.fail_rate <= 1:
            raise ConfigError("fault_at_s must be >= 0, slow_factor >= 1 and fail_rate in [0, 1]")
        if self.max_tokens < 1 or self.backend_concurrency < 1:
            raise ConfigError("max_tokens and backend_concurrency must be >= 1")


class SimProcess:
    """A :mod:`cascade.simulate` server in a child process on a free loopback port (same face as SimServer)."""

    def __init__(self, config: SimConfig) -> None:
        self.config = config
        self._proc: subprocess.Popen[bytes] | None = None
        self._port = 0
        self._log: Any = None

    @property
    def base_url(self) -> str:
        """The OpenAI base URL, e.g. ``http://127.0.0.1:41234/v1``."""
        return f"http://127.0.0.1:{self._port}/v1"

    def start(self, timeout_s: float = 30.0) -> SimProcess:
        """Start the child and wait for the line announcing its port.

        Raises:
            ConfigError: the child exits or says nothing within ``timeout_s``.
        """
        c = self.config
        argv = [sys.executable, "-m", "cascade.simulate", "--host", "127.0.0.1", "--port", "0", "--model", c.model,
                "--latency-per-token", repr(c.latency_per_token_s),
                "--latency-per-request", repr(c.latency_per_request_s), "--error-rate", repr(c.error_rate),
                "--timeout-rate", repr(c.timeout_rate), "--hang", repr(c.hang_s), "--seed", str(c.seed),
                "--max-answer-tokens", str(c.max_answer_tokens)]
        if not c.logprobs:
            argv.append("--no-logprobs")
        self._log = tempfile.TemporaryFile()  # noqa: SIM115 - kept open for the child's lifetime
        self._proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=self._log, stdin=subprocess.DEVNULL)
        assert self._proc.stdout is not None
        deadline = time.monotonic() + timeout_s
        line = b""
        while time.monotonic() < deadline and self._proc.poll() is None:
            ready, _, _ = select.select([self._proc.stdout], [], [], 0.1)
            if ready:
                line = self._proc.stdout.readline()
                break
        if b" on 127.0.0.1:" not in line:
            self._log.seek(0)
            err = self._log.read().decode(errors="replace")[-500:]
            self.stop()
            raise ConfigError(f"the simulated server {c.model!r} did not start: {line!r} {err}")
        self._port = int(line.rsplit(b":", 1)[1])
        return self

    def stop(self) -> None:
        """Terminate the child (kill it after 5 s) and wait for it."""
        if self._proc is not None:
            if self._proc.poll() is None:
                self._proc.terminate()
                try:
                    self._proc.wait(5.0)
                except subprocess.TimeoutExpired:
                    self._proc.kill()
                    self._proc.wait(5.0)
            if self._proc.stdout is not None:
                self._proc.stdout.close()
            self._proc = None
        if self._log is not None:
            self._log.close()
            self._log = None


class SwitchBackend:
    """The large tier under fault injection: calls go to ``normal`` until :meth:`switch`, then to ``faulty``.

    Both are real backends talking to real servers; this only chooses which one answers.
    """

    def __init__(self, normal: Backend, faulty: Backend) -> None:
        self.name = normal.name
        self._normal, self._faulty = normal, faulty
        self.switched = False

    def switch(self) -> None:
        """Send every later call to the faulty backend."""
        self.switched = True

    async def generate(self, prompts: Sequence[Prompt], params: GenerationParams, *, scores: bool = True,
                       early_exit: EarlyExit | None = None) -> list[Generation]:
        """Delegate to the current backend."""
        backend = self._faulty if self.switched else self._normal
        return await backend.generate(prompts, params, scores=scores, early_exit=early_exit)

    async def aclose(self) -> None:
        """Close both backends."""
        await self._normal.aclose()
        await self._faulty.aclose()


class TimedBackend:
    """A pass-through backend that records each call's duration and size (below the micro-batcher).

    Attributes:
        calls: (seconds, number of prompts) per call.
    """

    def __init__(self, inner: Backend) -> None:
        self.name = inner.name
        self.inner = inner
        self.calls: list[tuple[float, int]] = []

    async def generate(self, prompts: Sequence[Prompt], params: GenerationParams, *, scores: bool = True,
                       early_exit: EarlyExit | None = None) -> list[Generation]:
        """Delegate and time the call."""
        t0 = time.perf_counter()
        try:
            return await self.inner.generate(prompts, params, scores=scores, early_exit=early_exit)
        finally:
            self.calls.append((time.perf_counter() - t0, len(prompts)))

    async def aclose(self) -> None:
        """Close the inner backend."""
        await self.inner.aclose()


class SimulatedCascade:
    """Starts the servers, builds the cascade and injects the fault. Use ``async with``; then ``.target``."""

    def __init__(self, options: SimOptions) -> None:
        self.options = options
        self.servers: dict[str, Any] = {}
        self.target: CascadeTarget | None = None
        self.batching = "off"
        self.probes: dict[str, TimedBackend] = {}
        self._switch: SwitchBackend | None = None

    async def __aenter__(self) -> SimulatedCascade:
        try:
            await self._start()
        except BaseException:
            await self.aclose()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def _server(self, config: SimConfig) -> Any:
        return SimProcess(config) if self.options.mode == "process" else SimServer(config)

    async def _start(self) -> None:
        from cascade.backends.openai_compat import OpenAIBackend
        from cascade.engine import Cascade, Price, Tier

        o = self.options
        wanted = {"small": o.small, "large": o.large}
        if o.fault == "large-slow":
            wanted["large-faulty"] = replace(o.large, latency_per_token_s=o.large.latency_per_token_s * o.slow_factor,
                                             latency_per_request_s=o.large.latency_per_request_s * o.slow_factor)
        elif o.fault == "large-failing":
            wanted["large-faulty"] = replace(o.large, error_rate=o.fail_rate)
        for name, config in wanted.items():
            self.servers[name] = await asyncio.to_thread(self._server(config).start)

        def backend(name: str, model: str) -> OpenAIBackend:
            return OpenAIBackend(model=model, base_url=self.servers[name].base_url, api_key="sim", api=o.api,
                                 timeout_s=o.backend_timeout_s, max_retries=o.backend_retries,
                                 max_concurrency=o.backend_concurrency)

        backends: dict[str, Backend] = {"small": backend("small", o.small.model),
                                        "large": backend("large", o.large.model)}
        if "large-faulty" in self.servers:
            self._switch = SwitchBackend(backends["large"], backend("large-faulty", o.large.model))
            backends["large"] = self._switch
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
                          params=GenerationParams(max_tokens=o.max_tokens), on_error="degrade",
                          early_exit=o.early_exit)

        def depth() -> int:
            return sum(int(b.queue_depth) for b in batchers)

        self.target = CascadeTarget(cascade.run, f"simulated cascade ({o.mode} servers, batching "
                                    f"{'on' if batchers else 'off'})", depth if batchers else None,
                                    (cascade.aclose,))

    def reset_counters(self) -> None:
        """Forget the warm-up: clear the probes' records and the in-thread servers' counters."""
        for probe in self.probes.values():
            probe.calls.clear()
        for server in self.servers.values():
            stats = getattr(server, "stats", None)
            if stats is not None:
                stats.reset()

    def batching_stats(self) -> dict[str, Any]:
        """Per tier: inner calls under the batcher, prompts, mean batch size and inner-call latency (ms).

        ``TierCall.latency_s`` is measured around the batcher, so it includes the queue wait; the mean wait
        is estimated as the mean tier-call latency minus the prompt-weighted mean inner-call latency.
        """
        from eval.loadtest_stats import percentiles

        out: dict[str, Any] = {}
        for name, probe in self.probes.items():
            sizes = [n for _, n in probe.calls]
            weighted = [d for d, n in probe.calls for _ in range(n)]
            out[name] = {"inner_calls": len(sizes), "prompts": sum(sizes),
                         "mean_batch_size": round(sum(sizes) / len(sizes), 3) if sizes else None,
                         "inner_call_ms_per_prompt": percentiles(weighted, scale=1000.0),
                         "inner_call_mean_ms_per_prompt":
                             round(1000 * sum(weighted) / len(weighted), 3) if weighted else None}
        return out

    async def inject(self) -> str:
        """Inject the configured fault now; returns a one-line description for the report."""
        o = self.options
        if o.fault == "large-down":
            await asyncio.to_thread(self.servers["large"].stop)
            return f"large tier's server stopped ({o.mode} mode)"
        if self._switch is not None:
            self._switch.switch()
            if o.fault == "large-slow":
                return f"large tier {o.slow_factor:g}x slower (large tier timeout {o.large_timeout_s} s)"
            return f"large tier answers HTTP 500 with probability {o.fail_rate:g} ({o.backend_retries} retries)"
        return "no fault"

    def server_stats(self) -> dict[str, Any]:
        """Counters of the in-thread servers (child processes keep theirs to themselves)."""
        out: dict[str, Any] = {}
        for name, server in self.servers.items():
            stats = getattr(server, "stats", None)
            if stats is not None:
                out[name] = {"requests": stats.requests, "errors": stats.errors,
                             "max_in_flight": stats.max_in_flight}
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
        outcomes: the run's :class:`~eval.loadtest_stats.Outcome` records.

    Returns:
        ``{tier: {"p50", "p95", "p99", "max"}}`` in milliseconds.
    """
    from eval.loadtest_stats import percentiles

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
