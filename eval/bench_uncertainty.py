"""Benchmark: batched generation with on-device scoring vs the same generation without it.

``python -m eval.bench_uncertainty [--model smollm2-135m] [--batch-sizes 1 8 32] [--max-tokens 16]
[--repeats 5] [--report-json PATH]``

For each batch size the same prompts are generated greedily (a) by plain ``model.generate`` and (b) by
:class:`cascade.backends.hf_local.HFLocalBackend` with every uncertainty measure computed; runs alternate
a/b so machine noise hits both alike, and the ratio of medians is reported. Both produce the same tokens.
Goal: overhead ratio <= 1.05.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Sequence
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


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m eval.bench_uncertainty", description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m", help="embedded model name, folder or .gguf (default SmolLM2)")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--max-tokens", type=int, default=16, help="new tokens per answer (default 16)")
    p.add_argument("--repeats", type=int, default=5, help="timed runs per variant and batch size (default 5)")
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
    print(f"model {backend.name}, {args.max_tokens} new tokens, greedy, {args.repeats} alternating runs each, "
          f"{torch.get_num_threads()} torch threads")
    print(f"{'batch':>5} {'plain s':>9} {'scored s':>9} {'ratio':>7} {'cpu ratio':>9}")
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
        times: dict[str, list[float]] = {"plain": [], "scored": []}
        cpu: dict[str, list[float]] = {"plain": [], "scored": []}
        for _ in range(args.repeats):
            for name, fn in (("plain", plain), ("scored", scored)):
                t0, c0 = time.perf_counter(), time.process_time()
                fn()
                times[name].append(time.perf_counter() - t0)
                cpu[name].append(time.process_time() - c0)
        tp, ts = statistics.median(times["plain"]), statistics.median(times["scored"])
        cp, cs = statistics.median(cpu["plain"]), statistics.median(cpu["scored"])
        ratios[str(bs)] = ts / tp
        cpu_ratios[str(bs)] = cs / cp
        print(f"{bs:>5} {tp:>9.3f} {ts:>9.3f} {ts / tp:>7.3f} {cs / cp:>9.3f}")
        sys.stdout.flush()
    worst = max(ratios.values())
    print(f"worst wall-clock overhead ratio {worst:.3f}, worst CPU-time ratio {max(cpu_ratios.values()):.3f} "
          f"(goal <= 1.05): {'met' if worst <= 1.05 else 'MISSED'}")
    if args.report_json:
        report = {"overhead_ratio": ratios, "cpu_time_ratio": cpu_ratios}
        args.report_json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
