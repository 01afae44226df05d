"""Token streaming: from the local backend, and through the cascade with the decision on the first token."""

from __future__ import annotations

import pytest
from conftest import make_backend, until
from test_engine import FailingBackend

from cascade import BackendError, Cascade, GenerationParams
from cascade.types import CascadeChunk, CascadeResult, EarlyExit

PROMPTS = ["the movie was good", "what capital of france", "is it yes", "two three four", "a movie"]
PARAMS = GenerationParams(max_tokens=6)


async def collect(stream):
    chunks, result = [], None
    async for item in stream:
        if isinstance(item, CascadeChunk):
            assert result is None, "a chunk after the result"
            chunks.append(item)
        else:
            result = item
    assert isinstance(result, CascadeResult)
    return chunks, result


async def test_backend_stream_matches_generate():
    backend = make_backend(0)
    for prompt in PROMPTS:
        events = [e async for e in backend.stream(prompt, PARAMS)]
        [full] = await backend.generate([prompt], PARAMS)
        assert events[0].kind == "first" and events[-1].kind == "done"
        assert events[0].scores["margin_first"] == pytest.approx(full.scores["margin_first"], abs=1e-7)
        assert events[0].scores["entropy_first"] == pytest.approx(full.scores["entropy_first"], abs=1e-6)
        assert "".join(e.text for e in events if e.kind == "delta") == full.text
        assert events[-1].generation.token_ids == full.token_ids
        exited = [e async for e in backend.stream(prompt, PARAMS, early_exit=EarlyExit("margin_first", (-1.0,)))]
        assert exited[-1].generation.finish_reason == "early_exit" and exited[-1].generation.completion_tokens == 1


async def test_backend_stream_stop_strings_never_leak():
    backend = make_backend(0)
    [full] = await backend.generate(["what capital of france"], GenerationParams(max_tokens=8))
    stop = full.text.split()[2]
    params = GenerationParams(max_tokens=8, stop=(stop,))
    events = [e async for e in backend.stream("what capital of france", params)]
    streamed = "".join(e.text for e in events if e.kind == "delta")
    assert stop not in streamed and streamed == events[-1].generation.text


@pytest.mark.parametrize("measure", ["margin_first", "margin_mean"])
async def test_cascade_stream_equals_run(measure):
    small, large = make_backend(0), make_backend(1)
    scores = [g.scores[measure] for g in await small.generate(PROMPTS, PARAMS)]
    threshold = sorted(scores)[2]
    cascade = Cascade(small=small, large=large, measure=measure, threshold=threshold, params=PARAMS)
    tiers = set()
    for prompt in PROMPTS:
        chunks, result = await collect(cascade.stream(prompt))
        expected = await cascade.run(prompt)
        assert "".join(c.text for c in chunks) == result.text == expected.text
        assert {c.tier for c in chunks} <= {result.tier}
        assert (result.tier, result.escalated) == (expected.tier, expected.escalated)
        assert result.uncertainty == pytest.approx(expected.uncertainty, abs=1e-6)
        assert [c.completion_tokens for c in result.calls] == [c.completion_tokens for c in expected.calls]
        tiers.add(result.tier)
    assert tiers == {"small", "large"}


async def test_accepted_answer_streams_while_small_model_still_generates():
    small, large = make_backend(0), make_backend(1)
    params = GenerationParams(max_tokens=40)
    cascade = Cascade(small=small, large=large, threshold=10.0, params=params)  # always accept
    stream = cascade.stream("what capital of france")
    first = await stream.__anext__()
    assert isinstance(first, CascadeChunk) and first.tier == "small"
    assert small._lock.locked(), "the first chunk arrived only after the whole small answer"
    await stream.aclose()  # the client went away: generation stops at the next token
    await until(lambda: not small._lock.locked(), "the small model's generation stopped")
    assert not small._lock.locked()
    _chunks, result = await collect(cascade.stream("a movie", params=GenerationParams(max_tokens=3)))
    assert result.tier == "small"


async def test_escalated_stream_early_exits_and_degrades():
    small = make_backend(0)
    cascade = Cascade(small=small, large=make_backend(1), threshold=-1.0, params=PARAMS)
    chunks, result = await collect(cascade.stream("a movie"))
    assert result.tier == "large" and result.calls[0].finish_reason == "early_exit"
    assert all(c.tier == "large" for c in chunks)
    down = Cascade(small=small, large=FailingBackend(BackendError("down")), threshold=-1.0, params=PARAMS)
    chunks, result = await collect(down.stream("a movie"))
    [full] = await small.generate(["a movie"], PARAMS)
    assert result.degraded and result.text == full.text == "".join(c.text for c in chunks)
    raising = Cascade(small=small, large=FailingBackend(BackendError("down")), threshold=-1.0, on_error="raise")
    with pytest.raises(BackendError):
        await collect(raising.stream("a movie"))


async def test_remote_tiers_stream_with_early_exit():
    """OpenAI-compatible tiers (real loopback servers): streamed answers equal run(), escalations exit early."""
    from cascade.backends.openai_compat import OpenAIBackend
    from cascade.simulate import SimConfig, SimServer

    prompts = [f"[[sim:confidence={c}]] question {i}" for i, c in enumerate((0.95, 0.2, 0.9, 0.1))]
    async with SimServer(SimConfig(model="small", seed=1, latency_per_token_s=0.002)) as s1, \
            SimServer(SimConfig(model="large", seed=2)) as s2:
        small = OpenAIBackend(model="small", base_url=s1.base_url, max_retries=0)
        large = OpenAIBackend(model="large", base_url=s2.base_url, max_retries=0)
        first = [(await small.generate([p], PARAMS))[0].scores["margin_first"] for p in prompts]
        threshold = sorted(first)[1]
        cascade = Cascade(small=small, large=large, threshold=threshold, params=PARAMS)
        events = [e async for e in small.stream(prompts[0], PARAMS)]
        assert events[0].kind == "first" and events[-1].kind == "done"
        assert "".join(e.text for e in events if e.kind == "delta") == events[-1].generation.text
        tiers = set()
        for prompt, u in zip(prompts, first):
            chunks, result = await collect(cascade.stream(prompt))
            expected = await cascade.run(prompt)
            assert "".join(c.text for c in chunks) == result.text == expected.text
            assert result.tier == expected.tier and result.uncertainty == pytest.approx(u, abs=1e-6)
            if result.escalated:
                assert result.calls[0].finish_reason == "early_exit" and result.calls[0].completion_tokens == 1
            tiers.add(result.tier)
        assert tiers == {"small", "large"}
        await cascade.aclose()
