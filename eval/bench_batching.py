"""Benchmark dynamic micro-batching on a real model: concurrent callers vs one at a time vs raw batches.

Three ways to answer the same prompts with the same greedy parameters (scores on, as the small tier does),
measured side by side in one run, round by round so that load from other processes hits all three:

* ``sequential``: one request at a time, ``backend.generate([prompt])``;
* ``dynamic``: ``callers`` concurrent callers, one request each, through a
  :class:`~cascade.batching.MicroBatcher` (``max_batch_size = callers``);
* ``raw batched``: ``backend.generate(prompts)`` with ``callers`` prompts at once, the physical limit of
  batching at that batch size.

Two workloads, because batching helps the decode phase only:

* ``chat`` (default): short open-ended instructions, 48 new tokens: decode-bound, as most serving is;
* ``sst2``: the bundled SST-2 classification prompts (about 80 prompt tokens), 16 new tokens, most
  answers ending after a few tokens: prefill-bound, so batching can gain little on a CPU.

Run from the checkout::

    python -m eval.bench_batching [--workload chat|sst2] [--callers 32] [--report-json PATH]

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
from typing import Any

from cascade.atomic_files import write_text_atomic
from cascade.types import GenerationParams, Prompt

_CHAT = [
    "Write a short poem about the sea.",
    "Tell me a story about a brave mouse.",
    "Explain why the sky is blue.",
    "Describe your ideal weekend.",
    "Write a letter to a friend about a trip to the mountains.",
    "List some fun things to do in Paris.",
    "Explain how a bicycle works.",
    "Write a recipe for pancakes.",
    "What makes a good teacher?",
    "Describe a busy market in the morning.",
    "Give advice to someone starting to learn the piano.",
    "Explain what a rainbow is to a child.",
    "Write a product description for a red umbrella.",
    "Why do people keep cats as pets?",
    "Summarise the rules of chess in a few sentences.",
    "Describe the taste of a lemon.",
]
_DEFAULT_TOKENS = {"chat": 48, "sst2": 16}


def _prompts(workload: str, n: int) -> list[Prompt]:
    """``n`` prompts of a workload (cycled; chat prompts are numbered so no two are equal)."""
    if workload == "chat":
        return [f"{_CHAT[i % len(_CHAT)]} (request {i})" for i in range(n)]
    text = resources.files("cascade").joinpath("data/demo_sst2.jsonl").read_text("utf-8")
    rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    base: list[Prompt] = [row.get("messages") or row["prompt"] for row in rows]
    return [base[i % len(base)] for i in range(n)]


async def _timed(coro: Any) -> float:
    t0 = time.perf_counter()
    await coro
    return time.perf_counter() - t0


async def _dynamic(batcher: Any, prompts: list[Prompt], params: GenerationParams) -> None:
    await asyncio.gather(*(batcher.generate([p], params) for p in prompts))


async def _sequential(backend: Any, prompts: list[Prompt], params: GenerationParams) -> None:
    for p in prompts:
        await backend.generate([p], params)


async def bench(backend: Any, *, workload: str, callers: int, max_tokens: int, rounds: int, sequential: int,
                max_wait_ms: float) -> dict[str, Any]:
    """Measure the three modes, interleaved round by round.

    Each round runs one raw batch of ``callers`` prompts and ``callers`` concurrent callers (in alternating
    order), then ``sequential / rounds`` of the same prompts one at a time (different ones each round).
    Warm-up calls at batch sizes 1 and ``callers`` come first.

    Returns:
        The report: requests per second of each mode and the two ratios.
    """
    from cascade.batching import MicroBatcher

    params = GenerationParams(max_tokens=max_tokens)
    prompts = _prompts(workload, callers)
    await backend.generate(prompts[:1], params)
    await backend.generate(prompts, params)
    batcher = MicroBatcher(backend, max_batch_size=callers, max_wait_ms=max_wait_ms, max_queue=4 * callers)
    raw_s: list[float] = []
    dyn_s: list[float] = []
    seq_s: list[float] = []
    per_round = max(1, sequential // rounds)
    seq_n = 0
    for r in range(rounds):
        pair = [("raw", backend.generate(prompts, params)), ("dyn", _dynamic(batcher, prompts, params))]
        for name, coro in pair if r % 2 == 0 else pair[::-1]:
            (raw_s if name == "raw" else dyn_s).append(await _timed(coro))
        share = [prompts[(r * per_round + j) % callers] for j in range(per_round)]
        seq_s.append(await _timed(_sequential(backend, share, params)))
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
        "setup": {"model": backend.name, "workload": workload, "callers": callers, "max_tokens": max_tokens,
                  "rounds": rounds, "sequential_requests": seq_n, "max_wait_ms": max_wait_ms, "greedy": True,
                  "scores": True, "cpu_count": os.cpu_count(), "loadavg_at_end": list(os.getloadavg())},
    }


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: ``python -m eval.bench_batching``."""
    p = argparse.ArgumentParser(prog="python -m eval.bench_batching", description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m", help="model for HFLocalBackend.from_pretrained")
    p.add_argument("--workload", choices=sorted(_DEFAULT_TOKENS), default="chat", help="prompt set (default chat)")
    p.add_argument("--callers", type=int, default=32, help="concurrent callers = batch size (default 32)")
    p.add_argument("--max-tokens", type=int, help="new tokens per answer (default: chat 48, sst2 16)")
    p.add_argument("--rounds", type=int, default=4, help="interleaved measurement rounds (default 4)")
    p.add_argument("--sequential", type=int, default=8,
                   help="requests answered one at a time for the baseline, over all rounds (default 8)")
    p.add_argument("--max-wait-ms", type=float, default=5.0, help="micro-batcher wait (default 5 ms)")
    p.add_argument("--report-json", help="write the report here as JSON")
    args = p.parse_args(argv)
    if min(args.callers, args.rounds, args.sequential) < 1:
        p.error("--callers, --rounds and --sequential must be >= 1")
    max_tokens = args.max_tokens or _DEFAULT_TOKENS[args.workload]
    from cascade.backends.hf_local import HFLocalBackend

    print(f"loading {args.model} ...", file=sys.stderr)
    backend = HFLocalBackend.from_pretrained(args.model, max_batch_size=args.callers)
    report = asyncio.run(bench(backend, workload=args.workload, callers=args.callers, max_tokens=max_tokens,
                               rounds=args.rounds, sequential=args.sequential, max_wait_ms=args.max_wait_ms))
    rps = report["requests_per_s"]
    print(f"\n[{args.workload}, {max_tokens} new tokens] requests/s: sequential {rps['sequential']:.3f} | "
          f"dynamic batching ({args.callers} callers) {rps['dynamic']:.3f} | "
          f"raw batched generate (batch {args.callers}) {rps['raw_batched']:.3f}")
    print(f"speedup vs sequential {report['speedup_vs_sequential']:.2f}x (goal >= 4x); "
          f"fraction of raw batched {report['fraction_of_raw_batched']:.1%} (goal >= 80%); "
          f"mean batch {report['mean_dynamic_batch_size']:.1f}")
    if args.report_json:
        write_text_atomic(args.report_json, json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
