"""The combined measure end to end: `cascade-calibrate --measure combined` -> artifact -> Cascade on tiny
random-weight models; the policy and artifact checks around it."""

from __future__ import annotations

import asyncio
import json
import math
from dataclasses import replace

import pytest
from test_calibration_cli import DATA, calibrate, prompts, setup  # noqa: F401  (setup is a fixture)

from cascade.artifact import Artifact
from cascade.combined import Combination
from cascade.errors import ArtifactError, InvalidRequestError
from cascade.policy import Policy


def test_calibrate_combined_stores_weights_and_the_cascade_scores_with_them(tmp_path, setup):  # noqa: F811
    from cascade.config import build_cascade, load_config

    out = tmp_path / "combined.json"
    code, report = calibrate(setup, out, "--measure", "combined", "--no-choices", "--max-large-share", "0.5")
    assert code == 0
    art = Artifact.load(out, expect_measure="combined")
    assert art.combination is not None and len(art.combination) == 1
    assert art.n == 60  # the other 60 of the 120 fit examples fitted the weights
    assert report["measure"]["chosen"] == "combined" and report["data"]["n_fit"] == 60
    assert "combined" in report["measures"] and "margin_first" in report["measures"]
    assert Artifact.from_json(art.to_json()) == art

    cascade = build_cascade(replace(load_config(setup["two"]), measure="combined", artifact=str(out)))
    assert cascade.measure == "combined"
    ps = prompts()
    results = cascade.run_batch_sync(ps)
    small = asyncio.run(cascade.tiers[0].backend.generate(ps, cascade.params))  # independently, the same tier
    combo = art.combination[0]
    for r, g in zip(results, small):
        want = combo.score(g.scores, g.text)
        assert math.isclose(r.uncertainty, want, rel_tol=1e-5, abs_tol=1e-5)
        assert r.escalated == (want > art.thresholds[0])
    assert 0 < sum(r.escalated for r in results) < len(results)


def test_combined_on_constrained_answers_uses_the_choice_measures_and_the_answer(tmp_path, setup):  # noqa: F811
    from cascade.config import build_cascade, load_config
    from cascade.types import CHOICE_MEASURES

    out = tmp_path / "choices.json"
    code, _ = calibrate(setup, out, "--measure", "combined", "--max-large-share", "0.5")
    assert code == 0
    combo = Artifact.load(out, expect_measure="combined").combination[0]  # type: ignore[index]
    assert combo.measures == CHOICE_MEASURES
    assert set(combo.answers) <= {"negative", "positive"} and combo.answers  # answers seen >= 5 times
    cascade = build_cascade(replace(load_config(setup["two"]), measure="combined", artifact=str(out)))
    lines = [json.loads(line) for line in DATA.read_text().splitlines()][:24]
    ps, choices = [x["prompt"] for x in lines], [x["choices"] for x in lines]
    results = cascade.run_batch_sync(ps, choices=choices)
    small = asyncio.run(cascade.tiers[0].backend.choose(ps, choices))
    for r, g in zip(results, small):
        want = combo.score(g.scores, g.text)
        assert math.isclose(r.uncertainty, want, rel_tol=1e-5, abs_tol=1e-5)
        assert r.escalated == (want > Artifact.load(out).thresholds[0])


def test_combined_with_a_quality_target_certifies_on_the_other_half(tmp_path, setup):  # noqa: F811
    out = tmp_path / "q.json"
    code, report = calibrate(setup, out, "--measure", "combined", "--no-choices", "--max-quality-loss", "0.2",
                             "--test-split", "0.25")
    assert code == 0
    art = Artifact.load(out)
    assert art.measure == "combined" and art.n == report["data"]["n_fit"] == 45  # 90 fit examples, 45 certify
    assert report["test"]["n"] == 30


def test_artifact_and_policy_refuse_a_combined_measure_without_weights(tmp_path):
    combo = Combination(("margin_mean",), (0.5,), (0.2,), (2.0,), (1.5,), -0.3)
    base = {"schema_version": 2, "created": "2025-01-01T00:00:00+00:00", "models": ["a", "b"],
            "measure": "combined", "thresholds": [0.1], "method": "budget", "params": {},
            "data_fingerprint": "0" * 64, "n": 10, "feasible": True, "message": "", "levels": None}
    with pytest.raises(ArtifactError, match="combination"):
        Artifact.from_json(json.dumps(base))
    with pytest.raises(ArtifactError, match="combination"):
        Artifact.from_json(json.dumps({**base, "combination": [{"measures": ["margin_mean"]}]}))
    with pytest.raises(ArtifactError, match="only stored"):
        Artifact.from_json(json.dumps({**base, "measure": "margin_first", "combination": [combo.to_dict()]}))
    art = Artifact.from_json(json.dumps({**base, "combination": [combo.to_dict()]}))
    policy = Policy.from_artifact(art)
    assert policy.uncertainty(0, {"margin_mean": 0.7}) == pytest.approx(-0.3 + 1.5 * (0.7 - 0.5) / 0.2)
    assert math.isnan(policy.uncertainty(0, {"choice_margin": 0.1}))  # no free measure at all: escalates
    with pytest.raises(InvalidRequestError, match="combined"):
        Policy.fixed(0.3, measure="combined")
    old = {k: v for k, v in base.items() if k != "levels"}  # a version-1 file without the field still loads
    assert Artifact.from_json(json.dumps({**old, "schema_version": 1, "measure": "margin_first"})).combination is None
