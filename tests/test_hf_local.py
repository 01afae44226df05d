"""The local transformers backend: batching, stop strings, sampling, limits."""

from __future__ import annotations

import asyncio

import pytest
from conftest import make_backend, make_model, make_tokenizer

from cascade.backends.hf_local import HFLocalBackend
from cascade.errors import InvalidRequestError
from cascade.types import EarlyExit, GenerationParams


def gen(backend, prompts, **kw):
    params = GenerationParams(**{"max_tokens": 8, **kw})
    return asyncio.run(backend.generate(prompts, params))


def test_stop_strings_cut_text_and_scores():
    backend = make_backend(0)
    full = gen(backend, ["what capital of france"])[0]
    words = full.text.split()
    assert len(words) >= 3, full.text
    stop = words[1]
    cut = gen(backend, ["what capital of france"], stop=(stop,))[0]
    assert stop not in cut.text and full.text.startswith(cut.text.strip())
    assert cut.finish_reason == "stop" and cut.completion_tokens < full.completion_tokens
    assert len(cut.token_stats.margin) == cut.completion_tokens


def test_sampling_is_seeded_per_request_and_varies():
    backend = make_backend(0)
    prompts = ["the movie was", "a movie", "paris is"]
    a = gen(backend, prompts, temperature=1.5, seed=1)
    b = gen(backend, prompts, temperature=1.5, seed=1)
    assert [g.token_ids for g in a] == [g.token_ids for g in b]
    alone = [gen(backend, [p], temperature=1.5, seed=1)[0] for p in prompts]  # batch neighbours change nothing
    assert [g.token_ids for g in alone] == [g.token_ids for g in a]
    assert [g.scores for g in alone] == [g.scores for g in a]
    seeds = {gen(backend, ["the movie was"], temperature=1.5, seed=k)[0].token_ids for k in range(6)}
    assert len(seeds) > 1  # it samples
    unseeded = gen(backend, ["the movie was"] * 4, temperature=1.5)
    assert len({g.token_ids for g in unseeded}) > 1  # without a seed, one batch samples each row anew


def test_batches_are_split_at_max_batch_size():
    small = make_backend(0, max_batch_size=2)
    big = make_backend(0)
    prompts = ["a movie", "the movie was good", "is it", "paris", "one two"]
    exits = EarlyExit("margin_first", (0.0, 2.0, 0.0, 2.0, 0.0))
    p = GenerationParams(max_tokens=4)
    x = asyncio.run(small.generate(prompts, p, early_exit=exits))
    y = asyncio.run(big.generate(prompts, p, early_exit=exits))
    assert [g.token_ids for g in x] == [g.token_ids for g in y]
    assert [g.finish_reason for g in x][::2] == ["early_exit"] * 3


def test_plain_prompt_without_chat_template():
    tok = make_tokenizer()
    tok.chat_template = None
    backend = HFLocalBackend(make_model(0), tok, name="plain")
    assert backend.render("the movie") == "the movie"
    assert backend.render([{"role": "user", "content": "hi"}]).endswith("assistant:")
    g = gen(backend, ["the movie"])[0]
    assert g.completion_tokens >= 1 and g.prompt_tokens == 2


def test_too_long_prompt_and_bad_exit_are_typed_errors():
    backend = make_backend(0)
    with pytest.raises(InvalidRequestError):
        gen(backend, ["the " * 300])
    with pytest.raises(InvalidRequestError):
        asyncio.run(backend.generate(["a", "b"], GenerationParams(), early_exit=EarlyExit("margin_first", (1.0,))))
    assert gen(backend, []) == []


def test_scores_can_be_skipped():
    backend = make_backend(0)
    g = asyncio.run(backend.generate(["a movie"], GenerationParams(max_tokens=3), scores=False))[0]
    assert g.scores == {} and g.token_stats is None and g.completion_tokens >= 1


async def test_a_cancelled_generation_stops_the_model_thread():
    """A tier timeout cancels the call: the generation thread must stop too, not run on holding the model."""
    import threading

    backend = make_backend(0)
    steps: list[int] = []
    third = threading.Event()
    forward = backend.model.forward

    def counting(*args, **kwargs):
        steps.append(1)
        if len(steps) == 3:
            third.set()
        return forward(*args, **kwargs)

    backend.model.forward = counting
    full = await backend.generate(["a movie"], GenerationParams(max_tokens=120))
    assert full[0].completion_tokens == 120  # this prompt runs to max_tokens when left alone
    steps.clear()
    third.clear()
    task = asyncio.create_task(backend.generate(["a movie"], GenerationParams(max_tokens=120)))
    assert await asyncio.to_thread(third.wait, 30)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await asyncio.to_thread(backend._lock.acquire)  # the thread has let go of the model
    backend._lock.release()
    assert len(steps) < 40, len(steps)


async def test_the_end_of_turn_token_is_not_a_step() -> None:
    """Servers return no logprob for the end-of-turn token, so the local backend does not count it either: an
    answer ending with it is scored on the tokens before it (it is still billed)."""
    backend = make_backend(0)
    params = GenerationParams(max_tokens=6)
    (free,) = await backend.generate(["the movie was good"], params)
    assert free.token_stats is not None and len(free.token_ids) >= 3
    third = free.token_ids[2]
    if third in free.token_ids[:2]:
        pytest.skip("the tiny model repeats a token early; the test needs a fresh third token")
    backend.model.generation_config.eos_token_id = third  # the model now ends its turn at its third token
    (ended,) = await backend.generate(["the movie was good"], params)
    assert ended.finish_reason == "stop" and ended.completion_tokens == 3
    assert ended.token_stats is not None and ended.token_stats.logprob == free.token_stats.logprob[:2]
    assert ended.scores["logprob_mean"] == pytest.approx(-sum(free.token_stats.logprob[:2]) / 2, abs=1e-5)
    assert ended.scores["margin_first"] == pytest.approx(free.scores["margin_first"], abs=1e-6)
