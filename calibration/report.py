"""What ``cascade-calibrate`` reports: measure comparison, operating points, Pareto front, plot, JSON.

Every function here is pure numpy over the calibration arrays (shapes as in :mod:`calibration.metrics`:
``scores (n, N-1)``, ``correct (n, N)``, ``costs (n, N)``) or formats a finished report dict. The report
dict is JSON-ready after :func:`jsonable` (infinite thresholds become the strings ``"inf"``/``"-inf"``, as
in the artifact). matplotlib is imported only by :func:`plot`.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from calibration.fit import common_sweep, grid_search, pareto_index
from calibration.metrics import CascadeStats, apgr, auc, oracle_curve, random_curve, simulate
from calibration.pipeline import answering_tiers, widen_thresholds
from cascade.atomic_files import replacing

__all__ = [
    "held_out_check",
    "jsonable",
    "levels_section",
    "measure_summary",
    "operating_points",
    "pareto_section",
    "plot",
    "render_text",
    "stats_dict",
    "thin",
]

_CURVE_POINTS = 401  # points per curve kept in the report (and drawn)
_FRONT_ROWS = 12  # Pareto rows printed in the terminal


def thin(n: int, keep: int) -> npt.NDArray[np.int64]:
    """At most ``keep`` evenly spaced indices of ``range(n)``, always both ends."""
    return np.unique(np.rint(np.linspace(0, n - 1, min(n, keep))).astype(np.int64))


def stats_dict(st: CascadeStats, thresholds: Sequence[float] | None = None) -> dict[str, Any]:
    """A JSON-ready summary of one operating point."""
    out: dict[str, Any] = {"accuracy": st.accuracy, "large_share": st.large_share, "mean_cost": st.mean_cost,
                           "answered": list(st.answered), "n": st.n}
    if thresholds is not None:
        out["thresholds"] = [float(t) for t in thresholds]
    return out


def measure_summary(scores: Mapping[str, npt.ArrayLike], correct: npt.ArrayLike,
                    costs: npt.ArrayLike) -> dict[str, dict[str, Any]]:
    """Each measure's accuracy-vs-large-share curve (one common threshold for every stage) and its AUC.

    Args:
        scores: measure name -> ``(n, N-1)`` scores.
        correct: ``(n, N)``; costs: ``(n, N)``.

    Returns:
        ``{measure: {"auc", "apgr", "curve": {"large_share", "accuracy", "mean_cost"}}}``; the curve has at
        most 401 points, large share descending from 1 to 0. APGR is NaN when the last tier is not better.
    """
    out = {}
    for name, s in scores.items():
        cand = common_sweep(s, correct, costs)
        share, acc = cand.large_share, cand.accuracy
        keep = thin(len(acc), _CURVE_POINTS)
        out[name] = {"auc": auc(share, acc), "apgr": apgr(share, acc),
                     "curve": {"large_share": share[keep].tolist(), "accuracy": acc[keep].tolist(),
                               "mean_cost": cand.mean_cost[keep].tolist()}}
    return out


def reference_curves(correct: npt.ArrayLike) -> dict[str, Any]:
    """Random routing and the oracle between the first and the last tier (exact for two tiers)."""
    c = np.asarray(correct, dtype=np.bool_)[:, [0, -1]]
    rnd, orc = random_curve(c), oracle_curve(c)
    return {"random": {"large_share": rnd.share.tolist(), "accuracy": rnd.accuracy.tolist()},
            "oracle": {"large_share": orc.share.tolist(), "accuracy": orc.accuracy.tolist()},
            "oracle_auc": auc(orc.share, orc.accuracy), "random_auc": auc(rnd.share, rnd.accuracy)}


def operating_points(scores: npt.ArrayLike, correct: npt.ArrayLike, costs: npt.ArrayLike,
                     thresholds: Sequence[float], tier_names: Sequence[str],
                     shares: Sequence[float] = (0.1, 0.25, 0.5, 0.75)) -> list[dict[str, Any]]:
    """Rows of the terminal table: every tier alone, the chosen cascade, other shares, random and oracle.

    The "cascade @ share r" rows use one common threshold (the largest measured share <= r); random and
    oracle rows are at the chosen cascade's large share, between the first and the last tier.
    """
    s, c, k = np.asarray(scores, dtype=np.float64), np.asarray(correct, dtype=np.bool_), np.asarray(costs)
    rows = []
    for j, name in enumerate(tier_names):
        rows.append({"label": f"{name} alone", "accuracy": float(c[:, j].mean()),
                     "large_share": 1.0 if j == len(tier_names) - 1 else 0.0, "mean_cost": float(k[:, j].mean())})
    chosen = simulate(thresholds, s, c, k).stats()
    rows.append({"label": "cascade (chosen)", "chosen": True, **stats_dict(chosen, thresholds)})
    cand = common_sweep(s, c, k)
    for r in shares:
        i = int(np.flatnonzero(cand.large_share <= r + 1e-12)[0])
        rows.append({"label": f"cascade @ share <= {r:.0%}",
                     **stats_dict(cand.stats(i), widen_thresholds(cand.thresholds[i], s))})
    small, large = float(c[:, 0].mean()), float(c[:, -1].mean())
    x = chosen.large_share
    orc = oracle_curve(c[:, [0, -1]])
    rows.append({"label": "random @ chosen share", "accuracy": small + x * (large - small), "large_share": x,
                 "mean_cost": float((1.0 - x) * k[:, 0].mean() + x * k[:, -1].mean())})
    rows.append({"label": "oracle @ chosen share", "accuracy": float(np.interp(x, orc.share, orc.accuracy)),
                 "large_share": x, "mean_cost": float("nan")})
    return rows


def pareto_section(scores: npt.ArrayLike, correct: npt.ArrayLike, costs: npt.ArrayLike,
                   chosen: CascadeStats, *, max_grid: int = 4096) -> dict[str, Any]:
    """The (mean cost, accuracy) Pareto front of the threshold combinations searched, chosen point marked.

    Two tiers: every distinct threshold. N tiers: the joint grid of :func:`calibration.fit.grid_search`.
    Without prices (all costs 0) the large share stands in for the cost. Thresholds are moved off the data
    values as the fitted ones are (:func:`calibration.pipeline.widen_thresholds`).
    """
    c, k = np.asarray(correct, dtype=np.bool_), np.asarray(costs, dtype=np.float64)
    two = c.shape[1] == 2
    cand = common_sweep(scores, c, k) if two else grid_search(scores, c, k, max_grid=max_grid)
    priced = bool(np.any(k != 0))
    x = cand.mean_cost if priced else cand.large_share
    idx = pareto_index(cand)  # the same front the fits choose from
    points = [stats_dict(cand.stats(int(i)), widen_thresholds(cand.thresholds[int(i)], scores)) for i in idx]
    cx = chosen.mean_cost if priced else chosen.large_share
    hit = [p for p, i in enumerate(idx) if abs(x[i] - cx) <= 1e-12 and abs(cand.accuracy[i] - chosen.accuracy) <= 1e-12]
    note = ""
    if not hit:
        better = [p for p, i in enumerate(idx) if x[i] <= cx + 1e-12 and cand.accuracy[i] >= chosen.accuracy - 1e-12]
        note = "the chosen thresholds are not on the front" + (
            f"; front point {better[0]} is at least as good" if better else " (outside the searched grid)")
    return {"x": "mean_cost" if priced else "large_share",
            "searched": len(cand.accuracy),
            "search": "every distinct threshold" if two else f"joint grid of per-stage thresholds (<= {max_grid})",
            "points": points, "chosen_index": hit[0] if hit else None, "note": note}


def _verdict(method: str, target: Mapping[str, float], test: Mapping[str, Any]) -> tuple[str, str]:
    if method == "budget":
        r = target["max_large_share"]
        return f"large share <= {r:.1%}", f"{'held' if test['large_share'] <= r + 1e-12 else 'MISSED'} " \
                                          f"(large share {test['large_share']:.1%})"
    if method == "quality":
        eps = target["max_quality_loss"]
        if test["claim"] == "disagreement":
            d = test["disagreement"]
            return (f"answers differing from the last tier's <= {eps:.2%}",
                    f"{'held' if d <= eps + 1e-12 else 'MISSED'} (differ {d:.2%})")
        loss = test["large_accuracy"] - test["accuracy"]
        return f"accuracy loss vs last tier <= {eps:.2%}", f"{'held' if loss <= eps + 1e-12 else 'MISSED'} " \
                                                          f"(loss {loss:+.2%})"
    return f"value {target['value_per_correct']:g} per correct answer", \
        f"net value {target['value_per_correct'] * test['accuracy'] - test['mean_cost']:.4g} per request (no pass/fail)"


def held_out_check(method: str, target: Mapping[str, float], names: Sequence[str], per_example: npt.ArrayLike,
                   scores: npt.ArrayLike, correct: npt.ArrayLike, costs: npt.ArrayLike, thresholds: Sequence[float],
                   source: str, *, claim: str = "accuracy", agreement: npt.ArrayLike | None = None,
                   labelled: npt.ArrayLike | None = None) -> dict[str, Any]:
    """The fitted cascade on held-out examples: accuracies, large share, cost, and whether the target held.

    Args:
        method, target: the fit's method and target (as given on the command line).
        names: tier names.
        per_example: ``(n, N-1)`` the thresholds of each held-out example (its cluster's in router mode); a
            ``-inf`` stage is skipped and costs nothing.
        scores: ``(n, N-1)`` its scores.
        correct: ``(n, N)`` correctness (rows of unlabeled examples are ignored).
        costs: ``(n, N)``.
        thresholds: the global thresholds (reported).
        source: how the held-out examples were chosen.
        claim: ``"disagreement"`` for a label-free fit: the verdict is on the share of answers differing from
            the last tier's, and the accuracy loss is reported on the labelled examples as well.
        agreement: ``(n, N)`` agreement with the last tier (the disagreement claim).
        labelled: ``(n,)`` which examples have labels (default: all).
    """
    per = np.asarray(per_example, dtype=np.float64)
    t = answering_tiers(per, scores)
    c, k = np.asarray(correct, dtype=np.bool_), np.asarray(costs, dtype=np.float64)
    n = len(t)
    lab = np.ones(n, dtype=np.bool_) if labelled is None else np.asarray(labelled, dtype=np.bool_)
    rows = np.arange(n)
    acc = float(c[rows, t][lab].mean()) if lab.any() else float("nan")
    called = np.c_[per > -np.inf, np.ones(n, dtype=np.bool_)]  # skipped stages cost nothing
    spent = np.cumsum(k * called, 1)[rows, t]
    st = CascadeStats.from_counts(n, acc, spent.mean(), np.bincount(t, minlength=len(names)))
    test: dict[str, Any] = {
        "n": n, "n_labelled": int(lab.sum()), "source": source, "claim": claim,
        "small_accuracy": float(c[lab, 0].mean()) if lab.any() else float("nan"),
        "large_accuracy": float(c[lab, -1].mean()) if lab.any() else float("nan"), **stats_dict(st, thresholds)}
    if agreement is not None:
        test["disagreement"] = float(1.0 - np.asarray(agreement, dtype=np.bool_)[rows, t].mean())
    test["target"], test["verdict"] = _verdict(method, target, test)
    test["held"] = test["verdict"].startswith("held") if method != "min_cost" else None
    if claim == "disagreement" and method == "quality" and lab.any():
        eps, loss = target["max_quality_loss"], test["large_accuracy"] - test["accuracy"]
        test["accuracy_loss"], test["accuracy_held"] = loss, bool(loss <= eps + 1e-12)
    test["points"] = [
        *({"label": f"{name} alone", "accuracy": float(c[lab, j].mean()) if lab.any() else float("nan"),
           "mean_cost": float(k[:, j].mean()), "large_share": float(j == len(names) - 1)}
          for j, name in enumerate(names)),
        {"label": "cascade (fitted)", "chosen": True, **stats_dict(st, thresholds)}]
    return test


def levels_section(fits: Sequence[Any], thresholds: Sequence[Sequence[float]], names: Sequence[str],
                   test: Mapping[str, Any] | None) -> list[dict[str, Any]]:
    """One row per certified level (ascending): its thresholds, bound and calibration numbers, and with held-out
    data (``test``: the keyword arguments of :func:`held_out_check` but the thresholds) whether it held there.

    Args:
        fits: the levels' :class:`calibration.fit.FitResult`.
        thresholds: their stored (widened) thresholds.
        names: tier names.
        test: ``{"scores", "correct", "costs", "source", "claim", "agreement", "labelled"}`` or None.
    """
    rows = []
    for f, ts in sorted(zip(fits, thresholds), key=lambda ft: float(ft[0].params["max_quality_loss"])):
        row: dict[str, Any] = {"max_quality_loss": f.params["max_quality_loss"], "feasible": f.feasible,
                               "certified_loss_bound": f.params["certified_loss_bound"],
                               "delta_per_level": f.params.get("delta_per_level", f.params["delta"]),
                               **stats_dict(f.stats, ts)}
        if test is not None:
            per = np.tile(np.asarray(ts, dtype=np.float64), (len(test["scores"]), 1))
            got = held_out_check("quality", {"max_quality_loss": float(f.params["max_quality_loss"])}, names, per,
                                 thresholds=ts, **test)
            row["test"] = {k: got.get(k) for k in ("n", "accuracy", "large_share", "mean_cost", "large_accuracy",
                                                   "disagreement", "held", "verdict")}
        rows.append(row)
    return rows


def jsonable(obj: Any) -> Any:
    """Nested data with numpy values as Python ones and non-finite floats as "inf"/"-inf"/None."""
    if isinstance(obj, Mapping):
        return {str(key): jsonable(v) for key, v in obj.items()}
    if isinstance(obj, (list, tuple, np.ndarray)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        f = float(obj)
        return f if math.isfinite(f) else (None if math.isnan(f) else ("inf" if f > 0 else "-inf"))
    return obj


def _fmt_t(ts: Sequence[Any]) -> str:
    return "[" + ", ".join(f"{float(t):.4f}" if isinstance(t, (int, float)) else str(t) for t in ts) + "]"


def _row(label: str, p: Mapping[str, Any], mark: str = " ") -> str:
    cost = p.get("mean_cost")
    cost_s = f"{cost:>11.4g}" if isinstance(cost, (int, float)) and math.isfinite(cost) else f"{'-':>11}"
    ts = _fmt_t(p["thresholds"]) if "thresholds" in p else ""
    a = p["accuracy"]
    acc_s = f"{a:>9.4f}" if isinstance(a, (int, float)) and math.isfinite(a) else f"{'-':>9}"
    return f"{mark} {label:<26} {acc_s} {p['large_share']:>11.1%} {cost_s}  {ts}"


def render_text(report: Mapping[str, Any]) -> str:
    """The terminal report: data, measures, operating points, Pareto front, held-out check, clusters."""
    d, fit = report["data"], report["fit"]
    lines = [f"data: {d['path']} ({d['n']} examples; fit on {d['n_fit']}, {d['split']}); scorer {d['scorer']!r}"]
    lines.append("tiers: " + " -> ".join(f"{t['name']}={t['model']}" for t in report["tiers"]))
    free = report.get("claim") == "disagreement"
    quality = "agreement" if free else "accuracy"
    if free:
        lines.append(f"label-free: answers compared with the last tier's ({d.get('same')!r} decides 'same'); "
                     f"'agreement' below is agreement with the last tier, not accuracy; "
                     f"{d.get('n_fit_labelled', 0)} fit lines have labels (reported, not used by the fit)")
    cp = report.get("choice_priors")
    if cp:
        sets = sorted({key for table in cp["priors"].values() for key in table})
        lines.append(f"choice priors: fitted on {cp['n']} requests ({cp['from']}), not on the fit data; "
                     f"{len(sets)} choice set(s), subtracted from every constrained answer")
    m = report["measure"]
    lines.append(f"\nmeasures (AUC of {quality} vs large share on the fit data; oracle "
                 f"{report['reference']['oracle_auc']:.4f}, random {report['reference']['random_auc']:.4f}):")
    for name, v in sorted(report["measures"].items(), key=lambda kv: -kv[1]["auc"]):
        ap = v["apgr"]
        ap_s = f"{ap:.3f}" if isinstance(ap, float) and math.isfinite(ap) else "n/a"
        lines.append(f"  {'*' if name == m['chosen'] else ' '} {name:<14} AUC {v['auc']:.4f}  APGR {ap_s}")
    lines.append(f"  measure: {m['chosen']} ({m['how']})")
    lines.append(f"\nfit: {fit['message']}")
    if fit["params"].get("family"):
        lines.append(f"family: {fit['params']['family']} ({fit['params']['family_why']})")
    lines.append(f"thresholds: {_fmt_t(fit['thresholds'])}" + ("" if fit["feasible"] else "  (target NOT met)"))
    lines.append(f"\n  {'operating point (fit data)':<26} {quality:>9} {'large share':>11} {'mean cost':>11}  "
                 "thresholds")
    for p in report["points"]:
        lines.append(_row(p["label"], p, "*" if p.get("chosen") else " "))
    par = report["pareto"]
    pts = par["points"]
    lines.append(f"\nPareto front ({par['x'].replace('_', ' ')} vs {quality}; {len(pts)} of {par['searched']} "
                 f"candidates, {par['search']}; * = chosen):")
    keep = set(thin(len(pts), _FRONT_ROWS).tolist())
    if par["chosen_index"] is not None:
        keep.add(par["chosen_index"])
    for i in sorted(keep):
        lines.append(_row(f"front[{i}]", pts[i], "*" if i == par["chosen_index"] else " "))
    if par["note"]:
        lines.append(f"  note: {par['note']}")
    test = report.get("test")
    if test:
        lines.append(f"\nheld-out check ({test['n']} examples, {test['source']}):")
        for p in test["points"]:
            lines.append(_row(p["label"], p, "*" if p.get("chosen") else " "))
        lines.append(f"  target: {test['target']} -> {test['verdict']}")
        if "accuracy_loss" in test:
            lines.append(f"  accuracy loss vs last tier on the {test['n_labelled']} labelled held-out examples: "
                         f"{test['accuracy_loss']:+.2%} ({'within' if test['accuracy_held'] else 'ABOVE'} the target)")
    if report.get("levels"):
        lines.append("\ncertified levels (for per-request max_quality_loss targets; all hold at once):")
        for lv in report["levels"]:
            t = lv.get("test")
            held = f"  held-out: share {t['large_share']:.1%}, {t['verdict']}" if t else ""
            lines.append(f"  <= {lv['max_quality_loss']:.2%}: bound {lv['certified_loss_bound']:.2%} at delta "
                         f"{lv['delta_per_level']:.4g}, share {lv['large_share']:.1%}, thresholds "
                         f"{_fmt_t(lv['thresholds'])}{'' if lv['feasible'] else ' (always last)'}{held}")
    clusters = report.get("clusters")
    if clusters:
        lines.append(f"\nper-cluster thresholds (router {clusters['router']}, embedder {clusters['embedder']}):")
        for cid, v in sorted(clusters["fits"].items(), key=lambda kv: int(kv[0])):
            flag = "" if v["feasible"] else "  (target not met: fallback)"
            lines.append(f"  cluster {cid}: n={v['n']:<5} thresholds {_fmt_t(v['thresholds'])} "
                         f"accuracy {v['accuracy']:.4f} large share {v['large_share']:.1%}{flag}")
    if report.get("hint"):
        lines.append(f"\n{report['hint']}")
    return "\n".join(lines)


def plot(report: Mapping[str, Any], path: str | os.PathLike[str]) -> Path:
    """Accuracy vs large-model share for every measure, with random routing, the oracle and the chosen point.

    Written atomically (temporary file, then rename). Uses matplotlib's Agg canvas without pyplot.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.5, 5.0), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    chosen = report["measure"]["chosen"]
    for name, v in sorted(report["measures"].items(), key=lambda kv: -kv[1]["auc"]):
        cur = v["curve"]
        ax.plot(cur["large_share"], cur["accuracy"], lw=2.2 if name == chosen else 1.0,
                label=f"{name} (AUC {v['auc']:.3f})", zorder=3 if name == chosen else 2)
    ref = report["reference"]
    ax.plot(ref["random"]["large_share"], ref["random"]["accuracy"], "k--", lw=1, label="random routing")
    ax.plot(ref["oracle"]["large_share"], ref["oracle"]["accuracy"], "k:", lw=1.2,
            label=f"oracle (AUC {ref['oracle_auc']:.3f})")
    fit = report["fit"]
    ax.plot([fit["large_share"]], [fit["accuracy"]], "r*", ms=14, zorder=4,
            label=f"chosen ({fit['method']}, {chosen})")
    ax.set_xlabel("share of requests sent to the last tier")
    ax.set_ylabel("accuracy")
    ax.set_xlim(0.0, 1.0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    ax.set_title(" -> ".join(t["model"].rsplit("/", 1)[-1] for t in report["tiers"])
                 + f" (n={report['data']['n_fit']})", fontsize=9)
    fig.tight_layout()
    with replacing(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png")
    return Path(path)
