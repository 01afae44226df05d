"""The numbers of :mod:`eval.labelfree` from cached generations: fits, held-out checks, planner checks, tables."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

__all__ = ["Split", "evaluate", "evaluate_setup", "render", "split_arrays"]

BoolArray = npt.NDArray[np.bool_]


@dataclass(frozen=True)
class Split:
    """One split of one setup.

    Attributes:
        scores: measure -> ``(n,)`` small-model uncertainty (measures with finite values on every example).
        correct: ``(n, 2)`` small and large answer right (the pool's hidden labels: never used by a label-free fit).
        agree: ``(n, 2)`` the small answer names the same label as the large one (last column True).
        answers: the small model's ``n`` answer texts (for the combined measure's answer offsets; None: none).
    """

    scores: dict[str, npt.NDArray[np.float64]]
    correct: BoolArray
    agree: BoolArray
    answers: tuple[str, ...] | None = None

    def head(self, n: int) -> Split:
        """The first ``n`` examples."""
        return Split({m: v[:n] for m, v in self.scores.items()}, self.correct[:n], self.agree[:n],
                     None if self.answers is None else self.answers[:n])

    def __len__(self) -> int:
        return len(self.correct)


def split_arrays(examples: Sequence[Mapping[str, Any]], small: Sequence[Any], large: Sequence[Any]) -> Split:
    """Score, compare and collect one split's generations."""
    from eval.datasets import same_answer, score_answer

    correct = np.array([[score_answer(s.text, ex), score_answer(g.text, ex)]
                        for ex, s, g in zip(examples, small, large)], dtype=bool).reshape(-1, 2)
    agree = np.array([[same_answer(s.text, g.text, ex), True] for ex, s, g in zip(examples, small, large)],
                     dtype=bool).reshape(-1, 2)
    names = sorted(set.intersection(*(set(g.scores) for g in small))) if small else []
    scores = {m: np.array([float(g.scores[m]) for g in small]) for m in names}
    return Split({m: v for m, v in scores.items() if np.isfinite(v).all()}, correct, agree,
                 tuple(s.text for s in small))


def _check(measure: str, fit: Any, test: Split, scores: npt.NDArray[np.float64] | None = None) -> dict[str, Any]:
    """A fit's thresholds on the test split (the measure's ``scores`` there, default ``test.scores[measure]``):
    escalated share, accuracy loss, disagreement."""
    t = fit.thresholds[0]
    esc = (test.scores[measure] if scores is None else scores) > t
    acc = np.where(esc, test.correct[:, 1], test.correct[:, 0]).mean()
    return {"measure": measure, "feasible": fit.feasible, "fit_share": fit.stats.large_share,
            "bound": float(fit.params.get("certified_loss_bound", math.nan)), "test_share": float(esc.mean()),
            "test_loss": float(test.correct[:, 1].mean() - acc),
            "test_disagreement": float(1.0 - np.where(esc, True, test.agree[:, 0]).mean())}


def evaluate_setup(cal: Split, test: Split, pool: Split, *, eps: float, delta: float, replicates: int,
                   seed: int) -> dict[str, Any]:
    """Every number of one setup (see :mod:`eval.labelfree`)."""
    from calibration.certify import upper_bounds
    from calibration.fit import common_sweep, fit_quality, fit_quality_measures
    from calibration.metrics import auc, share_curve
    from calibration.plan import plan_quality

    measures = sorted(set(cal.scores) & set(test.scores) & set(pool.scores))

    def fit(split: Split, claim: str) -> tuple[str, Any]:
        target = split.correct if claim == "accuracy" else split.agree
        return fit_quality_measures({m: split.scores[m] for m in measures}, target, max_quality_loss=eps,
                                    delta=delta, claim=claim)  # type: ignore[arg-type]

    def plan(split: Split, claim: str, n: int = 1000) -> dict[str, float]:
        target = split.correct if claim == "accuracy" else split.agree
        (row,) = plan_quality({m: split.scores[m] for m in measures}, target, max_quality_loss=eps, delta=delta,
                              claim=claim, sizes=[n], replicates=replicates, seed=seed)  # type: ignore[arg-type]
        return {"share": row.share, "low": row.low, "high": row.high, "at": n}

    out: dict[str, Any] = {"n_cal": len(cal), "n_test": len(test), "n_pool": len(pool), "measures": measures,
                           "small_accuracy": float(test.correct[:, 0].mean()),
                           "large_accuracy": float(test.correct[:, 1].mean()),
                           "test_agreement": float(test.agree[:, 0].mean())}
    out["labelled"] = _check(*fit(cal, "accuracy"), test)
    out["label_free"] = _check(*fit(pool, "disagreement"), test)
    p1000 = pool.head(1000)
    out.update(_combined(cal, test, pool, eps=eps, delta=delta, seed=seed))
    out["label_free_by_n"] = {str(k): _check(*fit(pool.head(k), "disagreement"), test)
                              for k in (300, 1000) if k < len(pool)}
    real_free = out["label_free_by_n"].get("1000", out["label_free"])["fit_share"]  # the fit on p1000, made above
    real_lab = fit(p1000, "accuracy")[1].stats.large_share
    out["planner"] = {"n_real": len(p1000),
                      "accuracy": {"pilot": "300 labelled", **plan(cal, "accuracy"), "real": real_lab},
                      "disagreement": {"pilot": "300 labelled", **plan(cal, "disagreement"), "real": real_free},
                      "disagreement_unlabeled_pilot": {"pilot": "first 300 pool prompts",
                                                       **plan(pool.head(300), "disagreement"), "real": real_free}}
    if len(pool) > 1000:  # a larger unlabeled pilot predicting the whole pool's fit
        out["planner"]["disagreement_unlabeled_1000"] = {
            "pilot": "first 1,000 pool prompts", **plan(p1000, "disagreement", len(pool)),
            "real": out["label_free"]["fit_share"]}
    m = out["labelled"]["measure"]
    sw = common_sweep(cal.scores[m], cal.correct)
    ok = np.flatnonzero(upper_bounds(sw.harmed, sw.helped, sw.n, delta / len(measures), "discordant") <= eps)
    aucs = {k: auc(share_curve(cal.scores[k], cal.correct).share, share_curve(cal.scores[k], cal.correct).accuracy)
            for k in measures}
    best_auc = max(aucs, key=aucs.__getitem__)
    by_auc = fit_quality(cal.scores[best_auc], cal.correct, max_quality_loss=eps, delta=delta / len(measures))
    out["sequence"] = {"fixed_sequence": out["labelled"]["fit_share"],
                       "best_point_same_bound": float(sw.large_share[ok].min()) if ok.size else 1.0,
                       "best_auc_measure": best_auc, "best_auc_share": by_auc.stats.large_share,
                       "least_escalation_measure": m, "least_escalation_share": out["labelled"]["fit_share"]}
    return out


def _combined(cal: Split, test: Split, pool: Split, *, eps: float, delta: float, seed: int) -> dict[str, Any]:
    """Both claims with the ``combined`` measure (:mod:`calibration.combine`: weights and answer offsets fitted
    on a seeded half of the fit data to predict a wrong answer, resp. a differing one; the thresholds
    certified at the full level on the other half), each checked on test. Empty where the splits lack the
    measures it combines."""
    from calibration.combine import fit_quality_combined
    from cascade.combined import default_measures

    names = [m for m in default_measures(cal.scores) if m in test.scores and m in pool.scores]
    if not names:
        return {}
    out = {}
    for key, split, claim in (("labelled_combined", cal, "accuracy"), ("label_free_combined", pool, "disagreement")):
        combos, fit = fit_quality_combined({m: split.scores[m] for m in names},
                                           split.correct if claim == "accuracy" else split.agree,
                                           max_quality_loss=eps, delta=delta, claim=claim,  # type: ignore[arg-type]
                                           seed=seed, answers=split.answers)
        scores = combos[0].scores({m: test.scores[m] for m in names}, test.answers)
        out[key] = _check("combined", fit, test, scores)
    return out


def evaluate(args: Any, data: Mapping[str, tuple[Any, list[dict[str, Any]]]]) -> dict[str, Any]:
    """Every (task, pair) whose generations are all cached; the others are listed as skipped."""
    from calibration.generation_cache import cached_generations
    from eval.setups import MODELS, PAIRS, gen_params

    choices = args.mode == "choices"
    setups, skipped = [], []
    for task, (td, pool) in data.items():
        params = gen_params(td.task)
        for pair in args.pairs:
            small, large = (MODELS[m] for m in PAIRS[pair])
            splits = []
            for exs in (td.cal, td.test, pool):
                gs = cached_generations(small.identity, exs, params, args.cache, choices=choices)
                gl = cached_generations(large.identity, exs, params, args.cache, choices=choices)
                n = next((i for i, (a, b) in enumerate(zip(gs, gl)) if a is None or b is None), len(exs))
                splits.append(split_arrays(exs[:n], gs[:n], gl[:n]))  # the pool: its cached prefix
            cal, test, pl = splits
            if len(cal) < len(td.cal) or len(test) < len(td.test) or len(pl) < 300:
                skipped.append(f"{task} / {pair}: cal {len(cal)}, test {len(test)}, pool {len(pl)} cached")
                continue
            res = evaluate_setup(cal, test, pl, eps=args.max_quality_loss, delta=1.0 - args.confidence,
                                 replicates=args.replicates, seed=args.seed)
            setups.append({"task": task, "pair": pair, **res})
    return {"settings": {"prompts": args.prompts, "mode": args.mode, "eps": args.max_quality_loss,
                         "confidence": args.confidence, "n_pool": args.n_pool, "replicates": args.replicates,
                         "limit_cal": args.limit_cal, "limit_test": args.limit_test, "seed": args.seed},
            "setups": setups, "skipped": skipped}


def _pct(x: float) -> str:
    return f"{x:.1%}"


def _per_pair(rows: Sequence[Mapping[str, Any]], lab: str, free: str, eps: float) -> list[str]:
    """One summary line per pair: on how many tasks the ``free`` fit escalates less on test than the ``lab``
    one (and, for other fits than the single measures', than the labelled single-measure fit), and whether
    every test loss held."""
    out = []
    for pair in dict.fromkeys(r["pair"] for r in rows):
        mine = [r for r in rows if r["pair"] == pair]
        wins = sum(r[free]["test_share"] < r[lab]["test_share"] for r in mine)
        held = all(r[k]["test_loss"] <= eps + 1e-12 for r in mine for k in (lab, free))
        name, vs = pair, ""
        if lab != "labelled":
            name = f"{pair}, {lab.removeprefix('labelled_')}"
            single = sum(r[free]["test_share"] < r["labelled"]["test_share"] for r in mine)
            vs = f" (than labelled single measures: {single})"
        out.append(f"\n{name}: label-free escalates less on {wins} of {len(mine)} tasks{vs}; the accuracy loss on "
                   f"test is within {eps:.0%} in {'every' if held else 'NOT every'} setup")
    return out


def render(report: Mapping[str, Any]) -> str:
    """Three markdown tables (the goal, the planner, the sequence) and a summary line per pair."""
    st, rows = report["settings"], report["setups"]
    eps = st["eps"]
    lines = [f"prompts {st['prompts']}, mode {st['mode']}; target: accuracy loss <= {eps:.0%} at "
             f"{st['confidence']:.0%} confidence; every measure at delta/M, the least escalation kept", "",
             "| task | pair | acc small / large (test) | labelled 300: share fit / test, test loss | label-free 300 | "
             "label-free 1,000 | label-free, all n: share fit / test, test loss, test differ | label-free escalates "
             "less |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lab, free, by_n = r["labelled"], r["label_free"], r.get("label_free_by_n", {})
        small = " | ".join(f"{_pct(by_n[k]['fit_share'])} / {_pct(by_n[k]['test_share'])}, {by_n[k]['test_loss']:+.1%}"
                           if k in by_n else "-" for k in ("300", "1000"))
        lines.append(f"| {r['task']} | {r['pair']} | {r['small_accuracy']:.3f} / {r['large_accuracy']:.3f} | "
                     f"{_pct(lab['fit_share'])} / {_pct(lab['test_share'])}, {lab['test_loss']:+.1%} | {small} | "
                     f"n={r['n_pool']}: {_pct(free['fit_share'])} / {_pct(free['test_share'])}, "
                     f"{free['test_loss']:+.1%}, {_pct(free['test_disagreement'])} | "
                     f"{'yes' if free['test_share'] < lab['test_share'] else 'no'} |")
    lines += _per_pair(rows, "labelled", "label_free", eps)
    both = [r for r in rows if "label_free_combined" in r]
    if both:
        lines += ["", "The combined measure (weights and answer offsets fitted on half of the fit data, thresholds "
                  "certified on the other half, at the full level):", "",
                  "| task | pair | labelled 300, combined: share fit / test, test loss | label-free, combined: share "
                  "fit / test, test loss, test differ | label-free combined escalates less |", "|---|---|---|---|---|"]
        for r in both:
            lab, free = r["labelled_combined"], r["label_free_combined"]
            lines.append(f"| {r['task']} | {r['pair']} | {_pct(lab['fit_share'])} / {_pct(lab['test_share'])}, "
                         f"{lab['test_loss']:+.1%} | n={r['n_pool']}: {_pct(free['fit_share'])} / "
                         f"{_pct(free['test_share'])}, {free['test_loss']:+.1%}, {_pct(free['test_disagreement'])} | "
                         f"{'yes' if free['test_share'] < lab['test_share'] else 'no'} |")
        lines += _per_pair(both, "labelled_combined", "label_free_combined", eps)
    lines += ["", "| task | pair | claim (pilot) | predicted at n [10%-90%] | real fit at n | error |",
              "|---|---|---|---|---|---|"]
    for r in rows:
        for claim, p in r["planner"].items():
            if claim == "n_real":
                continue
            lines.append(f"| {r['task']} | {r['pair']} | {claim} ({p['pilot']}) | {_pct(p['share'])} "
                         f"[{_pct(p['low'])}-{_pct(p['high'])}] | {_pct(p['real'])} "
                         f"(n={p.get('at', r['planner']['n_real'])}) | "
                         f"{(p['share'] - p['real']) * 100:+.1f} pts |")
    lines += ["", "| task | pair | fixed sequence | best point, same bound (not valid) | best AUC measure at "
              "delta/M | least escalation at delta/M (adopted) |", "|---|---|---|---|---|---|"]
    for r in rows:
        s = r["sequence"]
        lines.append(f"| {r['task']} | {r['pair']} | {_pct(s['fixed_sequence'])} | {_pct(s['best_point_same_bound'])} "
                     f"| {_pct(s['best_auc_share'])} ({s['best_auc_measure']}) | {_pct(s['least_escalation_share'])} "
                     f"({s['least_escalation_measure']}) |")
    if report["skipped"]:
        lines.append("\nskipped: " + "; ".join(report["skipped"]))
    return "\n".join(lines)
