"""eval.labelfree: the setup numbers on synthetic splits, the tables, and waiting for a priority process."""

from __future__ import annotations

import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from eval.labelfree import _busy
from eval.labelfree_report import Split, evaluate_setup, render


def _split(n: int, rng: np.random.Generator) -> Split:
    """Two labels: the large answer is right w.p. 0.9, the small one agrees with it w.p. 1 - 0.5 s in its score s
    (so it is right exactly when it agrees with a right large answer or disagrees with a wrong one)."""
    s = rng.uniform(size=n)
    large = rng.uniform(size=n) < 0.9
    same = rng.uniform(size=n) < 1.0 - 0.5 * s
    c = np.column_stack([same == large, large])
    return Split({"good": s, "noise": rng.uniform(size=n)}, c, np.column_stack([same, np.ones(n, dtype=bool)]))


def test_setup_numbers_and_tables() -> None:
    rng = np.random.default_rng(0)
    cal, test, pool = _split(300, rng), _split(500, rng), _split(3000, rng)
    r = evaluate_setup(cal, test, pool, eps=0.05, delta=0.1, replicates=20, seed=0)
    assert r["n_pool"] == 3000 and r["measures"] == ["good", "noise"]
    lab, free = r["labelled"], r["label_free"]
    for row in (lab, free):
        assert 0.0 <= row["test_share"] <= 1.0 and row["measure"] == "good"
    # 3,000 prompts certify far less escalation than 300 labels here, and the test loss stays within 5%
    assert free["fit_share"] < lab["fit_share"] and free["test_loss"] <= 0.05 and lab["test_loss"] <= 0.05
    assert free["test_disagreement"] >= free["test_loss"] - 1e-12
    assert set(r["planner"]) == {"n_real", "accuracy", "disagreement", "disagreement_unlabeled_pilot",
                                 "disagreement_unlabeled_1000"}
    big = r["planner"]["disagreement_unlabeled_1000"]
    assert big["at"] == 3000 and big["real"] == free["fit_share"] and 0.0 <= big["low"] <= big["share"] <= big["high"]
    assert r["planner"]["n_real"] == 1000
    seq = r["sequence"]
    assert seq["best_point_same_bound"] <= seq["fixed_sequence"] + 1e-12
    assert seq["least_escalation_share"] <= seq["best_auc_share"] + 1e-12
    text = render({"settings": {"prompts": "plain", "mode": "choices", "eps": 0.05, "confidence": 0.9},
                   "setups": [{"task": "t", "pair": "p", **r}], "skipped": ["x / y: pool 0 cached"]})
    assert "label-free escalates less on 1 of 1 tasks" in text and "within 5% in every setup" in text
    assert "skipped: x / y" in text and text.count("| t | p |") == 1 + 4 + 1


def _choice_split(n: int, rng: np.random.Generator) -> Split:
    """As :func:`_split`, with the choice measures' names and two answers: the small model says "b" on a fifth
    of the examples, and those always differ from the large answer (which the answer offset can learn)."""
    base = _split(n, rng)
    b = rng.uniform(size=n) < 0.2
    agree = base.agree.copy()
    agree[b, 0] = False
    correct = base.correct.copy()
    correct[b, 0] = ~correct[b, 1]
    scores = {"choice_margin": base.scores["good"], "choice_entropy": base.scores["noise"]}
    return Split(scores, correct, agree, tuple("b" if x else "a" for x in b))


def test_combined_rows_for_both_claims() -> None:
    rng = np.random.default_rng(1)
    cal, test, pool = _choice_split(300, rng), _choice_split(500, rng), _choice_split(3000, rng)
    r = evaluate_setup(cal, test, pool, eps=0.05, delta=0.1, replicates=20, seed=0)
    lab, free = r["labelled_combined"], r["label_free_combined"]
    assert lab["measure"] == free["measure"] == "combined"
    for row in (lab, free):
        assert row["test_loss"] <= 0.05 and 0.0 <= row["test_share"] <= 1.0
    # the answer offset sends every "b" answer up: the combined label-free fit escalates them and less of the rest
    # than the single measure does
    assert free["test_share"] < r["label_free"]["test_share"]
    text = render({"settings": {"prompts": "plain", "mode": "choices", "eps": 0.05, "confidence": 0.9},
                   "setups": [{"task": "t", "pair": "p", **r}], "skipped": []})
    assert "p, combined: label-free escalates less on 1 of 1 tasks" in text
    assert text.count("| t | p |") == 1 + 1 + 4 + 1


def test_busy_sees_a_matching_process_and_not_itself() -> None:
    marker = f"h17-marker-{uuid.uuid4().hex}"
    assert not _busy([marker])
    proc = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()", marker], stdin=subprocess.PIPE)
    try:
        assert _busy([marker])
    finally:
        proc.communicate(b"")
    assert not _busy([marker])
