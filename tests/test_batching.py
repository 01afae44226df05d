"""MicroBatcher: merging, limits, cancellation, error isolation, and unchanged answers on a real tiny model."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Sequence
from dataclasses import dataclass, field

import pytest
from conftest import make_backend, until

from cascade.backends.base import Backend
from cascade.batching import MicroBatcher
from cascade.engine import Cascade
from cascade.errors import BackendError, InvalidRequestError, OverloadedError
from cascade.types import EarlyExit, Generation, GenerationParams, Prompt, StreamEvent

PROMPTS = [
    "the movie was good",
    "what is the capital of france",
    "it was awful",
    "answer yes or no",
    "one two three four",
    "the movie is great it is positive",
    "a bad movie",
    "is it good",
]
GREEDY = GenerationParams(max_tokens=6)


@dataclass
class Call:
    prompts: list[Prompt]
    params: GenerationParams
    scores: bool
    early_exit: EarlyExit | None


@dataclass
class EchoBackend:
    """A real, instant backend: answers ``echo:<prompt>``; fails on chosen prompts; can be held at a gate."""

    name: str = "echo"
    calls: list[Call] = field(default_factory=list)
    gate: asyncio.Event | None = None
    fail_on: str | None = None
    invalid_on: str | None = None
    closed: bool = False

    async def generate(self, prompts: Sequence[Prompt], params: GenerationParams, *, scores: bool = True,
                       early_exit: EarlyExit | None = None) -> list[Generation]:
        self.calls.append(Call(list(prompts), params, scores, early_exit))
        if self.gate is not None:
            await self.gate.wait()
        if self.invalid_on is not None and self.invalid_on in prompts:
            raise InvalidRequestError(f"bad prompt {self.invalid_on!r}")
        if self.fail_on is not None and self.fail_on in prompts:
            raise BackendError("model crashed")
        return [Generation(text=f"echo:{p}", model=self.name, scores={"margin_first": 0.5}) for p in prompts]

    async def aclose(self) -> None:
        self.closed = True


def test_is_a_backend() -> None:
    assert isinstance(MicroBatcher(EchoBackend()), Backend)


async def test_same_answers_and_uncertainties_with_and_without_batching() -> None:
    backend = make_backend(0)
    alone = [(await backend.generate([p], GREEDY))[0] for p in PROMPTS]
    batcher = MicroBatcher(backend, max_batch_size=8, max_wait_ms=20)
    batched = await asyncio.gather(*(batcher.generate([p], GREEDY) for p in PROMPTS))
    assert batcher.batches == 1
    for a, [b] in zip(alone, batched):
        assert b.text == a.text
        assert b.token_ids == a.token_ids
        assert b.finish_reason == a.finish_reason
        assert set(b.scores) == set(a.scores)
        for k in a.scores:
            assert b.scores[k] == pytest.approx(a.scores[k], abs=1e-4)


async def test_cascade_decisions_unchanged_by_batching() -> None:
    small, large = make_backend(0), make_backend(1)
    probe = [(await small.generate([p], GREEDY))[0].scores["margin_first"] for p in PROMPTS]
    threshold = sorted(probe)[len(probe) // 2]  # about half escalate
    plain = Cascade(small=small, large=large, threshold=threshold, params=GREEDY)
    expected = [await plain.run(p) for p in PROMPTS]
    wrapped = Cascade(small=MicroBatcher(small, max_wait_ms=20), large=MicroBatcher(large, max_wait_ms=20),
                      threshold=threshold, params=GREEDY)
    got = await asyncio.gather(*(wrapped.run(p) for p in PROMPTS))
    assert [r.tier for r in got] == [r.tier for r in expected]
    assert [r.text for r in got] == [r.text for r in expected]
    for g, e in zip(got, expected):
        assert g.uncertainty == pytest.approx(e.uncertainty, abs=1e-4)
    assert any(r.escalated for r in expected) and not all(r.escalated for r in expected)
    assert isinstance(wrapped.tiers[0].backend, MicroBatcher) and wrapped.tiers[0].backend.batches < len(PROMPTS)


async def test_early_exit_thresholds_are_concatenated_per_prompt() -> None:
    backend = make_backend(0)
    thresholds = [0.0, 1.0, 0.0, 1.0, 0.5, 0.5, 0.0, 1.0]
    alone = [(await backend.generate([p], GREEDY, early_exit=EarlyExit("margin_first", (t,))))[0]
             for p, t in zip(PROMPTS, thresholds)]
    batcher = MicroBatcher(backend, max_batch_size=8, max_wait_ms=20)
    got = await asyncio.gather(*(batcher.generate([p], GREEDY, early_exit=EarlyExit("margin_first", (t,)))
                                 for p, t in zip(PROMPTS, thresholds)))
    assert batcher.batches == 1
    assert [g[0].finish_reason for g in got] == [a.finish_reason for a in alone]
    assert {a.finish_reason for a in alone} >= {"early_exit"}
    echo = EchoBackend()
    eb = MicroBatcher(echo, max_wait_ms=20)
    await asyncio.gather(eb.generate(["a", "b"], GREEDY, early_exit=EarlyExit("margin_first", (0.1, 0.2))),
                         eb.generate(["c"], GREEDY, early_exit=EarlyExit("margin_first", (0.3,))))
    [call] = echo.calls
    assert call.prompts == ["a", "b", "c"]
    assert call.early_exit == EarlyExit("margin_first", (0.1, 0.2, 0.3))


async def test_merges_up_to_max_batch_size_and_answers_each_caller() -> None:
    echo = EchoBackend()
    batcher = MicroBatcher(echo, max_batch_size=4, max_wait_ms=50)
    results = await asyncio.gather(*(batcher.generate([f"p{i}"], GREEDY) for i in range(10)))
    assert [r[0].text for r in results] == [f"echo:p{i}" for i in range(10)]
    assert [len(c.prompts) for c in echo.calls] == [4, 4, 2]
    assert batcher.queue_depth == 0 and batcher.in_flight == 0


async def test_multi_prompt_calls_keep_their_order() -> None:
    echo = EchoBackend()
    batcher = MicroBatcher(echo, max_batch_size=8, max_wait_ms=20)
    a, b = await asyncio.gather(batcher.generate(["a1", "a2", "a3"], GREEDY), batcher.generate(["b1"], GREEDY))
    assert [g.text for g in a] == ["echo:a1", "echo:a2", "echo:a3"] and [g.text for g in b] == ["echo:b1"]
    assert len(echo.calls) == 1
    big = await batcher.generate([f"x{i}" for i in range(20)], GREEDY)  # larger than a batch: sent alone
    assert len(big) == 20 and len(echo.calls[-1].prompts) == 20


async def test_different_params_scores_or_measure_go_in_separate_batches() -> None:
    echo = EchoBackend()
    batcher = MicroBatcher(echo, max_batch_size=16, max_wait_ms=20)
    await asyncio.gather(
        batcher.generate(["a"], GREEDY),
        batcher.generate(["b"], GenerationParams(max_tokens=7)),
        batcher.generate(["c"], GREEDY, scores=False),
        batcher.generate(["d"], GREEDY, early_exit=EarlyExit("margin_first", (0.5,))),
        batcher.generate(["e"], GREEDY, early_exit=EarlyExit("entropy_first", (0.5,))),
        batcher.generate(["f"], GREEDY),
    )
    groups = sorted(tuple(c.prompts) for c in echo.calls)
    assert groups == [("a", "f"), ("b",), ("c",), ("d",), ("e",)]


async def test_bounded_queue_raises_overloaded() -> None:
    echo = EchoBackend(gate=asyncio.Event())
    assert echo.gate is not None
    batcher = MicroBatcher(echo, max_batch_size=1, max_wait_ms=0, max_queue=2)
    first = asyncio.create_task(batcher.generate(["a"], GREEDY))
    await until(lambda: len(echo.calls) == 1, '"a" dispatched and held at the gate')
    queued = [asyncio.create_task(batcher.generate([p], GREEDY)) for p in ("b", "c")]
    await until(lambda: batcher.queue_depth == 2, '"b" and "c" queued')
    assert batcher.queue_depth == 2 and batcher.in_flight == 1
    with pytest.raises(OverloadedError) as info:
        await batcher.generate(["d"], GREEDY)
    assert info.value.retry_after_s > 0
    echo.gate.set()
    assert [(await t)[0].text for t in (first, *queued)] == ["echo:a", "echo:b", "echo:c"]


async def test_cancelled_caller_is_dropped_before_dispatch() -> None:
    echo = EchoBackend(gate=asyncio.Event())
    assert echo.gate is not None
    batcher = MicroBatcher(echo, max_batch_size=1, max_wait_ms=0)
    first = asyncio.create_task(batcher.generate(["a"], GREEDY))
    await until(lambda: len(echo.calls) == 1, '"a" dispatched and held at the gate')
    doomed = asyncio.create_task(batcher.generate(["gone"], GREEDY))
    kept = asyncio.create_task(batcher.generate(["b"], GREEDY))
    await until(lambda: batcher.queue_depth == 2, '"gone" and "b" queued')
    doomed.cancel()
    await until(lambda: doomed.done(), "the cancellation delivered")
    assert batcher.queue_depth == 1
    echo.gate.set()
    assert (await first)[0].text == "echo:a" and (await kept)[0].text == "echo:b"
    assert doomed.cancelled()
    assert all("gone" not in c.prompts for c in echo.calls)


async def test_inner_error_reaches_only_that_batch() -> None:
    echo = EchoBackend(fail_on="boom")
    batcher = MicroBatcher(echo, max_batch_size=2, max_wait_ms=20)
    results = await asyncio.gather(*(batcher.generate([p], GREEDY) for p in ("ok1", "boom", "ok2", "ok3")),
                                   return_exceptions=True)
    assert isinstance(results[0], BackendError) and isinstance(results[1], BackendError)
    assert [r[0].text for r in results[2:]] == ["echo:ok2", "echo:ok3"]  # type: ignore[index]


async def test_one_invalid_prompt_fails_only_its_caller() -> None:
    echo = EchoBackend(invalid_on="bad")
    batcher = MicroBatcher(echo, max_batch_size=8, max_wait_ms=20)
    results = await asyncio.gather(*(batcher.generate([p], GREEDY) for p in ("x", "bad", "y")),
                                   return_exceptions=True)
    assert isinstance(results[1], InvalidRequestError)
    assert [results[0][0].text, results[2][0].text] == ["echo:x", "echo:y"]  # type: ignore[index]


async def test_exactly_one_answer_per_accepted_call_under_random_cancellation() -> None:
    rng = random.Random(7)
    echo = EchoBackend()
    batcher = MicroBatcher(echo, max_batch_size=5, max_wait_ms=2, max_queue=40)
    answered = overloaded = cancelled = 0
    for _ in range(5):
        tasks = [asyncio.create_task(batcher.generate([f"q{i}"] * rng.randint(1, 3), GREEDY)) for i in range(30)]
        await asyncio.sleep(0)
        for t in rng.sample(tasks, 8):
            t.cancel()
        for i, t in enumerate(tasks):
            try:
                gens = await t
                assert {g.text for g in gens} == {f"echo:q{i}"}
                answered += 1
            except OverloadedError:
                overloaded += 1
            except asyncio.CancelledError:
                cancelled += 1
        assert batcher.queue_depth == 0 and batcher.in_flight == 0
    assert answered + overloaded + cancelled == 150 and answered > 0
    assert sum(len(c.prompts) for c in echo.calls) == batcher.batched_prompts


async def test_aclose_fails_queued_calls_and_closes_inner() -> None:
    echo = EchoBackend(gate=asyncio.Event())
    batcher = MicroBatcher(echo, max_batch_size=1, max_wait_ms=0)
    tasks = [asyncio.create_task(batcher.generate([p], GREEDY)) for p in ("a", "b")]
    await until(lambda: len(echo.calls) == 1 and batcher.queue_depth == 1, '"a" at the gate and "b" queued')
    await batcher.aclose()
    for t in tasks:
        with pytest.raises(BackendError):
            await t
    assert echo.closed
    with pytest.raises(BackendError):
        await batcher.generate(["c"], GREEDY)


def test_works_across_event_loops() -> None:
    echo = EchoBackend()
    batcher = MicroBatcher(echo)
    for _ in range(2):
        assert asyncio.run(batcher.generate(["a"], GREEDY))[0].text == "echo:a"


@pytest.mark.parametrize("kwargs", [{"max_batch_size": 0}, {"max_wait_ms": -1.0}, {"max_queue": 0}])
def test_bad_settings_are_rejected(kwargs: dict[str, float]) -> None:
    with pytest.raises(InvalidRequestError):
        MicroBatcher(EchoBackend(), **kwargs)  # type: ignore[arg-type]


async def test_mismatched_early_exit_is_rejected() -> None:
    with pytest.raises(InvalidRequestError):
        await MicroBatcher(EchoBackend()).generate(["a", "b"], GREEDY, early_exit=EarlyExit("margin_first", (1,)))


def test_build_cascade_wraps_tiers_when_batching_is_enabled() -> None:
    from cascade.config import BatchingConfig, CascadeConfig, TierConfig, build_cascade

    tiers = (TierConfig("small"), TierConfig("large"))
    backends = {"small": EchoBackend("s"), "large": EchoBackend("l")}
    on = build_cascade(CascadeConfig(tiers=tiers, thresholds=(0.5,)), backends=backends)
    assert all(isinstance(t.backend, MicroBatcher) for t in on.tiers)
    off = build_cascade(CascadeConfig(tiers=tiers, thresholds=(0.5,), batching=BatchingConfig(enabled=False)),
                        backends=backends)
    assert not any(isinstance(t.backend, MicroBatcher) for t in off.tiers)


async def test_stream_goes_through_the_batch_queue_with_early_exit() -> None:
    backend = make_backend(0)
    batcher = MicroBatcher(backend, max_batch_size=8, max_wait_ms=20)

    async def collect(prompt: str, threshold: float) -> list[StreamEvent]:
        return [ev async for ev in batcher.stream(prompt, GREEDY, early_exit=EarlyExit("margin_first", (threshold,)))]

    streams = await asyncio.gather(*(collect(p, t) for p, t in zip(PROMPTS[:4], (0.0, 1.0, 0.0, 1.0))))
    assert batcher.batches == 1
    for events, threshold, prompt in zip(streams, (0.0, 1.0, 0.0, 1.0), PROMPTS[:4]):
        kinds = [e.kind for e in events]
        assert kinds[0] == "first" and kinds[-1] == "done"
        done = events[-1].generation
        assert done is not None
        [alone] = await backend.generate([prompt], GREEDY, early_exit=EarlyExit("margin_first", (threshold,)))
        assert done.text == alone.text and done.finish_reason == alone.finish_reason
        assert "".join(e.text for e in events if e.kind == "delta") == done.text
