"""How OpenAIBackend and the engine fail, against real loopback servers: no credentials in messages, a hard
deadline per request (streamed or not), and a batch where some requests fail keeping the others' answers."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from collections.abc import AsyncIterator

import pytest

from cascade.backends.openai_compat import OpenAIBackend
from cascade.engine import Cascade, Tier
from cascade.errors import BackendError, BackendTimeoutError, BatchError, redact
from cascade.simulate import SimConfig, SimServer
from cascade.types import CascadeResult, EarlyExit, Generation, GenerationParams

PARAMS = GenerationParams(max_tokens=24)
ANSWER = {"id": "c1", "object": "chat.completion", "created": 0, "model": "drip",
          "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hi " * 40}, "finish_reason": "stop",
                       "logprobs": None}],
          "usage": {"prompt_tokens": 1, "completion_tokens": 40, "total_tokens": 41}}


def dead_port() -> int:
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def with_userinfo(url: str, userinfo: str = "svc:topsecret") -> str:
    return url.replace("http://", f"http://{userinfo}@", 1)


@contextlib.asynccontextmanager
async def drip_server(every_s: float = 0.05) -> AsyncIterator[str]:
    """A loopback HTTP server that answers every request with a whole (non-streamed) chat answer, sent one
    byte every ``every_s`` seconds: no read ever waits long, the answer takes seconds. Yields the base URL."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                       if line.lower().startswith(b"content-length:")), 0)
        await reader.readexactly(length)
        body = json.dumps(ANSWER).encode()
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: "
                     + str(len(body)).encode() + b"\r\n\r\n")
        with contextlib.suppress(ConnectionError):
            for i in range(len(body)):
                writer.write(body[i : i + 1])
                await writer.drain()
                await asyncio.sleep(every_s)
        writer.close()

    srv = await asyncio.start_server(handle, "127.0.0.1", 0)
    async with srv:
        yield f"http://127.0.0.1:{srv.sockets[0].getsockname()[1]}/v1"


def test_redact_removes_userinfo_and_hides_urls() -> None:
    text = "cannot reach http://svc:top@secret@127.0.0.1:8701/v1/?q=a@b and https://k@h.example/x"
    assert redact(text) == "cannot reach http://***@127.0.0.1:8701/v1/?q=a@b and https://***@h.example/x"
    assert redact(text, hide_urls=True) == "cannot reach <url> and <url>"
    assert redact("no url at all: a@b") == "no url at all: a@b"


async def test_credentials_in_base_url_never_reach_an_error() -> None:
    b = OpenAIBackend(model="m", base_url=f"http://admin:hunter2@127.0.0.1:{dead_port()}/v1", max_retries=0)
    with pytest.raises(BackendError) as info:
        await b.generate(["hi"], GenerationParams(max_tokens=2), scores=False)
    await b.aclose()
    assert "hunter2" not in str(info.value) and "admin" not in str(info.value)
    assert "http://***@127.0.0.1" in str(info.value)  # the log still says where
    assert info.value.reason == "cannot connect" and "127.0.0.1" not in info.value.public()
    async with SimServer(SimConfig(model="m", error_rate=1.0)) as s:
        b = OpenAIBackend(model="m", base_url=with_userinfo(s.base_url), max_retries=0)
        with pytest.raises(BackendError) as info:
            await b.generate(["hi"], PARAMS)
        await b.aclose()
    assert "topsecret" not in str(info.value) and info.value.reason == "HTTP 500"


async def test_timeout_is_a_deadline_on_a_slowly_sent_answer() -> None:
    async with drip_server() as url:  # about 10 s for the whole body, one byte every 50 ms
        b = OpenAIBackend(model="drip", base_url=url, timeout_s=0.5, max_retries=2)
        with pytest.raises(BackendTimeoutError, match=r"no complete answer .* within 0\.5 s") as info:
            await b.generate(["hi"], PARAMS, scores=False)
        await b.aclose()
    assert info.value.reason == "no complete answer within 0.5 s"


async def test_timeout_is_a_deadline_on_a_slow_stream() -> None:
    async with SimServer(SimConfig(model="m", latency_per_token_s=0.1, max_answer_tokens=48)) as s:
        b = OpenAIBackend(model="m", base_url=s.base_url, timeout_s=0.5, max_retries=0)
        with pytest.raises(BackendTimeoutError):  # streamed (early exit), each token well within 0.5 s
            await b.generate(["Name a river. [[sim:confidence=1.0]]"], GenerationParams(max_tokens=40),
                             early_exit=EarlyExit("margin_first", (0.99,)))
        with pytest.raises(BackendTimeoutError):
            async for _ in b.stream("Name a river.", GenerationParams(max_tokens=40), scores=False):
                pass
        await b.aclose()


async def test_a_slowly_sent_large_answer_degrades_within_the_backend_timeout() -> None:
    async with SimServer(SimConfig(model="small")) as small_server, drip_server() as url:
        small = OpenAIBackend(model="small", base_url=small_server.base_url, max_retries=0)
        large = OpenAIBackend(model="drip", base_url=with_userinfo(url), timeout_s=0.5, max_retries=0)
        async with Cascade(small=small, large=large, threshold=-1.0, params=PARAMS) as cascade:
            r = await cascade.run("hi")
    assert r.degraded and r.tier == "small"
    assert r.calls[-1].error == "tier 'large': no complete answer within 0.5 s"


async def test_a_partly_failing_batch_keeps_the_answers_that_succeeded() -> None:
    async with SimServer(SimConfig(model="m", error_rate=0.5, seed=3)) as s:
        b = OpenAIBackend(model="m", base_url=s.base_url, max_retries=0)
        prompts = [f"question {i}" for i in range(12)]
        with pytest.raises(BatchError) as info:
            await b.generate(prompts, PARAMS)
        await b.aclose()
        outcomes = info.value.outcomes
        assert len(outcomes) == 12 and s.stats.requests == 12  # no request was cancelled or repeated
        failed = [o for o in outcomes if isinstance(o, BaseException)]
        assert len(failed) == s.stats.errors and 0 < len(failed) < 12
        assert all(isinstance(o, BackendError) and o.reason == "HTTP 500" for o in failed)
        assert all(isinstance(o, Generation) and o.text and o.scores for o in outcomes if o not in failed)


@pytest.mark.parametrize("batched", [False, True])
async def test_a_failing_large_call_fails_or_degrades_only_its_own_request(batched: bool) -> None:
    from cascade.batching import MicroBatcher

    async with SimServer(SimConfig(model="small")) as small_server, \
            SimServer(SimConfig(model="large", error_rate=0.4, seed=5)) as large_server:
        prompts = [f"question {i}" for i in range(16)]
        for on_error in ("raise", "degrade"):
            large_server.stats.reset()
            small = OpenAIBackend(model="small", base_url=small_server.base_url, max_retries=0)
            large = OpenAIBackend(model="large", base_url=large_server.base_url, max_retries=0)
            inner = MicroBatcher(large, max_batch_size=16, max_wait_ms=50) if batched else large
            async with Cascade([Tier("small", small), Tier("large", inner)], threshold=-1.0, params=PARAMS,
                               on_error=on_error) as cascade:
                if batched:  # concurrent single requests merged by the micro-batcher
                    got: list[object] = list(await asyncio.gather(*(cascade.run(p) for p in prompts),
                                                                  return_exceptions=True))
                else:
                    try:
                        got = list(await cascade.run_batch(prompts))
                    except BatchError as exc:
                        got = exc.outcomes
            assert large_server.stats.requests == 16  # every escalation sent once, none again
            errors = large_server.stats.errors
            assert 0 < errors < 16
            if on_error == "raise":
                failed = [g for g in got if isinstance(g, BackendError)]
                assert len(failed) == errors and all(f.public() == "tier 'large': HTTP 500" for f in failed)
                assert all(g.tier == "large" for g in got if isinstance(g, CascadeResult))
            else:
                assert all(isinstance(g, CascadeResult) for g in got)
                degraded = [g for g in got if isinstance(g, CascadeResult) and g.degraded]
                assert len(degraded) == errors and all(g.tier == "small" for g in degraded)
                assert all(g.calls[-1].error == "tier 'large': HTTP 500" for g in degraded)
