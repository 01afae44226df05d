"""The small HTTP/1.1 client for tier requests (:mod:`cascade.backends.http1`) and the openai client beside it,
against real loopback servers on 127.0.0.1 that record what they received."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import gzip
import logging
import socket
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
from test_openai_send import EXIT, WHOLE, keep_alive_server

from cascade.backends import http1
from cascade.backends.http1 import Http1Client, usable
from cascade.backends.openai_compat import OpenAIBackend
from cascade.backends.openai_send import OpenAISender
from cascade.errors import BackendError, BackendTimeoutError, ConfigError
from cascade.simulate import SimConfig, SimServer
from cascade.types import EarlyExit, GenerationParams

PARAMS = GenerationParams(max_tokens=8)
OK = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}"
Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@contextlib.asynccontextmanager
async def serving(handle: Handler) -> AsyncIterator[str]:
    """A loopback server running ``handle`` per connection; yields its OpenAI base URL."""
    srv = await asyncio.start_server(handle, "127.0.0.1", 0)
    async with srv:
        yield f"http://127.0.0.1:{srv.sockets[0].getsockname()[1]}/v1"


async def _request(reader: asyncio.StreamReader) -> bytes:
    """Read one request (head and body); return its head."""
    head = await reader.readuntil(b"\r\n\r\n")
    length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                  if line.lower().startswith(b"content-length"))
    await reader.readexactly(length)
    return head


@pytest.fixture(params=["http1", "openai"])
def sender(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Each test taking it runs over both senders: the HTTP/1.1 client (every ``http://`` server) and the openai
    client (``https://`` servers and proxies), which the rest of the suite no longer reaches over loopback."""
    if request.param == "openai":
        monkeypatch.setattr(http1, "usable", lambda url: False)
    return str(request.param)


def _sender_of(b: OpenAIBackend) -> str:
    return "openai" if isinstance(b._sender, OpenAISender) else "http1"


async def test_refused_connections_are_connection_errors(sender: str) -> None:
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    await _cannot_reach(f"http://127.0.0.1:{port}/v1", sender)


async def _cannot_reach(url: str, sender: str) -> None:
    """Plain and streamed requests to ``url`` fail as connection errors (not timeouts), through ``sender``."""
    b = OpenAIBackend(model="m", base_url=url, max_retries=0)
    assert _sender_of(b) == sender
    for early in (None, EarlyExit("margin_first", (0.5,))):
        with pytest.raises(BackendError, match="cannot reach") as info:
            await b.generate(["hi"], PARAMS, early_exit=early)
        assert not isinstance(info.value, BackendTimeoutError) and info.value.public() == "cannot connect"
    await b.aclose()


async def test_streamed_and_plain_answers_share_one_connection_and_an_early_exit_closes_it(sender: str) -> None:
    async with keep_alive_server() as (url, seen):
        b = OpenAIBackend(model="m", base_url=url, max_retries=0)
        assert _sender_of(b) == sender
        await b.generate(["Capital of France?"], PARAMS, early_exit=EXIT)
        await b.generate(["Capital of France?"], PARAMS)
        assert seen.connections == 1
        [cut] = await b.generate(["Capital of France?"], PARAMS, early_exit=EarlyExit("margin_first", (-1.0,)))
        await b.generate(["Capital of France?"], PARAMS)
        await b.aclose()
    assert cut.finish_reason == "early_exit" and seen.connections == 2  # the cut stream's connection was closed


async def test_a_server_that_drops_the_connection_is_a_connection_error_not_a_timeout(sender: str) -> None:
    async def drop(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.close()

    async with serving(drop) as url:
        await _cannot_reach(url, sender)


def test_a_backend_moved_to_a_new_loop_keeps_answering_and_leaves_nothing_unclosed(
        sender: str, caplog: pytest.LogCaptureFixture) -> None:
    with SimServer(SimConfig(model="m")) as sim:
        b = OpenAIBackend(model="m", base_url=sim.base_url, max_retries=0)
        assert _sender_of(b) == sender
        with caplog.at_level(logging.WARNING):
            for _ in range(3):  # each asyncio.run is a new loop: the old one's connections are dropped
                [g] = asyncio.run(b.generate(["hi"], PARAMS))
                assert g.text
            del b  # never closed
            gc.collect()
    assert not [r for r in caplog.records if "nclosed" in r.getMessage() or "Exception" in r.getMessage()]


@pytest.mark.parametrize("status", [503, 429])
async def test_retried_statuses_are_asked_again_after_the_server_s_retry_after(status: int) -> None:
    heads: list[bytes] = []

    async def flaky(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            while True:
                heads.append(await _request(reader))
                if len(heads) < 3:
                    body = b'{"error": {"message": "busy, try later"}}'
                    writer.write(b"HTTP/1.1 %d Busy\r\nretry-after-ms: 1\r\ncontent-length: %d\r\n\r\n%s"
                                 % (status, len(body), body))
                else:
                    writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%s" % (len(WHOLE), WHOLE))
                await writer.drain()

    async with serving(flaky) as url:
        b = OpenAIBackend(model="m", base_url=url, max_retries=1)
        with pytest.raises(BackendError, match=f"HTTP {status} from .*: busy, try later") as info:
            await b.generate(["hi"], PARAMS)
        assert info.value.public() == f"HTTP {status}" and len(heads) == 2  # one retry, then the error
        [g] = await b.generate(["hi"], PARAMS)  # third request: answered
        await b.aclose()
    assert g.text == "Paris" and len(heads) == 3


@pytest.mark.parametrize(("status", "header", "asked"), [(400, b"", 1), (503, b"x-should-retry: false\r\n", 1),
                                                          (400, b"x-should-retry: true\r\n", 3)])
async def test_other_statuses_are_not_retried_unless_the_server_says_so(status: int, header: bytes, asked: int) -> None:
    heads: list[bytes] = []

    async def refuse(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            while True:
                heads.append(await _request(reader))
                writer.write(b"HTTP/1.1 %d No\r\n%sretry-after-ms: 1\r\ncontent-length: 4\r\n\r\nnope"
                             % (status, header))
                await writer.drain()

    async with serving(refuse) as url:
        b = OpenAIBackend(model="m", base_url=url, max_retries=2)
        with pytest.raises(BackendError, match=f"HTTP {status} from .*: nope"):
            await b.generate(["hi"], PARAMS)
        await b.aclose()
    assert len(heads) == asked


async def test_a_pooled_connection_the_server_closed_is_replaced_without_a_retry() -> None:
    """A server that closes each connection after one answer without saying so: the next request finds its
    pooled connection dead before any answer byte, and goes out once more on a new one (max_retries=0)."""
    opened: list[int] = []

    async def once(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        opened.append(1)
        await _request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%s" % (len(WHOLE), WHOLE))
        await writer.drain()
        writer.close()

    async with serving(once) as url:
        b = OpenAIBackend(model="m", base_url=url, max_retries=0)
        for _ in range(3):
            [g] = await b.generate(["hi"], PARAMS)
            assert g.text == "Paris"
        await b.aclose()
    assert len(opened) == 3


async def test_the_key_goes_as_a_bearer_token_and_url_credentials_are_never_sent_or_shown() -> None:
    async with keep_alive_server() as (url, seen):
        secret_url = url.replace("http://", "http://alice:s3cret@")
        b = OpenAIBackend(model="m", base_url=secret_url, api_key="sk-k", max_retries=0)
        await b.generate(["hi"], PARAMS)
        await b.aclose()
    head = seen.heads[0]
    assert b"Authorization: Bearer sk-k\r\n" in head and b"s3cret" not in head and b"alice" not in head
    assert head.startswith(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:")
    assert "s3cret" not in b.where and "***@" in b.where


def _framings() -> dict[str, bytes]:
    sse = b'data: {"choices": [{"index": 0, "text": "ok"}]}\n\ndata: [DONE]\n\n'
    pieces = (sse[:7], sse[7:30], sse[30:])
    chunked = b"".join(b"%x;ext=1\r\n%s\r\n" % (len(p), p) for p in pieces) + b"0\r\nx-t: 1\r\n\r\n"
    packed = gzip.compress(sse)
    return {
        "length": b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%s" % (len(sse), sse),
        "chunked with extensions and trailers": b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\n"
                                                b"Transfer-Encoding: chunked\r\n\r\n" + chunked,
        "to the connection's end": b"HTTP/1.0 200 OK\r\n\r\n" + sse,
        "gzip": b"HTTP/1.1 200 OK\r\ncontent-encoding: gzip\r\ncontent-length: %d\r\n\r\n%s" % (len(packed), packed),
    }


@pytest.mark.parametrize("quiet", [False, True])
@pytest.mark.parametrize("framing", list(_framings()))
async def test_bodies_are_read_whatever_their_framing_even_a_byte_at_a_time(framing: str, quiet: bool) -> None:
    """Also ``quiet()`` after the first piece: the rest comes in one piece (its end is never missed)."""
    answer = _framings()[framing]

    async def trickle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _request(reader)
        for i in range(len(answer)):
            writer.write(answer[i:i + 1])
            await writer.drain()
        writer.close()

    async with serving(trickle) as url:
        client = Http1Client(url, api_key="k", max_retries=0, user_agent="t")
        stream = await client.open_stream("/completions", {"prompt": "x"})
        pieces = stream.chunks()
        first = await pieces.__anext__()
        if quiet:
            stream.quiet()
        rest = [piece async for piece in pieces]
        await stream.aclose()
        await client.aclose()
    assert first + b"".join(rest) == b'data: {"choices": [{"index": 0, "text": "ok"}]}\n\ndata: [DONE]\n\n'
    if quiet and framing != "gzip":  # (the inflater may hold back a tail until the end)
        assert len([p for p in rest if p]) <= 1


@pytest.mark.parametrize("garbage", [b"SSH-2.0-OpenSSH\r\n\r\n", b"HTTP/1.1 200 OK\r\nbroken header\r\n\r\n",
                                     b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n"])
async def test_an_answer_that_is_not_http_is_a_failed_connection(garbage: bytes) -> None:
    async def babble(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _request(reader)
        writer.write(garbage)
        await writer.drain()
        writer.close()

    async with serving(babble) as url:
        b = OpenAIBackend(model="m", base_url=url, max_retries=0)
        with pytest.raises(BackendError) as info:
            await b.generate(["hi"], PARAMS, early_exit=EXIT)
        await b.aclose()
    assert info.value.public() == "the connection failed" and not isinstance(info.value, BackendTimeoutError)


async def test_the_pool_holds_one_connection_per_request_in_flight_and_reuses_them() -> None:
    waiting: list[asyncio.Event] = []
    seen = [0, 0]  # connections opened, most requests waiting at once

    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen[0] += 1
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            while True:
                await _request(reader)
                go = asyncio.Event()
                waiting.append(go)
                seen[1] = max(seen[1], len(waiting))
                if len(waiting) == 2:  # answer in pairs
                    for event in waiting:
                        event.set()
                    waiting.clear()
                await go.wait()
                writer.write(OK)
                await writer.drain()

    async with serving(hold) as url:
        client = Http1Client(url, api_key="k", max_retries=0, user_agent="t")
        slots = asyncio.Semaphore(2)  # what the backend's max_concurrency does

        async def one() -> object:
            async with slots:
                return await client.post_json("/x", {})

        answers = await asyncio.gather(*(one() for _ in range(6)))
        await client.aclose()
    assert answers == [{}] * 6 and seen == [2, 2] and client.connections_opened == 2


def test_only_plain_http_without_a_proxy_goes_through_the_small_client(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy", "NO_PROXY", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    assert usable("http://10.0.0.5:8000/v1") and not usable("https://api.openai.com/v1")
    monkeypatch.setenv("HTTP_PROXY", "http://proxy:3128")
    monkeypatch.setenv("NO_PROXY", "localhost,127.0.0.1")
    assert not usable("http://10.0.0.5:8000/v1") and usable("http://127.0.0.1:8000/v1")
    b = OpenAIBackend(model="m", base_url="http://10.0.0.5:8000/v1")
    assert _sender_of(b) == "openai"  # the openai client honours the proxy


async def test_a_closed_client_closes_its_pooled_connections() -> None:
    closed = asyncio.Event()

    async def watch(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            await _request(reader)
            writer.write(OK)
            await writer.drain()
            await reader.read()  # returns at the client's close
        closed.set()

    async with serving(watch) as url:
        b = OpenAIBackend(model="m", base_url=url, max_retries=0)
        assert await b.post_json("chat", {"model": "m"}) == {}
        await b.aclose()
        await asyncio.wait_for(closed.wait(), 10)



async def test_an_answer_without_a_body_is_malformed_not_a_hang() -> None:
    async def empty(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _request(reader)
        writer.write(b"HTTP/1.1 204 No Content\r\n\r\n")  # no length, connection kept open
        await writer.drain()
        await reader.read()

    async with serving(empty) as url:
        b = OpenAIBackend(model="m", base_url=url, max_retries=0)
        with pytest.raises(BackendError) as info:
            await b.generate(["hi"], PARAMS)
        await b.aclose()
    assert info.value.public() == "malformed answer"


def test_a_key_that_cannot_go_in_a_header_is_a_config_error() -> None:
    for key in ("sk-a\r\nX-Evil: 1", "sk-\u00e9t\u00e9"):
        with pytest.raises(ConfigError, match="line break"):
            OpenAIBackend(model="m", base_url="http://127.0.0.1:9/v1", api_key=key)
