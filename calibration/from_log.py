"""Refit thresholds from live traffic: ``cascade-calibrate --from-log shadow.jsonl``.

A running cascade with ``monitor: {shadow_rate: r, log_path: ...}`` (:mod:`cascade.shadow`) logs a uniform
sample of the requests on its own thresholds, each with the first tier's complete answer, its uncertainty
scores and the last tier's answer. The last tier's answer serves as the label: the small answer is "right"
when it is the same answer (the record's ``agree``, decided by the artifact's scorer), the last tier always
is. That is exactly the agreement matrix of the ``disagreement`` claim (:mod:`calibration.certify`), so a
quality fit certifies, at the confidence asked, that the share of answers that differ from the last tier's
is at most the target, and therefore that the accuracy loss against always using the last tier is too,
whatever the ground truth. The guarantee is against the last tier's answers, not against labels: the report
and the artifact say so.

Only sampled records (``"sampled": true``) are used: the extra escalated records of ``log_escalated`` would
over-represent escalated traffic. Two-tier cascades only (the log holds the first and the last tier).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from calibration.artifact import artifact_from_fit, data_fingerprint
from calibration.fit import FitResult, fit_budget, fit_quality, measured_curve
from calibration.pipeline import widen_curve, widen_thresholds
from cascade.artifact import Artifact
from cascade.config import CascadeConfig
from cascade.errors import InvalidRequestError
from cascade.run_lines import read_lines

__all__ = ["LogData", "fit_from_log", "read_log", "refit_from_log"]


class LogData:
    """The sampled pairs of a shadow log: ``scores[measure]`` (n,) per measure and ``agree`` (n,)."""

    def __init__(self, scores: dict[str, np.ndarray], agree: np.ndarray, tiers: tuple[str, str], raw: bytes,
                 skipped: int) -> None:
        self.scores, self.agree, self.tiers, self.raw, self.skipped = scores, agree, tiers, raw, skipped

    def __len__(self) -> int:
        return int(self.agree.size)


def read_log(path: str | Path) -> LogData:
    """Read a shadow log, refusing a malformed line with ``file:line: ...``.

    Raises:
        InvalidRequestError: unreadable, malformed, mixed tiers, or no sampled record.
    """
    p = Path(path)
    try:
        raw = p.read_bytes()
    except OSError as exc:
        raise InvalidRequestError(f"cannot read shadow log {path}: {exc}") from None
    rows: list[tuple[dict[str, Any], bool]] = []
    tiers: set[tuple[str, str]] = set()
    skipped = 0
    for number, line in read_lines(p):
        text = line.strip()
        if not text:
            continue
        try:
            rec = json.loads(text)
        except ValueError as exc:
            raise InvalidRequestError(f"{path}:{number}: not JSON: {str(exc)[:120]}") from None
        if not isinstance(rec, Mapping) or not isinstance(rec.get("scores"), Mapping) \
                or not isinstance(rec.get("agree"), bool) or not isinstance(rec.get("sampled"), bool):
            raise InvalidRequestError(f"{path}:{number}: not a shadow record (needs scores, agree, sampled)")
        if not rec["sampled"]:
            skipped += 1
            continue
        tiers.add((str(rec.get("tier")), str(rec.get("last_tier"))))
        rows.append((dict(rec["scores"]), rec["agree"]))
    if not rows:
        raise InvalidRequestError(f"{path}: no sampled shadow record (set monitor.shadow_rate > 0)")
    if len(tiers) != 1:
        raise InvalidRequestError(f"{path}: records of several tier pairs {sorted(tiers)}: refit a two-tier "
                                  "cascade from its own log")
    names = {k for scores, _ in rows for k in scores}
    scores = {k: np.array([_score(s.get(k)) for s, _ in rows]) for k in sorted(names)}
    return LogData(scores, np.array([a for _, a in rows], dtype=bool), tiers.pop(), raw, skipped)


def _score(x: object) -> float:
    """A logged score; a missing one escalates (as NaN does in the engine)."""
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) else math.inf


def fit_from_log(log: LogData, *, models: Sequence[str], measure: str, method: str, target: float,
                 confidence: float = 0.9, previous: Artifact | None = None) -> tuple[Artifact, FitResult]:
    """Fit a two-tier artifact on the logged pairs, the last tier's answers as labels.

    Args:
        log: the sampled pairs.
        models: the cascade's two model names.
        measure: the uncertainty measure (must be in the log's scores).
        method: ``"quality"`` (``target`` = max disagreement, certified) or ``"budget"`` (max large share).
        target: the method's target.
        confidence: the quality fit's confidence.
        previous: the artifact now served, whose choice priors the logged scores were computed under (kept).

    Raises:
        InvalidRequestError: the measure is not in the log, or more than two models.
    """
    if len(models) != 2:
        raise InvalidRequestError("--from-log refits two-tier cascades (the log holds the first and last tier)")
    if measure not in log.scores:
        raise InvalidRequestError(f"the log has no {measure!r} scores; it has {sorted(log.scores)}")
    s = log.scores[measure]
    correct = np.stack([log.agree, np.ones_like(log.agree)], axis=1)
    if method == "quality":
        fit = fit_quality(s, correct, max_quality_loss=target, delta=1.0 - confidence, claim="disagreement")
    elif method == "budget":
        fit = fit_budget(s, correct, max_large_share=target)
    else:
        raise InvalidRequestError(f"--from-log fits 'quality' or 'budget', not {method!r}")
    params = {**fit.params, "labels": "the last tier's answers (shadow log): the guarantee is against the last "
              "tier's answers, not against ground truth", "pairs": len(log)}
    fit = FitResult(widen_thresholds(fit.thresholds, s), fit.method, params, fit.stats, fit.feasible, fit.message)
    curve = widen_curve(measured_curve(s, correct), s)
    art = artifact_from_fit(fit, models=models, measure=measure, data_fingerprint=data_fingerprint(log.raw),
                            curve=curve)
    if previous is not None and previous.choice_priors:
        from dataclasses import replace

        art = replace(art, choice_priors=previous.choice_priors)
    return art, fit


def refit_from_log(a: argparse.Namespace, cfg: CascadeConfig) -> int:
    """``cascade-calibrate --from-log``: refit the served cascade's thresholds from its shadow log, print what was
    fitted, save the artifact; returns the exit code."""
    served = a.artifact or cfg.artifact
    previous = Artifact.load(served) if served else None
    measure = a.measure or cfg.measure or (previous.measure if previous is not None else "margin_first")
    log = read_log(a.from_log)
    method = "quality" if a.max_quality_loss is not None else "budget"
    target = a.max_quality_loss if method == "quality" else a.max_large_share
    art, fit = fit_from_log(log, models=[t.backend.model for t in cfg.tiers], measure=measure, method=method,
                            target=target, confidence=a.confidence, previous=previous)
    print(f"{len(log)} sampled shadow pairs from {a.from_log} ({log.skipped} unsampled records left out), "
          f"tiers {log.tiers[0]!r} -> {log.tiers[1]!r}, measure {measure}")
    print(fit.message)
    print("labels: the last tier's answers; the guarantee is against the last tier's answers, not ground truth")
    art.save(a.out)
    print(f"\nartifact written to {a.out}", file=sys.stderr)
    return 0
