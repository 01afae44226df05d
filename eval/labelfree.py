"""The price of the guarantee (issue 17): label-free certification on unlabeled traffic, and the planner.

For every model pair x task, at one quality target (accuracy loss <= 5% against the large model, 90%
confidence; ``--measure all`` semantics: every measure tested at delta/M, the one certifying the least
escalation kept):

- **labelled**: the certified fit on the 300 labelled calibration examples of :mod:`eval.quality`'s split;
- **label-free**: the certified fit on up to ``--n-pool`` unlabeled prompts from the task's unused pools
  (:func:`eval.datasets.load_pool`; their labels are never read by the fit), claim: the share of answers
  differing from the large model's (:mod:`calibration.certify`), which bounds the accuracy loss;
- the same two with the ``combined`` measure (:mod:`calibration.combine`: weights and answer offsets fitted on
  a seeded half of the fit data, the thresholds certified on the other half at the full level);
- all checked on the same 500 labelled test examples: share escalated and accuracy loss against the large
  model (the target must hold in every setup);
- **planner** (:mod:`calibration.plan`): from the 300 labelled calibration examples as a pilot, the predicted
  share at n = 1,000 for both claims, against real fits on the first 1,000 pool prompts (the labelled one
  uses the pool's hidden labels); and from the first 300 pool prompts as an unlabeled pilot;
- **the testing sequence** on real data (:mod:`eval.sequences`): on the 300 labelled examples, what the
  fixed sequence certifies against the best point of the same bound (not valid), and the measure with the
  best AUC at delta/M against the one certifying the least escalation.

Generation goes through the shared cache (:mod:`calibration.generation_cache`) in chunks; with
``--yield-to PATTERN`` it waits before each chunk while a process matching PATTERN runs (another evaluation
with priority). ::

    python -m eval.labelfree --generate-only --n-pool 3000 --prompts plain --mode choices --yield-to eval.quality
    python -m eval.labelfree --n-pool 3000 --prompts plain --mode choices --report-json labelfree.json
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cascade.errors import CascadeError
from eval.quality import DEFAULT_TASKS
from eval.setups import MODELS, PAIRS, gen_params

__all__ = ["generate", "load", "main", "parse_args", "wait_for_priority"]

log = logging.getLogger("eval.labelfree")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Command-line options (see the module docstring)."""
    p = argparse.ArgumentParser(prog="python -m eval.labelfree", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default="../shared/data")
    p.add_argument("--cache", default="results/cache/generations", help="generation cache folder")
    p.add_argument("--pairs", nargs="+", default=["SmolLM2-135M -> Qwen-0.5B", "Qwen-0.5B -> Qwen-1.5B"])
    p.add_argument("--tasks", nargs="+", default=list(DEFAULT_TASKS))
    p.add_argument("--prompts", choices=("tuned", "plain"), default="tuned")
    p.add_argument("--mode", choices=("free", "choices"), default="free")
    p.add_argument("--limit-cal", type=int, default=300)
    p.add_argument("--limit-test", type=int, default=500)
    p.add_argument("--n-pool", type=int, default=3000, help="unlabeled prompts per task (default 3000)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-quality-loss", type=float, default=0.05)
    p.add_argument("--confidence", type=float, default=0.9)
    p.add_argument("--replicates", type=int, default=200, help="planner bootstrap replicates")
    p.add_argument("--generate-only", action="store_true")
    p.add_argument("--models", nargs="+", default=None, metavar="LABEL",
                   help="with --generate-only: only these models of the pairs (e.g. Qwen-1.5B)")
    p.add_argument("--chunk", type=int, default=200, help="prompts per generation chunk (default 200)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--yield-to", nargs="*", default=[], metavar="PATTERN",
                   help="before each chunk, wait while a process whose command line matches PATTERN runs")
    p.add_argument("--report-json", type=Path)
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    bad = [x for x in a.pairs if x not in PAIRS]
    if bad:
        p.error(f"unknown pair(s) {bad}; choose from {list(PAIRS)}")
    return a


def load(args: argparse.Namespace) -> dict[str, tuple[Any, list[dict[str, Any]]]]:
    """Per task: its :class:`eval.datasets.TaskData` and its pool of up to ``--n-pool`` unused examples."""
    from eval.datasets import load_pool, load_task

    kw = {"n_cal": args.limit_cal, "n_test": args.limit_test, "seed": args.seed, "prompts": args.prompts}
    return {t: (load_task(t, args.data, **kw), load_pool(t, args.data, n=args.n_pool, **kw))  # type: ignore[arg-type]
            for t in args.tasks}


def _busy(patterns: Sequence[str]) -> bool:
    me = {os.getpid(), os.getppid()}
    for pat in patterns:
        out = subprocess.run(["pgrep", "-f", pat], capture_output=True, text=True).stdout.split()
        if any(int(pid) not in me for pid in out):
            return True
    return False


def wait_for_priority(patterns: Sequence[str], poll_s: float = 60.0) -> None:
    """Return once no process matching any of ``patterns`` runs (checked every ``poll_s`` seconds)."""
    waited = False
    while patterns and _busy(patterns):
        if not waited:
            log.info("waiting for %s to finish", " / ".join(patterns))
            waited = True
        time.sleep(poll_s)
    if waited:
        log.info("resuming")


def generate(args: argparse.Namespace, data: dict[str, tuple[Any, list[dict[str, Any]]]]) -> None:
    """Fill the cache: every model of the pairs answers every task's calibration, test and pool examples."""
    from calibration.generation_cache import cached_generations, generate_cached
    from cascade.backends.hf_local import HFLocalBackend

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    choices = args.mode == "choices"
    names = {m for pair in args.pairs for m in PAIRS[pair]} & set(args.models or MODELS)
    for ref in (m for name, m in MODELS.items() if name in names):
        todo = {}
        for task, (td, pool) in data.items():
            exs = td.cal + td.test + pool
            got = cached_generations(ref.identity, exs, gen_params(td.task), args.cache, choices=choices)
            missing = [e for e, g in zip(exs, got) if g is None]
            if missing:
                todo[task] = missing
        if not todo:
            log.info("%s: everything cached", ref.label)
            continue
        wait_for_priority(args.yield_to)
        backend = HFLocalBackend.from_pretrained(ref.source, dtype=ref.dtype, max_batch_size=args.batch_size)
        try:
            for task, missing in todo.items():
                for start in range(0, len(missing), args.chunk):
                    wait_for_priority(args.yield_to)
                    t0 = time.perf_counter()
                    chunk = missing[start:start + args.chunk]
                    asyncio.run(generate_cached(backend, chunk, gen_params(data[task][0].task), args.cache,
                                                batch_size=args.batch_size, identity=ref.identity, choices=choices,
                                                progress=not args.no_progress, desc=f"{ref.label} {task}"))
                    log.info("%s %s: %d of %d missing in %.1f s", ref.label, task, min(start + args.chunk,
                             len(missing)), len(missing), time.perf_counter() - t0)
        finally:
            asyncio.run(backend.aclose())
            del backend
            gc.collect()


def main(argv: Sequence[str] | None = None) -> int:
    """Generate (``--generate-only``) or report from the cache; returns the exit code."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)
    try:
        data = load(args)
        if args.generate_only:
            generate(args, data)
            return 0
        from eval.labelfree_report import evaluate, render

        report = evaluate(args, data)
    except CascadeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: finished chunks are cached; run the same command again to resume", file=sys.stderr)
        return 130
    print(render(report))
    if args.report_json:
        args.report_json.write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
