"""Requests sent through the openai client's ``post`` with a prebuilt body, and streamed answers read from raw
bytes: against a real loopback HTTP/1.1 server with keep-alive that records what it received."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from cascade.backends.openai_answer import decode_json, sse_chunks
from cascade.backends.openai_compat import OpenAIBackend
from cascade.errors import BackendError
from cascade.types import EarlyExit, GenerationParams

PARAMS = GenerationParams(max_tokens=8)
EXIT = EarlyExit("margin_first", (0.99,))  # finite: the answer is streamed, and it is sure enough to go on


def _event(token: str | None, finish: str | None = None, usage: dict[str, int] | None = None) -> bytes:
    top = [{"token": token, "logprob": -0.01}, {"token": "x", "logprob": -5.0}] if token else []
    choice: dict[str, Any] = {"index": 0, "delta": {"content": token} if token else {}, "finish_reason": finish,
                              "logprobs": {"content": [{"token": token, "logprob": -0.01, "top_logprobs": top}]}
                              if token else None}
    body: dict[str, Any] = {"object": "chat.completion.chunk", "choices": [choice]}
    if usage:
        body = {"object": "chat.completion.chunk", "choices": [], "usage": usage}
    return b"data: " + json.dumps(body).encode()


STREAM = [_event("Par"), _event("is", "stop"), _event(None, usage={"prompt_tokens": 4, "completion_tokens": 2})]
_TOP = [{"token": "Paris", "logprob": -0.01}, {"token": "x", "logprob": -5.0}]
WHOLE = json.dumps({"object": "chat.completion", "usage": {"prompt_tokens": 4, "completion_tokens": 1},
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": "Paris"},
                                 "finish_reason": "stop", "logprobs": {"content": [
                                     {"token": "Paris", "logprob": -0.01, "top_logprobs": _TOP}]}}]}).encode()


@dataclass
class Seen:
    connections: int = 0
    heads: list[bytes] = field(default_factory=list)
    bodies: list[dict[str, Any]] = field(default_factory=list)


@contextlib.asynccontextmanager
async def keep_alive_server(line_end: bytes = b"\n") -> AsyncIterator[tuple[str, Seen]]:
    """Answers every request on a connection (HTTP/1.1 keep-alive): a stream as chunked SSE, with its lines
    ended by ``line_end``, ``data: [DONE]`` and the chunked body's end written apart; a plain request as JSON."""
    seen = Seen()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen.connections += 1
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                              if line.lower().startswith(b"content-length:"))
                body = json.loads(await reader.readexactly(length))
                seen.heads.append(head)
                seen.bodies.append(body)
                if not body.get("stream"):
                    writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: "
                                 + str(len(WHOLE)).encode() + b"\r\n\r\n" + WHOLE)
                    await writer.drain()
                    continue
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
                             b"transfer-encoding: chunked\r\n\r\n")
                for event in [*STREAM, b"data: [DONE]"]:
                    data = event + line_end + line_end
                    writer.write(b"%x\r\n%s\r\n" % (len(data), data))
                    await writer.drain()
                await asyncio.sleep(0.01)  # the body's end comes after [DONE] has been read
                writer.write(b"0\r\n\r\n")
                await writer.drain()
        writer.close()

    srv = await asyncio.start_server(handle, "127.0.0.1", 0)
    async with srv:
        yield f"http://127.0.0.1:{srv.sockets[0].getsockname()[1]}/v1", seen


async def test_streamed_answers_reuse_one_connection_and_send_the_body_as_built() -> None:
    async with keep_alive_server() as (url, seen):
        b = OpenAIBackend(model="m", base_url=url, api_key="sk-test", max_retries=0)
        first = await b.generate(["Capital of France?"], PARAMS, early_exit=EXIT)
        second = await b.generate(["Capital of France?"], PARAMS, early_exit=EXIT)
        await b.aclose()
    assert [g.text for g in first + second] == ["Paris", "Paris"]
    assert first[0].finish_reason == "stop" and first[0].prompt_tokens == 4 and first[0].completion_tokens == 2
    assert seen.connections == 1 and len(seen.bodies) == 2  # read to its end after [DONE]: back to the pool
    assert seen.bodies[0] == {"model": "m", "max_tokens": 8, "temperature": PARAMS.temperature, "top_p": PARAMS.top_p,
                              "messages": [{"role": "user", "content": "Capital of France?"}], "logprobs": True,
                              "top_logprobs": 5, "stream": True, "stream_options": {"include_usage": True}}
    head = seen.heads[0].lower()
    assert head.startswith(b"post /v1/chat/completions ") and b"authorization: bearer sk-test\r\n" in head
    assert b"content-type: application/json\r\n" in head


@pytest.mark.parametrize("line_end", [b"\r\n", b"\r"])
async def test_streamed_lines_may_end_with_crlf_or_cr(line_end: bytes) -> None:
    async with keep_alive_server(line_end) as (url, _):
        b = OpenAIBackend(model="m", base_url=url, max_retries=0)
        [g] = await b.generate(["Capital of France?"], PARAMS, early_exit=EXIT)
        await b.aclose()
    assert g.text == "Paris" and g.finish_reason == "stop" and g.scores["margin_first"] < 0.02


async def test_plain_answers_are_posted_as_json() -> None:
    async with keep_alive_server() as (url, seen):
        b = OpenAIBackend(model="m", base_url=url, max_retries=0)
        [g] = await b.generate(["Capital of France?"], PARAMS)
        [h] = await b.generate(["Capital of France?"], PARAMS, scores=False)
        await b.aclose()
    assert g.text == h.text == "Paris" and g.prompt_tokens == 4 and g.scores["margin_first"] < 0.02
    assert "stream" not in seen.bodies[0] and seen.bodies[0]["logprobs"] is True
    assert "logprobs" not in seen.bodies[1] and seen.connections == 1


async def _pieces(*parts: bytes) -> AsyncIterator[bytes]:
    for part in parts:
        yield part


async def test_sse_chunks_split_anywhere_and_stop_at_done() -> None:
    raw = b': comment\n\ndata: {"a": 1}\r\n\r\nevent: x\ndata:{"b": [2]}\n\ndata: [DONE]\n\ndata: {"c": 3}\n\n'
    for cut in range(1, len(raw)):
        got = [c async for c in sse_chunks(_pieces(raw[:cut], raw[cut:]))]
        assert got == [{"a": 1}, {"b": [2]}], cut
    assert [c async for c in sse_chunks(_pieces(b'data: {"a": 1}'))] == [{"a": 1}]  # no final line break


@pytest.mark.parametrize("raw", [
    b'{"logprob": -0.25, "token": "caf\\u00e9", "bytes": [99, 97], "n": null, "ok": true}',
    b'{"logprob": -Infinity}', b'[NaN, Infinity]',  # (vLLM can send -Infinity as a log-probability)
    '{"a": "\u00e9"}'.encode("utf-16"), b'"\\ud800"', b"1e400", b"-0", b"18446744073709551615",
])
def test_tier_json_decodes_as_the_standard_library(raw: bytes) -> None:
    def same(a: Any, b: Any) -> bool:  # (NaN is not equal to itself)
        return json.dumps(a) == json.dumps(b) and type(a) is type(b)
    assert same(decode_json(raw), json.loads(raw))
    assert decode_json(b"123456789012345678901234") == pytest.approx(123456789012345678901234)  # (orjson: a float)


@pytest.mark.parametrize("raw", [b"", b"{", b"[1,]", b"\xff", b"nope"])
def test_tier_json_errors_as_the_standard_library(raw: bytes) -> None:
    with pytest.raises(ValueError) as fast:
        decode_json(raw)
    with pytest.raises(ValueError) as std:
        json.loads(raw)
    assert str(fast.value) == str(std.value)


async def test_sse_error_objects_raise() -> None:
    with pytest.raises(BackendError, match="overloaded"):
        _ = [c async for c in sse_chunks(_pieces(b'data: {"error": {"message": "overloaded"}}\n\n'))]


async def test_bodies_keep_non_ascii_text() -> None:
    async with keep_alive_server() as (url, seen):
        b = OpenAIBackend(model="m", base_url=url, max_retries=0)
        await b.generate(["Où est le café ?"], PARAMS)
        await b.aclose()
    assert seen.bodies[0]["messages"][0]["content"] == "Où est le café ?"
