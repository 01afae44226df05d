"""A cut-off answer (a stream without a finish_reason, an undefined finish_reason, a non-streamed
``finish_reason: null``) is a TruncatedAnswerError: retried, then failed or degraded -- never accepted.

Against a real loopback HTTP server that plays back scripted answers, one per request, in order."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Sequence
from typing import Any

import pytest

from cascade.backends.openai_compat import OpenAIBackend
from cascade.engine import Cascade, Tier
from cascade.errors import BackendError, TruncatedAnswerError
from cascade.simulate import SimConfig, SimServer
from cascade.types import EarlyExit, GenerationParams

PARAMS = GenerationParams(max_tokens=8)
EXIT = EarlyExit("margin_first", (0.99,))  # a finite threshold: the answer is streamed


def _entry(token: str, lp: float) -> dict[str, Any]:
    return {"token": token, "logprob": lp, "bytes": list(token.encode()),
            "top_logprobs": [{"token": token, "logprob": lp}, {"token": "x", "logprob": -3.0}]}


def chunk(token: str | None, finish: str | None = None) -> bytes:
    choice: dict[str, Any] = {"index": 0, "delta": {} if token is None else {"content": token},
                              "logprobs": None if token is None else {"content": [_entry(token, -0.1)]},
                              "finish_reason": finish}
    return b"data: " + json.dumps({"id": "c", "object": "chat.completion.chunk", "created": 0, "model": "m",
                                   "choices": [choice]}).encode() + b"\n\n"


DONE = b"data: [DONE]\n\n"
CUT = [chunk("Par"), DONE]  # llama.cpp's interrupt: a bare [DONE] after the first token
WHOLE = [chunk("Par"), chunk("is"), chunk(None, "stop"), DONE]


def plain(finish: str | None) -> bytes:
    return json.dumps({"id": "c", "object": "chat.completion", "created": 0, "model": "m",
                       "choices": [{"index": 0, "message": {"role": "assistant", "content": "Paris"},
                                    "logprobs": {"content": [_entry("Paris", -0.1)]}, "finish_reason": finish}],
                       "usage": {"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6}}).encode()


@contextlib.asynccontextmanager
async def scripted(answers: Sequence[Sequence[bytes] | bytes]) -> AsyncIterator[tuple[str, list[int]]]:
    """A loopback server answering the i-th request with ``answers[i]`` (an SSE event list, or a JSON body);
    yields the base URL and a list that counts requests."""
    seen: list[int] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                      if line.lower().startswith(b"content-length:"))
        await reader.readexactly(length)
        answer = answers[min(len(seen), len(answers) - 1)]
        seen.append(1)
        if isinstance(answer, bytes):
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\nconnection: close\r\n"
                         b"content-length: " + str(len(answer)).encode() + b"\r\n\r\n" + answer)
        else:
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nconnection: close\r\n\r\n"
                         + b"".join(answer))
        await writer.drain()
        writer.close()

    srv = await asyncio.start_server(handle, "127.0.0.1", 0)
    async with srv:
        yield f"http://svc:topsecret@127.0.0.1:{srv.sockets[0].getsockname()[1]}/v1", seen


async def test_a_bare_done_is_retried_and_the_whole_answer_kept(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, "cascade.backends.openai")
    async with scripted([CUT, WHOLE]) as (url, seen):
        b = OpenAIBackend(model="m", base_url=url, max_retries=1)
        [g] = await b.generate(["Capital of France?"], PARAMS, early_exit=EXIT)
        await b.aclose()
    assert len(seen) == 2 and g.text == "Paris" and g.finish_reason == "stop"
    [record] = [r for r in caplog.records if r.name == "cascade.backends.openai"]
    message = record.getMessage()
    assert "cut off (no finish_reason) after 1 tokens" in message and "attempt 1 of 2" in message
    assert "topsecret" not in message and "***@127.0.0.1" in message


@pytest.mark.parametrize("answer", [CUT, [chunk("Par"), chunk("is")],  # bare [DONE]; closed without [DONE]
                                    [chunk("Par"), chunk(None, "abort"), DONE],  # vLLM's undefined "abort"
                                    [chunk(None), DONE]])  # nothing at all
async def test_a_cut_off_stream_is_an_error_once_retries_are_spent(answer: list[bytes]) -> None:
    async with scripted([answer]) as (url, seen):
        b = OpenAIBackend(model="m", base_url=url, max_retries=1)
        with pytest.raises(TruncatedAnswerError) as info:
            await b.generate(["Capital of France?"], PARAMS, early_exit=EXIT)
        await b.aclose()
    assert len(seen) == 2  # asked once more, as for any failure
    assert info.value.reason.startswith("the answer was cut off") and "127.0.0.1" not in info.value.reason


@pytest.mark.parametrize("finish", [None, "abort"])
async def test_a_non_streamed_answer_without_a_defined_finish_reason_is_an_error(finish: str | None) -> None:
    async with scripted([plain(finish)]) as (url, seen):
        b = OpenAIBackend(model="m", base_url=url, max_retries=0)
        with pytest.raises(TruncatedAnswerError):
            await b.generate(["Capital of France?"], PARAMS)
        await b.aclose()
    assert len(seen) == 1
    async with scripted([plain("stop")]) as (url, seen):
        b = OpenAIBackend(model="m", base_url=url, max_retries=0)
        [g] = await b.generate(["Capital of France?"], PARAMS)
        await b.aclose()
    assert g.text == "Paris" and g.finish_reason == "stop"


async def test_a_streamed_answer_cut_off_raises_at_its_end() -> None:
    async with scripted([CUT]) as (url, _):
        b = OpenAIBackend(model="m", base_url=url, max_retries=0)
        kinds = []
        with pytest.raises(TruncatedAnswerError):
            async for event in b.stream("Capital of France?", PARAMS):
                kinds.append(event.kind)
        await b.aclose()
    assert "done" not in kinds


async def test_a_cut_off_first_tier_fails_and_a_cut_off_higher_tier_degrades() -> None:
    async with SimServer(SimConfig(model="m")) as sim, scripted([CUT]) as (url, _):
        cut = OpenAIBackend(model="m", base_url=url, max_retries=0)
        good = OpenAIBackend(model="m", base_url=sim.base_url, max_retries=0)
        async with Cascade([Tier("small", cut), Tier("large", good)], threshold=0.5, params=PARAMS) as cascade:
            with pytest.raises(BackendError) as info:
                await cascade.run("Capital of France?")
        assert info.value.public() == "tier 'small': the answer was cut off (no finish_reason)"
    async with SimServer(SimConfig(model="m")) as sim, scripted([plain(None)]) as (url, _):
        cut = OpenAIBackend(model="m", base_url=url, max_retries=0)  # the last tier is not streamed
        good = OpenAIBackend(model="m", base_url=sim.base_url, max_retries=0)
        async with Cascade([Tier("small", good), Tier("large", cut)], threshold=-1.0, params=PARAMS) as cascade:
            r = await cascade.run("Capital of France?")
    assert r.degraded and r.tier == "small" and r.text
    assert r.calls[-1].error == "tier 'large': the answer was cut off (no finish_reason)"
