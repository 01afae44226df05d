"""Token usage is never a silent 0: a server that sends no usage (llama.cpp ignores
``stream_options.include_usage``; an early exit closes the stream before it) gets an estimate, marked."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from cascade import Cascade, Price, Tier
from cascade.backends.openai_compat import OpenAIBackend
from cascade.backends.openai_request import estimated_prompt_tokens
from cascade.simulate import SimConfig, SimServer
from cascade.types import EarlyExit, GenerationParams

PROMPT = [{"role": "user", "content": "Is this movie review negative or positive? a fine, warm film"}]


@pytest.fixture(scope="module")
def servers() -> Iterator[tuple[SimServer, SimServer]]:
    with SimServer(SimConfig(model="m")) as full, SimServer(SimConfig(model="m", stream_usage=False)) as bare:
        yield full, bare


async def stream_done(server: SimServer, early_exit: EarlyExit | None = None) -> object:
    backend = OpenAIBackend(model="m", base_url=server.base_url)
    try:
        events = [e async for e in backend.stream(PROMPT, GenerationParams(max_tokens=6), early_exit=early_exit)]
    finally:
        await backend.aclose()
    return events[-1].generation


async def test_reported_usage_is_taken_as_is(servers: tuple[SimServer, SimServer]) -> None:
    g = await stream_done(servers[0])
    assert not g.usage_estimated and g.prompt_tokens > 0  # type: ignore[attr-defined]


async def test_a_stream_without_usage_gets_an_estimate_marked_as_such(servers: tuple[SimServer, SimServer]) -> None:
    g = await stream_done(servers[1])
    assert g.usage_estimated and g.prompt_tokens == estimated_prompt_tokens(PROMPT) > 0  # type: ignore[attr-defined]
    assert g.completion_tokens > 0  # type: ignore[attr-defined]  # counted from the streamed tokens


async def test_an_early_exit_is_estimated_and_costs_something(servers: tuple[SimServer, SimServer]) -> None:
    g = await stream_done(servers[0], EarlyExit("margin_first", (-1.0,)))  # every first token exits
    assert g.finish_reason == "early_exit" and g.usage_estimated and g.prompt_tokens > 0  # type: ignore[attr-defined]
    small = OpenAIBackend(model="m", base_url=servers[1].base_url)
    large = OpenAIBackend(model="m", base_url=servers[0].base_url)
    cascade = Cascade([Tier("small", small, Price(1.0, 1.0)), Tier("large", large, Price(3.0, 3.0))],
                      threshold=-1.0)
    async with cascade:
        items = [x async for x in cascade.stream(PROMPT)]
    result = items[-1]
    small_call = result.calls[0]  # type: ignore[union-attr]
    assert small_call.usage_estimated and small_call.prompt_tokens > 0 and small_call.cost > 0
    assert not result.calls[-1].usage_estimated  # type: ignore[union-attr]


def test_the_estimate_grows_with_the_prompt() -> None:
    assert estimated_prompt_tokens("abcd" * 100) == 100 and estimated_prompt_tokens("a") == 1
    assert estimated_prompt_tokens(PROMPT) > estimated_prompt_tokens([{"role": "user", "content": "hi"}])
