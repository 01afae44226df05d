"""Benchmark: batched generation with on-device scoring vs the same generation without it.

``python -m eval.bench_uncertainty [--model smollm2-135m] [--batch-sizes 1 8 32] [--max-tokens 16]
[--repeats 15] [--threads N] [--report-json PATH]``

For each batch size the same prompts are generated greedily (a) by plain ``model.generate`` and (b) by
:class:`cascade.backends.hf_local.HFLocalBackend` with every uncertainty measure computed. Both produce the
same tokens. The runs are interleaved in pairs whose order flips each time (a b, b a, a b, ...), so machine
noise hits both alike and neither always runs first. Reported per batch size: the ratio of the medians
(scored / plain), and the spread (min, median, max) of the per-pair ratios, wall-clock and CPU time, so one
run on a loaded machine shows whether a high ratio is the code or the noise.
Goal: overhead ratio <= 1.05.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

PROMPTS = [
    "What is the capital of France?",
    "Is the sentiment of this review positive or negative? 'a gorgeous, witty, seductive movie.'",
    "Name a prime number larger than ten.",
    "Translate 'good morning' into Spanish.",
    "Write one sentence about the sea.",
    "What is 12 times 7?",
    "Who wrote Romeo and Juliet?",
    "Give a synonym for 'happy'.",
]


def _interleaved(plain: Callable[[], Any], scored: Callable[[], Any], repeats: int) -> dict[str, list[float]]:
    """Run ``repeats`` pairs, the order flipped every pair; wall-clock and CPU seconds of every run.

    Returns:
        ``{"plain": [...], "scored": [...], "plain_cpu": [...], "scored_cpu": [...]}``, ``repeats`` values each,
        the i-th of each list from the same pair.
    """
    runs: dict[str, list[float]] = {"plain": [], "scored": [], "plain_cpu": [], "scored_cpu": []}
    pair = (("plain", plain), ("scored", scored))
    for i in range(repeats):
        for name, fn in pair if i % 2 == 0 else pair[::-1]:
            t0, c0 = time.perf_counter(), time.process_time()
            fn()
            runs[name].append(time.perf_counter() - t0)
            runs[f"{name}_cpu"].append(time.process_time() - c0)
    return runs


def _spread(plain: list[float], scored: list[float]) -> dict[str, float]:
    """Min, median and max of the per-pair ratios scored / plain."""
    ratios = [s / p for p, s in zip(plain, scored)]
    return {"min": min(ratios), "median": statistics.median(ratios), "max": max(ratios)}


def _row(bs: int, tp: float, ts: float, spread: dict[str, float], cpu_ratio: float,
         cpu_spread: dict[str, float]) -> str:
    """One table line: median seconds, ratio of medians and the per-pair spread, wall-clock then CPU time."""
    wall = " ".join(f"{spread[k]:.3f}" for k in ("min", "median", "max"))
    cpu = " ".join(f"{cpu_spread[k]:.3f}" for k in ("min", "median", "max"))
    return f"{bs:>5} {tp:>9.3f} {ts:>9.3f} {ts / tp:>7.3f}  {wall:>17}  {cpu_ratio:>9.3f}  {cpu:>17}"


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m eval.bench_uncertainty", description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m", help="embedded model name, folder or .gguf (default SmolLM2)")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--max-tokens", type=int, default=16, help="new tokens per answer (default 16)")
    p.add_argument("--repeats", type=int, default=15,
                   help="timed runs per variant and batch size, interleaved in pairs (default 15)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0,
                   help="torch intra-op threads (default: torch's choice); 1 makes CPU-time ratios robust to load")
    p.add_argument("--report-json", type=Path)
    args = p.parse_args(argv)

    import torch

    from cascade.backends.hf_local import HFLocalBackend
    from cascade.types import GenerationParams

    if args.threads:
        torch.set_num_threads(args.threads)
    backend = HFLocalBackend.from_pretrained(args.model, device=args.device)
    params = GenerationParams(max_tokens=args.max_tokens)
    ratios: dict[str, float] = {}
    cpu_ratios: dict[str, float] = {}
    spreads: dict[str, dict[str, float]] = {}
    cpu_spreads: dict[str, dict[str, float]] = {}
    print(f"model {backend.name}, {args.max_tokens} new tokens, greedy, {args.repeats} interleaved runs each "
          f"(order flipped every pair), {torch.get_num_threads()} torch threads")
    print("ratio = median scored / median plain; spread = min median max of the per-pair ratios")
    print(f"{'batch':>5} {'plain s':>9} {'scored s':>9} {'ratio':>7}  {'spread':>17}  {'cpu ratio':>9}  "
          f"{'cpu spread':>17}")
    for bs in args.batch_sizes:
        prompts = [PROMPTS[i % len(PROMPTS)] for i in range(bs)]
        enc = backend._encode(prompts, params).to(backend.device)
        kwargs: dict[str, Any] = {
            "max_new_tokens": args.max_tokens, "do_sample": False, "pad_token_id": backend.tokenizer.pad_token_id,
            "eos_token_id": backend._eos_ids(), "temperature": None, "top_p": None, "top_k": None}

        def plain(enc: Any = enc, kwargs: dict[str, Any] = kwargs) -> list[list[int]]:
            with torch.inference_mode():
                out = backend.model.generate(**enc, **kwargs)
            return list(out[:, enc["input_ids"].shape[1]:].tolist())

        def scored(prompts: list[str] = prompts) -> list[list[int]]:
            return [list(g.token_ids) for g in backend.generate_sync(prompts, params, True)]

        a, b = plain(), scored()  # warm-up, and both must produce the same tokens
        for row_a, row_b in zip(a, b):
            assert row_a[: len(row_b)] == row_b, "scored generation changed the tokens"
        runs = _interleaved(plain, scored, args.repeats)
        tp, ts = statistics.median(runs["plain"]), statistics.median(runs["scored"])
        cp, cs = statistics.median(runs["plain_cpu"]), statistics.median(runs["scored_cpu"])
        ratios[str(bs)], cpu_ratios[str(bs)] = ts / tp, cs / cp
        spreads[str(bs)] = _spread(runs["plain"], runs["scored"])
        cpu_spreads[str(bs)] = _spread(runs["plain_cpu"], runs["scored_cpu"])
        print(_row(bs, tp, ts, spreads[str(bs)], cs / cp, cpu_spreads[str(bs)]))
        sys.stdout.flush()
    worst = max(ratios.values())
    print(f"worst wall-clock overhead ratio {worst:.3f}, worst CPU-time ratio {max(cpu_ratios.values()):.3f} "
          f"(goal <= 1.05): {'met' if worst <= 1.05 else 'MISSED'}; worst median per-pair ratio "
          f"{max(v['median'] for v in spreads.values()):.3f} wall-clock, "
          f"{max(v['median'] for v in cpu_spreads.values()):.3f} CPU")
    if args.report_json:
        report = {"overhead_ratio": ratios, "cpu_time_ratio": cpu_ratios, "overhead_ratio_spread": spreads,
                  "cpu_time_ratio_spread": cpu_spreads, "repeats": args.repeats}
        args.report_json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
