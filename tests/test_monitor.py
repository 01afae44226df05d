"""cascade.monitor and cascade.shadow: the statistics against independent computations, and the engine's live
checks (drift window, shadow pairs, the log, hot swap of thresholds) on real loopback simulated servers."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from cascade.artifact import Artifact
from cascade.backends.openai_compat import OpenAIBackend
from cascade.curve import Curve
from cascade.engine import Cascade, Price, Tier
from cascade.errors import ArtifactError, ConfigError
from cascade.monitor import Monitor, MonitorConfig, Reference, cp_upper, ks_pvalue, ks_statistic
from cascade.policy import Policy
from cascade.simulate import SimConfig, SimServer


@pytest.mark.parametrize("ties", [False, True])
def test_ks_matches_scipy_two_sample_test(ties: bool) -> None:
    rng = np.random.default_rng(0)
    for trial in range(40):
        n, m = int(rng.integers(5, 400)), int(rng.integers(5, 400))
        a = rng.normal(0, 1, n)
        b = rng.normal(rng.choice([0.0, 0.3]), rng.choice([1.0, 1.5]), m)
        if ties:
            a, b = np.round(a, 1), np.round(b, 1)
        d = ks_statistic(Reference.from_sample(a), b)
        want = stats.ks_2samp(a, b, method="asymp")
        assert d == pytest.approx(want.statistic, abs=1e-12), trial
        assert ks_pvalue(d, n, m) == pytest.approx(want.pvalue, rel=1e-9, abs=1e-12), trial


def test_a_thinned_reference_gives_a_smaller_statistic_so_a_conservative_p_value() -> None:
    rng = np.random.default_rng(1)
    a, b = rng.uniform(size=600), rng.uniform(0.1, 1.1, size=300)
    exact = ks_statistic(Reference.from_sample(a), b)
    grid = np.quantile(a, np.linspace(0.02, 1.0, 50))  # a sweep curve's thinned thresholds
    thr = tuple((float(t),) for t in grid)
    curve = Curve("sweep", thr, tuple(float(np.mean(a > t)) for t in grid), (0.5,) * 50, (0.0,) * 50, 0.5)
    thin = Reference.from_curve(curve, len(a))
    assert thin is not None and not thin.exact
    d = ks_statistic(thin, b)
    assert 0.5 * exact < d <= exact + 1e-12
    assert ks_pvalue(d, 600, 300) >= ks_pvalue(exact, 600, 300)


def test_clopper_pearson_upper_bound_matches_the_binomial_tail() -> None:
    for k, n, conf in ((0, 10, 0.9), (3, 50, 0.9), (12, 100, 0.95), (99, 100, 0.8), (40, 1000, 0.99)):
        lo, hi = k / n, 1.0  # bisection: the p at which P(X <= k | n, p) = 1 - conf
        for _ in range(100):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if stats.binom.cdf(k, n, mid) > 1 - conf else (lo, mid)
        assert cp_upper(k, n, conf) == pytest.approx(lo, abs=1e-9)
    assert cp_upper(5, 5, 0.9) == 1.0 and cp_upper(0, 0, 0.9) == 1.0


def test_the_drift_test_holds_its_level_and_finds_a_shift() -> None:
    rng = np.random.default_rng(2)
    ref = Reference.from_sample(rng.uniform(size=600))
    null = [ks_pvalue(ks_statistic(ref, w := rng.uniform(size=200)), 600, len(w)) for _ in range(600)]
    assert np.mean(np.asarray(null) < 0.05) <= 0.07  # the asymptotic test is slightly conservative
    shifted = [ks_pvalue(ks_statistic(ref, w := rng.uniform(0.25, 1.0, 200)), 600, len(w)) for _ in range(100)]
    assert np.mean(np.asarray(shifted) < 0.001) >= 0.9


def _monitor(alpha: float = 0.001, **kw: object) -> Monitor:
    ref = Reference.from_sample(np.random.default_rng(3).uniform(size=1000))
    cfg = MonitorConfig(window=300, min_window=100, check_every=25, drift_alpha=alpha, **kw)  # type: ignore[arg-type]
    return Monitor(cfg, ["small"], [ref], [0.3], target=0.05)


def test_a_stream_without_drift_stays_ok_and_a_drifted_one_is_flagged(caplog: pytest.LogCaptureFixture) -> None:
    rng = np.random.default_rng(4)
    mon = _monitor()
    states = []
    for u in rng.uniform(size=5000):
        mon.observe(0, float(u), u > 0.7, True)
        states.append(mon.stages[0].state)
    assert set(states) == {"ok"}
    assert mon.stage_status(0)["escalation_rate"] == pytest.approx(0.3, abs=0.03)
    flagged_after = None
    for i, u in enumerate(rng.uniform(0.3, 1.0, size=2000)):  # the small model got less sure
        mon.observe(0, float(u), u > 0.7, True)
        if mon.stages[0].state == "drifting":
            flagged_after = i + 1
            break
    assert flagged_after is not None and flagged_after <= 300
    assert any("ok -> drifting" in r.message for r in caplog.records)


def test_shadow_pairs_make_a_stage_violated_only_with_enough_evidence() -> None:
    mon = _monitor(min_pairs=50)
    for u in np.random.default_rng(5).uniform(size=400):
        mon.observe(0, float(u), False, True)  # every answer accepted: accepted share 1
    for i in range(49):
        mon.observe_pair(0, agree=i % 4 != 0)  # 25% disagree
    assert mon.stage_status(0)["state"] == "ok"  # fewer pairs than min_pairs
    mon.observe_pair(0, agree=False)
    st = mon.stage_status(0)
    assert st["state"] == "violated" and st["shadow"]["loss_upper"] > 0.05
    assert st["shadow"]["disagreement_upper"] == pytest.approx(cp_upper(14, 50, 0.9))


def test_monitor_settings_are_validated() -> None:
    for bad in ({"shadow_rate": 1.5}, {"window": 0}, {"min_window": 600}, {"confidence": 0.2}, {"log_path": ""}):
        with pytest.raises(ConfigError):
            MonitorConfig(**bad)  # type: ignore[arg-type]


# --- the engine, on real loopback servers ------------------------------------------------------------------


def _artifact(threshold: float, models: tuple[str, str] = ("sim-small", "sim-large")) -> Artifact:
    grid = np.linspace(0.0, 1.0, 21)
    curve = Curve("sweep", tuple((float(t),) for t in grid[::-1]), tuple(float(1 - t) for t in grid[::-1]),
                  (0.8,) * 21, (1.0,) * 21, 0.9)
    return Artifact(models, "margin_first", (threshold,), "quality", {"max_quality_loss": 0.05, "scorer": "exact"},
                    "0" * 64, 500, True, "test", curve=curve)


@pytest.fixture(scope="module")
def sims() -> object:
    with SimServer(SimConfig(model="sim-small", seed=1)) as small, SimServer(SimConfig(model="sim-large", seed=1)) \
            as large:
        yield small, large


def _cascade(sims: object, threshold: float, **monitor: object) -> Cascade:
    small, large = sims  # type: ignore[misc]
    backends = [OpenAIBackend(model=s.config.model, base_url=s.base_url, max_retries=0) for s in (small, large)]
    tiers = [Tier("small", backends[0], Price(0.1, 0.1)), Tier("large", backends[1], Price(1.0, 1.0))]
    return Cascade(tiers, policy=Policy.from_artifact(_artifact(threshold)),
                   monitor=MonitorConfig(**monitor))  # type: ignore[arg-type]


PROMPTS = [f"question number {i}: what is it?" for i in range(40)]


async def test_every_sampled_accepted_answer_gets_one_shadow_pair_logged(sims: object, tmp_path: Path) -> None:
    log = tmp_path / "shadow.jsonl"
    cascade = _cascade(sims, 0.5, shadow_rate=1.0, shadow_concurrency=64, log_path=str(log), seed=0)
    async with cascade:
        results = await cascade.run_batch(PROMPTS, params={"max_tokens": 6})
        await asyncio.gather(*cascade.shadow.tasks)  # type: ignore[union-attr]
        accepted = [r for r in results if not r.escalated]
        escalated = [r for r in results if r.escalated]
        assert accepted and escalated
        status = cascade.monitor.status()  # type: ignore[union-attr]
        stage = status["stages"][0]
        assert stage["requests"] == 40 and stage["escalations"] == len(escalated)
        assert stage["shadow"]["pairs"] == len(accepted) == status["shadow"]["calls"] - len(escalated)
        assert status["shadow"]["cost"] > 0 and all(r.cost == sum(c.cost for c in r.calls) for r in results)
        records = [json.loads(line) for line in log.read_text().splitlines()]
        assert len(records) == 40 and all(r["sampled"] for r in records)  # escalated: the first answer redone
        by_prompt = {r["prompt"]: r for r in records}
        for res, prompt in zip(results, PROMPTS):
            rec = by_prompt[prompt]
            assert rec["accepted"] == (not res.escalated)
            assert rec["agree"] == (rec["answer"] == rec["last_answer"])  # scorer "exact", same normalisation here
            assert rec["uncertainty"] == pytest.approx(res.uncertainty)
            if not res.escalated:
                assert rec["answer"] == res.text
            else:
                assert rec["last_answer"] == res.text and rec["finish_reason"] != "early_exit"
        assert stage["shadow"]["disagreements"] == sum(not r["agree"] for r in records if r["accepted"])


async def test_shadow_checks_beyond_the_concurrency_bound_are_dropped_not_queued(sims: object) -> None:
    cascade = _cascade(sims, 1.0, shadow_rate=1.0, shadow_concurrency=2)  # threshold 1: every answer accepted
    async with cascade:
        results = await cascade.run_batch(PROMPTS, params={"max_tokens": 4})
        assert not any(r.escalated for r in results)
        assert len(cascade.shadow.tasks) == 2  # type: ignore[union-attr]
        await asyncio.gather(*cascade.shadow.tasks)  # type: ignore[union-attr]
        status = cascade.monitor.status()  # type: ignore[union-attr]
        assert status["shadow"]["calls"] == 2 and status["shadow"]["dropped"] == 38


async def test_a_swap_applies_to_requests_that_start_after_it(sims: object) -> None:
    cascade = _cascade(sims, 0.2)
    async with cascade:
        gate = asyncio.Event()
        real_generate = cascade.tiers[0].backend.generate

        async def held(*args: object, **kwargs: object) -> object:
            await gate.wait()
            return await real_generate(*args, **kwargs)  # type: ignore[arg-type]

        cascade.tiers[0].backend.generate = held  # type: ignore[method-assign]
        before = asyncio.create_task(cascade.run_batch(PROMPTS[:8], params={"max_tokens": 4}))
        await asyncio.sleep(0)  # the batch has resolved its thresholds and waits at the gate
        cascade.swap_policy(Policy.from_artifact(_artifact(0.8)))
        after = asyncio.create_task(cascade.run_batch(PROMPTS[8:16], params={"max_tokens": 4}))
        await asyncio.sleep(0)
        gate.set()
        old, new = await before, await after
        assert {r.threshold for r in old} == {0.2} and {r.threshold for r in new} == {0.8}
        for r in old + new:
            assert {c.threshold for c in r.calls if c.threshold is not None} == {r.threshold}


async def test_a_bad_swap_is_refused_and_the_old_thresholds_stay(sims: object) -> None:
    cascade = _cascade(sims, 0.3)
    async with cascade:
        with pytest.raises(ArtifactError, match="models"):
            cascade.swap_policy(Policy.from_artifact(_artifact(0.9, ("other-small", "other-large"))))
        with pytest.raises(ArtifactError, match="measure"):
            cascade.swap_policy(Policy.fixed(0.9, "entropy_first"))
        assert cascade.policy.thresholds == (0.3,)
        assert (await cascade.run(PROMPTS[0], params={"max_tokens": 4})).threshold == 0.3


def test_an_artifact_gives_the_first_stage_its_reference_and_calibrated_rate() -> None:
    mon = Monitor.for_policy(MonitorConfig(), Policy.from_artifact(_artifact(0.35)), ["sim-small", "sim-large"])
    ref = mon.stages[0].reference
    assert ref is not None and ref.n == 500 and not ref.exact
    assert mon.stages[0].expected_rate == pytest.approx(0.7)  # between grid points: the one below
    assert mon.target == 0.05
    on_grid = float(np.linspace(0.0, 1.0, 21)[6])
    mon = Monitor.for_policy(MonitorConfig(), Policy.from_artifact(_artifact(on_grid)), ["sim-small", "sim-large"])
    assert mon.stages[0].expected_rate == pytest.approx(1 - on_grid)  # the curve's own point
    fixed = Monitor.for_policy(MonitorConfig(), Policy.fixed(0.3), ["a", "b"])
    assert fixed.stages[0].reference is None and fixed.target is None and fixed.stage_status(0)["state"] == "ok"


async def test_cascade_calibrate_refits_from_the_shadow_log(tmp_path: Path) -> None:
    import yaml

    from calibration.cli import main as calibrate

    log = tmp_path / "shadow.jsonl"
    with SimServer(SimConfig(model="sim-small", seed=1)) as small, SimServer(SimConfig(model="sim-large", seed=2)) \
            as large:
        backends = [OpenAIBackend(model=s.config.model, base_url=s.base_url, max_retries=0) for s in (small, large)]
        cascade = Cascade(small=backends[0], large=backends[1], policy=Policy.fixed(0.5, "choice_margin"),
                          monitor=MonitorConfig(shadow_rate=1.0, shadow_concurrency=200, log_path=str(log), seed=0))
        async with cascade:
            prompts = [f"review {i}: is it good?" for i in range(150)]
            await cascade.run_batch(prompts, choices=[["yes", "no", "maybe"]] * 150)
            await asyncio.gather(*cascade.shadow.tasks)  # type: ignore[union-attr]
        config = tmp_path / "config.yaml"
        tier = {"kind": "openai", "max_retries": 0}
        config.write_text(yaml.safe_dump({"tiers": [
            {"name": "small", "backend": {**tier, "model": "sim-small", "base_url": small.base_url}},
            {"name": "large", "backend": {**tier, "model": "sim-large", "base_url": large.base_url}}],
            "measure": "choice_margin", "thresholds": [0.5]}))
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert len(records) == 150 and 10 < sum(not r["agree"] for r in records) < 140
    out = tmp_path / "refit.json"
    assert calibrate(["--from-log", str(log), "--config", str(config), "--max-quality-loss", "0.2",
                      "--out", str(out)]) == 0
    art = Artifact.load(out, expect_models=["sim-small", "sim-large"], expect_measure="choice_margin")
    assert art.params["claim"] == "disagreement" and "not against ground truth" in art.params["labels"]
    assert art.n == 150 and art.feasible
    u = np.array([r["scores"]["choice_margin"] for r in records])
    agree = np.array([r["agree"] for r in records])
    kept = u <= art.thresholds[0]
    assert np.mean(kept & ~agree) <= 0.2  # on the log itself the refit cascade differs from the last tier <= 20%
    assert kept.any()  # and it keeps some small answers: agreement is predictable from the margin or not at all
    broken = tmp_path / "broken.jsonl"
    broken.write_text(log.read_text().splitlines()[0] + "\n{not json\n")
    assert calibrate(["--from-log", str(broken), "--config", str(config), "--max-quality-loss", "0.2",
                      "--out", str(tmp_path / "x.json")]) == 2
