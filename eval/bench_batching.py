"""Benchmark dynamic micro-batching on a real model: concurrent callers vs one at a time vs raw batches.

Three ways to answer the same prompts with the same greedy parameters (scores on, as the small tier does),
measured side by side in one run:

* ``sequential``: one request at a time, ``backend.generate([prompt])``, each prompt once;
* ``dynamic``: ``callers`` concurrent callers, each sending one request after the other through a
  :class:`~cascade.batching.MicroBatcher` (``max_batch_size = callers``);
* ``raw batched``: ``backend.generate(prompts)`` with ``callers`` prompts at once, the physical limit of
  batching at that batch size.

Run from the checkout::

    python -m eval.bench_batching [--model smollm2-135m] [--callers 32] [--report-json PATH]

The JSON report has ``speedup_vs_sequential`` (dynamic / sequential requests per second) and
``fraction_of_raw_batched`` (dynamic / raw batched), plus the raw numbers.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any

from cascade.types import GenerationParams


def _prompts(n: int) -> list[str]:
    """``n`` prompts from the bundled SST-2 demo questions (cycled when there are fewer)."""
    text = resources.files("cascade").joinpath("data/demo_sst2.jsonl").read_text("utf-8")
    base = [json.loads(line)["prompt"] for line in text.splitlines() if line.strip()]
    return [base[i % len(base)] for i in range(n)]


async def _raw(backend: Any, prompts: list[str], params: GenerationParams) -> float:
    """Seconds for one batched generate call over all ``prompts``."""
    t0 = time.perf_counter()
    await backend.generate(prompts, params)
    return time.perf_counter() - t0


async def _dynamic(batcher: Any, prompts: list[str], params: GenerationParams, per_caller: int) -> float:
    """Seconds for ``len(prompts)`` concurrent callers to each send ``per_caller`` requests in turn."""

    async def caller(prompt: str) -> None:
        for _ in range(per_caller):
            await batcher.generate([prompt], params)

    t0 = time.perf_counter()
    await asyncio.gather(*(caller(p) for p in prompts))
    return time.perf_counter() - t0


async def _sequential(backend: Any, prompts: list[str], params: GenerationParams) -> float:
    """Seconds to answer ``prompts`` one request at a time."""
    t0 = time.perf_counter()
    for p in prompts:
        await backend.generate([p], params)
    return time.perf_counter() - t0


async def bench(backend: Any, *, callers: int, max_tokens: int, rounds: int, max_wait_ms: float) -> dict[str, Any]:
    """Measure the three modes, interleaved round by round so shared-machine noise hits all of them.

    Each round runs one raw batch of ``callers`` prompts and ``callers`` concurrent callers with one request
    each (in alternating order), then a 1/``rounds`` share of the same prompts one at a time (over all
    rounds, every prompt once). Warm-up calls at batch sizes 1 and ``callers`` come first.

    Returns:
        The report: requests per second of each mode and the two ratios.
    """
    from cascade.batching import MicroBatcher

    params = GenerationParams(max_tokens=max_tokens)
    prompts = _prompts(callers)
    await backend.generate(prompts[:1], params)  # warm-up: first-call allocations at both batch sizes
    await backend.generate(prompts, params)
    batcher = MicroBatcher(backend, max_batch_size=callers, max_wait_ms=max_wait_ms, max_queue=4 * callers)
    raw_s, dyn_s, seq_s, seq_n = [], [], [], 0
    for r in range(rounds):
        if r % 2 == 0:  # alternate which of the two goes first
            raw_s.append(await _raw(backend, prompts, params))
            dyn_s.append(await _dynamic(batcher, prompts, params, 1))
        else:
            dyn_s.append(await _dynamic(batcher, prompts, params, 1))
            raw_s.append(await _raw(backend, prompts, params))
        share = prompts[r::rounds]
        seq_s.append(await _sequential(backend, share, params))
        seq_n += len(share)
        print(f"round {r + 1}/{rounds}: raw batch of {callers} {raw_s[-1]:.2f} s | {callers} concurrent callers "
              f"{dyn_s[-1]:.2f} s | {len(share)} sequential requests {seq_s[-1]:.2f} s", file=sys.stderr)
    raw_rps = callers * rounds / sum(raw_s)
    dyn_rps = callers * rounds / sum(dyn_s)
    seq_rps = seq_n / sum(seq_s)
    return {
        "speedup_vs_sequential": dyn_rps / seq_rps,
        "fraction_of_raw_batched": dyn_rps / raw_rps,
        "requests_per_s": {"dynamic": dyn_rps, "sequential": seq_rps, "raw_batched": raw_rps},
        "seconds": {"dynamic": dyn_s, "raw_batched": raw_s, "sequential": seq_s},
        "mean_dynamic_batch_size": batcher.batched_prompts / max(batcher.batches, 1),
        "median_round_ratio_dynamic_to_raw": statistics.median(r / d for r, d in zip(raw_s, dyn_s)),
        "setup": {"model": backend.name, "callers": callers, "max_tokens": max_tokens, "rounds": rounds,
                  "sequential_requests": seq_n, "max_wait_ms": max_wait_ms, "greedy": True, "scores": True,
                  "cpu_count": os.cpu_count(), "loadavg_at_end": list(os.getloadavg())},
    }


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: ``python -m eval.bench_batching``."""
    p = argparse.ArgumentParser(prog="python -m eval.bench_batching", description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m", help="model for HFLocalBackend.from_pretrained")
    p.add_argument("--callers", type=int, default=32, help="concurrent callers = batch size (default 32)")
    p.add_argument("--max-tokens", type=int, default=16, help="new tokens per answer (default 16)")
    p.add_argument("--rounds", type=int, default=3, help="dynamic and raw rounds, interleaved (default 3)")
    p.add_argument("--max-wait-ms", type=float, default=5.0, help="micro-batcher wait (default 5 ms)")
    p.add_argument("--report-json", help="write the report here as JSON")
    args = p.parse_args(argv)
    from cascade.backends.hf_local import HFLocalBackend

    print(f"loading {args.model} ...", file=sys.stderr)
    backend = HFLocalBackend.from_pretrained(args.model, max_batch_size=args.callers)
    report = asyncio.run(bench(backend, callers=args.callers, max_tokens=args.max_tokens, rounds=args.rounds,
                               max_wait_ms=args.max_wait_ms))
    rps = report["requests_per_s"]
    print(f"\nrequests/s  sequential {rps['sequential']:.2f} | dynamic batching ({args.callers} callers) "
          f"{rps['dynamic']:.2f} | raw batched generate (batch {args.callers}) {rps['raw_batched']:.2f}")
    print(f"speedup vs sequential {report['speedup_vs_sequential']:.2f}x (goal >= 4x); "
          f"fraction of raw batched {report['fraction_of_raw_batched']:.1%} (goal >= 80%); "
          f"mean batch {report['mean_dynamic_batch_size']:.1f}")
    if args.report_json:
        out = Path(args.report_json)
        tmp = out.with_name(out.name + ".part")
        tmp.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        tmp.replace(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
