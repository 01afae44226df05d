"""Side-by-side summary of several ``eval.quality`` reports (prompt sets x answer modes).

Reads each report folder's ``results.json`` and prints, per report, the small and large accuracy of every
setup and the headline numbers (wins over the best trained router, mean test APGR of the calibration-chosen
measure, setups above random), as markdown for ``eval/RESULTS.md``::

    python -m eval.compare results/eval-plain-free results/eval-plain-choices results/eval-tuned-free ...
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["accuracy_table", "headline_table", "main"]


def _label(report: Mapping[str, Any]) -> str:
    st = report["settings"]
    return f"{st.get('prompts', 'tuned')} / {st.get('mode', 'free')}"


def _f(x: float | None) -> str:
    return "n/a" if x is None or not math.isfinite(x) else f"{x:.3f}"


def headline_table(reports: Sequence[Mapping[str, Any]]) -> str:
    """One row per report: setups, wins, significant wins/losses, mean chosen APGR, above random."""
    lines = ["| prompts / mode | setups | wins vs best router | significant wins / losses | mean APGR (chosen) | "
             "mean APGR margin_first | above random (0.5) |", "|---|---|---|---|---|---|---|"]
    for r in reports:
        sm = r["summary"]
        lines.append(f"| {_label(r)} | {sm['setups']} | {sm['uncertainty_wins']} of {sm['compared_with_routers']} | "
                     f"{sm['significant_wins']} / {sm['significant_losses']} | {_f(sm.get('mean_chosen_apgr'))} | "
                     f"{_f(sm['mean_test_apgr'].get('margin_first'))} | {sm['best_measure_beats_random']} |")
    return "\n".join(lines) + "\n"


def accuracy_table(reports: Sequence[Mapping[str, Any]]) -> str:
    """Small / large test accuracy and the chosen measure's APGR per setup, one column group per report."""
    keys: list[tuple[str, str]] = []
    by: list[dict[tuple[str, str], Mapping[str, Any]]] = []
    for r in reports:
        table = {(s["task"], s["pair"]): s for s in r["setups"]}
        by.append(table)
        keys += [k for k in table if k not in keys]
    head = "| task | pair | " + " | ".join(f"{_label(r)}: small / large acc, APGR (measure)" for r in reports) + " |"
    lines = [head, "|---|---|" + "---|" * len(reports)]
    for key in keys:
        cells = []
        for table in by:
            s = table.get(key)
            if s is None:
                cells.append("n/a")
                continue
            best = s["best_measure"]
            win = " *" if s.get("uncertainty_wins") else ""
            cells.append(f"{_f(s['small_accuracy'])} / {_f(s['large_accuracy'])}, "
                         f"{_f(s['signals'][best]['apgr'][0])} ({best}){win}")
        lines.append(f"| {key[0]} | {key[1]} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n\n`*` = the chosen measure beats every trained router on test.\n"


def main(argv: Sequence[str] | None = None) -> int:
    """Print the comparison of the given report folders; returns the exit code."""
    p = argparse.ArgumentParser(prog="python -m eval.compare", description=__doc__.split("\n\n")[0])
    p.add_argument("reports", nargs="+", help="report folders of eval.quality (each with results.json)")
    args = p.parse_args(argv)
    reports = []
    for folder in args.reports:
        path = Path(folder) / "results.json"
        try:
            reports.append(json.loads(path.read_text()))
        except (OSError, ValueError) as exc:
            print(f"error: cannot read {path}: {exc}", file=sys.stderr)
            return 2
    print(headline_table(reports))
    print(accuracy_table(reports))
    return 0


if __name__ == "__main__":
    sys.exit(main())
