"""Wiring of the quality evaluation on synthetic data: signals, metrics, routers, the CLI and its report."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import eval_data

from calibration.generation_cache import GenerationCache, cache_key, raw_key
from calibration.metrics import apgr, oracle_curve, random_curve, share_curve
from cascade.errors import InvalidRequestError
from cascade.types import FREE_MEASURES, MEASURES, Generation, GenerationParams

# eval/ runs from the checkout (python -m eval.quality), not installed: make the checkout importable.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from eval.datasets import TASKS
from eval.quality import main, parse_args
from eval.routers import LogisticRouter, MLPRouter, bow_features
from eval.setups import MODELS, PAIRS
from eval.signals import SetupData, choose_measure, evaluate_setup, oracle_scores, paired_apgr_diff

DATA = eval_data()[0]  # the real files next to the checkout, else the bundled excerpts


def synthetic(n: int, seed: int, strength: float = 2.0, dim: int = 8) -> tuple[SetupData, np.ndarray]:
    """A setup where small is wrong more often on examples with a high planted feature x[:, 0].

    ``margin_first`` is informative (noisy copy of the truth), ``entropy_first`` is pure noise.
    """
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, dim))
    p_wrong = 1 / (1 + np.exp(-(strength * x[:, 0] - 0.5)))
    small_ok = rng.random(n) > p_wrong
    large_ok = rng.random(n) < 0.9
    correct = np.stack([small_ok, large_ok], axis=1)
    scores = {m: rng.random(n) for m in MEASURES}
    scores["margin_first"] = (~small_ok).astype(float) + rng.normal(0, 0.7, n)
    texts = [f"s{seed}-ex{i}" for i in range(n)]
    return SetupData(correct, scores, texts, np.ones((n, 2), dtype=np.int64)), x


def planted_features(*splits: tuple[SetupData, np.ndarray]) -> dict[str, object]:
    table = {t: row for data, x in splits for t, row in zip(data.texts, x)}
    return {"minilm": lambda texts: np.array([table[t] for t in texts])}


def test_random_routing_gives_apgr_near_one_half() -> None:
    values = []
    for seed in range(20):
        data, _ = synthetic(1000, seed)
        s = np.random.default_rng(100 + seed).random(1000)
        c = share_curve(s, data.correct)
        values.append(apgr(c.share, c.accuracy))
    assert abs(float(np.mean(values)) - 0.5) < 0.03
    assert all(abs(v - 0.5) < 0.2 for v in values)
    line = random_curve(data.correct)
    assert apgr(line.share, line.accuracy) == pytest.approx(0.5)


def test_no_signal_rises_above_the_oracle_and_the_oracle_score_is_the_oracle() -> None:
    cal, xc = synthetic(300, 1)
    test, xt = synthetic(400, 2)
    res = evaluate_setup(cal, test, planted_features((cal, xc), (test, xt)), n_boot=50)
    oracle = oracle_curve(test.correct)
    for name, sig in res["signals"].items():
        share, acc = np.array(sig["curve"]["share"]), np.array(sig["curve"]["accuracy"])
        bound = np.interp(share, oracle.share, oracle.accuracy)
        assert np.all(acc <= bound + 1e-9), name
        assert sig["apgr"][0] <= res["signals"]["oracle"]["apgr"][0] + 1e-9
    o = res["signals"]["oracle"]
    assert o["auc"][0] == pytest.approx(o["oracle_auc"])
    s = oracle_scores(test.correct)
    assert share_curve(s, test.correct).accuracy.max() == pytest.approx(oracle.accuracy.max())


def test_evaluate_setup_reports_every_signal_with_intervals() -> None:
    cal, xc = synthetic(300, 3)
    test, xt = synthetic(400, 4)
    for split in (cal, test):  # free answers: no choice measures (with them the combination would take those)
        split.scores = {m: v for m, v in split.scores.items() if m in FREE_MEASURES}
    res = evaluate_setup(cal, test, planted_features((cal, xc), (test, xt)) | {"bow": bow_features}, n_boot=100)
    assert set(res["signals"]) == set(FREE_MEASURES) | {"combined", "random", "oracle", "router-logreg-minilm",
                                                   "router-mlp-minilm", "router-logreg-bow"}
    for sig in res["signals"].values():
        for key in ("auc", "apgr", "cpt50", "cpt80"):
            est, lo, hi = sig[key]
            assert lo <= est + 1e-9 and est <= hi + 1e-9
    assert res["best_measure"] == "margin_first"  # the informative one, chosen on calibration data
    assert res["signals"]["margin_first"]["apgr"][0] > 0.7
    # the combination, fitted on half the calibration split, finds the informative measure
    assert res["combined"]["n_fix"] == 150 and res["signals"]["combined"]["apgr"][0] > 0.65
    w = dict(zip(res["combined"]["measures"], res["combined"]["weights"]))
    assert w["margin_first"] == max(w.values())
    assert res["signals"]["router-logreg-minilm"]["apgr"][0] > 0.6  # the planted prompt feature is learnt
    assert abs(res["signals"]["router-logreg-bow"]["apgr"][0] - 0.5) < 0.15  # texts carry no signal
    assert res["best_router"] in ("router-logreg-minilm", "router-mlp-minilm")
    assert isinstance(res["uncertainty_wins"], bool) and len(res["diff"]) == 3
    json.dumps(res)


def test_measure_is_chosen_on_calibration_not_test() -> None:
    cal, _ = synthetic(300, 5)
    cal.scores["entropy_mean"] = cal.scores["margin_first"] * 3  # best on calibration
    best, values = choose_measure(cal)
    assert best in ("entropy_mean", "margin_first") and values["entropy_mean"] == values["margin_first"]
    cal.scores["margin_first"] = np.random.default_rng(0).random(300)
    assert choose_measure(cal)[0] == "entropy_mean"


def test_paired_difference_sign() -> None:
    data, _ = synthetic(500, 6)
    good, noise = data.scores["margin_first"], data.scores["entropy_first"]
    point, lo, hi = paired_apgr_diff(good, noise, data.correct, n_boot=200)
    assert point > 0 and lo > 0 and hi >= point
    assert paired_apgr_diff(noise, good, data.correct, n_boot=50)[0] == pytest.approx(-point)


@pytest.mark.parametrize("router", [LogisticRouter(l2=1.0), MLPRouter(seed=0)])
def test_routers_learn_a_planted_signal(router: LogisticRouter | MLPRouter) -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(600, 32))
    y = (x[:, 3] - 0.5 * x[:, 7] + rng.normal(0, 0.5, 600) > 0.3).astype(float)
    p = router.fit(x[:300], y[:300]).predict_proba(x[300:])
    assert p.shape == (300,) and np.all((p >= 0) & (p <= 1))
    order = np.argsort(p)
    pos, neg = y[300:] == 1, y[300:] == 0
    ranks = np.empty(300)
    ranks[order] = np.arange(300)
    roc_auc = (ranks[pos].mean() - (pos.sum() - 1) / 2) / neg.sum()
    assert roc_auc > 0.85
    again = type(router)(**{k: getattr(router, k) for k in ("l2",)}) if isinstance(router, LogisticRouter) \
        else MLPRouter(seed=0)
    assert np.allclose(again.fit(x[:300], y[:300]).predict_proba(x[300:]), p)


def test_routers_reject_bad_input() -> None:
    with pytest.raises(InvalidRequestError):
        LogisticRouter().predict_proba(np.zeros((2, 3)))
    with pytest.raises(InvalidRequestError):
        LogisticRouter().fit(np.zeros((3, 2)), [0, 1, 2])
    with pytest.raises(InvalidRequestError):
        MLPRouter().fit(np.full((2, 2), np.nan), [0, 1])
    fitted = MLPRouter(epochs=5).fit(np.eye(4), [0, 1, 0, 1])
    with pytest.raises(InvalidRequestError):
        fitted.predict_proba(np.zeros((2, 3)))


def test_bow_features_shape_and_determinism() -> None:
    a = bow_features(["the movie was good", "awful"], dim=64)
    assert a.shape == (2, 65)
    assert np.allclose(a, bow_features(["the movie was good", "awful"], dim=64))
    assert np.linalg.norm(a[0, :64]) == pytest.approx(1.0)


def test_parse_args_quick_and_errors() -> None:
    args = parse_args(["--quick"])
    assert args.pairs == ["SmolLM2-135M -> Qwen-0.5B"] and len(args.tasks) == 2
    assert args.limit_cal <= 60 and args.limit_test <= 100
    assert parse_args([]).pairs == list(PAIRS)
    with pytest.raises(SystemExit):
        parse_args(["--pairs", "A -> B"])


def test_missing_data_folder_is_a_clean_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--data", str(tmp_path / "none"), "--cached-only", "--out", str(tmp_path)]) == 2
    assert "does not exist" in capsys.readouterr().err


def plant(tmp_path: Path, prompts: str, mode: str) -> None:
    """Planted generations of the SmolLM2 -> Qwen-0.5B pair on 40 + 60 SST-2 examples, as the runner caches
    them for the prompt set and mode (choice answers carry the two choice measures too)."""
    from eval.datasets import load_task

    pair = "SmolLM2-135M -> Qwen-0.5B"
    td = load_task("sst2", DATA, n_cal=40, n_test=60, seed=0, prompts=prompts)
    rng = np.random.default_rng(0)
    params = GenerationParams(max_tokens=TASKS["sst2"].max_tokens)
    choices = mode == "choices"
    names = MEASURES if choices else FREE_MEASURES
    for name, p_ok in zip(PAIRS[pair], (0.6, 0.9)):
        ref = MODELS[name]
        cache = GenerationCache(tmp_path / "cache" / f"{cache_key(ref.identity, params, True, choices=choices)}.jsonl")
        items, raws = [], []
        for ex in td.cal + td.test:
            ok = rng.random() < p_ok
            text = ex["answer"] if ok else next(c for c in ex["choices"] if c != ex["answer"])
            u = float(rng.normal(0.3 if ok else 0.7, 0.2))
            key = raw_key(ex["messages"], tuple(ex["choices"]) if choices else None)
            lp = tuple(-0.1 if c == text else -2.0 for c in ex["choices"]) if choices else ()
            items.append((key, Generation(text, ref.source, prompt_tokens=30, completion_tokens=1,
                                          scores={m: u for m in names}, choice_logprobs=lp)))
            raws.append(key)
        cache.append(items, raws)


@pytest.mark.parametrize(("prompts", "mode", "prior"), [("tuned", "free", False), ("plain", "choices", False),
                                                      ("plain", "choices", True)])
def test_cached_only_run_writes_the_report(tmp_path: Path, prompts: str, mode: str, prior: bool) -> None:
    """Plant generations in the cache (no model loaded) and rebuild the full report from it."""
    pair = "SmolLM2-135M -> Qwen-0.5B"
    plant(tmp_path, prompts, mode)
    plant(tmp_path, "tuned" if prompts == "plain" else "plain", mode)  # the other prompt set: other keys
    out = tmp_path / "out"
    argv = ["--cached-only", "--data", str(DATA), "--tasks", "sst2", "trec", "--pairs", pair,
            "--limit-cal", "40", "--limit-test", "60", "--out", str(out), "--cache", str(tmp_path / "cache"),
            "--no-embed", "--n-boot", "50", "--prompts", prompts, "--mode", mode]
    assert main(argv + (["--choice-prior"] if prior else [])) == 0
    other = ["--mode", "free" if mode == "choices" else "choices"]  # the other mode's cache entries are apart
    assert main([*argv, *other, "--out", str(tmp_path / "none")]) == 0
    assert json.loads((tmp_path / "none" / "results.json").read_text())["setups"] == []
    report = json.loads((out / "results.json").read_text())
    assert report["settings"]["prompts"] == prompts and report["settings"]["mode"] == mode + ("+prior" if prior else "")
    assert set(report["setups"][0]["cal_values"]) == set(MEASURES if mode == "choices" else FREE_MEASURES)
    from eval.compare import main as compare

    assert compare([str(out), str(out)]) == 0
    assert len(report["setups"]) == 1 and report["skipped"] == [f"trec / {pair}: generations not (all) cached"]
    setup = report["setups"][0]
    assert setup["n_cal"] == 40 and setup["n_test"] == 60
    assert setup["signals"]["margin_first"]["apgr"][0] > 0.5
    assert math.isfinite(setup["signals"]["router-logreg-bow"]["apgr"][0])
    md = (out / "results.md").read_text()
    assert "| sst2 | SmolLM2-135M -> Qwen-0.5B | 40/60 |" in md and "Summary" in md
    assert list(out.glob("curves_sst2_*.png"))
