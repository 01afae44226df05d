"""Quality evaluation: does the small model's own uncertainty pick the right requests to escalate?

For every model pair x task, the small and large models answer the calibration and test splits once
(cached on disk by :mod:`calibration.generation_cache`, so tables rebuild in seconds and a killed run resumes).
Escalation signals are then compared on the same generations: every uncertainty measure of the engine,
random routing, the oracle, and trained routers (:mod:`eval.routers`) that predict from the prompt alone
whether the small model will be wrong. Metrics on the test split: the accuracy-vs-large-share curve, AUC,
APGR and CPT(50%)/CPT(80%) with bootstrap confidence intervals (:mod:`calibration.metrics`).

Run from the checkout::

    python -m eval.quality --quick                       # a few minutes: one pair, two tasks
    python -m eval.quality --limit-cal 300 --limit-test 500
    python -m eval.quality --cached-only                 # rebuild the tables from the cache only
    python -m eval.quality --prompts plain --mode choices --out results/eval-plain-choices

Two prompt sets (``--prompts``: ``tuned`` by hand, or ``plain`` as a user writes them, see
:mod:`eval.datasets`) and two answer modes (``--mode``: ``free`` generation, or ``choices``: the most likely
label word, scored by the model, no free generation); each combination has its own cache entries.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cascade.errors import CascadeError, ConfigError
from eval.setups import MODELS, PAIRS, ModelRef, gen_params

log = logging.getLogger("eval.quality")


DEFAULT_TASKS = ("sst2", "rotten_tomatoes", "cr", "trec", "ag_news")
QUICK = {"pairs": ["SmolLM2-135M -> Qwen-0.5B"], "tasks": ["sst2", "trec"], "limit_cal": 60, "limit_test": 100}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Command-line options (see the module docstring)."""
    p = argparse.ArgumentParser(prog="python -m eval.quality", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default="../shared/data", help="data folder (default ../shared/data)")
    p.add_argument("--out", default="results/eval", help="report folder (default results/eval)")
    p.add_argument("--cache", default="results/cache/generations", help="generation cache folder")
    p.add_argument("--pairs", nargs="+", default=None, help=f"model pairs, from {list(PAIRS)}")
    p.add_argument("--tasks", nargs="+", default=None, help=f"tasks (default {' '.join(DEFAULT_TASKS)})")
    p.add_argument("--limit-cal", type=int, default=300, help="calibration examples per task (default 300)")
    p.add_argument("--limit-test", type=int, default=500, help="test examples per task (default 500)")
    p.add_argument("--quick", action="store_true", help="one pair, two tasks, 60 cal / 100 test examples")
    p.add_argument("--batch-size", type=int, default=16, help="prompts per model call (default 16)")
    p.add_argument("--seed", type=int, default=0, help="seed of splits, bootstrap, random routing, routers")
    p.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples for the CIs (default 1000)")
    p.add_argument("--generate-only", action="store_true", help="fill the generation cache, write no report")
    p.add_argument("--cached-only", action="store_true",
                   help="load no model: evaluate the setups whose generations are all cached, skip the rest")
    p.add_argument("--no-embed", action="store_true", help="skip the MiniLM-embedding routers")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--prompts", choices=("tuned", "plain"), default="tuned",
                   help="prompt set: tuned (hand-tuned formats) or plain (one instruction as a user writes it; "
                        "default tuned)")
    p.add_argument("--mode", choices=("free", "choices"), default="free",
                   help="free: generate freely and find the label in the answer; choices: answer with the most "
                        "likely label (scored, not generated) (default free)")
    p.add_argument("--choice-prior", action="store_true",
                   help="with --mode choices: correct each model's answers for its prior over the labels, fitted "
                        "on the calibration split without labels (cascade.choice_prior)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (1 is faster when other processes share the cores; default: torch's)")
    args = p.parse_args(argv)
    shown = list(sys.argv[1:] if argv is None else argv)
    args.command = "python -m eval.quality " + " ".join(shlex.quote(a) for a in shown)
    if args.quick:
        args.pairs = args.pairs or QUICK["pairs"]
        args.tasks = args.tasks or QUICK["tasks"]
        args.limit_cal = min(args.limit_cal, int(QUICK["limit_cal"]))  # type: ignore[call-overload]
        args.limit_test = min(args.limit_test, int(QUICK["limit_test"]))  # type: ignore[call-overload]
    args.pairs = args.pairs or list(PAIRS)
    args.tasks = args.tasks or list(DEFAULT_TASKS)
    unknown = [x for x in args.pairs if x not in PAIRS]
    if unknown:
        p.error(f"unknown pair(s) {unknown}; choose from {list(PAIRS)}")
    if args.choice_prior and args.mode != "choices":
        p.error("--choice-prior needs --mode choices")
    if args.limit_cal < 10 or args.limit_test < 10:
        p.error("--limit-cal and --limit-test must be >= 10")
    return args


def load_data(args: argparse.Namespace) -> dict[str, Any]:
    """Every task's :class:`eval.datasets.TaskData` (raises ConfigError on a missing data folder)."""
    from eval.datasets import TASKS, load_task

    bad = [t for t in args.tasks if t not in TASKS]
    if bad:
        raise ConfigError(f"unknown task(s) {bad}; choose from {sorted(TASKS)}")
    if not Path(args.data).is_dir():
        raise ConfigError(f"data folder {args.data!r} does not exist (see --data)")
    return {t: load_task(t, args.data, n_cal=args.limit_cal, n_test=args.limit_test, seed=args.seed,
                         prompts=args.prompts) for t in args.tasks}


def needed_models(pairs: Sequence[str]) -> list[ModelRef]:
    """The models the pairs use, smallest first (each is loaded once)."""
    names = {m for pair in pairs for m in PAIRS[pair]}
    return [m for name, m in MODELS.items() if name in names]


def generate_all(args: argparse.Namespace, data: dict[str, Any]) -> None:
    """Fill the cache: each model answers every task's calibration + test examples (model-major order)."""
    from calibration.generation_cache import cached_generations, generate_cached
    from cascade.backends.hf_local import HFLocalBackend

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)

    for ref in needed_models(args.pairs):
        todo = []
        for name, td in data.items():
            exs = td.cal + td.test
            if any(g is None for g in cached_generations(ref.identity, exs, gen_params(td.task), args.cache,
                                                         choices=args.mode == "choices")):
                todo.append(name)
        if not todo:
            log.info("%s: everything cached", ref.label)
            continue
        t0 = time.perf_counter()
        backend = HFLocalBackend.from_pretrained(ref.source, dtype=ref.dtype, max_batch_size=args.batch_size)
        log.info("%s loaded in %.1f s", ref.label, time.perf_counter() - t0)
        try:
            for name in todo:
                td = data[name]
                t1 = time.perf_counter()
                asyncio.run(generate_cached(backend, td.cal + td.test, gen_params(td.task), args.cache,
                                            batch_size=args.batch_size, identity=ref.identity,
                                            progress=not args.no_progress, choices=args.mode == "choices",
                                            desc=f"{ref.label} {name} ({args.prompts}, {args.mode})"))
                log.info("%s %s: %d examples in %.1f s", ref.label, name, len(td.cal) + len(td.test),
                         time.perf_counter() - t1)
        finally:
            asyncio.run(backend.aclose())
            del backend
            gc.collect()


def main(argv: Sequence[str] | None = None) -> int:
    """Run the evaluation; returns the process exit code."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)
    try:
        data = load_data(args)
        if not args.cached_only:
            generate_all(args, data)
        if args.generate_only:
            return 0
        from eval.report import evaluate_and_report

        evaluate_and_report(args, data)
    except CascadeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: finished batches are cached; run the same command again to resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
