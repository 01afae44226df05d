"""Load-test the cascade: ``python -m eval.loadtest --users 1000 --duration 30 --simulated``.

Targets: ``--simulated`` builds an in-process two-tier :class:`~cascade.engine.Cascade` whose tiers are
``OpenAIBackend`` clients of two simulated OpenAI-compatible servers on 127.0.0.1 (child processes by default);
``--target URL`` loads any OpenAI-compatible HTTP endpoint on this machine (``cascade serve`` or a peer's
server). Only loopback targets are accepted.

Load: closed loop (``--users`` users, each sending its next request ``--think-time`` seconds, exponential by
default, after its previous answer) or open loop (``--rate`` Poisson arrivals per second), with ``--ramp-up``,
``--duration`` and ``--max-requests``. The run always stops by itself: after the sending phase, in-flight
requests get ``--grace`` seconds and are then counted as failed (``unfinished_at_stop``), never dropped.

The report (terminal, ``--report-json``, ``--plot``) gives sent / answered / failed by kind / lost
(= sent - answered - failed, must be 0), throughput, latency percentiles overall and per tier, time to first
token when streaming, share escalated, cost per tier, the time series of requests in flight, and the engine's
own overhead (end-to-end latency minus time spent in backends). Exit status: 0 when nothing was lost or
answered twice, 1 otherwise, 2 on bad arguments or an unreachable target.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from cascade.errors import CascadeError, ConfigError
from cascade.simulate import SimConfig
from cascade.types import Prompt
from eval.loadtest.load import Event, LoadShape, RunResult, run, run_load, warm_up
from eval.loadtest.prompts import (
    DATASETS,
    dataset_prompts,
    generated_prompts,
    load_prompts,
    mixed_prompts,
    write_prompts,
)
from eval.loadtest.report import build_report, format_report, plot_report
from eval.loadtest.sim import FAULTS, SimOptions, SimulatedCascade, beyond_server
from eval.loadtest.targets import HttpTarget, LoadTarget

__all__ = ["loadtest", "main", "parse_args"]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse the command line (see ``--help``)."""
    p = argparse.ArgumentParser(prog="python -m eval.loadtest", description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--simulated", action="store_true", help="in-process cascade over two simulated servers")
    where.add_argument("--target", metavar="URL", help="OpenAI-compatible server on loopback, e.g. "
                       "http://127.0.0.1:8000")
    g = p.add_argument_group("load")
    g.add_argument("--users", type=int, default=10, help="closed loop: concurrent users")
    g.add_argument("--duration", type=float, default=30.0, help="seconds of sending")
    g.add_argument("--think-time", type=float, default=5.0, help="closed loop: mean think time, seconds")
    g.add_argument("--think", choices=("exp", "fixed"), default="exp", help="think time distribution")
    g.add_argument("--rate", type=float, default=None, help="open loop: Poisson arrivals per second")
    g.add_argument("--ramp-up", type=float, default=0.0, help="seconds to reach full load")
    g.add_argument("--max-requests", type=int, default=None, help="send at most this many requests")
    g.add_argument("--grace", type=float, default=10.0, help="seconds in-flight requests may finish at the end")
    g.add_argument("--stream", action="store_true", help="streamed answers (HTTP: measures time to first token)")
    g.add_argument("--warmup", type=int, default=4, help="uncounted requests sent before the run")
    g.add_argument("--sample-interval", type=float, default=0.5, help="seconds between time-series samples")
    g.add_argument("--seed", type=int, default=0, help="seed of think times, arrivals and generated prompts")
    g = p.add_argument_group("prompts")
    g.add_argument("--prompts", metavar="FILE", help="JSONL with 'prompt' or 'messages' per line")
    g.add_argument("--dataset", choices=sorted(DATASETS), help="build prompts from a dataset of the data folder")
    g.add_argument("--data-dir", default="../shared/data", help="where --dataset files live (default ../shared/data)")
    g.add_argument("--n-prompts", type=int, default=1000, help="most prompts to use")
    g.add_argument("--write-prompts", metavar="FILE", help="also write the prompts used as JSONL")
    g.add_argument("--mix", nargs="+", metavar="NAME:SHARE", help="prompts from several datasets in these "
                   "shares, e.g. sst2:0.5 trec:0.3 boolq:0.2")
    _simulated_args(p)
    g = p.add_argument_group("output")
    g.add_argument("--report-json", metavar="PATH", help="write the full report as JSON")
    g.add_argument("--plot", metavar="PNG", help="write plots (needs matplotlib)")
    g.add_argument("--quiet", action="store_true", help="no terminal table")
    args = p.parse_args(argv)
    if args.drift:
        if args.fault not in (None, "small-drift"):
            p.error("--drift is --fault small-drift; give one fault")
        args.fault, args.monitor = "small-drift", True
    if args.experts is not None and (args.serve or args.fault or args.monitor or not args.simulated):
        p.error("--experts runs in process with --simulated, without --serve, faults or --monitor")
    if args.serve and (args.monitor or args.shadow_rate or args.reload_at is not None):
        p.error("--monitor, --shadow-rate and --reload-at run in process: drop --serve")
    if args.fault and not args.simulated:
        p.error("--fault needs --simulated (faults are injected into the simulated large tier)")
    if args.serve and not args.simulated:
        p.error("--serve needs --simulated")
    if args.serve and args.fault not in (None, "large-down"):
        p.error("with --serve only --fault large-down can be injected")
    return args


def _simulated_args(p: argparse.ArgumentParser) -> None:
    """The options of the HTTP target and of the simulated one (tiers, faults, live checks)."""
    g = p.add_argument_group("HTTP target")
    g.add_argument("--model", default=None, help="model id to request (default: first of /v1/models)")
    g.add_argument("--max-tokens", type=int, default=16, help="new tokens per answer")
    g.add_argument("--timeout", type=float, default=60.0, help="seconds per HTTP request before 'timeout'")
    g = p.add_argument_group("simulated target")
    g.add_argument("--serve", action="store_true",
                   help="with --simulated: put the cascade behind a real `cascade serve` child process and load it "
                        "over HTTP")
    g.add_argument("--serve-max-in-flight", type=int, default=256, help="--serve: server max_in_flight")
    g.add_argument("--serve-max-queue", type=int, default=1024, help="--serve: server max_queue (429 beyond)")
    g.add_argument("--sim-mode", choices=("process", "thread", "local"), default="process",
                   help="simulated servers in child processes, in threads of this process, or 'local': no "
                        "servers, the simulated model called in-process (engine cost without HTTP)")
    g.add_argument("--threshold", type=float, default=SimOptions.threshold, help="margin_first threshold")
    g.add_argument("--small-latency", type=float, nargs=2, metavar=("PER_REQUEST", "PER_TOKEN"),
                   default=(0.02, 0.004), help="small server's latency, seconds")
    g.add_argument("--large-latency", type=float, nargs=2, metavar=("PER_REQUEST", "PER_TOKEN"),
                   default=(0.05, 0.015), help="large server's latency, seconds")
    g.add_argument("--small-error-rate", type=float, default=0.0, help="small server's HTTP 500 share")
    g.add_argument("--large-error-rate", type=float, default=0.0, help="large server's HTTP 500 share")
    g.add_argument("--large-timeout", type=float, default=3.0, help="large tier timeout; slower answers degrade")
    g.add_argument("--backend-retries", type=int, default=2, help="retries per backend request")
    g.add_argument("--on-error", choices=("degrade", "raise"), default="degrade",
                   help="the cascade's on_error: degrade (the small answer, marked) or raise (the request fails)")
    g.add_argument("--no-early-exit", action="store_true", help="turn off the engine's early exit")
    g.add_argument("--no-batching", action="store_true", help="no micro-batcher in front of the tiers")
    g.add_argument("--batch-size", type=int, default=16, help="micro-batcher max_batch_size")
    g.add_argument("--batch-wait-ms", type=float, default=5.0, help="micro-batcher max_wait_ms")
    g.add_argument("--batch-concurrency", type=int, default=16, help="micro-batcher max_concurrent_batches")
    g = p.add_argument_group("fault injection (simulated target)")
    g.add_argument("--fault", choices=FAULTS, default=None, help="what goes wrong with the large tier")
    g.add_argument("--fault-at", type=float, default=None, help="seconds into the run (default duration / 3)")
    g.add_argument("--slow-factor", type=float, default=10.0, help="large-slow: latency multiplier")
    g.add_argument("--fail-rate", type=float, default=0.5, help="large-failing: HTTP 500 share")
    g.add_argument("--drift", action="store_true", help="the small model gets worse at --fault-at: --fault "
                   "small-drift with --monitor")
    g.add_argument("--drift-scale", type=float, default=0.5, help="small-drift: confidence multiplier")
    g = p.add_argument_group("live calibration checks (simulated target, in process)")
    g.add_argument("--monitor", action="store_true", help="run the cascade's drift checks (cascade.monitor)")
    g.add_argument("--shadow-rate", type=float, default=0.0, help="share of accepted answers shadowed")
    g.add_argument("--reload-at", type=float, default=None, help="seconds into the run: swap the threshold")
    g.add_argument("--reload-threshold", type=float, default=None, help="the new threshold (default +0.1)")
    g = p.add_argument_group("expert-router mode (simulated target; eval.loadtest.experts)")
    g.add_argument("--experts", type=int, default=None, metavar="K", help="route over K clusters (MiniLM k-means)")
    g.add_argument("--expert-replicas", type=int, default=1, help="replicas per cluster")
    g.add_argument("--replica-capacity", type=int, default=8, help="requests in flight per replica and tier")
    g.add_argument("--shared-pool", action="store_true", help="every cluster on one pool of all the replicas")
    g.add_argument("--router-embedder", choices=("minilm", "hash"), default="minilm",
                   help="MiniLM (as cascade serve) or hashed word counts (cheap: isolates the pools)")


def _mix(args: argparse.Namespace) -> dict[str, float]:
    try:
        return {name: float(share) for name, _, share in (m.partition(":") for m in args.mix)}
    except ValueError:
        raise ConfigError(f"--mix takes NAME:SHARE items, got {args.mix}") from None


def _prompts(args: argparse.Namespace) -> list[Prompt]:
    if sum(bool(x) for x in (args.prompts, args.dataset, args.mix)) > 1:
        raise ConfigError("give one of --prompts, --dataset, --mix")
    if args.mix:
        prompts = mixed_prompts(_mix(args), args.n_prompts, args.data_dir, seed=args.seed)
    elif args.prompts:
        prompts = load_prompts(args.prompts, limit=args.n_prompts)
    elif args.dataset:
        prompts = dataset_prompts(args.dataset, args.data_dir, limit=args.n_prompts, seed=args.seed)
    else:
        prompts = generated_prompts(args.n_prompts, seed=args.seed)
    if args.write_prompts:
        write_prompts(prompts, args.write_prompts)
    return prompts


def _shape(args: argparse.Namespace) -> LoadShape:
    return LoadShape(users=args.users, duration_s=args.duration, think_time_s=args.think_time, think=args.think,
                     rate=args.rate, ramp_up_s=args.ramp_up, max_requests=args.max_requests, grace_s=args.grace,
                     stream=args.stream, sample_interval_s=args.sample_interval, seed=args.seed)


def _sim_options(args: argparse.Namespace) -> SimOptions:
    base = SimOptions()
    return replace(
        base, mode=args.sim_mode, threshold=args.threshold, max_tokens=args.max_tokens,
        small=replace(base.small, latency_per_request_s=args.small_latency[0],
                      latency_per_token_s=args.small_latency[1], error_rate=args.small_error_rate),
        large=replace(base.large, latency_per_request_s=args.large_latency[0],
                      latency_per_token_s=args.large_latency[1], error_rate=args.large_error_rate),
        large_timeout_s=args.large_timeout, backend_retries=args.backend_retries, early_exit=not args.no_early_exit,
        on_error=args.on_error,
        batching=not args.no_batching,
        batch_size=args.batch_size, batch_wait_ms=args.batch_wait_ms, batch_concurrency=args.batch_concurrency,
        fault=args.fault, fault_at_s=args.fault_at if args.fault_at is not None else args.duration / 3,
        slow_factor=args.slow_factor, fail_rate=args.fail_rate, drift_scale=args.drift_scale, monitor=args.monitor,
        shadow_rate=args.shadow_rate, reload_at_s=args.reload_at, reload_threshold=args.reload_threshold)


async def loadtest(target: LoadTarget, prompts: Sequence[Prompt], shape: LoadShape, *, warmup: int = 4,
                   events: Sequence[Event] = (), fault: str | None = None, fault_at_s: float | None = None,
                   notes: Sequence[str] = (), extra: dict[str, Any] | None = None,
                   after_warmup: Callable[[], None] | None = None) -> tuple[dict[str, Any], RunResult]:
    """Warm up, run the load and build the report (the programmatic face of the command).

    Args:
        target: what to load.
        prompts: the prompts, sent in turn.
        shape: the load.
        warmup: uncounted requests sent first (imports, connections).
        events: timed actions during the run (fault injection).
        fault: the fault's kind, for the report's before/after split.
        fault_at_s: when the fault is planned.
        notes: caveats printed with the report.
        extra: more top-level report keys.
        after_warmup: called between warm-up and load (e.g. to reset counters).

    Returns:
        (report dict, raw run result with every outcome).
    """
    await warm_up(target, prompts, warmup, shape.stream)
    if after_warmup is not None:
        after_warmup()
    load_before = os.getloadavg()
    result = await run_load(target, prompts, shape, events)
    notes = list(notes)
    if shape.stream and not any(o.ttft_s is not None for o in result.recorder.outcomes):
        notes.append("streaming asked for, but the target gave no streamed tokens: no time to first token")
    if not any(o.backend_s is not None for o in result.recorder.outcomes):
        notes.append("the target reports no backend time: engine overhead unknown")
    machine = {"cpus": os.cpu_count(), "loadavg_1m_before": round(load_before[0], 2),
               "loadavg_1m_after": round(os.getloadavg()[0], 2)}
    report = build_report(result, shape, target.name, fault=fault, fault_at_s=fault_at_s,
                          extra={"machine": machine, **(extra or {}), "notes": notes})
    return report, result


async def _run_http(args: argparse.Namespace, url: str, prompts: Sequence[Prompt], shape: LoadShape, *,
                    events: Sequence[Event] = (), fault: str | None = None, fault_at_s: float | None = None,
                    notes: Sequence[str] = (), after_warmup: Callable[[], None] | None = None
                    ) -> tuple[dict[str, Any], RunResult]:
    http = HttpTarget(url, model=args.model, max_tokens=args.max_tokens, timeout_s=args.timeout,
                      connections=max(args.users, 100) if args.rate is None else 1000)
    await http.start()
    try:
        notes = ["HTTP target: engine_overhead_ms = client-side latency minus the backend time the server "
                 "reports, so it includes HTTP, JSON and queueing on both sides; server_engine_overhead_ms is "
                 "the server's own engine latency minus backend time", *notes]
        return await loadtest(http, prompts, shape, warmup=args.warmup, events=events, fault=fault,
                              fault_at_s=fault_at_s, notes=notes, after_warmup=after_warmup)
    finally:
        await http.aclose()


async def _run(args: argparse.Namespace) -> tuple[dict[str, Any], RunResult]:
    prompts = _prompts(args)
    shape = _shape(args)
    if args.target:
        return await _run_http(args, args.target, prompts, shape)
    if args.serve:
        from eval.loadtest.serve import ServedCascade

        options = _sim_options(args)
        async with ServedCascade(options, max_in_flight=args.serve_max_in_flight,
                                 max_queue=args.serve_max_queue) as served:
            cpu0: dict[str, float | None] = {}
            report, result = await _run_http(
                args, served.url, prompts, shape, events=[(options.fault_at_s, served.inject)] if options.fault else [],
                fault=options.fault,
                fault_at_s=options.fault_at_s if options.fault else None,
                notes=["cascade serve and both simulated servers run as child processes on the same CPUs"],
                after_warmup=lambda: cpu0.update(served.cpu_by_process()))
            report["simulated"] = {"via": "cascade serve", **_sim_info(options),
                                   "tier_call_beyond_server_ms": beyond_server(result.recorder.outcomes, options)}
            report["cpu_split"] = cpu_split(cpu0, served.cpu_by_process(), result, report["answered"])
            return report, result
    if args.experts is not None:
        return await _run_experts(args, prompts, shape)
    options = _sim_options(args)
    async with SimulatedCascade(options) as sim:
        assert sim.target is not None
        notes = ["in-process target: the load generator shares the event loop with the engine, so its work "
                 "(see loop_lag_ms) is part of the measured overhead"]
        notes.append({
            "thread": "simulated servers run in this process (threads): their CPU and GIL time inflate latency "
                      "and overhead",
            "process": "simulated servers run as child processes on the same CPUs (they compete for CPU)",
            "local": "local mode: no HTTP; tiers are the simulated model called in-process (same answers and "
                     "sleeps), so this measures the engine and the harness without HTTP clients or servers",
        }[options.mode])
        if args.stream:
            notes.append("the in-process engine answers whole: --stream has no effect on this target")
        events: list[Event] = [(options.fault_at_s, sim.inject)] if options.fault else []
        if options.reload_at_s is not None:
            events.append((options.reload_at_s, sim.reload))
        report, result = await loadtest(
            sim.target, prompts, shape, warmup=args.warmup, events=events, fault=options.fault,
            fault_at_s=options.fault_at_s if options.fault else None, notes=notes, after_warmup=sim.reset_counters)
        report["simulated"] = {
            "via": "in-process Cascade", **_sim_info(options), "batching": sim.batching,
            "servers": sim.server_stats(), "batching_stats": sim.batching_stats(result.recorder.outcomes),
            "tier_call_beyond_server_ms": beyond_server(result.recorder.outcomes, options)}
        monitored = sim.monitor_report()
        if monitored is not None:
            report["monitor"] = monitored
        return report, result


async def _run_experts(args: argparse.Namespace, prompts: Sequence[Prompt], shape: LoadShape
                       ) -> tuple[dict[str, Any], RunResult]:
    from eval.loadtest.experts import ExpertOptions, RoutedCascade

    fit: list[Prompt] = []
    if args.mix:  # the router is fitted on other prompts of the same mix
        fit = mixed_prompts(_mix(args), 1000, args.data_dir, seed=args.seed, skip=args.n_prompts)
    options = ExpertOptions(k=args.experts, replicas=args.expert_replicas, capacity=args.replica_capacity,
                            shared=args.shared_pool, sim=_sim_options(args), embedder=args.router_embedder,
                            fit_prompts=tuple(fit))
    async with RoutedCascade(options) as routed:
        assert routed.target is not None
        notes = ["in-process expert router over two simulated servers (child processes); each replica's tiers "
                 f"allow {options.capacity} requests in flight (a server's batch slots)"]
        report, result = await loadtest(routed.target, prompts, shape, warmup=args.warmup, notes=notes)
        report["experts"] = routed.report()
        return report, result


def cpu_split(before: dict[str, float | None], after: dict[str, float | None], result: RunResult, answered: int
              ) -> dict[str, dict[str, float | None]]:
    """CPU seconds, share of one core and milliseconds per answered request of each process during the run
    (``loadgen``: this process; the others from ``/proc``, None where it cannot be read)."""
    used = {k: None if before.get(k) is None or after.get(k) is None else after[k] - before[k]  # type: ignore[operator]
            for k in after}
    used["loadgen"] = result.cpu_s
    span, n = max(result.elapsed_s, 1e-9), max(answered, 1)
    return {k: {"cpu_s": None if v is None else round(v, 3), "share_of_core": None if v is None else round(v / span, 3),
                "ms_per_request": None if v is None else round(v * 1000 / n, 3)} for k, v in used.items()}


def _sim_info(options: SimOptions) -> dict[str, Any]:
    return {"mode": options.mode, "threshold": options.threshold, "max_tokens": options.max_tokens,
            "early_exit": options.early_exit, "batching": options.batching,
            "small": _sim_dict(options.small), "large": _sim_dict(options.large),
            "large_timeout_s": options.large_timeout_s}


def _sim_dict(c: SimConfig) -> dict[str, Any]:
    return {"model": c.model, "latency_per_request_s": c.latency_per_request_s,
            "latency_per_token_s": c.latency_per_token_s, "error_rate": c.error_rate}


def main(argv: Sequence[str] | None = None) -> int:
    """Run the load test; returns the exit status (0 ok, 1 lost or duplicated requests, 2 bad input)."""
    args = parse_args(argv)
    try:
        report, result = run(_run(args))
    except CascadeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if not args.quiet:
        print(format_report(report))
    if args.report_json:
        Path(args.report_json).write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    if args.plot:
        plot_report(report, result.recorder.outcomes, args.plot)
    return 0 if report["exactly_one_outcome_each"] else 1
