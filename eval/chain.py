"""Three tiers vs two: SmolLM2-135M -> Qwen-0.5B -> Qwen-1.5B against each pair and always-1.5B.

Reads the generations that :mod:`eval.quality` cached (it loads no model; run ``python -m eval.quality
--generate-only --pairs "SmolLM2-135M -> Qwen-0.5B" "Qwen-0.5B -> Qwen-1.5B" ...`` first), fits every chain
on the calibration split for the same quality target (at most ``--max-quality-loss`` accuracy below its own
last tier, with probability ``--confidence``; :func:`calibration.fit.fit_quality`) and reports on the test
split: accuracy, loss against always-1.5B, mean cost (notional prices proportional to parameter count),
and the share of requests reaching each tier. ::

    python -m eval.chain --tasks sst2 trec --limit-cal 300 --limit-test 500 [--report-json PATH]
    python -m eval.chain --prompts plain --mode choices --max-quality-loss 0.02 0.05 0.1 \
        --families top_down per_stage

``--prompts`` and ``--mode`` pick the cached generations as in :mod:`eval.quality` (the default measure is then
``choice_margin``); several ``--max-quality-loss`` targets are each fitted and reported on their own.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

CHAINS: dict[str, tuple[str, ...]] = {
    "SmolLM2-135M -> Qwen-0.5B -> Qwen-1.5B": ("SmolLM2-135M", "Qwen-0.5B", "Qwen-1.5B"),
    "SmolLM2-135M -> Qwen-1.5B": ("SmolLM2-135M", "Qwen-1.5B"),
    "Qwen-0.5B -> Qwen-1.5B": ("Qwen-0.5B", "Qwen-1.5B"),
    "SmolLM2-135M -> Qwen-0.5B": ("SmolLM2-135M", "Qwen-0.5B"),
    "always Qwen-1.5B": ("Qwen-1.5B",),
}
#: Notional price per million tokens (input and output alike), proportional to parameter count.
PRICE_PER_MTOK = {"SmolLM2-135M": 0.135, "Qwen-0.5B": 0.5, "Qwen-1.5B": 1.5}


def evaluate_task(td: Any, cache: str, measure: str, eps: float, confidence: float, *, choices: bool = False,
                  families: Sequence[str] = ("auto",), choice_prior: bool = False) -> list[dict[str, Any]] | None:
    """Fit and test every chain on one task; None when some generations are not cached.

    ``choices``: read the constrained answers (``eval.quality --mode choices``) instead of free generations.
    ``families``: the quality fit's candidate families (:mod:`calibration.family`); a chain of three or more
    tiers gets one row per family (named ``chain [family]`` when there are several), a pair one row (every
    family is the same sweep for two tiers). ``choice_prior``: each model's constrained answers corrected for
    its prior over the labels, fitted on the calibration split's answers without labels (as ``eval.quality
    --choice-prior``).
    """
    from calibration.fit import fit_quality
    from calibration.generation_cache import cached_generations, tier_arrays
    from calibration.metrics import simulate
    from cascade.engine import Price
    from eval.datasets import score_answer
    from eval.setups import MODELS, gen_params

    gens: dict[str, dict[str, list[Any]]] = {}
    for label, ref in MODELS.items():
        for split in ("cal", "test"):
            found = cached_generations(ref.identity, getattr(td, split), gen_params(td.task), cache, choices=choices)
            if any(g is None for g in found):
                return None
            gens.setdefault(label, {})[split] = found
    if choice_prior:
        from eval.report import prior_corrected

        gens = {label: prior_corrected(by_split, list(td.cal[0]["choices"])) for label, by_split in gens.items()}
    best = next(iter(CHAINS.values()))[-1]
    best_acc = float(tier_arrays(td.test, [gens[best]["test"]] * 2, score_answer, measure).correct[:, 0].mean())
    rows = []
    for name, chain in CHAINS.items():
        prices = [Price(PRICE_PER_MTOK[m], PRICE_PER_MTOK[m]) for m in chain]
        if len(chain) == 1:  # always one model: no thresholds
            test = tier_arrays(td.test, [gens[chain[0]]["test"]] * 2, score_answer, measure, prices * 2)
            acc = float(test.correct[:, 0].mean())
            rows.append({"chain": name, "family": None, "thresholds": [], "feasible": True, "accuracy": acc,
                         "loss_vs_own_last": 0.0, "loss_vs_qwen_1.5b": best_acc - acc,
                         "mean_cost": float(test.costs[:, 0].mean()), "reached": [1.0]})
            continue
        cal = tier_arrays(td.cal, [gens[m]["cal"] for m in chain], score_answer, measure, prices)
        test = tier_arrays(td.test, [gens[m]["test"] for m in chain], score_answer, measure, prices)
        for family in (families if len(chain) > 2 else families[:1]):
            fit = fit_quality(cal.scores, cal.correct, cal.costs, max_quality_loss=eps, delta=1 - confidence,
                              family=family)  # type: ignore[arg-type]
            st = simulate(fit.thresholds, test.scores, test.correct, test.costs).stats()
            label = f"{name} [{fit.params['family']}]" if len(chain) > 2 and len(families) > 1 else name
            rows.append({"chain": label, "family": fit.params["family"], "thresholds": list(fit.thresholds),
                         "feasible": fit.feasible, "accuracy": st.accuracy,
                         "loss_vs_own_last": float(test.correct[:, -1].mean()) - st.accuracy,
                         "loss_vs_qwen_1.5b": best_acc - st.accuracy, "mean_cost": st.mean_cost,
                         "reached": list(st.reached)})
    return rows


def _print_rows(task: str, td: Any, eps: float, confidence: float, measure: str, rows: Sequence[dict[str, Any]]
                ) -> None:
    print(f"\n{task} (cal {len(td.cal)}, test {len(td.test)}; target: loss <= {eps} vs own "
          f"last tier with prob >= {confidence}, {measure})")
    print(f"{'chain':<52} {'acc':>6} {'loss vs 1.5B':>12} {'cost/req':>10}  reached per tier")
    for r in rows:
        flag = "" if r["feasible"] else "  (infeasible: always last tier)"
        print(f"{r['chain']:<52} {r['accuracy']:>6.3f} {r['loss_vs_qwen_1.5b']:>12.3f} {r['mean_cost']:>10.2e}  "
              f"{', '.join(f'{x:.2f}' for x in r['reached'])}{flag}")


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m eval.chain", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default="../shared/data")
    p.add_argument("--cache", default="results/cache/generations")
    p.add_argument("--tasks", nargs="+", default=["sst2", "trec"])
    p.add_argument("--limit-cal", type=int, default=300)
    p.add_argument("--limit-test", type=int, default=500)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--measure", default=None, help="default: margin_first, or choice_margin with --mode choices")
    p.add_argument("--max-quality-loss", type=float, nargs="+", default=[0.02],
                   help="one or more targets, each fitted on its own")
    p.add_argument("--prompts", choices=("tuned", "plain"), default="tuned", help="prompt set (as eval.quality)")
    p.add_argument("--mode", choices=("free", "choices"), default="free", help="answer mode (as eval.quality)")
    p.add_argument("--confidence", type=float, default=0.9)
    p.add_argument("--families", nargs="+", default=["auto"], choices=("auto", "common", "per_stage", "top_down"),
                   help="candidate families of the quality fit; chains of 3+ tiers get a row per family")
    p.add_argument("--choice-prior", action="store_true",
                   help="with --mode choices: correct each model's answers for its label prior (as eval.quality)")
    p.add_argument("--report-json", type=Path)
    args = p.parse_args(argv)
    from eval.datasets import load_task

    choices = args.mode == "choices"
    measure = args.measure or ("choice_margin" if choices else "margin_first")
    report: dict[str, Any] = {"targets": args.max_quality_loss, "confidence": args.confidence, "measure": measure,
                              "prompts": args.prompts, "mode": args.mode + ("+prior" if args.choice_prior else ""),
                              "tasks": {}}
    for task in args.tasks:
        td = load_task(task, args.data, n_cal=args.limit_cal, n_test=args.limit_test, seed=args.seed,
                       prompts=args.prompts)
        for eps in args.max_quality_loss:
            rows = evaluate_task(td, args.cache, measure, eps, args.confidence, choices=choices,
                                 families=args.families, choice_prior=args.choice_prior)
            if rows is None:
                print(f"{task}: generations not all cached; run eval.quality --generate-only first", file=sys.stderr)
                break
            report["tasks"].setdefault(task, {"n_cal": len(td.cal), "n_test": len(td.test), "targets": {}})
            report["tasks"][task]["targets"][str(eps)] = rows
            _print_rows(task, td, eps, args.confidence, measure, rows)
    if args.report_json:
        args.report_json.write_text(json.dumps(report, indent=2) + "\n")
    return 0 if report["tasks"] else 1


if __name__ == "__main__":
    sys.exit(main())
