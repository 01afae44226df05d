"""`cascade-calibrate` end to end on tiny models saved to folders: artifact, report, cache, bad input, splits."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from conftest import make_model, make_tokenizer

from calibration.cli import main
from cascade.artifact import Artifact
from cascade.errors import ArtifactError
from cascade.policy import Policy

DATA = Path(__file__).parent / "data" / "sst2_dev_sample.jsonl"
SCORER = "test_calibration_cli:id_scorer"
SAME = "test_calibration_cli:id_same"


def id_scorer(answer: str, example: dict[str, Any]) -> bool:
    """A deterministic scorer for random-weight models: right unless (id number + answer length) % 3 == 0."""
    return (int(str(example["id"]).rsplit("-", 1)[1]) + len(answer)) % 3 != 0


def id_same(a: str, b: str, example: dict[str, Any]) -> bool:
    """A deterministic same-answer function for random-weight models: the same unless (id number + length) % 4 == 0."""
    return a == b or (int(str(example["id"]).rsplit("-", 1)[1]) + len(a)) % 4 != 0


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("calib")
    for seed in (0, 1, 2):
        make_model(seed).save_pretrained(root / f"tiny{seed}")
        make_tokenizer().save_pretrained(root / f"tiny{seed}")

    def tier(name: str, seed: int, price: float) -> str:
        return f"  - {{name: {name}, backend: {{model: '{root / f'tiny{seed}'}'}}, price_input_per_mtok: {price}}}\n"

    head = "measure: margin_first\nmax_tokens: 4\ntiers:\n"
    (root / "two.yaml").write_text(head + tier("small", 0, 1.0) + tier("large", 1, 10.0))
    (root / "three.yaml").write_text(head + tier("small", 0, 1.0) + tier("mid", 2, 3.0) + tier("large", 1, 10.0))
    return {"root": root, "two": root / "two.yaml", "three": root / "three.yaml", "cache": root / "cache"}


def calibrate(setup: dict[str, Path], out: Path, *args: str, config: str = "two",
              data: Path = DATA) -> tuple[int, dict[str, Any]]:
    report = out.with_suffix(".report.json")
    code = main(["--data", str(data), "--out", str(out), "--config", str(setup[config]), "--scorer", SCORER,
                 "--cache-dir", str(setup["cache"]), "--report-json", str(report), "--no-progress", *args])
    return code, json.loads(report.read_text()) if code == 0 else {}


def prompts() -> list[str]:
    return [json.loads(line)["prompt"] for line in DATA.read_text().splitlines()]


def run_cascade(config: Path, artifact: Path) -> list[Any]:
    from cascade.config import build_cascade, load_config

    cascade = build_cascade(replace(load_config(config), artifact=str(artifact)))
    return cascade.run_batch_sync(prompts())


def test_artifact_round_trips_and_cascade_makes_the_reported_decisions(tmp_path, setup):
    out, png = tmp_path / "art.json", tmp_path / "curve.png"
    code, report = calibrate(setup, out, "--max-large-share", "0.3", "--plot", str(png))
    assert code == 0
    models = [str(setup["root"] / "tiny0"), str(setup["root"] / "tiny1")]
    art = Artifact.load(out, expect_models=models, expect_measure="margin_first")
    assert art.method == "budget" and art.n == 120 and art.curve is not None
    assert list(art.thresholds) == report["fit"]["thresholds"]
    assert 0.0 < report["fit"]["large_share"] <= 0.3
    assert Artifact.from_json(art.to_json()) == art
    results = run_cascade(setup["two"], out)
    large = sum(r.tier_index == 1 for r in results)
    assert large == round(report["fit"]["large_share"] * 120)
    assert all(r.threshold == art.thresholds[0] for r in results)
    with pytest.raises(ArtifactError, match="measure"):
        Policy.from_artifact(out, models=models, measure="entropy_mean")
    with pytest.raises(ArtifactError, match="other models"):
        Policy.from_artifact(out, models=[models[0], "another-model"], measure="margin_first")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert report["pareto"]["points"] and report["data"]["scorer"] == SCORER


def test_second_run_reads_the_cache_without_loading_any_model(tmp_path, setup, capsys):
    out = tmp_path / "a.json"
    assert calibrate(setup, out, "--max-large-share", "0.5")[0] == 0
    root = setup["root"]
    for seed in (0, 1):
        (root / f"tiny{seed}").rename(root / f"gone{seed}")
    try:
        code, report = calibrate(setup, out, "--max-quality-loss", "0.1", "--confidence", "0.8")
    finally:
        for seed in (0, 1):
            (root / f"gone{seed}").rename(root / f"tiny{seed}")
    assert code == 0, capsys.readouterr().err
    assert Artifact.load(out).method == "quality" and report["fit"]["target"]["delta"] == pytest.approx(0.2)


BAD = [
    ('{"id": "a", "prompt": "x", "answer": "positive"}\n\n{"id": "b", "prompt": ', ":3: invalid JSON"),
    ('{"id": "a", "prompt": "x", "answer": "positive"}\n{"id": "b", "prompt": "y"}', ":2: missing 'answer'"),
    ('{"id": "a", "prompt": "x", "answer": " "}', ":1: empty or malformed 'answer'"),
    ('{"id": "a", "prompt": "x", "answer": "maybe", "choices": ["negative", "positive"]}', ":1: answer 'maybe' is not"),
    ('{"id": "a", "messages": [{"role": "robot", "content": "x"}], "answer": "1"}', ":1: messages[0].role"),
    ('{"id": "a", "prompt": "x", "answer": "1"}\n{"id": "a", "prompt": "y", "answer": "1"}', ":2: duplicate id 'a'"),
    ('[1, 2]', ":1: expected a JSON object"),
    ("\n\n", "no examples"),
]


@pytest.mark.parametrize(("content", "message"), BAD)
def test_bad_input_names_the_line_and_writes_nothing(tmp_path, setup, capsys, content, message):
    data, out = tmp_path / "bad.jsonl", tmp_path / "art.json"
    data.write_text(content)
    code, _ = calibrate(setup, out, "--max-large-share", "0.3", data=data)
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err
    assert not out.exists() and not out.with_suffix(".report.json").exists()
    assert not list(tmp_path.glob(".art.json*"))


def test_bad_scorer_and_arguments_exit_2_and_keep_an_old_artifact(tmp_path, setup, capsys):
    out = tmp_path / "art.json"
    out.write_text("old")
    base = ["--data", str(DATA), "--out", str(out), "--config", str(setup["two"]), "--no-progress"]
    assert main([*base, "--scorer", "nope", "--max-large-share", "0.3"]) == 2
    assert "unknown scorer 'nope'" in capsys.readouterr().err
    no_choices = tmp_path / "plain.jsonl"
    no_choices.write_text('{"id": "a", "prompt": "x", "answer": "1"}\n')
    assert main([*base, "--data", str(no_choices), "--scorer", "choice", "--max-large-share", "0.3"]) == 2
    assert "plain.jsonl:1: the choice scorer needs 'choices'" in capsys.readouterr().err
    assert main([*base, "--max-large-share", "0.3", "--confidence", "0.9"]) == 2  # confidence needs a quality target
    assert main([*base, "--min-cost"]) == 2  # needs --value-per-correct
    assert main([*base, "--measure", "bogus", "--max-large-share", "0.3"]) == 2
    assert out.read_text() == "old"


def test_output_folders_and_seed_are_checked_before_any_model_runs(tmp_path, setup, capsys):
    base = ["--data", str(DATA), "--config", str(tmp_path / "no-such-config.yaml"), "--max-large-share", "0.3"]
    for extra, message in [(["--out", str(tmp_path / "missing" / "a.json")], "--out: the folder"),
                           (["--out", str(tmp_path / "a.json"), "--report-json", str(tmp_path / "x" / "r.json")],
                            "--report-json: the folder"),
                           (["--out", str(tmp_path / "a.json"), "--plot", str(tmp_path / "x" / "p.png")],
                            "--plot: the folder"),
                           (["--out", str(tmp_path / "a.json"), "--test-split", "0.5", "--seed", "-1"],
                            "--seed must be >= 0")]:
        assert main([*base, *extra]) == 2  # the config does not even exist: nothing was loaded
        assert message in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_a_line_separator_inside_a_string_is_not_a_line_break(tmp_path, setup):
    data = tmp_path / "u2028.jsonl"
    rows = [json.loads(line) for line in DATA.read_text().splitlines()[:20]]
    rows[3]["prompt"] += "\u2028and\x85more"
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    code, report = calibrate(setup, tmp_path / "a.json", "--max-large-share", "0.3", data=data)
    assert code == 0 and report["data"]["n"] == 20


def test_measure_all_with_a_quality_target_tests_each_measure_at_delta_over_m(tmp_path, setup):
    code, report = calibrate(setup, tmp_path / "a.json", "--measure", "all", "--max-quality-loss", "0.2",
                             "--confidence", "0.9")
    assert code == 0  # the data has choices: answered by scoring them, so the two choice measures join the seven
    assert report["fit"]["params"]["delta"] == pytest.approx(0.1 / 9) and report["fit"]["target"]["delta"] == 0.1
    assert "delta/9" in report["measure"]["how"] and report["generation"]["constrained"] == 120
    code, report = calibrate(setup, tmp_path / "free.json", "--measure", "all", "--max-quality-loss", "0.2",
                             "--confidence", "0.9", "--no-choices")
    assert code == 0 and report["fit"]["params"]["delta"] == pytest.approx(0.1 / 7)
    assert "delta/7" in report["measure"]["how"] and report["generation"]["constrained"] == 0
    code, report = calibrate(setup, tmp_path / "b.json", "--measure", "margin_first", "--max-quality-loss", "0.2")
    assert code == 0 and report["fit"]["params"]["delta"] == pytest.approx(0.1)
    params = Artifact.load(tmp_path / "b.json").params
    assert params["claim"] == "accuracy" and params["guarantee"].startswith("accuracy loss against always")


def test_test_split_reports_whether_the_target_held(tmp_path, setup, capsys):
    code, report = calibrate(setup, tmp_path / "a.json", "--max-quality-loss", "0.1", "--test-split", "0.25",
                             "--seed", "3")
    assert code == 0
    test = report["test"]
    assert test["n"] == 30 and report["data"]["n_fit"] == 90
    for key in ("small_accuracy", "large_accuracy", "accuracy", "large_share", "mean_cost"):
        assert 0.0 <= test[key] <= (1.0 if key != "mean_cost" else 1e-2)
    assert test["held"] == (test["large_accuracy"] - test["accuracy"] <= 0.1 + 1e-12)
    assert "held-out check (30 examples" in capsys.readouterr().out
    again = calibrate(setup, tmp_path / "b.json", "--max-quality-loss", "0.1", "--test-split", "0.25",
                      "--seed", "3")[1]
    other = calibrate(setup, tmp_path / "c.json", "--max-quality-loss", "0.1", "--test-split", "0.25",
                      "--seed", "4")[1]
    assert again["data"]["fingerprint"] == report["data"]["fingerprint"] != other["data"]["fingerprint"]


def test_measure_all_picks_the_best_auc(tmp_path, setup):
    out = tmp_path / "a.json"
    code, report = calibrate(setup, out, "--measure", "all", "--min-cost", "--value-per-correct", "0.001")
    assert code == 0
    aucs = {m: v["auc"] for m, v in report["measures"].items()}
    assert len(aucs) == 9 and report["measure"]["chosen"] == max(aucs, key=aucs.__getitem__)
    assert Artifact.load(out).measure == report["measure"]["chosen"]
    assert "best AUC" in report["measure"]["how"]


def test_three_tiers_fit_two_thresholds_on_the_pareto_front(tmp_path, setup):
    out = tmp_path / "a.json"
    code, report = calibrate(setup, out, "--min-cost", "--value-per-correct", "0.0005", config="three")
    assert code == 0
    art = Artifact.load(out)
    assert len(art.thresholds) == 2 and art.curve is not None and art.curve.kind == "pareto"
    assert report["pareto"]["chosen_index"] is not None
    results = run_cascade(setup["three"], out)
    shares = [sum(r.tier_index == j for r in results) / 120 for j in range(3)]
    assert shares == pytest.approx(report["fit"]["answered"])


def test_router_mode_fits_thresholds_per_cluster(tmp_path, setup):
    from cascade.backends.hf_local import HFLocalBackend
    from cascade.router.embed import HiddenStateEmbedder
    from cascade.router.pool import fit_router

    name = str(setup["root"] / "tiny0")
    embedder = HiddenStateEmbedder.from_backend(HFLocalBackend.from_pretrained(name))
    router = fit_router(embedder, prompts(), 2, seed=0).save(tmp_path / "router.json")
    out = tmp_path / "a.json"
    code, report = calibrate(setup, out, "--max-large-share", "0.4", "--router", str(router))
    assert code == 0
    art = Artifact.load(out)
    fits = report["clusters"]["fits"]
    assert art.cluster_thresholds and set(art.cluster_thresholds) == {int(c) for c in fits}
    assert sum(v["n"] for v in fits.values()) == 120
    assert all(v["large_share"] <= 0.4 for v in fits.values())
    code, report = calibrate(setup, tmp_path / "q.json", "--max-quality-loss", "0.2", "--router", str(router))
    assert code == 0  # every cluster is tested at delta / K, so all of them hold at once with 1 - delta
    assert report["clusters"]["delta_per_cluster"] == pytest.approx(0.1 / len(report["clusters"]["fits"]))


def test_module_entry_point():
    out = subprocess.run([sys.executable, "-m", "calibration", "--help"], capture_output=True, text=True, check=True)
    assert "--max-quality-loss" in out.stdout


def test_data_with_choices_is_answered_with_them_and_the_cascade_decides_alike(tmp_path, setup):
    """Every tier answers with one of the example's choices; a cascade run with the same choices makes the
    decisions the report counted (the artifact's measure is a choice measure)."""
    out = tmp_path / "a.json"
    code, report = calibrate(setup, out, "--measure", "choice_margin", "--max-large-share", "0.4")
    assert code == 0 and Artifact.load(out).measure == "choice_margin" and Artifact.load(out).params["choices"]
    from cascade.config import build_cascade, load_config

    cascade = build_cascade(replace(load_config(setup["two"]), artifact=str(out), measure="choice_margin"))
    lines = [json.loads(line) for line in DATA.read_text().splitlines()]
    results = cascade.run_batch_sync([x["prompt"] for x in lines], choices=[x["choices"] for x in lines])
    assert all(r.text in x["choices"] for r, x in zip(results, lines, strict=True))
    assert sum(r.escalated for r in results) == round(report["fit"]["large_share"] * 120)


def _unlabeled(tmp_path: Path, keep_every: int = 0) -> Path:
    """The sample without answers (every ``keep_every``-th line keeps its answer)."""
    rows = [json.loads(line) for line in DATA.read_text().splitlines()]
    for i, r in enumerate(rows):
        if not keep_every or i % keep_every:
            del r["answer"]
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_unlabeled_lines_need_label_free(tmp_path, setup, capsys):
    data, out = _unlabeled(tmp_path), tmp_path / "a.json"
    code, _ = calibrate(setup, out, "--max-quality-loss", "0.3", data=data)
    err = capsys.readouterr().err
    assert code == 2 and "prompts.jsonl:1: missing 'answer'" in err and "--label-free" in err and not out.exists()
    code, report = calibrate(setup, out, "--max-quality-loss", "0.3", "--label-free", "--same", SAME,
                             data=data)
    assert code == 0, capsys.readouterr().err
    art = Artifact.load(out)
    assert art.params["claim"] == "disagreement" and art.params["bound"] == "harm"
    assert "differ from the last tier" in art.params["guarantee"] and "differ from the last tier" in art.message
    assert art.params["labelled_fit_lines"] == 0 and art.curve is not None and art.curve.last_accuracy == 1.0
    assert report["claim"] == "disagreement" and "label-free" in capsys.readouterr().out
    # without --same, a user scorer cannot say when two answers are the same
    assert calibrate(setup, tmp_path / "b.json", "--max-quality-loss", "0.3", "--label-free", data=data)[0] == 2
    assert "needs --same" in capsys.readouterr().err
    assert main(["--data", str(data), "--out", str(out), "--label-free", "--max-large-share", "0.3"]) == 2


def test_label_free_ignores_labels_for_the_fit_and_checks_on_them(tmp_path, setup, capsys):
    same = ("--label-free", "--same", SAME, "--max-quality-loss", "0.3")
    code, labelled = calibrate(setup, tmp_path / "a.json", *same, "--test-split", "0.25")
    assert code == 0
    code, stripped = calibrate(setup, tmp_path / "b.json", *same, "--test-split", "0.25", data=_unlabeled(tmp_path, 2))
    assert code == 0
    assert labelled["fit"]["thresholds"] == stripped["fit"]["thresholds"]  # the fit never reads a label
    assert labelled["fit"]["large_share"] == stripped["fit"]["large_share"]
    test = labelled["test"]
    assert test["claim"] == "disagreement" and test["n_labelled"] == test["n"] == 30
    assert test["held"] == (test["disagreement"] <= 0.3 + 1e-12)
    assert test["accuracy_loss"] == pytest.approx(test["large_accuracy"] - test["accuracy"])
    assert stripped["test"]["n_labelled"] < 30 and labelled["data"]["n_fit_labelled"] == 90
    assert "labelled held-out examples" in capsys.readouterr().out


def test_label_free_combined_measure_fits_on_prompts_alone(tmp_path, setup, capsys):
    """--label-free --measure combined: the combination learns "differs from the last tier" without a label."""
    same = ("--label-free", "--same", SAME, "--max-quality-loss", "0.3", "--measure", "combined")
    code, labelled = calibrate(setup, tmp_path / "a.json", *same)
    assert code == 0, capsys.readouterr().err
    code, stripped = calibrate(setup, tmp_path / "b.json", *same, data=_unlabeled(tmp_path))
    assert code == 0, capsys.readouterr().err
    assert labelled["fit"]["thresholds"] == stripped["fit"]["thresholds"]  # the labels are never read
    a, b = Artifact.load(tmp_path / "a.json"), Artifact.load(tmp_path / "b.json")
    assert a.measure == b.measure == "combined" and a.params["claim"] == b.params["claim"] == "disagreement"
    assert a.combination == b.combination and a.params["n_certify"] == b.params["n_certify"] < 120


def test_plan_predicts_both_claims_from_a_labelled_pilot(tmp_path, setup, capsys):
    report = tmp_path / "plan.json"
    base = ["--data", str(DATA), "--config", str(setup["two"]), "--scorer", SCORER, "--cache-dir", str(setup["cache"]),
            "--no-progress", "--max-quality-loss", "0.3", "--plan", "--plan-sizes", "50", "2000"]
    assert main([*base, "--same", SAME, "--report-json", str(report)]) == 0
    out = capsys.readouterr().out
    assert "accuracy loss against always using the last tier <= 30.00%" in out and "differ from the last tier" in out
    plans = json.loads(report.read_text())["plans"]
    for claim in ("accuracy", "disagreement"):
        rows = plans[claim]["rows"]
        assert [r["n"] for r in rows] == [50, 2000] and all(0.0 <= r["low"] <= r["share"] <= r["high"] <= 1.0
                                                              for r in rows)
    assert plans["disagreement"]["rows"][1]["share"] <= plans["disagreement"]["rows"][0]["share"]
    assert main([*base, "--out", str(tmp_path / "a.json")]) == 2 and not (tmp_path / "a.json").exists()
    assert main([*base[:-5], "--max-large-share", "0.3", "--plan"]) == 2


def test_choice_prior_is_fitted_apart_stored_and_applied_by_the_cascade(tmp_path, setup, capsys):
    """--choice-prior sets a share of the data aside for the prior, stores it in the artifact, and the cascade
    built from that artifact corrects its answers with it."""
    out = tmp_path / "a.json"
    code, report = calibrate(setup, out, "--measure", "choice_margin", "--max-large-share", "0.4",
                             "--choice-prior", "--prior-share", "0.25", "--test-split", "0.2")
    assert code == 0, capsys.readouterr().err
    art = Artifact.load(out)
    key = json.dumps(["negative", "positive"])
    assert set(art.choice_priors) == {0, 1} and len(art.choice_priors[0][key]) == 2
    assert report["choice_priors"]["n"] == 24 and report["data"]["n_fit"] == 72
    assert abs(sum(art.choice_priors[0][key])) < 1e-9
    assert art.params["held_out"]["n"] == 24 and art.params["held_out"]["large_share"] == report["test"]["large_share"]
    assert "choice priors: fitted on 24 requests" in capsys.readouterr().out
    assert Artifact.from_json(art.to_json()) == art
    from cascade.config import build_cascade, load_config

    cascade = build_cascade(replace(load_config(setup["two"]), artifact=str(out), measure="choice_margin"))
    lines = [json.loads(line) for line in DATA.read_text().splitlines()]
    results = cascade.run_batch_sync([x["prompt"] for x in lines], choices=[x["choices"] for x in lines])
    raw = cascade_without_prior(setup, out).run_batch_sync([x["prompt"] for x in lines],
                                                            choices=[x["choices"] for x in lines])
    assert [r.uncertainty for r in results] != [r.uncertainty for r in raw]  # the prior changed the scores
    assert main(["--data", str(DATA), "--out", str(out), "--max-large-share", "0.3", "--prior-share", "0.5"]) == 2


def cascade_without_prior(setup: dict[str, Path], artifact: Path) -> Any:
    from cascade.config import build_cascade, load_config

    art = replace(Artifact.load(artifact), choice_priors=None)
    plain = artifact.with_name("plain.json")
    art.save(plain)
    return build_cascade(replace(load_config(setup["two"]), artifact=str(plain), measure="choice_margin"))


def test_several_quality_levels_are_certified_stored_and_used_per_request(tmp_path, setup, capsys):
    out = tmp_path / "levels.json"
    code, report = calibrate(setup, out, "--max-quality-loss", "0.2", "0.1", "0.3", "--test-split", "0.25",
                             config="three")
    assert code == 0
    art = Artifact.load(out)
    assert art.levels is not None and art.levels.targets == (0.1, 0.2, 0.3)
    assert art.levels.delta_per_level == pytest.approx(0.1 / 3) and art.levels.correction == "bonferroni"
    assert art.levels.confidence == pytest.approx(0.9) and art.levels.family == "top_down"
    assert art.thresholds == art.levels.items[1].thresholds  # the first level given is the default
    assert report["fit"]["params"]["max_quality_loss"] == 0.2 and report["fit"]["params"]["family"] == "top_down"
    rows = report["levels"]
    assert [r["max_quality_loss"] for r in rows] == [0.1, 0.2, 0.3]
    for r in rows:
        assert r["test"]["n"] == 30 and r["test"]["held"] == r["test"]["verdict"].startswith("held")
        assert r["delta_per_level"] == pytest.approx(0.1 / 3)
    assert "certified levels" in capsys.readouterr().out
    from cascade.config import build_cascade, load_config

    cascade = build_cascade(replace(load_config(setup["three"]), artifact=str(out)))
    got = cascade.run_batch_sync(prompts()[:5], target={"max_quality_loss": 0.25})
    assert {(r.threshold_source, r.certified_level) for r in got} == {("certified", 0.2)}
    assert all(r.threshold == art.levels.items[1].thresholds[0] for r in got)
    with pytest.raises(Exception, match="below every certified level"):
        cascade.run_batch_sync(prompts()[:1], target={"max_quality_loss": 0.05})
    code, report = calibrate(setup, tmp_path / "m.json", "--measure", "all", "--max-quality-loss", "0.2", "0.3")
    assert code == 0 and report["levels"][0]["delta_per_level"] == pytest.approx(0.1 / 18)  # 9 measures x 2
    assert calibrate(setup, tmp_path / "d.json", "--max-quality-loss", "0.1", "0.1")[0] == 2


def test_without_a_measure_calibration_picks_by_the_data_and_the_cascade_takes_the_artifacts(tmp_path, setup):
    """No ``measure`` in the config: data with choices is fitted on choice_margin, free data on margin_first, and
    a cascade built from that config uses whatever its artifact was fitted for."""
    from cascade.config import build_cascade, load_config

    config = tmp_path / "nomeasure.yaml"
    config.write_text(setup["two"].read_text().replace("measure: margin_first\n", ""))
    assert load_config(config).measure is None
    out = tmp_path / "a.json"
    with_it = {**setup, "nomeasure": config}
    code, _ = calibrate(with_it, out, "--max-large-share", "0.4", config="nomeasure")
    assert code == 0 and Artifact.load(out).measure == "choice_margin"
    assert build_cascade(replace(load_config(config), artifact=str(out))).measure == "choice_margin"
    code, _ = calibrate(with_it, tmp_path / "free.json", "--max-large-share", "0.4", "--no-choices", config="nomeasure")
    assert code == 0 and Artifact.load(tmp_path / "free.json").measure == "margin_first"
    by_hand = replace(load_config(config), thresholds=(0.5,))
    assert build_cascade(by_hand).measure == "margin_first"



def test_an_artifact_refuses_other_backends_than_it_was_fitted_on(tmp_path, setup):
    """The same model behind a server scores differently (top-k logprobs): an artifact fitted on local tiers is
    refused for a config serving a tier remotely, and one fitted with top_logprobs 5 for a config asking 20."""
    from cascade.config import BackendConfig, backend_signature, build_cascade, load_config
    from cascade.errors import ArtifactError

    out = tmp_path / "a.json"
    assert calibrate(setup, out, "--max-large-share", "0.4")[0] == 0
    local = load_config(setup["two"])
    assert Artifact.load(out).params["backends"] == backend_signature(local)
    assert build_cascade(replace(local, artifact=str(out))).measure == "margin_first"  # same backends: fine
    small = local.tiers[0]
    remote = replace(small, backend=BackendConfig(kind="openai", model=small.backend.model,
                                                   base_url="http://127.0.0.1:9/v1"))
    served = replace(local, tiers=(remote, *local.tiers[1:]), artifact=str(out))
    with pytest.raises(ArtifactError, match=r"tier 'small' were fitted on a hf backend.*openai with top_logprobs 5"):
        build_cascade(served)
    old = Artifact.load(out)
    old_params = {k: v for k, v in old.params.items() if k != "backends"}  # an artifact from before the check
    replace(old, params=old_params).save(tmp_path / "old.json")
    assert build_cascade(replace(served, artifact=str(tmp_path / "old.json"))).tiers[0].name == "small"
