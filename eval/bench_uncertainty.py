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
    p.add_argument("--report-json", type=Path)
    args = p.parse_args(argv)

    import torch

    from cascade.backends.hf_local import HFLocalBackend
    from cascade.types import GenerationParams

    torch.set_num_threads(max(1, torch.get_num_threads()))
    backend = HFLocalBackend.from_pretrained(args.model, device=args.device)
    params = GenerationParams(max_tokens=args.max_tokens)
    ratios: dict[str, float] = {}
    print(f"model {backend.name}, {args.max_tokens} new tokens, greedy, {args.repeats} alternating runs each")
    print(f"{'batch':>5} {'plain s':>9} {'scored s':>9} {'ratio':>7}")
    for bs in args.batch_sizes:
        prompts = [PROMPTS[i % len(PROMPTS)] for i in range(bs)]
        enc = backend._encode(prompts, params).to(backend.device)
        kwargs = {"max_new_tokens": args.max_tokens, "do_sample": False, "pad_token_id": backend.tokenizer.pad_token_id,
                  "eos_token_id": backend._eos_ids(), "temperature": None, "top_p": None, "top_k": None}

        def plain() -> list[list[int]]:
            with torch.inference_mode():
                out = backend.model.generate(**enc, **kwargs)
            return list(out[:, enc["input_ids"].shape[1]:].tolist())

        def scored() -> list[list[int]]:
            return [list(g.token_ids) for g in backend.generate_sync(prompts, params, True)]

        a, b = plain(), scored()  # warm-up, and both must produce the same tokens
        for row_a, row_b in zip(a, b):
            assert row_a[: len(row_b)] == row_b, "scored generation changed the tokens"
        times: dict[str, list[float]] = {"plain": [], "scored": []}
        for _ in range(args.repeats):
            for name, fn in (("plain", plain), ("scored", scored)):
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
        tp, ts = statistics.median(times["plain"]), statistics.median(times["scored"])
        ratios[str(bs)] = ts / tp
        print(f"{bs:>5} {tp:>9.3f} {ts:>9.3f} {ts / tp:>7.3f}")
        sys.stdout.flush()
    worst = max(ratios.values())
    print(f"worst overhead ratio {worst:.3f} (goal <= 1.05): {'met' if worst <= 1.05 else 'MISSED'}")
    if args.report_json:
        args.report_json.write_text(json.dumps({"overhead_ratio": ratios}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
