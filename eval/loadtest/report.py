"""Turn a finished run into the report: a JSON-ready dict, a terminal table and optional PNG plots.

Percentiles are exact, computed by :func:`eval.loadtest.stats.percentile` with linear interpolation
(Hyndman & Fan type 7, NumPy's default). Latencies are of answered requests only (degraded answers included).
Engine overhead = the time from actually sending a request to its answer minus the seconds spent inside
backends, over requests whose target reports backend time. Latency is counted from when a request was due
(open loop: its scheduled arrival), so a late load generator shows as latency ("send lateness") but not as
engine overhead.
"""

from __future__ import annotations

import itertools
import math
from collections import Counter, defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from eval.loadtest.load import LoadShape, RunResult
from eval.loadtest.stats import Outcome, percentiles

__all__ = ["build_report", "format_report", "plot_report"]

_MS = 1000.0


def _lat(values: Sequence[float]) -> dict[str, float | None]:
    """p50, p95, p99 and max of seconds, in milliseconds."""
    out = percentiles(values, (50, 95, 99, 100), scale=_MS)
    out["max"] = out.pop("p100")
    return out


def _share(n: int, d: int) -> float | None:
    return round(n / d, 4) if d else None


def _window(outcomes: Sequence[Outcome]) -> dict[str, Any]:
    answered = [o for o in outcomes if o.ok]
    return {
        "sent": len(outcomes),
        "answered": len(answered),
        "failed": len(outcomes) - len(answered),
        "failed_by_kind": dict(Counter(o.error_kind for o in outcomes if not o.ok)),
        "degraded": sum(o.degraded for o in answered),
        "escalated": sum(o.escalated for o in answered),
        "latency_ms": _lat([o.latency_s for o in answered]),
    }


def _tiers(outcomes: Sequence[Outcome]) -> dict[str, Any]:
    calls: dict[str, list[Any]] = defaultdict(list)
    answered_by: dict[str, list[float]] = defaultdict(list)
    for o in outcomes:
        for c in o.calls:
            calls[c.tier].append(c)
        if o.ok and o.tier is not None:
            answered_by[o.tier].append(o.latency_s)
    out: dict[str, Any] = {}
    for name in list(calls) + [t for t in answered_by if t not in calls]:
        cs = calls.get(name, [])
        lat = [c.latency_s for c in cs if c.latency_s is not None and not math.isnan(c.latency_s)]
        out[name] = {
            "calls": len(cs),
            "call_errors": sum(c.error is not None for c in cs),
            "answered": len(answered_by.get(name, [])),
            "prompt_tokens": sum(c.prompt_tokens for c in cs),
            "completion_tokens": sum(c.completion_tokens for c in cs),
            "cost": round(sum(c.cost for c in cs), 9),
            "call_latency_ms": _lat(lat),
            "latency_ms": _lat(answered_by.get(name, [])),
        }
    return out


def build_report(result: RunResult, shape: LoadShape, target: str, *, fault: str | None = None,
                 fault_at_s: float | None = None, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The whole report as plain JSON-ready data (see the module docstring for definitions).

    Args:
        result: the finished run.
        shape: the load it ran with.
        target: a description of the target.
        fault: the injected fault kind, if any.
        fault_at_s: when it was injected (requests sent before/after are reported separately).
        extra: more top-level keys (machine load, server counters, notes).
    """
    rec = result.recorder
    outs = rec.outcomes
    answered = [o for o in outs if o.ok]
    overhead = [o.overhead_s for o in answered if o.overhead_s is not None]
    late = [o.sent_s - o.start_s for o in outs if o.sent_s is not None]
    ttft = [o.ttft_s for o in answered if o.ttft_s is not None]
    lags = [s.loop_lag_ms for s in rec.samples]
    report: dict[str, Any] = {
        "target": target,
        "load": {"kind": shape.kind, "users": shape.users if shape.kind == "closed" else None,
                 "rate_rps": shape.rate, "think_time_s": shape.think_time_s if shape.kind == "closed" else None,
                 "think": shape.think if shape.kind == "closed" else None, "ramp_up_s": shape.ramp_up_s,
                 "duration_s": shape.duration_s, "max_requests": shape.max_requests, "grace_s": shape.grace_s,
                 "stream": shape.stream},
        "sent": rec.sent,
        "answered": rec.answered,
        "failed": rec.failed,
        "lost": rec.lost,
        "duplicates": rec.duplicates,
        "exactly_one_outcome_each": rec.lost == 0 and rec.duplicates == 0
        and sorted(o.id for o in outs) == list(range(rec.sent)),
        "failed_by_kind": dict(rec.failures),
        "degraded": sum(o.degraded for o in answered),
        "degraded_share": _share(sum(o.degraded for o in answered), len(answered)),
        "sending_s": round(result.sending_s, 3),
        "elapsed_s": round(result.elapsed_s, 3),
        "throughput_rps": round(rec.answered / result.elapsed_s, 3),
        "latency_ms": _lat([o.latency_s for o in answered]),
        "ttft_ms": _lat(ttft) if ttft else None,
        "engine_overhead_ms": {**_lat(overhead), "n": len(overhead)},
        "send_lateness_ms": _lat(late),
        "escalated_share": _share(sum(o.escalated for o in answered), len(answered)),
        "cost": {"total": round(sum(o.cost for o in outs), 9),
                 "per_answer": round(sum(o.cost for o in answered) / len(answered), 12) if answered else None},
        "tiers": _tiers(outs),
        "max_in_flight": max((s.in_flight for s in rec.samples), default=0),
        "loop_lag_ms": percentiles(lags, (50, 99, 100)),
        "harness_cpu_s": round(result.cpu_s, 3),
        "events": [{"t_s": t, "what": w} for t, w in result.events],
        "percentile_method": "linear interpolation between closest ranks (Hyndman-Fan type 7, numpy default)",
        "timeline": [{"t_s": s.t_s, "in_flight": s.in_flight, "sent": s.sent, "answered": s.answered,
                      "failed": s.failed, "queue_depth": s.queue_depth, "loop_lag_ms": s.loop_lag_ms}
                     for s in rec.samples],
    }
    if fault is not None:
        at = fault_at_s if fault_at_s is not None else math.inf
        injected = next((t for t, w in result.events if not w.startswith("skipped")), None)
        at = injected if injected is not None else at
        report["fault"] = {"kind": fault, "at_s": at,
                           "before": _window([o for o in outs if o.start_s < at]),
                           "after": _window([o for o in outs if o.start_s >= at])}
    served = [(o.service_s, o.engine_s, o.backend_s) for o in answered if o.engine_s is not None]
    if served:  # an HTTP target that reports the engine's own latency: split the overhead
        report["server_engine_overhead_ms"] = _lat([e - b for _, e, b in served if b is not None])
        report["http_and_queue_ms"] = _lat([total - e for total, e, _ in served])
    report.update(extra or {})
    return report


def _fmt(x: Any, nd: int = 1) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.{nd}f}"
    return str(x)


def format_report(r: dict[str, Any]) -> str:
    """A terminal table of the report's headline numbers."""
    load = r["load"]
    shape = (f"closed loop, {load['users']} users, think {load['think_time_s']:g} s ({load['think']})"
             if load["kind"] == "closed" else f"open loop, Poisson {load['rate_rps']:g} req/s")
    lines = [f"target: {r['target']}", f"load:   {shape}, duration {load['duration_s']:g} s, "
             f"ramp-up {load['ramp_up_s']:g} s, grace {load['grace_s']:g} s"
             + (f", max {load['max_requests']} requests" if load["max_requests"] else "")]
    lines.append(f"requests: sent {r['sent']}  answered {r['answered']}  failed {r['failed']}  "
                 f"lost {r['lost']}  duplicates {r['duplicates']}  (degraded answers {r['degraded']}); "
                 f"exactly one outcome per request: {'yes' if r['exactly_one_outcome_each'] else 'NO'}")
    if r["failed_by_kind"]:
        lines.append("failed by kind: " + ", ".join(f"{k} {v}" for k, v in sorted(r["failed_by_kind"].items())))
    lines.append(f"throughput {r['throughput_rps']:.1f} answers/s over {r['elapsed_s']:.1f} s; "
                 f"escalated share {_fmt(r['escalated_share'], 3)}; cost {r['cost']['total']:.6g}; "
                 f"max in flight {r['max_in_flight']}")
    head = f"{'':28}{'p50':>10}{'p95':>10}{'p99':>10}{'max':>10}"
    lines += ["", head]

    def row(label: str, p: dict[str, Any] | None) -> None:
        p = p or {}
        lines.append(f"{label:28}" + "".join(f"{_fmt(p.get(k)):>10}" for k in ("p50", "p95", "p99", "max")))

    row("latency ms (all answers)", r["latency_ms"])
    for name, t in r["tiers"].items():
        row(f"  answered by {name}", t["latency_ms"])
    if r["ttft_ms"]:
        row("time to first token ms", r["ttft_ms"])
    row(f"engine overhead ms (n={r['engine_overhead_ms']['n']})", r["engine_overhead_ms"])
    if "server_engine_overhead_ms" in r:
        row("  of which engine in server", r["server_engine_overhead_ms"])
        row("  of which HTTP + queueing", r["http_and_queue_ms"])
    if r["load"]["kind"] == "open":
        row("send lateness ms (harness)", r["send_lateness_ms"])
    lag = r["loop_lag_ms"]
    row("harness loop lag ms", {"p50": lag.get("p50"), "p99": lag.get("p99"), "max": lag.get("p100")})
    lines += ["", f"{'tier':12}{'calls':>8}{'errors':>8}{'answered':>10}{'in tok':>10}{'out tok':>10}"
                  f"{'cost':>12}{'call p50 ms':>13}{'call p99 ms':>13}"]
    for name, t in r["tiers"].items():
        cl = t["call_latency_ms"]
        lines.append(f"{name:12}{t['calls']:>8}{t['call_errors']:>8}{t['answered']:>10}{t['prompt_tokens']:>10}"
                     f"{t['completion_tokens']:>10}{t['cost']:>12.6g}{_fmt(cl['p50']):>13}{_fmt(cl['p99']):>13}")
    if "fault" in r:
        f = r["fault"]
        lines += ["", f"fault {f['kind']} at {f['at_s']} s:"]
        for when in ("before", "after"):
            w = f[when]
            lines.append(f"  {when:6} sent {w['sent']:6}  answered {w['answered']:6} (degraded {w['degraded']}, "
                         f"escalated {w['escalated']})  failed {w['failed']} {w['failed_by_kind'] or ''}  "
                         f"p50 {_fmt(w['latency_ms']['p50'])} ms  p99 {_fmt(w['latency_ms']['p99'])} ms")
    stats = (r.get("simulated") or {}).get("batching_stats") or {}
    waits = {k: v.get("mean_batch_wait_ms") for k, v in stats.items()}
    if waits:
        lines.append("micro-batcher: mean queue wait per tier call (inside tier-call time, not in the engine "
                     "overhead): " + ", ".join(f"{k} {_fmt(v)} ms" for k, v in waits.items()))
    beyond = (r.get("simulated") or {}).get("tier_call_beyond_server_ms")
    if beyond:
        lines.append("")
        for name, p in beyond.items():
            row(f"{name} call beyond server ms", p)
    split = r.get("cpu_split")
    if split:
        lines.append("CPU during the run: " + "  ".join(
            f"{k} {_fmt(v['ms_per_request'], 3)} ms/answer ({_fmt(v['share_of_core'], 2)} core)"
            for k, v in split.items()))
    for e in r["events"]:
        lines.append(f"event at {e['t_s']} s: {e['what']}")
    for note in r.get("notes", []):
        lines.append(f"note: {note}")
    return "\n".join(lines)


def plot_report(r: dict[str, Any], outcomes: Sequence[Outcome], path: str | Path) -> None:
    """Four panels in one PNG: in flight / queue depth, answers and failures per second, latency of each
    request over time (by tier; degraded and failed marked), and the CDFs of latency, engine overhead and
    time to first token on a log axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tl = r["timeline"]
    fig, ax = plt.subplots(2, 2, figsize=(13, 8))
    t = [s["t_s"] for s in tl]
    ax[0, 0].plot(t, [s["in_flight"] for s in tl], label="in flight")
    if any(s["queue_depth"] is not None for s in tl):
        ax[0, 0].plot(t, [s["queue_depth"] or 0 for s in tl], label="queue depth")
    ax[0, 0].set(title="requests in flight", xlabel="s")
    rates_t, ok_rate, fail_rate = [], [], []
    for a, b in itertools.pairwise(tl):
        dt = b["t_s"] - a["t_s"]
        if dt > 0:
            rates_t.append(b["t_s"])
            ok_rate.append((b["answered"] - a["answered"]) / dt)
            fail_rate.append((b["failed"] - a["failed"]) / dt)
    ax[0, 1].plot(rates_t, ok_rate, label="answered/s")
    ax[0, 1].plot(rates_t, fail_rate, label="failed/s", color="red")
    ax[0, 1].set(title="throughput", xlabel="s")
    tiers = sorted({o.tier for o in outcomes if o.ok and o.tier is not None})
    for tier in tiers:
        sel = [o for o in outcomes if o.ok and o.tier == tier and not o.degraded]
        ax[1, 0].scatter([o.end_s for o in sel], [o.latency_s * _MS for o in sel], s=3, label=tier)
    for label, sel, color in (("degraded", [o for o in outcomes if o.degraded], "purple"),
                              ("failed", [o for o in outcomes if not o.ok], "red")):
        if sel:
            ax[1, 0].scatter([o.end_s for o in sel], [o.latency_s * _MS for o in sel], s=9, label=label, c=color,
                             marker="x")
    ax[1, 0].set(title="latency of each request", xlabel="answer time, s", ylabel="ms", yscale="log")
    series = {"end-to-end latency": [o.latency_s for o in outcomes if o.ok],
              "engine overhead": [o.overhead_s for o in outcomes if o.ok and o.overhead_s is not None],
              "time to first token": [o.ttft_s for o in outcomes if o.ok and o.ttft_s is not None]}
    for label, values in series.items():
        xs = sorted(max(v * _MS, 1e-3) for v in values if v is not None)
        if xs:
            ax[1, 1].step(xs, [(i + 1) / len(xs) for i in range(len(xs))], where="post", label=label)
    ax[1, 1].set(title="distributions (CDF)", xlabel="ms", xscale="log", ylabel="share of answers")
    fault = r.get("fault")
    for a in ax.flat:
        if fault and math.isfinite(fault["at_s"]) and a is not ax[1, 1]:
            a.axvline(fault["at_s"], color="k", linestyle="--", label=f"fault: {fault['kind']}")
        a.legend(fontsize=8)
    fig.suptitle(f"load test: {r['target']} ({r['sent']} sent, {r['answered']} answered, {r['failed']} failed, "
                 f"{r['lost']} lost)")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
