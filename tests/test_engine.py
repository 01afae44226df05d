"""The Cascade engine on tiny random models: decisions, early exit, costs, failures, N tiers."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest
from conftest import make_backend

from cascade import (
    BackendError,
    BackendTimeoutError,
    Cascade,
    GenerationParams,
    InvalidRequestError,
    OverloadedError,
    Policy,
    Price,
    Tier,
)
from cascade.types import EarlyExit, Generation, Prompt

PROMPTS = ["the movie was good", "what capital of france", "is it yes", "two three four", "a movie",
           [{"role": "user", "content": "the answer is paris"}]]
PARAMS = GenerationParams(max_tokens=5)


class FailingBackend:
    """A real backend that always fails (the large tier being down)."""

    def __init__(self, exc: Exception) -> None:
        self.name = "down"
        self.exc = exc
        self.calls = 0

    async def generate(self, prompts: Sequence[Prompt], params: GenerationParams, *, scores: bool = True,
                       early_exit: EarlyExit | None = None) -> list[Generation]:
        self.calls += 1
        raise self.exc

    async def aclose(self) -> None:
        pass


def small_scores(backend, measure="margin_first"):
    gens = asyncio.run(backend.generate(PROMPTS, PARAMS))
    return [g.scores[measure] for g in gens], gens


@pytest.mark.parametrize("measure", ["margin_first", "entropy_mean", "logprob_mean"])
def test_two_tier_follows_threshold(measure):
    small, large = make_backend(0), make_backend(1)
    scores, small_gens = small_scores(small, measure)
    threshold = sorted(scores)[len(scores) // 2]
    cascade = Cascade(small=small, large=large, measure=measure, threshold=threshold, params=PARAMS)
    results = cascade.run_batch_sync(PROMPTS)
    large_gens = asyncio.run(large.generate(PROMPTS, PARAMS, scores=False))
    for r, s, sg, lg in zip(results, scores, small_gens, large_gens):
        assert r.uncertainty == pytest.approx(s, abs=1e-5)
        assert r.threshold == threshold and r.measure == measure
        if s > threshold:
            assert (r.tier, r.tier_index, r.escalated, r.text) == ("large", 1, True, lg.text)
            assert len(r.calls) == 2 and "escalated" in r.reason
        else:
            assert (r.tier, r.escalated, r.text) == ("small", False, sg.text)
            assert len(r.calls) == 1 and "accepted" in r.reason
    assert any(r.escalated for r in results) and not all(r.escalated for r in results)


def test_early_exit_stops_small_answer_after_one_token():
    small, large = make_backend(0), make_backend(1)
    cascade = Cascade(small=small, large=large, measure="margin_first", threshold=-1.0, params=PARAMS)
    r = cascade.run_sync("the movie was good")
    assert r.escalated and r.calls[0].completion_tokens == 1 and r.calls[0].finish_reason == "early_exit"
    no_exit = Cascade(small=small, large=large, measure="margin_first", threshold=-1.0, params=PARAMS,
                      early_exit=False)
    r2 = no_exit.run_sync("the movie was good")
    assert r2.calls[0].completion_tokens == 5 and r2.text == r.text
    # a mean measure needs the whole answer: no early exit
    mean = Cascade(small=small, large=large, measure="margin_mean", threshold=-1.0, params=PARAMS)
    assert mean.run_sync("the movie was good").calls[0].completion_tokens == 5


def test_costs_and_tokens_per_tier():
    small, large = make_backend(0), make_backend(1)
    tiers = [Tier("small", small, Price(1.0, 2.0)), Tier("large", large, Price(10.0, 30.0))]
    cascade = Cascade(tiers, measure="margin_first", threshold=-1.0, params=PARAMS)
    r = cascade.run_sync("the movie was good")
    s, lg = r.calls
    assert s.cost == pytest.approx((s.prompt_tokens * 1 + s.completion_tokens * 2) / 1e6)
    assert lg.cost == pytest.approx((lg.prompt_tokens * 10 + lg.completion_tokens * 30) / 1e6)
    assert r.cost == pytest.approx(s.cost + lg.cost)
    assert r.prompt_tokens == s.prompt_tokens + lg.prompt_tokens > 0


def test_three_tiers_follow_per_stage_thresholds():
    b0, b1, b2 = make_backend(0), make_backend(1), make_backend(2)
    s0, _ = small_scores(b0)
    s1, _ = small_scores(b1)
    t0, t1 = sorted(s0)[2], sorted(s1)[3]
    tiers = [Tier("t0", b0), Tier("t1", b1), Tier("t2", b2)]
    cascade = Cascade(tiers, measure="margin_first", threshold=[t0, t1], params=PARAMS, early_exit=False)
    results = cascade.run_batch_sync(PROMPTS)
    for r, u0, u1 in zip(results, s0, s1):
        expected = 0 if u0 <= t0 else (1 if u1 <= t1 else 2)
        assert r.tier_index == expected, (u0, u1, r.reason)
        assert len(r.calls) == expected + 1
        if expected >= 1:
            assert r.calls[1].uncertainty == pytest.approx(u1, abs=1e-5) and r.calls[1].threshold == t1
    assert {r.tier_index for r in results} == {0, 1, 2}


def test_two_tier_results_unchanged_by_n_tier_path():
    """Two tiers given as small/large or as a tier list give identical results."""
    small, large = make_backend(0), make_backend(1)
    a = Cascade(small=small, large=large, threshold=0.5, params=PARAMS).run_batch_sync(PROMPTS)
    b = Cascade([Tier("small", small), Tier("large", large)], threshold=[0.5], params=PARAMS).run_batch_sync(PROMPTS)
    assert [(x.text, x.tier, x.uncertainty) for x in a] == [(x.text, x.tier, x.uncertainty) for x in b]


@pytest.mark.parametrize("early", [True, False])
def test_failing_large_tier_degrades(early):
    small = make_backend(0)
    down = FailingBackend(BackendTimeoutError("large timed out"))
    cascade = Cascade(small=small, large=down, threshold=-1.0, params=PARAMS, early_exit=early)
    r = cascade.run_sync("the movie was good")
    full = asyncio.run(small.generate(["the movie was good"], PARAMS))[0]
    assert r.degraded and r.tier == "small" and r.text == full.text
    assert r.calls[-1].error and "degraded" in r.reason
    raising = Cascade(small=small, large=down, threshold=-1.0, params=PARAMS, on_error="raise")
    with pytest.raises(BackendTimeoutError):
        raising.run_sync("the movie was good")


class WrongCount(FailingBackend):
    async def generate(self, prompts, params, *, scores=True, early_exit=None):
        return []


@pytest.mark.parametrize("large", [
    FailingBackend(OverloadedError("queue full", retry_after_s=1.0)),  # the large tier's micro-batcher is full
    FailingBackend(InvalidRequestError("prompt has 9000 tokens; the limit is 4096")),  # too long for it
    FailingBackend(asyncio.TimeoutError()),  # a backend's own wait_for
    WrongCount(RuntimeError()),  # a broken backend: no answers at all
])
def test_every_failure_of_a_higher_tier_follows_on_error(large):
    small = make_backend(0)
    r = Cascade(small=small, large=large, threshold=-1.0, params=PARAMS).run_sync("the movie was good")
    full = asyncio.run(small.generate(["the movie was good"], PARAMS))[0]
    assert r.degraded and r.tier == "small" and r.text == full.text and r.calls[-1].error is not None
    with pytest.raises((type(large.exc), BackendError)):
        Cascade(small=small, large=large, threshold=-1.0, params=PARAMS, on_error="raise").run_sync("a movie")


def test_failing_small_tier_raises_and_confident_requests_skip_large():
    down = FailingBackend(BackendError("boom"))
    with pytest.raises(BackendError):
        Cascade(small=down, large=make_backend(1), threshold=0.5).run_sync("hello")
    large = FailingBackend(BackendError("never called"))
    r = Cascade(small=make_backend(0), large=large, threshold=10.0, params=PARAMS).run_sync("a movie")
    assert r.tier == "small" and large.calls == 0


def test_tier_timeout_is_enforced():
    class Slow(FailingBackend):
        async def generate(self, prompts, params, *, scores=True, early_exit=None):
            await asyncio.Event().wait()  # never answers: only the tier timeout ends the call
            raise AssertionError("not reached")

    tiers = [Tier("small", make_backend(0)), Tier("large", Slow(RuntimeError()), timeout_s=0.05)]
    r = Cascade(tiers, threshold=-1.0, params=PARAMS).run_sync("a movie")
    assert r.degraded and "BackendTimeoutError" in r.reason


@pytest.mark.parametrize(
    "prompt",
    ["", "   ", [], [{"role": "user"}], [{"role": "wizard", "content": "x"}], 42, "x" * 300_001,
     [{"role": "system", "content": " "}, {"role": "user", "content": "\n"}], "a \ud800 b"],
)
def test_bad_prompts_are_typed_errors(prompt):
    cascade = Cascade(small=make_backend(0), large=make_backend(1), threshold=0.5)
    with pytest.raises(InvalidRequestError):
        cascade.run_sync(prompt)


def test_bad_construction_is_typed_error():
    small, large = make_backend(0), make_backend(1)
    with pytest.raises(InvalidRequestError):
        Cascade(small=small, large=large)  # no threshold
    with pytest.raises(InvalidRequestError):
        Cascade([Tier("a", small), Tier("b", large), Tier("c", large)], threshold=0.5)  # 1 threshold, 3 tiers
    with pytest.raises(InvalidRequestError):
        Cascade(small=small, large=large, threshold=0.5, measure="nope")
    with pytest.raises(InvalidRequestError):
        GenerationParams(max_tokens=0)
    with pytest.raises(InvalidRequestError):
        GenerationParams(temperature=-1)
    assert GenerationParams(stop="END").stop == ("END",) and GenerationParams(stop=["a", "b"]).stop == ("a", "b")  # type: ignore[arg-type]
    with pytest.raises(InvalidRequestError):
        Cascade(small=small, large=large, threshold=0.5).run_sync("hi", target={"max_large_share": 0.3})


def test_policy_rule_and_cluster_thresholds():
    p = Policy(measure="margin_first", thresholds=(0.5,), cluster_thresholds={1: (0.1,)})
    assert p.thresholds_for() == (0.5,) and p.thresholds_for(1) == (0.1,) and p.thresholds_for(7) == (0.5,)
    small, large = make_backend(0), make_backend(1)
    scores, _ = small_scores(small)
    u = scores[0]
    cascade = Cascade(small=small, large=large, policy=Policy("margin_first", (u + 0.01,), {3: (u - 0.01,)}),
                      params=PARAMS)
    assert cascade.run_sync(PROMPTS[0]).tier == "small"
    r = cascade.run_sync(PROMPTS[0], cluster=3)
    assert r.tier == "large" and r.cluster == 3


async def test_async_context_and_concurrent_runs():
    small, large = make_backend(0), make_backend(1)
    async with Cascade(small=small, large=large, threshold=0.5, params=PARAMS) as cascade:
        results = await asyncio.gather(*(cascade.run(p) for p in PROMPTS))
    assert len(results) == len(PROMPTS)
    assert small.model is None  # closed


async def test_the_sync_face_refuses_a_running_loop():
    cascade = Cascade(small=make_backend(0), large=make_backend(1), threshold=0.5)
    with pytest.raises(InvalidRequestError, match="running event loop"):
        cascade.run_sync("a movie")
