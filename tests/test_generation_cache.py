"""The cached generation runner on a tiny random-weight model: cache hits, resume, repair, keys, arrays."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import make_backend

from calibration.generation_cache import (
    GenerationCache,
    cache_key,
    example_prompt,
    generate_cached,
    model_identity,
    tier_arrays,
)
from cascade.engine import Price
from cascade.errors import BackendError, InvalidRequestError
from cascade.scorers import get_scorer
from cascade.types import EarlyExit, Generation, GenerationParams, Prompt

PARAMS = GenerationParams(max_tokens=3)
SENTENCES = ["the movie was good", "it was awful", "a great movie", "the movie was bad", "what is it",
             "one two three", "yes it is", "no it was not", "the capital of france", "is it good"]


def examples(n: int = 10) -> list[dict[str, Any]]:
    return [{"id": i, "prompt": SENTENCES[i % len(SENTENCES)] + " " + "a " * (i // len(SENTENCES)),
             "answer": "positive", "choices": ["negative", "positive"]} for i in range(n)]


class CountingBackend:
    """A real backend (the tiny model) that counts its calls and can fail after a number of calls."""

    def __init__(self, inner: Any, fail_after: int | None = None) -> None:
        self.inner = inner
        self.name = inner.name
        self.model = inner.model
        self.calls = 0
        self.prompts = 0
        self.fail_after = fail_after

    def render(self, prompt: Prompt) -> str:
        return str(self.inner.render(prompt))

    async def generate(self, prompts: Sequence[Prompt], params: GenerationParams, *, scores: bool = True,
                       early_exit: EarlyExit | None = None) -> list[Generation]:
        if self.fail_after is not None and self.calls >= self.fail_after:
            raise BackendError("interrupted")
        self.calls += 1
        self.prompts += len(prompts)
        return list(await self.inner.generate(prompts, params, scores=scores))

    async def aclose(self) -> None:
        await self.inner.aclose()


@pytest.fixture
def backend() -> CountingBackend:
    return CountingBackend(make_backend(0))


def only_file(folder: Path) -> Path:
    files = list(folder.glob("*.jsonl"))
    assert len(files) == 1, files
    return files[0]


async def test_second_run_reads_the_cache(backend: CountingBackend, tmp_path: Path) -> None:
    exs = examples(10)
    first = await generate_cached(backend, exs, PARAMS, tmp_path, batch_size=4, progress=False)
    assert backend.calls == 3 and backend.prompts == 10
    again = CountingBackend(make_backend(0))
    second = await generate_cached(again, exs, PARAMS, tmp_path, batch_size=4, progress=False)
    assert again.calls == 0
    assert [g.text for g in first] == [g.text for g in second]
    assert [g.token_ids for g in first] == [g.token_ids for g in second]
    for a, b in zip(first, second):
        assert set(a.scores) == set(b.scores) and len(a.scores) == 7
        assert all(math.isclose(a.scores[k], b.scores[k]) for k in a.scores)
        assert a.token_stats == b.token_stats
        assert (a.prompt_tokens, a.completion_tokens, a.finish_reason) == \
            (b.prompt_tokens, b.completion_tokens, b.finish_reason)


async def test_answers_follow_example_order_and_duplicates_run_once(backend: CountingBackend,
                                                                    tmp_path: Path) -> None:
    exs = examples(4) + examples(4)
    gens = await generate_cached(backend, exs, PARAMS, tmp_path, batch_size=16, progress=False)
    assert backend.prompts == 4
    direct = await make_backend(0).generate([example_prompt(e) for e in exs[:4]], PARAMS)
    assert [g.text for g in gens] == [g.text for g in direct] * 2


async def test_interrupted_run_resumes(tmp_path: Path) -> None:
    exs = examples(10)
    broken = CountingBackend(make_backend(0), fail_after=2)
    with pytest.raises(BackendError):
        await generate_cached(broken, exs, PARAMS, tmp_path, batch_size=3, progress=False)
    lines = only_file(tmp_path).read_text().splitlines()
    assert len(lines) == 1 + 6  # header + two flushed batches
    resumed = CountingBackend(make_backend(0))
    gens = await generate_cached(resumed, exs, PARAMS, tmp_path, batch_size=3, progress=False)
    assert resumed.prompts == 4
    assert len(gens) == 10
    fresh = await generate_cached(CountingBackend(make_backend(0)), exs, PARAMS, tmp_path / "fresh",
                                  batch_size=3, progress=False)
    assert [g.text for g in gens] == [g.text for g in fresh]


async def test_truncated_last_line_is_tolerated(backend: CountingBackend, tmp_path: Path) -> None:
    exs = examples(6)
    await generate_cached(backend, exs, PARAMS, tmp_path, batch_size=6, progress=False)
    path = only_file(tmp_path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 25])  # a kill in the middle of writing the last record
    again = CountingBackend(make_backend(0))
    gens = await generate_cached(again, exs, PARAMS, tmp_path, batch_size=6, progress=False)
    assert again.prompts == 1 and len(gens) == 6
    for line in path.read_text().splitlines():  # the partial line was cut, not glued to the new one
        json.loads(line)
    assert len(GenerationCache(path).load()) == 6


async def test_garbage_line_in_the_middle_is_regenerated(backend: CountingBackend, tmp_path: Path) -> None:
    exs = examples(5)
    await generate_cached(backend, exs, PARAMS, tmp_path, batch_size=5, progress=False)
    path = only_file(tmp_path)
    lines = path.read_text().splitlines()
    lines[2] = "{not json"
    path.write_text("\n".join(lines) + "\n")
    again = CountingBackend(make_backend(0))
    await generate_cached(again, exs, PARAMS, tmp_path, batch_size=5, progress=False)
    assert again.prompts == 1


async def test_key_changes_with_params_scores_and_model(backend: CountingBackend, tmp_path: Path) -> None:
    ident = model_identity(backend)
    assert ident == "tiny-llama-0@float32"
    keys = {
        cache_key(ident, PARAMS, True),
        cache_key(ident, GenerationParams(max_tokens=4), True),
        cache_key(ident, GenerationParams(max_tokens=3, temperature=0.7, seed=1), True),
        cache_key(ident, PARAMS, False),
        cache_key("tiny-llama-0@bfloat16", PARAMS, True),
    }
    assert len(keys) == 5
    assert cache_key(ident, PARAMS, True) == cache_key(ident, GenerationParams(max_tokens=3), True)
    exs = examples(3)
    await generate_cached(backend, exs, PARAMS, tmp_path, progress=False)
    await generate_cached(backend, exs, GenerationParams(max_tokens=2), tmp_path, progress=False)
    assert backend.prompts == 6
    assert len(os.listdir(tmp_path)) == 2


async def test_bad_examples_raise_typed_errors(backend: CountingBackend, tmp_path: Path) -> None:
    with pytest.raises(InvalidRequestError):
        await generate_cached(backend, [{"id": 1, "answer": "x"}], PARAMS, tmp_path, progress=False)
    with pytest.raises(InvalidRequestError):
        await generate_cached(backend, [{"id": 1, "prompt": "  "}], PARAMS, tmp_path, progress=False)
    with pytest.raises(InvalidRequestError):
        await generate_cached(backend, examples(2), PARAMS, tmp_path, batch_size=0, progress=False)


async def test_messages_examples_work(backend: CountingBackend, tmp_path: Path) -> None:
    exs = [{"id": 0, "messages": [{"role": "system", "content": "answer yes or no"},
                                  {"role": "user", "content": "is it good"}], "answer": "yes"}]
    gens = await generate_cached(backend, exs, PARAMS, tmp_path, progress=False)
    assert len(gens) == 1 and gens[0].model == "tiny-llama-0"


def gen(text: str, score: float, prompt_tokens: int = 10, completion_tokens: int = 2) -> Generation:
    return Generation(text=text, model="m", prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                      scores={"margin_first": score})


def test_tier_arrays_for_three_tiers() -> None:
    exs = [{"id": i, "answer": "positive", "choices": ["negative", "positive"]} for i in range(3)]
    small = [gen("positive", 0.1), gen("negative", 0.9), gen("no idea", 0.5)]
    mid = [gen("Positive.", 0.2), gen("positive", 0.3), gen("negative", 0.4)]
    large = [gen("positive", 0.0, 10, 5)] * 3
    prices = [Price(1.0, 2.0), Price(10.0, 20.0), Price(100.0, 200.0)]
    arrays = tier_arrays(exs, [small, mid, large], get_scorer("choice"), "margin_first", prices)
    assert arrays.scores.shape == (3, 2) and arrays.correct.shape == (3, 3) and arrays.costs.shape == (3, 3)
    np.testing.assert_allclose(arrays.scores[:, 0], [0.1, 0.9, 0.5])
    np.testing.assert_allclose(arrays.scores[:, 1], [0.2, 0.3, 0.4])
    assert arrays.correct.tolist() == [[True, True, True], [False, True, True], [False, False, True]]
    np.testing.assert_allclose(arrays.costs[0], [14e-6, 140e-6, 2000e-6])
    no_prices = tier_arrays(exs, [small, large], get_scorer("choice"))
    assert no_prices.costs.sum() == 0 and no_prices.scores.shape == (3, 1)


def test_tier_arrays_rejects_bad_input() -> None:
    exs = [{"id": 0, "answer": "a"}]
    with pytest.raises(InvalidRequestError):
        tier_arrays(exs, [[gen("a", 0.1)]], get_scorer("exact"))
    with pytest.raises(InvalidRequestError):
        tier_arrays(exs, [[gen("a", 0.1)], []], get_scorer("exact"))
    with pytest.raises(InvalidRequestError):
        tier_arrays(exs, [[gen("a", 0.1)], [gen("a", 0.1)]], get_scorer("exact"), measure="nope")
    with pytest.raises(InvalidRequestError):
        tier_arrays(exs, [[gen("a", 0.1)], [gen("a", 0.1)]], get_scorer("exact"), prices=[Price()])
    missing = tier_arrays(exs, [[Generation(text="a", model="m")], [gen("a", 0.1)]], get_scorer("exact"))
    assert math.isnan(missing.scores[0, 0])
