"""Evaluation report: read cached generations, evaluate every setup, write markdown, JSON and PNG curves."""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import logging
import math
import platform
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from cascade.types import MEASURES

__all__ = ["evaluate_and_report", "markdown_report"]

log = logging.getLogger("eval.report")
FloatArray = npt.NDArray[np.float64]


def _cached_features(cache_dir: Path, name: str, fn: Any) -> Any:
    """Wrap a feature function with an on-disk cache (``.npy`` keyed by the texts' hash)."""

    def features(texts: Sequence[str]) -> FloatArray:
        digest = hashlib.sha256("\x00".join(texts).encode()).hexdigest()[:20]
        path = cache_dir / f"{name}-{digest}.npy"
        if path.is_file():
            return np.asarray(np.load(path), dtype=np.float64)
        x = np.asarray(fn(texts), dtype=np.float64)
        cache_dir.mkdir(parents=True, exist_ok=True)
        np.save(path, x)
        return x

    return features


def feature_functions(args: argparse.Namespace) -> dict[str, Any]:
    """Router feature functions: hashed bag of words always, MiniLM embeddings when installed."""
    from eval.routers import bow_features, minilm_features

    cache = Path(args.cache).parent / "embeddings"
    out: dict[str, Any] = {"bow": bow_features}
    if not args.no_embed:
        try:
            from cascade.router.embed import minilm_folder

            minilm_folder()
            out["minilm"] = _cached_features(cache, "minilm", minilm_features)
        except Exception as exc:  # missing package or module: the bag-of-words router still runs
            log.warning("MiniLM routers skipped: %s", exc)
    return out


def evaluate_and_report(args: argparse.Namespace, data: Mapping[str, Any]) -> dict[str, Any]:
    """Evaluate every (task, pair) whose generations are cached and write the report under ``args.out``."""
    from calibration.generation_cache import cached_generations
    from eval.datasets import score_answer
    from eval.setups import MODELS, PAIRS, gen_params
    from eval.signals import evaluate_setup, setup_arrays

    features = feature_functions(args)
    setups: list[dict[str, Any]] = []
    skipped: list[str] = []
    for task_name, td in data.items():
        params = gen_params(td.task)
        for pair in args.pairs:
            small, large = (MODELS[m] for m in PAIRS[pair])
            gens = {}
            choices = getattr(args, "mode", "free") == "choices"
            for split, exs in (("cal", td.cal), ("test", td.test)):
                gs = cached_generations(small.identity, exs, params, args.cache, choices=choices)
                gl = cached_generations(large.identity, exs, params, args.cache, choices=choices)
                if any(g is None for g in gs + gl):
                    break
                gens[split] = (exs, gs, gl)
            if getattr(args, "choice_prior", False) and len(gens) == 2:
                gens = with_choice_prior(gens)
            splits = {split: setup_arrays(exs, gs, gl, score_answer)  # type: ignore[arg-type]
                      for split, (exs, gs, gl) in gens.items()}
            if len(splits) < 2:
                skipped.append(f"{task_name} / {pair}: generations not (all) cached")
                continue
            res = evaluate_setup(splits["cal"], splits["test"], features, seed=args.seed, n_boot=args.n_boot)
            res.update(task=task_name, pair=pair, source=td.source)
            setups.append(res)
            log.info("%s / %s: best measure %s, APGR %.3f", task_name, pair, res["best_measure"],
                     res["signals"][res["best_measure"]]["apgr"][0])
    report = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": getattr(args, "command", "python -m eval.quality " + " ".join(sys.argv[1:])),
        "settings": {"prompts": getattr(args, "prompts", "tuned"),
                     "mode": getattr(args, "mode", "free") + ("+prior" if getattr(args, "choice_prior", False) else ""),
                     "limit_cal": args.limit_cal, "limit_test": args.limit_test, "seed": args.seed,
                     "n_boot": args.n_boot, "data": args.data, "pairs": args.pairs, "tasks": args.tasks,
                     "models": {k: vars(v) for k, v in MODELS.items()}, "python": platform.python_version()},
        "setups": setups,
        "skipped": skipped,
        "summary": summary(setups),
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(report, indent=1, allow_nan=True) + "\n")
    (out / "results.md").write_text(markdown_report(report))
    plot_curves(setups, out)
    print(markdown_report(report, brief=True))
    print(f"report written to {out}/results.md, results.json and curves_*.png")
    return report


def with_choice_prior(gens: Mapping[str, tuple[Any, Any, Any]]) -> dict[str, tuple[Any, Any, Any]]:
    """Both tiers' constrained answers corrected for each model's prior over the task's labels
    (:mod:`cascade.choice_prior`), the prior fitted on the calibration split's answers (no labels used)."""
    choices = list(gens["cal"][0][0]["choices"])
    small = prior_corrected({split: gs for split, (_, gs, _) in gens.items()}, choices)
    large = prior_corrected({split: gl for split, (_, _, gl) in gens.items()}, choices)
    return {split: (exs, small[split], large[split]) for split, (exs, _, _) in gens.items()}


def prior_corrected(by_split: Mapping[str, Sequence[Any]], choices: Sequence[str]) -> dict[str, list[Any]]:
    """One model's constrained answers of every split corrected for its prior over ``choices``, the prior
    fitted on the ``"cal"`` split's answers (no labels used; :mod:`cascade.choice_prior`)."""
    from cascade.choice_prior import apply_prior, fit_prior

    prior = fit_prior([g.choice_logprobs for g in by_split["cal"]])
    return {split: [apply_prior(g, choices, prior) for g in gs] for split, gs in by_split.items()}


def summary(setups: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Counts over setups: where the calibration-chosen measure beats every trained router, and more."""
    compared = [s for s in setups if "uncertainty_wins" in s]
    wins = [s for s in compared if s["uncertainty_wins"]]
    sig_wins = [s for s in compared if math.isfinite(s["diff"][1]) and s["diff"][1] > 0]
    sig_losses = [s for s in compared if math.isfinite(s["diff"][2]) and s["diff"][2] < 0]
    beats_random = [s for s in setups if s["signals"][s["best_measure"]]["apgr"][0] > 0.5]
    names = set.intersection(*(set(s["signals"]) for s in setups)) if setups else set()
    mean_apgr = {name: float(np.nanmean([s["signals"][name]["apgr"][0] for s in setups])) for name in sorted(names)}
    chosen = [s["signals"][s["best_measure"]]["apgr"][0] for s in setups]
    combined = [s for s in setups if "combined" in s["signals"]]
    combined_wins = [s for s in combined if s.get("best_router") and s["signals"]["combined"]["apgr"][0]
                     > s["signals"][s["best_router"]]["apgr"][0]]
    return {"setups": len(setups), "compared_with_routers": len(compared), "uncertainty_wins": len(wins),
            "significant_wins": len(sig_wins), "significant_losses": len(sig_losses),
            "best_measure_beats_random": len(beats_random), "mean_test_apgr": mean_apgr,
            "mean_chosen_apgr": float(np.nanmean(chosen)) if chosen else math.nan,
            "combined_setups": len(combined), "combined_wins": len(combined_wins),
            "combined_beats_random": sum(s["signals"]["combined"]["apgr"][0] > 0.5 for s in combined)}


def _f(x: float, digits: int = 3) -> str:
    return "n/a" if x is None or not math.isfinite(x) else f"{x:.{digits}f}"


def _ci(v: Sequence[float]) -> str:
    return f"{_f(v[0])} [{_f(v[1])}, {_f(v[2])}]"


def markdown_report(report: Mapping[str, Any], *, brief: bool = False) -> str:
    """The report as markdown: summary, one headline row per setup, then every signal per setup."""
    setups, sm = report["setups"], report["summary"]
    lines = []
    if not brief:
        lines += ["# Quality evaluation: uncertainty-based escalation vs trained routers", "",
                  f"Generated {report['date']} by `{report['command']}`.", "",
                  "APGR / CPT with 95% percentile-bootstrap intervals on the test split. `best measure` is chosen "
                  "by APGR on the calibration split; routers are trained on the calibration split. `win` = the "
                  "chosen measure's test APGR is above every router's; `diff` = paired bootstrap APGR(best "
                  "measure) - APGR(best router). `combined`: the logistic combination of the small "
                  "model's measures and answers (cascade.combined), fitted on a seeded half of the calibration "
                  "split.", ""]
    lines += [f"**Summary:** {sm['setups']} setups; the calibration-chosen uncertainty measure beats every "
              f"trained router in {sm['uncertainty_wins']} of {sm['compared_with_routers']} "
              f"({sm['significant_wins']} with a paired 95% CI above 0, {sm['significant_losses']} significantly "
              f"worse); it beats random routing (APGR > 0.5) in {sm['best_measure_beats_random']} of "
              f"{sm['setups']}. The combined measure beats every trained router in {sm.get('combined_wins', 0)} "
              f"of {sm.get('combined_setups', 0)} and random routing in {sm.get('combined_beats_random', 0)}.", ""]
    lines += ["| task | pair | n cal/test | acc small | acc large | best measure (cal) | APGR | CPT(50%) | "
              "CPT(80%) | combined APGR | "
              "best router | router APGR | random APGR | oracle APGR | diff [95% CI] | win |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for s in setups:
        sig, best = s["signals"], s["best_measure"]
        router = s.get("best_router")
        lines.append(
            f"| {s['task']} | {s['pair']} | {s['n_cal']}/{s['n_test']} | {_f(s['small_accuracy'])} | "
            f"{_f(s['large_accuracy'])} | {best} | {_ci(sig[best]['apgr'])} | {_ci(sig[best]['cpt50'])} | "
            f"{_ci(sig[best]['cpt80'])} | {_ci(sig['combined']['apgr']) if 'combined' in sig else 'n/a'} | "
            f"{router or 'n/a'} | {_ci(sig[router]['apgr']) if router else 'n/a'} | "
            f"{_f(sig['random']['apgr'][0])} | {_f(sig['oracle']['apgr'][0])} | "
            f"{_ci(s['diff']) if 'diff' in s else 'n/a'} | {'yes' if s.get('uncertainty_wins') else 'no'} |")
    if brief:
        return "\n".join(lines) + "\n"
    lines += ["", f"Mean test APGR of the calibration-chosen measure: {_f(sm.get('mean_chosen_apgr', math.nan))}.",
              "", "Mean test APGR over setups: " + ", ".join(
        f"{k} {_f(v)}" for k, v in sorted(sm["mean_test_apgr"].items(), key=lambda kv: -kv[1]
                                           if math.isfinite(kv[1]) else 9)), ""]
    for s in setups:
        lines += [f"## {s['task']} / {s['pair']}", "",
                  f"Split: {s['source']}. Calibration: small {_f(s['cal_small_accuracy'])}, large "
                  f"{_f(s['cal_large_accuracy'])}. Tokens per request (prompt + answer): small "
                  f"{s['tokens_per_request'][0]:.1f}, large {s['tokens_per_request'][1]:.1f}.", "",
                  "| signal | cal APGR | test AUC | test APGR | CPT(50%) | CPT(80%) |", "|---|---|---|---|---|---|"]
        for name, v in s["signals"].items():
            cal = _f(s["cal_values"][name]) if name in s["cal_values"] else ""
            mark = " (chosen)" if name == s["best_measure"] else ""
            lines.append(f"| {name}{mark} | {cal} | {_ci(v['auc'])} | {_ci(v['apgr'])} | {_ci(v['cpt50'])} | "
                         f"{_ci(v['cpt80'])} |")
        for r, note in s.get("router_notes", {}).items():
            lines.append(f"\n{r}: {note}")
        notes = {v["note"] for v in s["signals"].values() if v["note"]}
        lines += [f"\nNote: {n}" for n in notes]
        lines += ["", f"![curves](curves_{_slug(s['task'], s['pair'])}.png)", ""]
    if report["skipped"]:
        lines += ["## Skipped", ""] + [f"- {x}" for x in report["skipped"]] + [""]
    return "\n".join(lines) + "\n"


def _slug(task: str, pair: str) -> str:
    return f"{task}_{pair}".replace(" -> ", "_to_").replace(" ", "_").replace(".", "")


def plot_curves(setups: Sequence[Mapping[str, Any]], out: Path) -> None:
    """One PNG per setup: accuracy vs large share for the chosen measure, other measures, routers, refs."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed: no plots")
        return
    for s in setups:
        fig, ax = plt.subplots(figsize=(6.4, 4.6))
        for name, v in s["signals"].items():
            c = v["curve"]
            if name == s["best_measure"]:
                style: dict[str, Any] = {"lw": 2.4, "color": "C0", "zorder": 5}
            elif name in MEASURES:
                style = {"lw": 0.8, "alpha": 0.5, "color": "C0"}
            elif name == "oracle":
                style = {"lw": 1.5, "color": "k", "ls": ":"}
            elif name == "random":
                style = {"lw": 1.2, "color": "gray", "ls": "--"}
            else:
                style = {"lw": 1.6, "ls": "-.", "color": f"C{1 + sorted(s['signals']).index(name) % 8}"}
            label = None if (name in MEASURES and name != s["best_measure"]) else \
                f"{name} (APGR {_f(v['apgr'][0], 2)})"
            ax.plot(c["share"], c["accuracy"], label=label, **style)
        ax.plot([], [], color="C0", lw=0.8, alpha=0.5, label="other measures")
        ax.set_xlabel("share of requests sent to the large model")
        ax.set_ylabel("accuracy")
        ax.set_title(f"{s['task']}: {s['pair']} (test n={s['n_test']})", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
        fig.tight_layout()
        fig.savefig(out / f"curves_{_slug(s['task'], s['pair'])}.png", dpi=110)
        plt.close(fig)
