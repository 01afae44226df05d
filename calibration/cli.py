"""``cascade-calibrate`` (also ``python -m calibration``): fit escalation thresholds on held-out data.

Every tier of the config answers every example once through the generation cache (the last tier without
scores), so a rerun, or a refit with another target, reads the cache and takes seconds; an interrupted run
resumes. The fit (:mod:`calibration.fit`) becomes a versioned artifact (:mod:`cascade.artifact`) that
``Cascade(..., artifact=path)`` and ``cascade run --artifact`` load; the report (:mod:`calibration.report`)
goes to the terminal and optionally to JSON and a PNG plot. Example::

    cascade-calibrate --data dev.jsonl --out thresholds.json --max-quality-loss 0.02 --confidence 0.9 \\
        --test-data test.jsonl --measure all --plot curve.png --report-json report.json

Without labels, ``--label-free`` certifies how often the cascade's answer differs from the last tier's (which
bounds the accuracy loss for any labels; :mod:`calibration.certify`); ``--plan`` predicts, from a pilot run,
what a quality fit would certify with 100 to 10,000 examples (:mod:`calibration.plan`)::

    cascade-calibrate --label-free --data prompts.jsonl --test-data labelled.jsonl --out t.json --max-quality-loss 0.05
    cascade-calibrate --plan --data pilot.jsonl --max-quality-loss 0.05 [--label-free]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from calibration.inputs import Arrays, Inputs, measure_arrays, read_inputs
from calibration.pipeline import fit_thresholds, widen_curve, widen_thresholds
from cascade.atomic_files import write_text_atomic
from cascade.config import backend_signature
from cascade.errors import CascadeError, InvalidRequestError

if TYPE_CHECKING:
    from calibration.certify import Claim
    from calibration.fit import FitResult
    from cascade.artifact import Artifact
    from cascade.config import CascadeConfig
    from cascade.types import GenerationParams

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="cascade-calibrate",
        description="Fit the escalation thresholds of a cascade on held-out data and write an artifact.")
    p.add_argument("--data",
                   help='JSONL, one example per line: {"id", "prompt" or "messages", "answer", optional "choices"} '
                        '("answer" optional with --label-free)')
    p.add_argument("--out", help="artifact to write (JSON, written atomically; required unless --plan)")
    p.add_argument("--scorer", default="auto",
                   help="exact | choice | numeric | contains | module:function (default: choice when every "
                        "example has choices, else exact)")
    p.add_argument("--measure", help="uncertainty measure, 'all' to pick the best AUC, or 'combined': a logistic "
                   "combination of the free measures fitted on half of the fit data, the thresholds certified on the "
                   "other half (default: the config's)")
    p.add_argument("--config", help="YAML or TOML cascade config (default: the embedded model pair)")
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--max-large-share", type=float, metavar="R",
                        help="budget: at most this share of requests reaches the last tier")
    target.add_argument("--max-quality-loss", type=float, nargs="+", metavar="EPS",
                        help="quality: accuracy loss vs always-last-tier <= EPS with probability >= --confidence; "
                             "several levels (e.g. 0.02 0.05 0.1) are each certified (all holding at once: "
                             "Bonferroni) and stored for per-request targets, the first one the default")
    target.add_argument("--min-cost", action="store_true",
                        help="maximise value-per-correct * accuracy - mean cost (needs --value-per-correct)")
    p.add_argument("--confidence", type=float, help="confidence of the quality guarantee (default 0.9)")
    p.add_argument("--family", choices=("auto", "common", "per_stage", "top_down"),
                   help="quality: the candidate thresholds (default auto: every threshold for two tiers; for N >= 3 "
                        "tiers top_down: each stage its own threshold, opened one stage at a time from the top; "
                        "per_stage: per-stage thresholds fixed on part of the fit data and certified on the rest, "
                        "split by --seed)")
    p.add_argument("--value-per-correct", type=float, metavar="V",
                   help="what one correct answer is worth, in the tiers' price unit")
    held = p.add_mutually_exclusive_group()
    held.add_argument("--test-split", type=float, metavar="F",
                      help="hold out this share of --data (seeded) and report whether the target held on it")
    held.add_argument("--test-data", help="a separate labelled JSONL to report the held-out check on")
    p.add_argument("--seed", type=int, default=0, help="seed of --test-split (default 0)")
    p.add_argument("--max-tokens", type=int, help="new tokens per answer (default: the config's max_tokens)")
    p.add_argument("--batch-size", type=int, default=16, help="prompts per model call (default 16)")
    p.add_argument("--choice-prior", action="store_true",
                   help="correct each tier's constrained answers for its prior over the choices, fitted without "
                        "labels on --prior-data or on a --prior-share of --data set aside for it; stored in the "
                        "artifact (see calibration/priors.py)")
    p.add_argument("--prior-data", help="JSONL of requests with 'choices' (answers not needed) for --choice-prior")
    p.add_argument("--prior-share", type=float, default=0.3, metavar="F",
                   help="without --prior-data: the share of --data set aside for the prior (default 0.3)")
    p.add_argument("--no-choices", action="store_true",
                   help="generate free answers even for examples with 'choices' (default: such examples are "
                        "answered with the most likely of their choices, as the cascade answers requests with choices)")
    p.add_argument("--cache-dir", help="generation cache (default: <model cache>/generations)")
    p.add_argument("--plot", help="PNG: accuracy vs large-model share per measure, random and oracle")
    p.add_argument("--report-json", help="every number of the report as JSON")
    p.add_argument("--router", help="fitted expert-router file: also fit one threshold set per cluster")
    p.add_argument("--label-free", action="store_true",
                   help="certify the share of answers that differ from the last tier's (no labels needed: lines may "
                        "omit 'answer'; labels present are used only for the report); with --max-quality-loss")
    p.add_argument("--same", help="when two answers are the same, for --label-free: exact | choice | numeric | "
                                  "contains | module:function(answer_a, answer_b, example) (default: the scorer's)")
    p.add_argument("--plan", action="store_true",
                   help="predict from this pilot data what a --max-quality-loss fit would certify with more data "
                        "(no artifact)")
    p.add_argument("--plan-sizes", type=int, nargs="+", metavar="N",
                   help="calibration-set sizes to plan for (default 100 300 1000 3000 10000)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--from-log", metavar="JSONL", help="refit from a running cascade's shadow log (monitor.log_path):"
                   " the last tier's answers are the labels, so the guarantee is against them, not ground truth")
    p.add_argument("--artifact", help="with --from-log: the artifact now served (its measure and choice priors)")
    return p


def _check_args(p: argparse.ArgumentParser, a: argparse.Namespace) -> None:
    if (a.from_log is None) == (a.data is None):
        p.error("give --data (held-out examples) or --from-log (a shadow log), one of them")
    if a.from_log is not None and (a.min_cost or a.plan or a.label_free or len(a.max_quality_loss or []) > 1):
        p.error("--from-log fits one --max-quality-loss level or --max-large-share")
    if a.artifact is not None and a.from_log is None:
        p.error("--artifact goes with --from-log")
    if a.max_quality_loss is None and (a.confidence is not None or a.family is not None):
        p.error("--confidence and --family apply to --max-quality-loss only")
    if a.min_cost != (a.value_per_correct is not None):
        p.error("--min-cost and --value-per-correct go together")
    a.levels = list(a.max_quality_loss or [])
    if a.levels:
        if len(set(a.levels)) != len(a.levels) or not all(0.0 <= e < 1.0 for e in a.levels):
            p.error("--max-quality-loss levels must be distinct numbers in [0, 1)")
        a.max_quality_loss = a.levels[0]
    a.confidence = 0.9 if a.confidence is None else a.confidence
    if not 0.0 < a.confidence < 1.0:
        p.error("--confidence must be in (0, 1)")
    if a.test_split is not None and not 0.0 < a.test_split < 1.0:
        p.error("--test-split must be in (0, 1)")
    if a.batch_size < 1 or (a.max_tokens is not None and a.max_tokens < 1):
        p.error("--batch-size and --max-tokens must be >= 1")
    from cascade.types import MEASURES

    if a.measure is not None and a.measure not in ("all", "combined", *MEASURES):
        p.error(f"--measure must be 'all', 'combined' or one of {', '.join(MEASURES)}")
    if a.seed < 0:
        p.error("--seed must be >= 0")
    if (a.label_free or a.plan) and a.max_quality_loss is None:
        p.error("--label-free and --plan go with a quality target (--max-quality-loss)")
    if a.same is not None and not (a.label_free or a.plan):
        p.error("--same applies to --label-free (and --plan)")
    if a.plan == (a.out is not None):
        p.error("--plan writes no artifact: leave out --out" if a.plan else "--out is required (unless --plan)")
    if a.plan_sizes is not None and (not a.plan or min(a.plan_sizes) < 1):
        p.error("--plan-sizes go with --plan and must be >= 1")
    if (a.prior_data or a.prior_share != 0.3) and not a.choice_prior:
        p.error("--prior-data and --prior-share go with --choice-prior")
    if not 0.0 < a.prior_share < 1.0:
        p.error("--prior-share must be in (0, 1)")
    if a.choice_prior and a.no_choices:
        p.error("--choice-prior needs constrained answers (not --no-choices)")
    for flag, path in (("--out", a.out), ("--report-json", a.report_json), ("--plot", a.plot)):
        if path is not None and not Path(path).resolve().parent.is_dir():
            p.error(f"{flag}: the folder of {path!r} does not exist")  # checked before any model runs


def _target(a: argparse.Namespace) -> tuple[str, dict[str, float]]:
    if a.max_large_share is not None:
        return "budget", {"max_large_share": a.max_large_share}
    if a.max_quality_loss is not None:
        return "quality", {"max_quality_loss": a.max_quality_loss, "delta": round(1.0 - a.confidence, 12)}
    return "min_cost", {"value_per_correct": a.value_per_correct}


def _choose_measure(a: argparse.Namespace, cfg: CascadeConfig, arrays: Arrays,
                    n_fit: int) -> tuple[str | None, str, dict[str, Any]]:
    """The measure to fit (``--measure``, or the config's; ``all``: the best AUC on the fit data, or None with a
    quality target, whose fit picks it), how it was chosen, and the summary of every measure on the fit data."""
    from calibration import report as rep

    wanted = a.measure or cfg.measure or ("choice_margin" if "choice_margin" in arrays.by_measure else "margin_first")
    if wanted != "all" and wanted not in arrays.by_measure:
        raise InvalidRequestError(f"measure {wanted!r} is not available from these tiers; have "
                                  f"{sorted(arrays.by_measure)}")
    first = next(iter(arrays.by_measure.values()))
    summary = rep.measure_summary({m: arr.scores[:n_fit] for m, arr in arrays.by_measure.items()},
                                  first.correct[:n_fit], first.costs[:n_fit])
    if wanted == "all" and a.max_quality_loss is not None:
        return None, (f"of {len(summary)} measures each tested at delta/{len(summary)} (Bonferroni), the one whose "
                      "sequence certifies the least escalation, picked by --measure all"), summary
    if wanted == "all":
        measure = max(summary, key=lambda m: summary[m]["auc"])
        return measure, f"best AUC of {len(summary)} measures on the fit data, picked by --measure all", summary
    how = "given by --measure" if a.measure else "the config's measure" if cfg.measure else \
        "the default: choice_margin when every example has choices, else margin_first"
    return wanted, how, summary


def _fit(a: argparse.Namespace, cfg: CascadeConfig, inputs: Inputs, params: GenerationParams, cache_dir: Path,
         arrays: Arrays, wanted: str | None, how: str,
         summary: dict[str, Any]) -> tuple[Artifact, dict[str, Any]]:
    """Fit the chosen measure's thresholds (and per cluster with ``--router``): the artifact and the report."""
    import numpy as np

    from calibration import report as rep
    from calibration.artifact import artifact_from_fit, data_fingerprint, levels_from_fits
    from calibration.fit import measured_curve
    from calibration.metrics import simulate

    n_fit, names, claim = len(inputs.fit), [t.name for t in cfg.tiers], arrays.claim
    method, kw = _target(a)
    fit_kw: dict[str, Any] = dict(kw)
    if method == "quality":
        fit_kw.update(family=a.family or "auto", seed=a.seed)
    first = next(iter(arrays.by_measure.values()))
    fc, fk = first.correct[:n_fit], first.costs[:n_fit]
    measure, fit, level_fits = _fits(a, method, fit_kw, arrays, wanted, n_fit)
    if wanted is None:  # --measure all with a quality target: the level split between the measures' sequences
        fit_kw["delta"] = kw["delta"] / len(summary)
    fs = arrays.by_measure[measure].scores[:n_fit]
    thresholds = widen_thresholds(fit.thresholds, fs)
    level_ts = [widen_thresholds(f.thresholds, fs) for f in level_fits]
    fp = data_fingerprint("\n".join(json.dumps(e.data, sort_keys=True, ensure_ascii=False) for e in inputs.fit))
    clusters: dict[int, tuple[float, ...]] | None = None
    ids: list[int] = []
    report: dict[str, Any] = {"clusters": None, "claim": claim if method == "quality" else None}
    if a.router:
        from calibration.pipeline import cluster_ids, fit_clusters

        every = [e.data for e in inputs.fit + inputs.test]
        ids, embedder = asyncio.run(cluster_ids(a.router, cfg, every, cache_dir))
        clusters, report["clusters"] = fit_clusters(ids[:n_fit], method, fit_kw, fs, fc, fk, claim)
        report["clusters"].update(router=a.router, embedder=embedder)
    art = artifact_from_fit(fit, models=[t.backend.model for t in cfg.tiers], measure=measure, data_fingerprint=fp,
                            curve=widen_curve(measured_curve(fs, fc, fk), fs), cluster_thresholds=clusters,
                            combination=arrays.combination if measure == "combined" else None)
    if level_fits:
        art = replace(art, levels=levels_from_fits(level_fits, level_ts, confidence=a.confidence))
    if arrays.priors is not None:
        art = replace(art, choice_priors=arrays.priors)
        report["choice_priors"] = {"n": len(inputs.prior), "from": inputs.prior_source,
                                   "priors": {str(k): v for k, v in arrays.priors.items()}}
    art = replace(art, thresholds=thresholds, params={
        **dict(fit.params), "fitted_thresholds": rep.jsonable(list(fit.thresholds)), "scorer": inputs.scorer_name,
        "max_tokens": params.max_tokens, "temperature": params.temperature, "data": Path(a.data).name,
        "choices": not a.no_choices and all(e.data.get("choices") for e in inputs.fit + inputs.test),
        "split": inputs.split, "backends": backend_signature(cfg), **_claim_params(method, arrays, inputs),
        **({"delta_overall": kw["delta"], "tested_measures": len(summary)}
           if fit_kw.get("delta") != kw.get("delta") else {})})
    chosen = simulate(thresholds, fs, fc, fk).stats()
    held = _held_out(inputs, arrays, measure)
    test = None
    if held is not None:
        per = np.tile(np.asarray(thresholds, dtype=np.float64), (len(held["scores"]), 1))
        for i, cid in enumerate(ids[n_fit:]):
            if clusters and cid in clusters:
                per[i] = clusters[cid]
        test = rep.held_out_check(method, kw, names, per, thresholds=thresholds, **held)
        art = replace(art, params={**dict(art.params), "held_out": {  # what the thresholds did on unseen data
            k: rep.jsonable(test.get(k)) for k in ("n", "accuracy", "large_share", "small_accuracy",
                                                   "large_accuracy", "held", "mean_cost")}})
    report["levels"] = rep.levels_section(level_fits, level_ts, names, held) if level_fits else None
    report.update(_data_sections(a, cfg, inputs, arrays, params, cache_dir, fp))
    report.update({
        "measures": summary, "measure": {"chosen": measure, "how": how},
        "reference": rep.reference_curves(fc),
        "fit": {"method": method, "target": kw, "params": dict(fit.params), "thresholds": list(thresholds),
                "fitted_thresholds": list(fit.thresholds), "feasible": fit.feasible, "message": fit.message,
                **rep.stats_dict(chosen)},
        "points": rep.operating_points(fs, fc, fk, thresholds, names),
        "pareto": rep.pareto_section(fs, fc, fk, chosen),
        "test": test,
        "artifact": a.out,
    })
    return art, report


def _claim_params(method: str, arrays: Arrays, inputs: Inputs) -> dict[str, Any]:
    """What the artifact says about the guarantee: its claim, and for the label-free one how answers compare."""
    from calibration.certify import claim_text

    out: dict[str, Any] = {"guarantee": claim_text(arrays.claim)} if method == "quality" else {}
    if arrays.claim == "disagreement":
        out.update(same=inputs.same_name, labelled_fit_lines=int(arrays.labelled[:len(inputs.fit)].sum()),
                   curve_accuracy="agreement with the last tier")
    return out


def _held_out(inputs: Inputs, arrays: Arrays, measure: str) -> dict[str, Any] | None:
    """The held-out examples' arrays for the checks, or None without held-out examples."""
    if not inputs.test:
        return None
    n_fit = len(inputs.fit)
    first = next(iter(arrays.by_measure.values()))
    return {"scores": arrays.by_measure[measure].scores[n_fit:], "correct": arrays.labels[n_fit:],
            "costs": first.costs[n_fit:], "source": inputs.split, "claim": arrays.claim,
            "labelled": arrays.labelled[n_fit:],
            "agreement": None if arrays.agreement is None else arrays.agreement[n_fit:]}


def _data_sections(a: argparse.Namespace, cfg: CascadeConfig, inputs: Inputs, arrays: Arrays,
                   params: GenerationParams, cache_dir: Path, fp: str) -> dict[str, Any]:
    """The report's ``data``, ``tiers`` and ``generation`` sections (what was fitted on, by which models)."""
    n_fit = len(inputs.fit)
    first = next(iter(arrays.by_measure.values()))
    fc, fk = first.correct[:n_fit], first.costs[:n_fit]
    lab, labels = arrays.labelled[:n_fit], arrays.labels[:n_fit]
    return {
        "data": {"path": a.data, "n": len(inputs.data), "n_fit": n_fit, "n_test": len(inputs.test),
                 "split": inputs.split, "fingerprint": fp, "scorer": inputs.scorer_name,
                 "same": inputs.same_name, "n_fit_labelled": int(lab.sum())},
        "tiers": [{"name": t.name, "model": t.backend.model, "price_input_per_mtok": t.price_input_per_mtok,
                   "price_output_per_mtok": t.price_output_per_mtok, "accuracy": float(fc[:, j].mean()),
                   "labelled_accuracy": float(labels[lab, j].mean()) if lab.any() else None,
                   "mean_cost": float(fk[:, j].mean())} for j, t in enumerate(cfg.tiers)],
        "generation": {"max_tokens": params.max_tokens, "temperature": params.temperature,
                       "constrained": 0 if a.no_choices else sum(bool(e.data.get("choices"))
                                                                  for e in inputs.fit + inputs.test),
                       "cache_dir": str(cache_dir)},
    }


def _fits(a: argparse.Namespace, method: str, fit_kw: dict[str, Any], arrays: Arrays, wanted: str | None,
          n_fit: int) -> tuple[str, FitResult, list[FitResult]]:
    """The measure, the main fit and, with a quality target, every certified level's fit (the first level's is
    the main fit). ``wanted`` None: the measure is chosen among all (``--measure all``, Bonferroni over them)."""
    from calibration.fit import fit_levels, fit_levels_measures

    first = next(iter(arrays.by_measure.values()))
    fc, fk = first.correct[:n_fit], first.costs[:n_fit]
    if method != "quality":
        assert wanted is not None
        return wanted, fit_thresholds(method, arrays.by_measure[wanted].scores[:n_fit], fc, fk, **fit_kw), []
    common = {"levels": a.levels, "delta": fit_kw["delta"], "claim": arrays.claim, "family": fit_kw["family"],
              "seed": fit_kw["seed"]}
    if wanted is None:
        measure, fits = fit_levels_measures({m: arr.scores[:n_fit] for m, arr in arrays.by_measure.items()}, fc, fk,
                                            **common)
    else:
        measure, fits = wanted, fit_levels(arrays.by_measure[wanted].scores[:n_fit], fc, fk, **common)
    return measure, fits[0], fits


def _plan(a: argparse.Namespace, inputs: Inputs, arrays: Arrays, wanted: str | None) -> dict[str, Any]:
    """The planner's predictions for the claim(s) this pilot can plan: labelled (with labels) and label-free."""
    from calibration.certify import claim_text
    from calibration.fit import fit_quality, fit_quality_measures
    from calibration.plan import DEFAULT_SIZES, plan_quality, render_plan

    n = len(inputs.fit)
    eps, delta = a.max_quality_loss, round(1.0 - a.confidence, 12)
    first = next(iter(arrays.by_measure.values()))
    fk = first.costs[:n]
    targets: list[tuple[Claim, Any]] = []
    if not a.label_free:
        targets.append(("accuracy", arrays.labels[:n]))
    if arrays.agreement is not None:
        targets.append(("disagreement", arrays.agreement[:n]))
    out: dict[str, Any] = {"n_pilot": n, "target": {"max_quality_loss": eps, "delta": delta}, "plans": {}}
    for claim, target in targets:
        scores: Any = ({m: arr.scores[:n] for m, arr in arrays.by_measure.items()} if wanted is None
                       else arrays.by_measure[wanted].scores[:n])
        if wanted is None:
            _, own = fit_quality_measures(scores, target, fk, max_quality_loss=eps, delta=delta, claim=claim)
        else:
            own = fit_quality(scores, target, fk, max_quality_loss=eps, delta=delta, claim=claim)
        rows = plan_quality(scores, target, fk, max_quality_loss=eps, delta=delta, claim=claim,
                            sizes=a.plan_sizes or DEFAULT_SIZES, seed=a.seed)
        what = f"{claim_text(claim)} <= {eps:.2%} at {a.confidence:.0%} confidence"
        print(render_plan(rows, what=what, n_pilot=n, pilot_share=own.stats.large_share) + "\n")
        out["plans"][claim] = {"what": what, "pilot_share": own.stats.large_share,
                               "rows": [vars(r) for r in rows]}
    return out


def _run(a: argparse.Namespace) -> int:
    from calibration import report as rep
    from cascade.config import default_config, load_config
    from cascade.types import GenerationParams

    if a.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError as exc:
            raise InvalidRequestError(f"--plot needs matplotlib (the 'plot' extra): {exc}") from None
    cfg = load_config(a.config) if a.config else default_config()
    if a.from_log:
        from calibration.from_log import refit_from_log

        return refit_from_log(a, cfg)
    inputs = read_inputs(a.data, scorer=a.scorer, test_data=a.test_data, test_split=a.test_split, seed=a.seed,
                         same=a.same, label_free=a.label_free, prior_data=a.prior_data if a.choice_prior else None,
                         prior_share=a.prior_share if a.choice_prior and not a.prior_data else None)
    params = GenerationParams(max_tokens=a.max_tokens or cfg.max_tokens, temperature=cfg.temperature)
    cache_dir = Path(a.cache_dir) if a.cache_dir else _default_cache()
    arrays = measure_arrays(cfg, inputs, params, cache_dir, batch_size=a.batch_size, progress=not a.no_progress,
                            choices=not a.no_choices, label_free=a.label_free)
    if a.measure == "combined":  # weights from one part of the fit data; all that follows sees only the rest
        from calibration.combine import combine_arrays

        _, arrays, inputs, note = combine_arrays(arrays, inputs, seed=a.seed)
        print(note, file=sys.stderr)
    wanted, how, summary = _choose_measure(a, cfg, arrays, len(inputs.fit))
    if a.plan:
        planned = _plan(a, inputs, arrays, wanted)
        if a.report_json:
            write_text_atomic(a.report_json, json.dumps(rep.jsonable(planned), indent=1, allow_nan=False) + "\n")
        return 0
    art, report = _fit(a, cfg, inputs, params, cache_dir, arrays, wanted, how, summary)
    measure = art.measure
    if cfg.measure is not None and measure != cfg.measure:
        report["hint"] = (f"note: the artifact is for measure {measure!r}, the config uses {cfg.measure!r}; run the "
                          f"cascade with --measure {measure} (or set measure: {measure} in the config)")
    print(rep.render_text(report))
    art.save(a.out)  # the artifact first: the report and plot describe it
    if a.report_json:
        write_text_atomic(a.report_json, json.dumps(rep.jsonable(report), indent=1, allow_nan=False) + "\n")
    if a.plot:
        rep.plot(report, a.plot)
    print(f"\nartifact written to {a.out}", file=sys.stderr)
    return 0


def _default_cache() -> Path:
    from cascade.embedded_models import default_cache_dir

    return default_cache_dir() / "generations"


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``cascade-calibrate``; returns the exit code (2 on bad input, 130 when interrupted)."""
    p = _parser()
    try:
        args = p.parse_args(argv)
        _check_args(p, args)
    except SystemExit as exc:
        return int(exc.code) if isinstance(exc.code, int) else 2
    try:
        return _run(args)
    except (CascadeError, OSError) as exc:
        print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: finished batches are cached; run the same command again to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
