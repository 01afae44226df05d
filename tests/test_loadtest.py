"""The load-test harness: percentiles, loopback guard, closed and open loops, stop conditions, faults, the CLI.

Every run is against real servers on 127.0.0.1: simulated OpenAI-compatible servers (cascade.simulate) behind
real OpenAIBackend tiers, or loaded directly over HTTP.
"""

from __future__ import annotations

import json
import math
import random
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from conftest import eval_data

from cascade.errors import ConfigError
from cascade.simulate import SimConfig, SimServer

# eval/ is run from the checkout (python -m eval.loadtest), not installed: make the checkout importable.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from eval.loadtest.cli import loadtest, main
from eval.loadtest.load import LoadShape, warm_up
from eval.loadtest.prompts import (
    DATASETS,
    dataset_prompts,
    generated_prompts,
    load_prompts,
)
from eval.loadtest.sim import SimOptions, SimulatedCascade
from eval.loadtest.stats import Outcome, Recorder, percentile, percentiles
from eval.loadtest.targets import HttpTarget, RequestFailed, check_loopback

FAST = SimOptions(mode="thread", small=SimConfig(model="sim-small", latency_per_token_s=0.001, seed=1),
                  large=SimConfig(model="sim-large", latency_per_request_s=0.01, latency_per_token_s=0.002, seed=2),
                  max_tokens=8, batch_wait_ms=2.0)
PROMPTS = generated_prompts(60, seed=3)


def assert_counts_add_up(report: dict, result) -> None:
    assert report["sent"] == report["answered"] + report["failed"]
    assert report["lost"] == 0 and report["duplicates"] == 0 and report["exactly_one_outcome_each"]
    assert len(result.recorder.outcomes) == report["sent"]
    assert sorted(o.id for o in result.recorder.outcomes) == list(range(report["sent"]))


# ------------------------------------------------------------------ percentiles


def test_percentiles_on_known_latencies():
    xs = [15.0, 20.0, 35.0, 40.0, 50.0]
    # nearest rank: the smallest value with at least q% of the values at or below it
    assert [percentile(xs, q, "nearest") for q in (0, 5, 30, 40, 50, 100)] == [15, 15, 20, 20, 35, 50]
    # linear (type 7): rank h = (n - 1) q / 100, interpolated
    assert percentile(xs, 40) == pytest.approx(29.0)  # h = 1.6: 20 + 0.6 * 15
    assert percentile(xs, 50) == 35.0 and percentile(xs, 0) == 15.0 and percentile(xs, 100) == 50.0
    assert percentile(list(reversed(xs)), 90) == pytest.approx(46.0)  # order does not matter
    ms = list(range(1, 101))  # 1..100 ms
    assert percentile(ms, 99, "nearest") == 99 and percentile(ms, 99) == pytest.approx(99.01)
    assert percentile([7.0], 99) == 7.0 and math.isnan(percentile([], 50))
    assert percentiles([0.001, 0.002, 0.003], (50, 100), scale=1000) == {"p50": 2.0, "p100": 3.0}
    assert percentiles([], (50,)) == {"p50": None}


def test_linear_percentile_matches_numpy():
    rng = random.Random(0)
    for n in (1, 2, 3, 10, 101, 1000):
        xs = [rng.expovariate(1.0) for _ in range(n)]
        for q in (0, 1, 50, 95, 99, 99.9, 100):
            assert percentile(xs, q) == pytest.approx(float(np.percentile(xs, q)), rel=1e-12, abs=1e-12)


@pytest.mark.parametrize("bad", [-1, 100.5, math.nan])
def test_percentile_rejects_bad_q(bad):
    with pytest.raises(ValueError):
        percentile([1.0], bad)
    with pytest.raises(ValueError):
        percentile([1.0, math.nan], 50)


def test_recorder_detects_lost_and_duplicated_outcomes():
    rec = Recorder()
    a, b, _ = rec.begin(), rec.begin(), rec.begin()
    rec.finish(Outcome(a, 0.0, 1.0))
    rec.finish(Outcome(b, 0.0, 1.0, "http_500"))
    rec.finish(Outcome(a, 0.0, 2.0))  # a second outcome for one request is not counted, only flagged
    assert (rec.sent, rec.answered, rec.failed, rec.lost, rec.duplicates) == (3, 1, 1, 1, 1)
    assert rec.in_flight == 1 and dict(rec.failures) == {"http_500": 1}


# ------------------------------------------------------------------ loopback guard


@pytest.mark.parametrize("url,base", [
    ("http://127.0.0.1:8000", "http://127.0.0.1:8000/v1"),
    ("http://127.1.2.3:9/v1/", "http://127.1.2.3:9/v1"),
    ("http://localhost:8000/api", "http://localhost:8000/api/v1"),
    ("http://[::1]:8000/v1", "http://[::1]:8000/v1"),
    ("https://[::ffff:127.0.0.1]:443", "https://[::ffff:127.0.0.1]:443/v1"),
])
def test_loopback_targets_are_accepted(url, base):
    assert check_loopback(url) == base


@pytest.mark.parametrize("url", ["http://10.0.0.1:8000", "http://8.8.8.8/v1", "http://0.0.0.0:8000",
                                 "http://example.com", "http://localhost.example.com", "http://[2001:db8::1]:80",
                                 "ftp://127.0.0.1", "127.0.0.1:8000", "http://"])
def test_non_loopback_targets_are_refused(url):
    with pytest.raises(ConfigError):
        HttpTarget(url)


def test_cli_refuses_a_remote_target_before_sending(capsys):
    # 10.255.255.1 is unroutable: the address check refuses it before any connection (and no run, no report)
    code = main(["--target", "http://10.255.255.1:8000", "--users", "2", "--duration", "1", "--warmup", "1"])
    out = capsys.readouterr()
    assert code == 2 and "only loopback targets are allowed" in out.err and out.out == ""


# ------------------------------------------------------------------ load shapes on the simulated cascade


async def test_closed_loop_counts_add_up_and_stops_at_duration():
    shape = LoadShape(users=12, duration_s=1.2, think_time_s=0.05, ramp_up_s=0.3, grace_s=5.0,
                      sample_interval_s=0.1)
    async with SimulatedCascade(replace(FAST, threshold=0.5)) as sim:
        await warm_up(sim.target, PROMPTS, 2)  # imports torch: not part of the timed run
        report, result = await loadtest(sim.target, PROMPTS, shape, warmup=0)
    assert_counts_add_up(report, result)
    assert report["failed"] == 0 and report["answered"] > 12  # every request answered: none waited out the grace
    assert max(o.start_s for o in result.recorder.outcomes) < shape.duration_s  # nothing sent after the end
    assert result.stopped_by == "duration"
    assert 0 < report["escalated_share"] < 1 and set(report["tiers"]) == {"small", "large"}
    assert report["tiers"]["small"]["calls"] == report["answered"]
    assert report["tiers"]["large"]["calls"] == round(report["escalated_share"] * report["answered"])
    assert report["engine_overhead_ms"]["n"] == report["answered"]
    assert 0 <= report["engine_overhead_ms"]["p50"] <= report["latency_ms"]["p50"]
    assert report["cost"]["total"] > 0 and report["max_in_flight"] <= 12
    assert report["timeline"] and report["timeline"][-1]["sent"] <= report["sent"]
    ramp = sorted(o.start_s for o in result.recorder.outcomes)[:12]
    assert ramp[-1] > 0.1  # users started over the ramp-up, not all at once


async def test_max_requests_stops_early():
    shape = LoadShape(users=5, duration_s=20.0, think_time_s=0.0, max_requests=17, grace_s=5.0)
    async with SimulatedCascade(FAST) as sim:
        await warm_up(sim.target, PROMPTS, 1)
        report, result = await loadtest(sim.target, PROMPTS, shape, warmup=0)
    assert result.stopped_by == "max_requests"  # not by the 20 s duration
    assert report["sent"] == 17 and report["answered"] == 17
    assert_counts_add_up(report, result)


async def test_open_loop_poisson_arrivals():
    shape = LoadShape(rate=80.0, duration_s=1.0, grace_s=5.0, seed=1)
    async with SimulatedCascade(FAST) as sim:
        report, result = await loadtest(sim.target, PROMPTS, shape, warmup=1)
    assert_counts_add_up(report, result)
    assert report["load"]["kind"] == "open" and report["failed"] == 0
    assert 50 <= report["sent"] <= 115  # Poisson(80): well within +-4 sigma
    starts = sorted(o.start_s for o in result.recorder.outcomes)
    assert starts[-1] < 1.0
    gaps = np.diff(starts)
    assert gaps.mean() == pytest.approx(1 / 80, rel=0.35)  # exponential inter-arrival times


async def test_in_flight_requests_get_a_bounded_grace_then_are_counted():
    hanging = SimConfig(model="sim-model", timeout_rate=1.0, hang_s=30.0)
    async with SimServer(hanging) as server:
        target = HttpTarget(server.url, max_tokens=4)
        await target.start()
        shape = LoadShape(users=4, duration_s=0.3, think_time_s=0.0, grace_s=0.4)
        report, result = await loadtest(target, PROMPTS, shape, warmup=0)
        await target.aclose()
    # cut at the end of the grace, counted, and not waited for (the server hangs 30 s)
    assert report["sent"] == 4 and report["failed"] == 4 and report["failed_by_kind"] == {"unfinished_at_stop": 4}
    assert_counts_add_up(report, result)


async def test_http_target_streams_and_reports_time_to_first_token():
    async with SimServer(SimConfig(model="peer", latency_per_token_s=0.002, error_rate=0.2, seed=5)) as server:
        target = HttpTarget(f"http://localhost:{server.url.rsplit(':', 1)[1]}", max_tokens=6)
        await target.start()
        assert target.model == "peer"  # read from /v1/models
        shape = LoadShape(users=6, duration_s=0.8, think_time_s=0.01, stream=True)
        report, result = await loadtest(target, PROMPTS, shape, warmup=2)
        await target.aclose()
    assert_counts_add_up(report, result)
    assert report["failed_by_kind"].get("http_500", 0) == report["failed"] > 0  # what users of a 20% failing peer see
    assert report["ttft_ms"]["p50"] <= report["latency_ms"]["p50"]
    assert report["engine_overhead_ms"]["n"] == 0  # a plain peer reports no backend time
    assert any("engine overhead unknown" in n for n in report["notes"])


async def test_http_target_names_what_went_wrong():
    async with SimServer(SimConfig(model="peer", timeout_rate=1.0, hang_s=30.0)) as server:
        target = HttpTarget(server.url, model="peer", timeout_s=0.3)
        await target.start()
        with pytest.raises(RequestFailed) as hung:  # nothing read for timeout_s
            await target.send("hello", stream=False)
        await target.aclose()
    async with SimServer(SimConfig(model="peer")) as server:
        target = HttpTarget(server.url, model="peer")
        await target.start()
        with pytest.raises(RequestFailed) as wrong:
            target.model = "another"
            await target.send("hello", stream=True)
    with pytest.raises(RequestFailed) as gone:  # the server stopped: nothing listens on its port any more
        await target.send("hello", stream=False)
    await target.aclose()
    assert (hung.value.kind, wrong.value.kind, gone.value.kind) == ("timeout", "http_404", "connect_error")
    assert "does not exist" in str(wrong.value)


# ------------------------------------------------------------------ fault injection


async def test_large_tier_down_mid_run_degrades_answers_and_loses_none():
    options = replace(FAST, threshold=0.5, fault="large-down", fault_at_s=0.5)
    shape = LoadShape(users=10, duration_s=1.5, think_time_s=0.02, grace_s=5.0)
    async with SimulatedCascade(options) as sim:
        report, result = await loadtest(sim.target, PROMPTS, shape, warmup=2,
                                        events=[(options.fault_at_s, sim.inject)], fault="large-down",
                                        fault_at_s=options.fault_at_s)
    assert_counts_add_up(report, result)
    fault = report["fault"]
    assert report["events"] and "stopped" in report["events"][0]["what"]
    at = fault["at_s"]
    assert 0.5 <= at < 1.0 and fault["before"]["escalated"] > 0
    assert not any(o.degraded for o in result.recorder.outcomes if o.end_s < at)  # all well before the stop
    assert fault["after"]["degraded"] > 0  # escalations after the stop get the small tier's answer, marked
    assert report["failed"] == 0  # degrade mode: every user got an answer
    assert report["tiers"]["large"]["call_errors"] == report["degraded"]


async def test_large_tier_failing_shows_errors_by_kind():
    options = replace(FAST, threshold=0.5, fault="large-failing", fault_at_s=0.0, fail_rate=1.0,
                      backend_retries=0)
    shape = LoadShape(users=6, duration_s=0.8, think_time_s=0.02)
    async with SimulatedCascade(options) as sim:
        report, result = await loadtest(sim.target, PROMPTS, shape, warmup=0,
                                        events=[(0.0, sim.inject)], fault="large-failing", fault_at_s=0.0)
    assert_counts_add_up(report, result)
    escalated = [o for o in result.recorder.outcomes if o.escalated]
    assert escalated and all(o.degraded for o in escalated)
    assert all("HTTP 500" in (o.calls[-1].error or "") for o in escalated)


# ------------------------------------------------------------------ prompts and the command line


def test_prompt_files(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "hello"}\n\n{"messages": [{"role": "user", "content": "hi"}], "id": 3}\n')
    assert load_prompts(path) == ["hello", [{"role": "user", "content": "hi"}]]
    path.write_text('{"text": "no prompt field"}\n')
    with pytest.raises(ConfigError, match=r"p\.jsonl:1"):
        load_prompts(path)
    with pytest.raises(ConfigError):
        load_prompts(tmp_path / "missing.jsonl")
    assert len(set(map(str, generated_prompts(200)))) == 200


@pytest.mark.parametrize("name", sorted(DATASETS))
def test_dataset_conversion(name):
    prompts = dataset_prompts(name, eval_data()[0], limit=20)  # the real files, else the bundled excerpts
    assert len(prompts) == 20 and all(isinstance(p, str) and p.strip() for p in prompts)


def test_cli_simulated_run_writes_report_and_plot(tmp_path, capsys):
    out, png = tmp_path / "r.json", tmp_path / "r.png"
    code = main(["--simulated", "--sim-mode", "thread", "--users", "8", "--duration", "1", "--think-time", "0.05",
                 "--large-latency", "0.01", "0.002", "--small-latency", "0", "0.001", "--max-tokens", "8",
                 "--report-json", str(out), "--plot", str(png), "--warmup", "2"])
    assert code == 0
    report = json.loads(out.read_text())
    for key in ("sent", "answered", "failed", "lost", "throughput_rps", "latency_ms", "engine_overhead_ms",
                "escalated_share", "tiers", "timeline"):
        assert key in report
    assert set(report["latency_ms"]) >= {"p50", "p95", "p99"} and set(report["engine_overhead_ms"]) >= {"p50", "p99"}
    assert report["lost"] == 0 and report["simulated"]["batching_stats"]["small"]["inner_calls"] > 0
    assert png.stat().st_size > 10_000
    assert "lost 0" in capsys.readouterr().out


def test_cli_simulated_behind_cascade_serve(tmp_path):
    pytest.importorskip("cascade.server")
    out = tmp_path / "r.json"
    code = main(["--simulated", "--serve", "--users", "6", "--duration", "1.5", "--think-time", "0.05", "--stream",
                 "--large-latency", "0.01", "0.002", "--small-latency", "0", "0.001", "--max-tokens", "8",
                 "--fault", "large-down", "--fault-at", "0.7", "--report-json", str(out), "--quiet"])
    assert code == 0
    r = json.loads(out.read_text())
    assert r["sent"] == r["answered"] + r["failed"] and r["lost"] == 0 and r["failed"] == 0
    assert r["engine_overhead_ms"]["n"] == r["answered"]  # the server's `cascade` field gives backend time
    assert r["server_engine_overhead_ms"]["p50"] <= r["engine_overhead_ms"]["p50"]
    assert r["ttft_ms"]["p50"] is not None and set(r["tiers"]) == {"small", "large"}
    assert r["fault"]["after"]["degraded"] > 0 and r["fault"]["before"]["escalated"] > 0
    assert any(s["queue_depth"] is not None for s in r["timeline"])  # read from /health


async def test_local_mode_measures_the_engine_without_http():
    options = replace(FAST, mode="local", threshold=0.5, fault="large-down", fault_at_s=0.4)
    shape = LoadShape(users=200, duration_s=1.0, think_time_s=0.05, ramp_up_s=0.2)
    async with SimulatedCascade(options) as sim:
        assert not sim.servers  # no sockets at all
        report, result = await loadtest(sim.target, PROMPTS, shape, warmup=1,
                                        events=[(options.fault_at_s, sim.inject)], fault="large-down",
                                        fault_at_s=options.fault_at_s)
    assert_counts_add_up(report, result)
    assert report["failed"] == 0 and report["fault"]["after"]["degraded"] > 0
    assert report["engine_overhead_ms"]["p50"] < 5.0  # the engine's own work is well under a millisecond


def test_a_served_cascade_child_runs_the_code_on_its_pythonpath(tmp_path: Path) -> None:
    """``--baseline-src``: ``python -c`` started elsewhere must import the other checkout's ``cascade``."""
    import subprocess

    from eval.loadtest.serve import child_code

    (tmp_path / "cascade").mkdir()
    (tmp_path / "cascade" / "__init__.py").write_text("", encoding="utf-8")
    env, cwd = child_code(str(tmp_path))
    out = subprocess.run([sys.executable, "-c", "import cascade; print(cascade.__file__)"], env=env, cwd=cwd,
                         capture_output=True, text=True, check=True).stdout
    assert Path(out.strip()).parent == tmp_path / "cascade"
    assert child_code(None) == (None, None)
