"""How much escalation the testing sequence of a quality guarantee leaves on the table (issue 17, item 3).

Seeded synthetic draws of two-tier calibration sets with known population loss, fitted for the same target
(accuracy loss <= eps against the last tier, confidence 1 - delta, the discordant bound of
:mod:`calibration.certify`) by:

- ``fixed sequence``: the adopted procedure, every threshold in one sequence at level delta;
- ``best point, same bound``: the smallest share whose bound is <= eps anywhere -- NOT valid (it picks the
  noise's luckiest point); the limit of what any sequence could reach with this bound;
- ``20-share grid``: fixed-sequence over 20 shares (95% .. 0%), their thresholds placed with *independent*
  data (a free, perfectly valid placement no user has; the best case for a grid);
- ``4 sequences``: four fixed sequences starting at shares 100/75/50/25%, each at delta/4 (independent
  placement again), the smallest certified share kept;
- ``+ small-alone test``: the sequence at 0.9 delta, plus "never escalate" tested alone at 0.1 delta.

Then several measures (a good, a half-good and a noise score of the same examples), fitted at delta/M: the
measure with the best AUC against the one whose sequence certifies the least escalation
(:func:`calibration.fit.fit_quality_measures`, adopted). Every row reports the mean certified large share and
the share of draws whose population loss exceeds eps (must be <= delta for a valid procedure). ::

    python -m eval.sequences [--draws 200] [--ns 150 300 1000 3000] [--report-json PATH]
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float64]


@dataclass(frozen=True)
class Population:
    """Two tiers: score ``s ~ U(0, 1)``; the small tier is right w.p. ``a - b s``, the large one w.p. ``p_large``;
    with probability ``rho`` both draw on the same uniform (correlated errors), which leaves the risk unchanged:
    ``R(lam) = int_0^lam (p_large - a + b s) ds``."""

    name: str
    a: float
    b: float
    p_large: float
    rho: float

    def risk(self, lam: float) -> float:
        """Population accuracy loss against the large tier of threshold ``lam``."""
        x = min(max(lam, 0.0), 1.0)
        return x * (self.p_large - self.a) + self.b * x * x / 2

    def draw(self, n: int, rng: np.random.Generator) -> tuple[FloatArray, npt.NDArray[np.bool_]]:
        """Scores ``(n,)`` and correctness ``(n, 2)``."""
        s = rng.uniform(size=n)
        u = rng.uniform(size=n)
        v = np.where(rng.uniform(size=n) < self.rho, u, rng.uniform(size=n))
        return s, np.column_stack([u < self.a - self.b * s, v < self.p_large])


POPULATIONS = (
    Population("equal accuracy, weak signal (the issue's case)", 0.86, 0.10, 0.81, 0.3),
    Population("equal accuracy, good signal", 1.00, 0.38, 0.81, 0.5),
    Population("large 9 points better, good signal", 1.07, 0.50, 0.91, 0.5),
    Population("large 11 points better, weak signal", 0.85, 0.22, 0.82, 0.3),
)


def _counts(lam: FloatArray, s: FloatArray, c: npt.NDArray[np.bool_]) -> tuple[Any, Any]:
    acc = s[None, :] <= lam[:, None]
    return (acc & ~c[:, 0] & c[:, 1]).sum(1), (acc & c[:, 0] & ~c[:, 1]).sum(1)


def procedures(eps: float, delta: float) -> dict[str, Callable[..., float]]:
    """Each procedure: ``(s, c, placement_scores) -> certified threshold``."""
    from calibration.certify import fixed_sequence, upper_bounds
    from calibration.fit import common_sweep

    def seq(s: FloatArray, c: Any, lams: FloatArray, dlt: float, safe_start: bool) -> float | None:
        h, p = _counts(lams, s, c)
        upper = upper_bounds(h, p, len(s), dlt, "discordant")
        if not safe_start and not upper[0] <= eps:
            return None
        return float(lams[fixed_sequence(upper, eps)])

    def fixed(s: FloatArray, c: Any, _: FloatArray, dlt: float = delta) -> float:
        sw = common_sweep(s, c)
        return float(sw.thresholds[fixed_sequence(upper_bounds(sw.harmed, sw.helped, sw.n, dlt, "discordant"), eps),
                                   0])

    def best_point(s: FloatArray, c: Any, _: FloatArray) -> float:
        sw = common_sweep(s, c)
        ok = np.flatnonzero(upper_bounds(sw.harmed, sw.helped, sw.n, delta, "discordant") <= eps)
        return float(sw.thresholds[ok[-1], 0]) if ok.size else -np.inf

    def grid(s: FloatArray, c: Any, place: FloatArray) -> float:
        lams = np.r_[-np.inf, np.quantile(place, 1.0 - np.linspace(0.95, 0.0, 20))]
        got = seq(s, c, lams, delta, True)
        return -np.inf if got is None else got

    def starts(s: FloatArray, c: Any, place: FloatArray) -> float:
        cands = np.r_[-np.inf, np.unique(s)]
        best = -np.inf
        for q in (0.0, 0.25, 0.5, 0.75):
            lo = -np.inf if q == 0.0 else float(np.quantile(place, q))
            got = seq(s, c, np.r_[lo, cands[cands > lo]], delta / 4, q == 0.0)
            best = max(best, got if got is not None else -np.inf)
        return best

    def small_alone(s: FloatArray, c: Any, place: FloatArray) -> float:
        h, p = _counts(np.array([np.inf]), s, c)
        if upper_bounds(h, p, len(s), 0.1 * delta, "discordant")[0] <= eps:
            return float("inf")
        return fixed(s, c, place, 0.9 * delta)

    return {"fixed sequence (adopted)": fixed, "best point, same bound (NOT valid)": best_point,
            "20-share grid": grid, "4 sequences at delta/4": starts, "+ small-alone test": small_alone}


def run_sequences(ns: Sequence[int], draws: int, eps: float, delta: float, seed: int) -> list[dict[str, Any]]:
    """Mean certified share and violation rate of every procedure, per population and n."""
    rows = []
    procs = procedures(eps, delta)
    for pop in POPULATIONS:
        for n in ns:
            rng = np.random.default_rng(seed)
            share = {k: 0.0 for k in procs}
            bad = {k: 0 for k in procs}
            for _ in range(draws):
                s, c = pop.draw(n, rng)
                place = pop.draw(20_000, rng)[0]
                for name, fit in procs.items():
                    lam = fit(s, c, place)
                    share[name] += float((s > lam).mean()) / draws
                    bad[name] += pop.risk(lam) > eps
            rows.append({"population": pop.name, "n": n,
                         **{k: {"share": share[k], "violations": bad[k] / draws} for k in procs}})
            print(f"{pop.name} n={n}: " + ", ".join(f"{k} {share[k]:.3f}" for k in procs), file=sys.stderr)
    return rows


def run_measures(ns: Sequence[int], draws: int, eps: float, delta: float, seed: int) -> list[dict[str, Any]]:
    """Three measures at delta/3: the best-AUC measure's fit against the least-escalation choice."""
    from calibration.fit import fit_quality, fit_quality_measures
    from calibration.metrics import auc, share_curve

    pop = POPULATIONS[2]
    rows = []
    for n in ns:
        rng = np.random.default_rng(seed)
        out = {"best AUC at delta/3": [0.0, 0], "least escalation at delta/3 (adopted)": [0.0, 0]}
        for _ in range(draws):
            good, noise = rng.uniform(size=n), rng.uniform(size=n)
            half = np.where(rng.uniform(size=n) < 0.5, good, rng.uniform(size=n))
            c = np.column_stack([rng.uniform(size=n) < pop.a - pop.b * good, rng.uniform(size=n) < pop.p_large])
            scores = {"noise": noise, "half": half, "good": good}

            def risk(m: str, lam: float) -> float:
                x = min(max(lam, 0.0), 1.0)
                lin = x * (pop.p_large - pop.a + pop.b / 2)
                return {"good": pop.risk(lam), "noise": lin, "half": (pop.risk(lam) + lin) / 2}[m]

            curves = {m: share_curve(v, c) for m, v in scores.items()}
            m_auc = max(scores, key=lambda m: auc(curves[m].share, curves[m].accuracy))
            f_auc = fit_quality(scores[m_auc], c, max_quality_loss=eps, delta=delta / 3)
            m_min, f_min = fit_quality_measures(scores, c, max_quality_loss=eps, delta=delta)
            for key, m, f in (("best AUC at delta/3", m_auc, f_auc),
                              ("least escalation at delta/3 (adopted)", m_min, f_min)):
                out[key][0] += f.stats.large_share / draws
                out[key][1] += risk(m, f.thresholds[0]) > eps
        rows.append({"population": pop.name + ", three measures", "n": n,
                     **{k: {"share": v[0], "violations": v[1] / draws} for k, v in out.items()}})
    return rows


def render(rows: Sequence[dict[str, Any]]) -> str:
    """A markdown table: one row per population and n, ``share (violations)`` per procedure."""
    keys = [k for k in rows[0] if k not in ("population", "n")]
    head = "| population | n | " + " | ".join(keys) + " |"
    lines = [head, "|" + "---|" * (len(keys) + 2)]
    for r in rows:
        cells = " | ".join(f"{r[k]['share']:.3f} ({r[k]['violations']:.1%})" for k in keys)
        lines.append(f"| {r['population']} | {r['n']} | {cells} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Print both tables (mean certified large share, and in brackets the share of draws missing eps)."""
    p = argparse.ArgumentParser(prog="python -m eval.sequences", description=__doc__.split("\n\n")[0])
    p.add_argument("--ns", type=int, nargs="+", default=[150, 300, 1000, 3000])
    p.add_argument("--draws", type=int, default=200)
    p.add_argument("--max-quality-loss", type=float, default=0.05)
    p.add_argument("--confidence", type=float, default=0.9)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--report-json", type=Path)
    a = p.parse_args(argv)
    delta = 1.0 - a.confidence
    seq = run_sequences(a.ns, a.draws, a.max_quality_loss, delta, a.seed)
    meas = run_measures(a.ns, a.draws, a.max_quality_loss, delta, a.seed)
    print(f"target: accuracy loss <= {a.max_quality_loss} at confidence {a.confidence}; {a.draws} draws per row; "
          "mean certified large share (share of draws whose population loss exceeds the target)\n")
    print(render(seq) + "\n\n" + render(meas))
    if a.report_json:
        a.report_json.write_text(json.dumps({"sequences": seq, "measures": meas}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
