"""Constrained requests through the Cascade: every tier answers with one of the allowed answers."""

from __future__ import annotations

import asyncio
import math

import pytest
from conftest import make_backend
from test_engine import FailingBackend

from cascade import Cascade, GenerationParams, InvalidRequestError
from cascade.batching import MicroBatcher
from cascade.errors import ChoicesUnsupportedError
from cascade.types import CascadeChunk, CascadeResult

PROMPTS = ["the movie was good", "what capital of france", "is it yes", "two three four", "a movie"]
CHOICES = [["positive", "negative"], ["paris", "the capital of france", "two"], ["yes", "no"], ["one", "four"],
           ["good", "bad", "awful"]]


@pytest.mark.parametrize("measure", ["choice_margin", "choice_entropy", "margin_first"])
def test_constrained_answers_follow_the_threshold(measure):
    small, large = make_backend(0), make_backend(1)
    own = asyncio.run(small.choose(PROMPTS, CHOICES))
    big = asyncio.run(large.choose(PROMPTS, CHOICES, scores=False))
    scores = [g.scores[measure] for g in own]
    threshold = sorted(scores)[len(scores) // 2]
    cascade = Cascade(small=small, large=large, measure=measure, threshold=threshold)
    results = cascade.run_batch_sync(PROMPTS, choices=CHOICES)
    for r, s, g, lg, allowed in zip(results, scores, own, big, CHOICES, strict=True):
        assert r.text in allowed and r.uncertainty == pytest.approx(s, abs=1e-5)
        assert r.text == (lg.text if s > threshold else g.text)
        assert r.escalated == (s > threshold) and r.calls[0].finish_reason == "stop"
    assert any(r.escalated for r in results) and not all(r.escalated for r in results)


def test_mixed_batch_and_single_run():
    small, large = make_backend(0), make_backend(1)
    cascade = Cascade(small=small, large=large, measure="margin_first", threshold=0.99,
                      params=GenerationParams(max_tokens=4))
    mixed = cascade.run_batch_sync(PROMPTS[:2], choices=[None, CHOICES[1]])
    alone = cascade.run_sync(PROMPTS[0])
    assert mixed[0].text == alone.text and mixed[0].uncertainty == pytest.approx(alone.uncertainty, abs=1e-5)
    assert mixed[1].text in CHOICES[1]
    one = cascade.run_sync(PROMPTS[1], choices=CHOICES[1])
    assert one.text == mixed[1].text
    with pytest.raises(InvalidRequestError):
        cascade.run_sync(PROMPTS[1], choices=["a", "a"])
    with pytest.raises(InvalidRequestError):
        cascade.run_batch_sync(PROMPTS[:2], choices=[None])


def test_a_choice_measure_escalates_a_free_request_and_says_why():
    cascade = Cascade(small=make_backend(0), large=make_backend(1), measure="choice_margin", threshold=1.0,
                      params=GenerationParams(max_tokens=3))
    r = cascade.run_sync("the movie was")
    assert r.escalated and math.isnan(r.uncertainty)
    assert "choice_margin undefined (the request has no choices)" in r.reason
    assert not cascade.run_sync("the movie was", choices=["good", "bad"]).escalated  # threshold 1.0: never


def test_a_tier_without_choose_is_a_typed_error_never_a_free_answer():
    down = FailingBackend(RuntimeError("never called"))
    first = Cascade(small=down, large=make_backend(1), threshold=0.5)  # type: ignore[arg-type]
    with pytest.raises(ChoicesUnsupportedError, match="cannot answer with choices"):
        first.run_sync("the movie", choices=["good", "bad"])
    raising = Cascade(small=make_backend(0), large=down, threshold=-1.0, on_error="raise")  # type: ignore[arg-type]
    with pytest.raises(ChoicesUnsupportedError):
        raising.run_sync("the movie", choices=["good", "bad"])
    degrading = Cascade(small=make_backend(0), large=down, threshold=-1.0)  # type: ignore[arg-type]
    r = degrading.run_sync("the movie", choices=["good", "bad"])
    assert r.degraded and r.text in ("good", "bad") and "ChoicesUnsupportedError" in r.reason
    assert down.calls == 0


def test_streaming_a_constrained_request_sends_one_chunk():
    cascade = Cascade(small=make_backend(0), large=make_backend(1), measure="choice_entropy", threshold=0.5)

    async def collect():
        return [x async for x in cascade.stream("is it yes", choices=["yes", "no"])]

    items = asyncio.run(collect())
    assert isinstance(items[0], CascadeChunk) and isinstance(items[-1], CascadeResult) and len(items) == 2
    assert items[0].text == items[-1].text in ("yes", "no") and items[0].tier == items[-1].tier


def test_micro_batcher_merges_concurrent_choose_calls():
    inner = make_backend(0)
    batcher = MicroBatcher(inner, max_batch_size=8, max_wait_ms=50.0)

    async def run():
        calls = [batcher.choose([p], [c]) for p, c in zip(PROMPTS, CHOICES, strict=True)]
        free = batcher.generate(["the movie"], GenerationParams(max_tokens=2))
        return await asyncio.gather(*calls, free)

    *chosen, free = asyncio.run(run())
    direct = asyncio.run(inner.choose(PROMPTS, CHOICES))
    assert [g[0].text for g in chosen] == [g.text for g in direct]
    for g, d in zip(chosen, direct, strict=True):
        assert g[0].choice_logprobs == pytest.approx(d.choice_logprobs, abs=1e-4)
    assert free[0].choice_logprobs == () and batcher.batches == 2  # constrained and free calls never share
    with pytest.raises(ChoicesUnsupportedError):
        asyncio.run(MicroBatcher(FailingBackend(RuntimeError("x"))).choose(["a"], [["b"]]))  # type: ignore[arg-type]


def test_a_policy_prior_corrects_each_tiers_constrained_answers():
    from cascade.choice_prior import apply_prior, choice_set_key
    from cascade.policy import Policy

    small, large = make_backend(0), make_backend(1)
    prompts, choices = PROMPTS[:4], [["yes", "no"]] * 4
    own = asyncio.run(small.choose(prompts, choices))
    offsets = (own[0].choice_logprobs[0] - own[0].choice_logprobs[1] + 0.5, 0.0)  # pushes away from "yes"
    policy = Policy("choice_margin", (0.5,), choice_priors={0: {choice_set_key(["yes", "no"]): offsets}})
    results = Cascade(small=small, large=large, policy=policy).run_batch_sync(prompts, choices=choices)
    for r, g in zip(results, own, strict=True):
        fixed = apply_prior(g, ["yes", "no"], offsets)
        assert r.uncertainty == pytest.approx(fixed.scores["choice_margin"], abs=1e-6)
        if not r.escalated:
            assert r.text == fixed.text
    assert results[0].escalated or results[0].text == "no"
    other = Cascade(small=small, large=large, policy=policy).run_sync(prompts[0], choices=["no", "yes"])
    assert other.uncertainty == pytest.approx(own[0].scores["choice_margin"], abs=1e-5)  # another order: no prior
