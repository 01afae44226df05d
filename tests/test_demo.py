"""``cascade demo``'s summary: the cascade against each tier alone, on constrained bundled requests."""

from __future__ import annotations

import asyncio

import pytest
from conftest import make_backend

from cascade import Cascade, Price, Tier
from cascade.artifact import Artifact
from cascade.config import DEFAULT_ARTIFACT
from cascade.demo import demo_examples, run_demo, target_text
from cascade.scorers import get_scorer


def test_every_bundled_request_allows_its_labels_only() -> None:
    rows = demo_examples()
    assert len(rows) >= 24 and demo_examples(3) == rows[:3]
    for r in rows:
        assert r["choices"] == ["negative", "positive"] and r["answer"] in r["choices"]


@pytest.mark.parametrize("threshold", [-1.0, 0.5, 2.0])
def test_the_summary_compares_the_cascade_with_each_tier_alone(threshold: float,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    examples = demo_examples(6)
    tiers = [Tier("small", make_backend(0), Price(0.1, 0.1)), Tier("large", make_backend(1), Price(1.0, 1.0))]
    cascade = Cascade(tiers, measure="choice_margin", threshold=threshold)
    out = asyncio.run(run_demo(cascade, examples, get_scorer("choice")))
    text = capsys.readouterr().out
    assert "cascade on these 6 requests" in text and "of always-large" in text
    assert out["escalated"] == {-1.0: 1.0, 2.0: 0.0}.get(threshold, out["escalated"])
    if threshold == -1.0:  # every request escalated: the cascade answers as the large tier alone
        assert out["accuracy"] == out["large_accuracy"] and out["cost"] > out["large_cost"] > 0.0
    if threshold == 2.0:
        assert out["accuracy"] == out["small_accuracy"] and out["cost"] < out["large_cost"]


def test_target_text_of_the_shipped_artifact() -> None:
    art = Artifact.load(DEFAULT_ARTIFACT)
    text = target_text(art)
    assert f"fitted on {art.n} labelled examples" in text
    assert target_text(None) == "hand-set thresholds"
