"""``cascade-calibrate`` (also ``python -m calibration``): fit escalation thresholds on labelled held-out data.

Every tier of the config answers every example once through the generation cache (the last tier without
scores), so a rerun, or a refit with another target, reads the cache and takes seconds; an interrupted run
resumes. The fit (:mod:`calibration.fit`) becomes a versioned artifact (:mod:`cascade.artifact`) that
``Cascade(..., artifact=path)`` and ``cascade run --artifact`` load; the report (:mod:`calibration.report`)
goes to the terminal and optionally to JSON and a PNG plot. Example::

    cascade-calibrate --data dev.jsonl --out thresholds.json --max-quality-loss 0.02 --confidence 0.9 \\
        --test-data test.jsonl --measure all --plot curve.png --report-json report.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from calibration.pipeline import (
    Example,
    check_scorer,
    fit_thresholds,
    generate_all,
    load_examples,
    split_examples,
    widen_curve,
    widen_thresholds,
)
from cascade.errors import CascadeError, InvalidRequestError

if TYPE_CHECKING:
    from calibration.generation_cache import TierArrays
    from cascade.artifact import Artifact
    from cascade.config import CascadeConfig
    from cascade.scorers import Scorer
    from cascade.types import GenerationParams

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="cascade-calibrate",
        description="Fit the escalation thresholds of a cascade on labelled held-out data and write an artifact.")
    p.add_argument("--data", required=True,
                   help='JSONL, one example per line: {"id", "prompt" or "messages", "answer", optional "choices"}')
    p.add_argument("--out", required=True, help="artifact to write (JSON, written atomically)")
    p.add_argument("--scorer", default="auto",
                   help="exact | choice | numeric | contains | module:function (default: choice when every "
                        "example has choices, else exact)")
    p.add_argument("--measure", help="uncertainty measure, or 'all' to pick the best AUC (default: the config's)")
    p.add_argument("--config", help="YAML or TOML cascade config (default: the embedded model pair)")
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--max-large-share", type=float, metavar="R",
                        help="budget: at most this share of requests reaches the last tier")
    target.add_argument("--max-quality-loss", type=float, metavar="EPS",
                        help="quality: accuracy loss vs always-last-tier <= EPS with probability >= --confidence")
    target.add_argument("--min-cost", action="store_true",
                        help="maximise value-per-correct * accuracy - mean cost (needs --value-per-correct)")
    p.add_argument("--confidence", type=float, help="confidence of the quality guarantee (default 0.9)")
    p.add_argument("--value-per-correct", type=float, metavar="V",
                   help="what one correct answer is worth, in the tiers' price unit")
    held = p.add_mutually_exclusive_group()
    held.add_argument("--test-split", type=float, metavar="F",
                      help="hold out this share of --data (seeded) and report whether the target held on it")
    held.add_argument("--test-data", help="a separate labelled JSONL to report the held-out check on")
    p.add_argument("--seed", type=int, default=0, help="seed of --test-split (default 0)")
    p.add_argument("--max-tokens", type=int, help="new tokens per answer (default: the config's max_tokens)")
    p.add_argument("--batch-size", type=int, default=16, help="prompts per model call (default 16)")
    p.add_argument("--no-choices", action="store_true",
                   help="generate free answers even for examples with 'choices' (default: such examples are "
                        "answered with the most likely of their choices, as the cascade answers requests with choices)")
    p.add_argument("--cache-dir", help="generation cache (default: <model cache>/generations)")
    p.add_argument("--plot", help="PNG: accuracy vs large-model share per measure, random and oracle")
    p.add_argument("--report-json", help="every number of the report as JSON")
    p.add_argument("--router", help="fitted expert-router file: also fit one threshold set per cluster")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def _check_args(p: argparse.ArgumentParser, a: argparse.Namespace) -> None:
    if a.max_quality_loss is None and a.confidence is not None:
        p.error("--confidence applies to --max-quality-loss only")
    if a.min_cost != (a.value_per_correct is not None):
        p.error("--min-cost and --value-per-correct go together")
    a.confidence = 0.9 if a.confidence is None else a.confidence
    if not 0.0 < a.confidence < 1.0:
        p.error("--confidence must be in (0, 1)")
    if a.test_split is not None and not 0.0 < a.test_split < 1.0:
        p.error("--test-split must be in (0, 1)")
    if a.batch_size < 1 or (a.max_tokens is not None and a.max_tokens < 1):
        p.error("--batch-size and --max-tokens must be >= 1")
    from cascade.types import MEASURES

    if a.measure is not None and a.measure != "all" and a.measure not in MEASURES:
        p.error(f"--measure must be 'all' or one of {', '.join(MEASURES)}")
    if a.seed < 0:
        p.error("--seed must be >= 0")
    for flag, path in (("--out", a.out), ("--report-json", a.report_json), ("--plot", a.plot)):
        if path is not None and not Path(path).resolve().parent.is_dir():
            p.error(f"{flag}: the folder of {path!r} does not exist")  # checked before any model runs


def _target(a: argparse.Namespace) -> tuple[str, dict[str, float]]:
    if a.max_large_share is not None:
        return "budget", {"max_large_share": a.max_large_share}
    if a.max_quality_loss is not None:
        return "quality", {"max_quality_loss": a.max_quality_loss, "delta": round(1.0 - a.confidence, 12)}
    return "min_cost", {"value_per_correct": a.value_per_correct}


def _verdict(method: str, kw: dict[str, float], test: dict[str, Any]) -> tuple[str, str]:
    if method == "budget":
        r = kw["max_large_share"]
        return f"large share <= {r:.1%}", f"{'held' if test['large_share'] <= r + 1e-12 else 'MISSED'} " \
                                          f"(large share {test['large_share']:.1%})"
    if method == "quality":
        eps, loss = kw["max_quality_loss"], test["large_accuracy"] - test["accuracy"]
        return f"accuracy loss vs last tier <= {eps:.2%}", f"{'held' if loss <= eps + 1e-12 else 'MISSED'} " \
                                                          f"(loss {loss:+.2%})"
    return f"value {kw['value_per_correct']:g} per correct answer", \
        f"net value {kw['value_per_correct'] * test['accuracy'] - test['mean_cost']:.4g} per request (no pass/fail)"


def _held_out(method: str, kw: dict[str, float], names: Sequence[str], thresholds: Sequence[float],
              per_cluster: dict[int, tuple[float, ...]] | None, ids: Sequence[int], scores: Any, correct: Any,
              costs: Any, source: str) -> dict[str, Any]:
    """The fitted cascade on the held-out examples: accuracies, large share, cost, and whether the target held."""
    import numpy as np

    from calibration import report as rep
    from calibration.metrics import CascadeStats
    from calibration.pipeline import answering_tiers

    n = len(scores)
    per = np.tile(np.asarray(thresholds, dtype=np.float64), (n, 1))
    for i, cid in enumerate(ids):
        if per_cluster and cid in per_cluster:
            per[i] = per_cluster[cid]
    tier = answering_tiers(per, scores)
    rows = np.arange(n)
    st = CascadeStats.from_counts(n, correct[rows, tier].mean(), np.cumsum(costs, 1)[rows, tier].mean(),
                                  np.bincount(tier, minlength=len(names)))
    test = {"n": n, "source": source, "small_accuracy": float(correct[:, 0].mean()),
            "large_accuracy": float(correct[:, -1].mean()), **rep.stats_dict(st, thresholds)}
    test["target"], test["verdict"] = _verdict(method, kw, test)
    test["held"] = test["verdict"].startswith("held") if method != "min_cost" else None
    test["points"] = [
        *({"label": f"{name} alone", "accuracy": float(correct[:, j].mean()), "mean_cost": float(costs[:, j].mean()),
           "large_share": float(j == len(names) - 1)} for j, name in enumerate(names)),
        {"label": "cascade (fitted)", "chosen": True, **rep.stats_dict(st, thresholds)}]
    return test


@dataclass(frozen=True)
class _Inputs:
    """The labelled examples of one run.

    Attributes:
        data: every example of ``--data``.
        fit: the examples the thresholds are fitted on.
        test: the held-out examples (``--test-data`` or a ``--test-split`` of ``--data``), possibly none.
        split: how the held-out examples were chosen, in words.
        scorer_name: the scorer's name (``auto`` resolved).
        scorer: the scorer.
    """

    data: list[Example]
    fit: list[Example]
    test: list[Example]
    split: str
    scorer_name: str
    scorer: Scorer


def _inputs(a: argparse.Namespace) -> _Inputs:
    """Read ``--data`` (and ``--test-data``), check the scorer on them, and split off the held-out examples."""
    data = load_examples(a.data)
    scorer_name, scorer = check_scorer(a.scorer, data)
    fit_ex, test_ex, split = data, [], "no held-out check"
    if a.test_data:
        test_ex = load_examples(a.test_data)
        check_scorer(scorer_name, test_ex)
        split = f"held-out check on {a.test_data}"
    elif a.test_split:
        fit_ex, test_ex = split_examples(data, a.test_split, a.seed)
        split = f"seeded split (seed {a.seed}), {len(test_ex)} held out"
    return _Inputs(data, fit_ex, test_ex, split, scorer_name, scorer)


def _measure_arrays(a: argparse.Namespace, cfg: CascadeConfig, inputs: _Inputs, params: GenerationParams,
                    cache_dir: Path) -> dict[str, TierArrays]:
    """Every tier on every example (cached), as arrays per measure with finite scores (fit examples first)."""
    import numpy as np

    from calibration.generation_cache import tier_arrays
    from cascade.engine import Price
    from cascade.types import MEASURES

    every = inputs.fit + inputs.test
    gens = asyncio.run(generate_all(cfg, [e.data for e in every], params, cache_dir, batch_size=a.batch_size,
                                    progress=not a.no_progress, choices=not a.no_choices))
    prices = [Price(t.price_input_per_mtok, t.price_output_per_mtok) for t in cfg.tiers]
    score = scorer_for(inputs.scorer, every)
    arrays = {m: arr for m in MEASURES
              if np.isfinite((arr := tier_arrays([e.data for e in every], gens, score, m, prices)).scores).all()}
    if not arrays:
        raise InvalidRequestError("the lower tiers returned no finite uncertainty scores for any measure")
    return arrays


def _choose_measure(a: argparse.Namespace, cfg: CascadeConfig, arrays: dict[str, TierArrays],
                    n_fit: int) -> tuple[str, str, dict[str, Any]]:
    """The measure to fit (``--measure``, ``all``: the best AUC on the fit data, or the config's), how it was
    chosen, and the summary of every measure on the fit data."""
    from calibration import report as rep

    wanted = a.measure or cfg.measure
    if wanted != "all" and wanted not in arrays:
        raise InvalidRequestError(f"measure {wanted!r} is not available from these tiers; have {sorted(arrays)}")
    first = next(iter(arrays.values()))
    summary = rep.measure_summary({m: arr.scores[:n_fit] for m, arr in arrays.items()}, first.correct[:n_fit],
                                  first.costs[:n_fit])
    if wanted == "all":
        measure = max(summary, key=lambda m: summary[m]["auc"])
        return measure, f"best AUC of {len(summary)} measures on the fit data, picked by --measure all", summary
    return wanted, "given by --measure" if a.measure else "the config's measure", summary


def _fit(a: argparse.Namespace, cfg: CascadeConfig, inputs: _Inputs, params: GenerationParams, cache_dir: Path,
         arrays: dict[str, TierArrays], measure: str, how: str,
         summary: dict[str, Any]) -> tuple[Artifact, dict[str, Any]]:
    """Fit the chosen measure's thresholds (and per cluster with ``--router``): the artifact and the report."""
    from calibration import report as rep
    from calibration.artifact import artifact_from_fit, data_fingerprint
    from calibration.fit import measured_curve
    from calibration.metrics import simulate

    n_fit, names = len(inputs.fit), [t.name for t in cfg.tiers]
    correct, costs = arrays[measure].correct, arrays[measure].costs
    fs, fc, fk = arrays[measure].scores[:n_fit], correct[:n_fit], costs[:n_fit]
    method, kw = _target(a)
    fit_kw = dict(kw)
    if method == "quality" and (a.measure or cfg.measure) == "all":  # picked on the fit data: test at delta / M
        fit_kw["delta"] = kw["delta"] / len(summary)
        how += f"; the guarantee is tested at delta/{len(summary)} (Bonferroni over the measures compared)"
    fit = fit_thresholds(method, fs, fc, fk, **fit_kw)
    thresholds = widen_thresholds(fit.thresholds, fs)
    fp = data_fingerprint("\n".join(json.dumps(e.data, sort_keys=True, ensure_ascii=False) for e in inputs.fit))
    clusters: dict[int, tuple[float, ...]] | None = None
    ids: list[int] = []
    report: dict[str, Any] = {"clusters": None}
    if a.router:
        from calibration.pipeline import cluster_ids, fit_clusters

        every = [e.data for e in inputs.fit + inputs.test]
        ids, embedder = asyncio.run(cluster_ids(a.router, cfg, every, cache_dir))
        clusters, report["clusters"] = fit_clusters(ids[:n_fit], method, fit_kw, fs, fc, fk)
        report["clusters"].update(router=a.router, embedder=embedder)
    art = artifact_from_fit(fit, models=[t.backend.model for t in cfg.tiers], measure=measure, data_fingerprint=fp,
                            curve=widen_curve(measured_curve(fs, fc, fk), fs), cluster_thresholds=clusters)
    art = replace(art, thresholds=thresholds, params={
        **dict(fit.params), "fitted_thresholds": rep.jsonable(list(fit.thresholds)), "scorer": inputs.scorer_name,
        "max_tokens": params.max_tokens, "temperature": params.temperature, "data": Path(a.data).name,
        "choices": not a.no_choices and all(e.data.get("choices") for e in inputs.fit + inputs.test),
        "split": inputs.split,
        **({"delta_overall": kw["delta"], "tested_measures": len(summary)} if fit_kw != kw else {})})
    chosen = simulate(thresholds, fs, fc, fk).stats()
    report.update({
        "data": {"path": a.data, "n": len(inputs.data), "n_fit": n_fit, "n_test": len(inputs.test),
                 "split": inputs.split, "fingerprint": fp, "scorer": inputs.scorer_name},
        "tiers": [{"name": t.name, "model": t.backend.model, "price_input_per_mtok": t.price_input_per_mtok,
                   "price_output_per_mtok": t.price_output_per_mtok, "accuracy": float(fc[:, j].mean()),
                   "mean_cost": float(fk[:, j].mean())} for j, t in enumerate(cfg.tiers)],
        "generation": {"max_tokens": params.max_tokens, "temperature": params.temperature,
                       "constrained": 0 if a.no_choices else sum(bool(e.data.get("choices"))
                                                                  for e in inputs.fit + inputs.test),
                       "cache_dir": str(cache_dir)},
        "measures": summary, "measure": {"chosen": measure, "how": how},
        "reference": rep.reference_curves(fc),
        "fit": {"method": method, "target": kw, "params": dict(fit.params), "thresholds": list(thresholds),
                "fitted_thresholds": list(fit.thresholds), "feasible": fit.feasible, "message": fit.message,
                **rep.stats_dict(chosen)},
        "points": rep.operating_points(fs, fc, fk, thresholds, names),
        "pareto": rep.pareto_section(fs, fc, fk, chosen),
        "test": None if not inputs.test else _held_out(
            method, kw, names, thresholds, clusters, ids[n_fit:], arrays[measure].scores[n_fit:],
            correct[n_fit:], costs[n_fit:], inputs.split),
        "artifact": a.out,
    })
    return art, report


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
    inputs = _inputs(a)
    params = GenerationParams(max_tokens=a.max_tokens or cfg.max_tokens, temperature=cfg.temperature)
    cache_dir = Path(a.cache_dir) if a.cache_dir else _default_cache()
    arrays = _measure_arrays(a, cfg, inputs, params, cache_dir)
    measure, how, summary = _choose_measure(a, cfg, arrays, len(inputs.fit))
    art, report = _fit(a, cfg, inputs, params, cache_dir, arrays, measure, how, summary)
    if measure != cfg.measure:
        report["hint"] = (f"note: the artifact is for measure {measure!r}, the config uses {cfg.measure!r}; run the "
                          f"cascade with --measure {measure} (or set measure: {measure} in the config)")
    print(rep.render_text(report))
    art.save(a.out)  # the artifact first: the report and plot describe it
    if a.report_json:
        _write_text(a.report_json, json.dumps(rep.jsonable(report), indent=1, allow_nan=False) + "\n")
    if a.plot:
        rep.plot(report, a.plot)
    print(f"\nartifact written to {a.out}", file=sys.stderr)
    return 0


def scorer_for(scorer: Any, examples: Sequence[Example]) -> Any:
    """Wrap a scorer so that its failure names the input line of the example."""
    where = {id(e.data): e for e in examples}

    def score(text: str, ex: Any) -> bool:
        try:
            return bool(scorer(text, ex))
        except Exception as exc:
            e = where.get(id(ex))
            at = f"{e.source}:{e.line}" if e else "an example"
            raise InvalidRequestError(f"{at}: the scorer failed: {type(exc).__name__}: {exc}") from exc

    return score


def _default_cache() -> Path:
    from cascade.embedded_models import default_cache_dir

    return default_cache_dir() / "generations"


def _write_text(path: str, text: str) -> None:
    import os
    import tempfile

    target = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, target)
    finally:
        Path(tmp).unlink(missing_ok=True)


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
