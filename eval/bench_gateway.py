"""Gateway efficiency: ``python -m eval.bench_gateway --report-json F``.

Drives a real ``cascade serve`` child process (:class:`eval.loadtest.serve.ServedCascade`) whose two tiers are
simulated servers in child processes (:mod:`cascade.simulate`), with open-loop Poisson load at fixed offered
rates (:func:`eval.loadtest.load.run_load`), and reports from each process's own CPU time (``/proc``):

* **CPU per request**: CPU milliseconds per answered request of the gateway (``cascade serve``, its workers
  included), of each simulated server and of the load generator, for plain and streamed requests, all
  accepted (threshold 2: the small tier answers everything) or all escalated (threshold -1: two tier calls).
  The gateway's share of a core is given too, so a run says who saturated.
* **Rate sweep**: at each offered rate (the simulated cascade's mixed threshold, plain requests) the HTTP +
  queueing latency (client latency minus the engine's own latency that the server reports) and the highest
  rate served with its p99 <= ``--p99-ms`` and no failed request.

``--repeat N`` runs the CPU phases N times, interleaved, and reports each phase's median round: CPU per request
moves by about 15% between runs minutes apart on a shared VM.

``--baseline-src DIR`` runs the same phases, interleaved, against a ``cascade serve`` and simulated servers run
from another checkout (e.g. a worktree of the commit before a change) and prints current / baseline ratios side
by side. The load generator is this process in both, so its ratio is ~1 by construction: compare it across two
runs, one from each checkout.
The load generator polls ``/health`` twice a second; those requests are counted in the gateway's CPU but not
as requests (about 2% at 100 requests/s).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from cascade.types import Prompt
from eval.loadtest.cli import cpu_split
from eval.loadtest.load import LoadShape, run, run_load, warm_up
from eval.loadtest.prompts import generated_prompts
from eval.loadtest.report import build_report
from eval.loadtest.serve import ServedCascade
from eval.loadtest.sim import SimOptions
from eval.loadtest.targets import HttpTarget

__all__ = ["main"]

VARIANTS = {"accepted": 2.0, "escalated": -1.0}  # threshold on 1 - margin (in [0, 1]): never / always escalate
PROCESSES = ("gateway", "small", "large", "loadgen")


@dataclass(frozen=True)
class Gateway:
    """A ``cascade serve`` to measure: its label, the code it runs and its extra arguments."""

    label: str
    pythonpath: str | None = None  # None: this checkout
    serve_args: tuple[str, ...] = ()


async def phase(url: str, cpu: Callable[[], dict[str, float | None]], prompts: Sequence[Prompt], *, rate: float,
                duration_s: float, stream: bool, max_tokens: int, seed: int = 0) -> dict[str, Any]:
    """One open-loop run at ``rate`` requests/s against the server at ``url``; CPU per answered request of every
    process ``cpu`` reads (seconds so far, by name) and of the load generator, latencies."""
    target = HttpTarget(url + "/v1", max_tokens=max_tokens, timeout_s=30.0, connections=256)
    await target.start()
    try:
        await warm_up(target, prompts, 16, stream)
        shape = LoadShape(rate=rate, duration_s=duration_s, stream=stream, grace_s=10.0, seed=seed)
        before = cpu()
        result = await run_load(target, prompts, shape)
        after = cpu()
    finally:
        await target.aclose()
    report = build_report(result, shape, url)
    split = cpu_split(before, after, result, report["answered"])
    http = report.get("http_and_queue_ms") or {}
    return {
        "rate_rps": rate, "stream": stream, "sent": report["sent"], "answered": report["answered"],
        "failed": report["failed"], "failed_by_kind": report["failed_by_kind"],
        "escalated_share": report["escalated_share"], "throughput_rps": report["throughput_rps"],
        "latency_ms": report["latency_ms"], "http_and_queue_ms": http or None,
        "cpu_ms_per_request": {k: v["ms_per_request"] for k, v in split.items()},
        "cpu_share_of_core": {k: v["share_of_core"] for k, v in split.items()},
    }


def _options(threshold: float | None, args: argparse.Namespace) -> SimOptions:
    base = SimOptions(max_tokens=args.max_tokens, early_exit=args.early_exit)
    return base if threshold is None else replace(base, threshold=threshold)


async def _serve(gateway: Gateway, options: SimOptions) -> ServedCascade:
    served = ServedCascade(options, serve_args=gateway.serve_args, pythonpath=gateway.pythonpath)
    return await served.__aenter__()


async def cpu_phases(gateways: Sequence[Gateway], prompts: Sequence[Prompt], args: argparse.Namespace,
                     out: dict[str, Any]) -> None:
    """``--repeat`` rounds of: per variant (accepted, escalated), per gateway in turn, plain then streamed at
    ``--cpu-rate``. Each phase's row is its round with the median gateway CPU (``gateway_cpu_ms_rounds``: all)."""
    rounds: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for _ in range(args.repeat):
        for variant, threshold in VARIANTS.items():
            for gw in gateways:
                served = await _serve(gw, _options(threshold, args))
                try:
                    for stream in (False, True):
                        row = await phase(served.url, served.cpu_by_process, prompts, rate=args.cpu_rate,
                                          duration_s=args.duration, stream=stream, max_tokens=args.max_tokens)
                        rounds.setdefault((gw.label, f"{variant}_{'streamed' if stream else 'plain'}"), []).append(row)
                        _print_cpu(gw.label, variant, row)
                finally:
                    await served.aclose()
    for (label, key), rows in rounds.items():
        cpu = [r["cpu_ms_per_request"]["gateway"] for r in rows]
        median = sorted(rows, key=lambda r: r["cpu_ms_per_request"]["gateway"] or 0.0)[(len(rows) - 1) // 2]
        out[label]["cpu"][key] = {**median, "gateway_cpu_ms_rounds": cpu}
        if args.repeat > 1:
            print(f"  {label:>9} {key:>18}: gateway CPU ms/req median "
                  f"{_f(median['cpu_ms_per_request']['gateway'], 3)} of " + " ".join(_f(c, 3) for c in cpu), flush=True)


async def sweep(gateways: Sequence[Gateway], prompts: Sequence[Prompt], args: argparse.Namespace,
                out: dict[str, Any]) -> None:
    """Each rate of ``--rates`` against each gateway in turn (mixed threshold, plain requests)."""
    served = {gw.label: await _serve(gw, _options(None, args)) for gw in gateways}
    try:
        for rate in args.rates:
            for gw in gateways:
                one = served[gw.label]
                row = await phase(one.url, one.cpu_by_process, prompts, rate=rate, duration_s=args.duration,
                                  stream=False, max_tokens=args.max_tokens)
                p99 = (row["http_and_queue_ms"] or {}).get("p99")
                row["ok"] = bool(p99 is not None and p99 <= args.p99_ms and row["failed"] == 0)
                out[gw.label]["sweep"].append(row)
                print(f"  sweep {gw.label:>9} {rate:6.0f}/s: answered {row['answered']:5d} failed {row['failed']:3d} "
                      f"http+queue p99 {_f(p99)} ms  gateway {_f(row['cpu_share_of_core']['gateway'], 2)} core  "
                      f"{'ok' if row['ok'] else 'over'}", flush=True)
    finally:
        for s in served.values():
            await s.aclose()
    for gw in gateways:
        passed = [r["rate_rps"] for r in out[gw.label]["sweep"] if r["ok"]]
        out[gw.label]["highest_rate_p99_ok_rps"] = max(passed, default=None)


def _f(x: float | None, nd: int = 1) -> str:
    return "-" if x is None else f"{x:.{nd}f}"


def _print_cpu(label: str, variant: str, row: dict[str, Any]) -> None:
    cpu = row["cpu_ms_per_request"]
    kind = "streamed" if row["stream"] else "plain"
    print(f"  {label:>9} {variant:>9} {kind:>8}: answered {row['answered']:5d} failed {row['failed']:3d}  CPU ms/req "
          + "  ".join(f"{k} {_f(cpu[k], 3)}" for k in PROCESSES)
          + f"  http+queue p99 {_f((row['http_and_queue_ms'] or {}).get('p99'))} ms", flush=True)


def ratios(out: dict[str, Any], current: str, baseline: str) -> dict[str, Any]:
    """current / baseline of each process's CPU per request per phase (the gateway's, the simulated servers'
    and, only meaningful across two checkouts' runs, the load generator's), and of the highest rate within p99."""
    res: dict[str, Any] = {}
    for key, row in out[current]["cpu"].items():
        for proc in PROCESSES:
            a, b = row["cpu_ms_per_request"][proc], out[baseline]["cpu"][key]["cpu_ms_per_request"][proc]
            res[f"{proc}_cpu_{key}"] = None if not a or not b else round(a / b, 3)
    a, b = out[current].get("highest_rate_p99_ok_rps"), out[baseline].get("highest_rate_p99_ok_rps")
    res["highest_rate_p99_ok"] = None if not a or not b else round(a / b, 3)
    return res


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse the command line (see ``--help``)."""
    p = argparse.ArgumentParser(prog="python -m eval.bench_gateway", description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--report-json", metavar="F", help="write the whole report as JSON")
    p.add_argument("--cpu-rate", type=float, default=100.0, help="offered rate of the CPU phases, requests/s")
    p.add_argument("--rates", type=lambda t: [float(x) for x in t.split(",")], default=[50, 100, 200, 300, 400],
                   help="offered rates of the sweep, comma-separated requests/s (empty sweep: --rates '')")
    p.add_argument("--duration", type=float, default=10.0, help="seconds of sending per phase")
    p.add_argument("--p99-ms", type=float, default=50.0, help="HTTP + queueing p99 a served rate must stay within")
    p.add_argument("--max-tokens", type=int, default=16, help="new tokens per answer")
    p.add_argument("--repeat", type=int, default=1,
                   help="rounds of the CPU phases, interleaved; each phase reports its median round (of an even "
                        "count, the lower middle one)")
    p.add_argument("--no-early-exit", dest="early_exit", action="store_false",
                   help="the engine's early_exit off: the small tier answers in one piece, not streamed")
    p.add_argument("--workers", type=int, default=None, help="cascade serve --workers for this checkout's gateway")
    p.add_argument("--baseline-src", metavar="DIR", help="also measure a cascade serve run from this checkout "
                   "(PYTHONPATH=DIR), interleaved, and print ratios")
    p.add_argument("--no-cpu", dest="cpu", action="store_false", help="skip the CPU phases")
    p.add_argument("--no-sweep", dest="sweep", action="store_false", help="skip the rate sweep")
    args = p.parse_args(argv)
    if args.repeat < 1:
        p.error("--repeat must be >= 1")
    return args


async def bench(args: argparse.Namespace) -> dict[str, Any]:
    """Run the phases; the report as JSON-ready data."""
    here = os.environ.get("PYTHONPATH")
    gateways = [Gateway("current", here, ("--workers", str(args.workers)) if args.workers else ())]
    if args.baseline_src:
        gateways.insert(0, Gateway("baseline", args.baseline_src))
    prompts = generated_prompts(1000, seed=0)
    out: dict[str, Any] = {gw.label: {"pythonpath": gw.pythonpath, "serve_args": list(gw.serve_args), "cpu": {},
                                      "sweep": []} for gw in gateways}
    out["machine"] = {"cpus": os.cpu_count(), "loadavg_at_start": list(os.getloadavg())}
    out["settings"] = {k: v for k, v in vars(args).items() if k != "report_json"}
    if args.cpu:
        await cpu_phases(gateways, prompts, args, out)
    if args.sweep and args.rates:
        await sweep(gateways, prompts, args, out)
    out["machine"]["loadavg_at_end"] = list(os.getloadavg())
    if args.baseline_src:
        out["ratios_current_over_baseline"] = ratios(out, "current", "baseline")
        print("current / baseline:", json.dumps(out["ratios_current_over_baseline"]))
    for gw in gateways:
        print(f"{gw.label}: highest rate with HTTP + queueing p99 <= {args.p99_ms:g} ms: "
              f"{out[gw.label].get('highest_rate_p99_ok_rps')}")
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: run the benchmark, print the table, write ``--report-json``."""
    args = parse_args(argv)
    if args.baseline_src:
        args.baseline_src = str(Path(args.baseline_src).resolve())
    report = run(bench(args))
    if args.report_json:
        Path(args.report_json).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
