"""The simulated server in llama.cpp's mode (``SimConfig.llamacpp()``) reproduces what a real llama.cpp server
did to the cascade: streams cut off by a bare ``[DONE]`` when a newer request arrives, and no streamed usage."""

from __future__ import annotations

import asyncio

from conftest import until

from cascade.backends.openai_compat import OpenAIBackend
from cascade.errors import TruncatedAnswerError
from cascade.simulate import SimConfig, SimServer
from cascade.types import GenerationParams

PROMPTS = [[{"role": "user", "content": f"question {i}: is it good?"}] for i in range(4)]


async def test_concurrent_streams_are_cut_off_and_never_accepted() -> None:
    # each stream waits before its first token; the next one is sent once the server counts the previous one as
    # started (no reliance on arrival timing), so all four are waiting when the first would send a token
    config = SimConfig.llamacpp(model="m", latency_per_request_s=5.0, max_answer_tokens=8)
    assert config.interrupt_requests and not config.stream_usage and not config.guided_choice
    with SimServer(config) as server:
        backend = OpenAIBackend(model="m", base_url=server.base_url, max_retries=0)

        async def one(prompt: object) -> object:
            try:
                events = [e async for e in backend.stream(prompt, GenerationParams(max_tokens=8))]  # type: ignore[arg-type]
                return events[-1].generation
            except TruncatedAnswerError as exc:
                return exc

        tasks = []
        for k, p in enumerate(PROMPTS, 1):
            tasks.append(asyncio.ensure_future(one(p)))
            await until(lambda k=k: server.stats.started >= k, f"stream {k} started")  # type: ignore[misc]
        got = await asyncio.gather(*tasks)
        await backend.aclose()
        cut = [g for g in got if isinstance(g, TruncatedAnswerError)]
        answered = [g for g in got if not isinstance(g, TruncatedAnswerError)]
        assert server.stats.streams_interrupted == len(cut) == 3  # all but the newest were cut off ...
        assert len(answered) == 1 and answered[0].finish_reason in ("stop", "length")  # type: ignore[attr-defined]
        assert answered[0].usage_estimated  # type: ignore[attr-defined]  # ... and no usage was streamed


async def test_one_request_at_a_time_is_never_cut_off() -> None:
    with SimServer(SimConfig.llamacpp(model="m", max_answer_tokens=8)) as server:
        backend = OpenAIBackend(model="m", base_url=server.base_url, max_retries=0)
        for p in PROMPTS:
            events = [e async for e in backend.stream(p, GenerationParams(max_tokens=8))]  # type: ignore[arg-type]
            assert events[-1].generation.finish_reason in ("stop", "length")  # type: ignore[union-attr]
        await backend.aclose()
        assert server.stats.streams_interrupted == 0
