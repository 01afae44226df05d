"""The aiohttp transport under the openai client, against real loopback servers on 127.0.0.1."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import socket
from collections.abc import AsyncIterator

import pytest
from test_openai_send import EXIT, keep_alive_server

from cascade.backends import openai_compat
from cascade.backends.openai_compat import OpenAIBackend
from cascade.backends.openai_http import aiohttp_client, http_library
from cascade.errors import BackendError, BackendTimeoutError
from cascade.simulate import SimConfig, SimServer
from cascade.types import EarlyExit, GenerationParams

pytest.importorskip("aiohttp")

PARAMS = GenerationParams(max_tokens=8)
OK = b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: 2\r\n\r\nok"


@contextlib.asynccontextmanager
async def holding_server(hold_until: int) -> AsyncIterator[tuple[str, list[int]]]:
    """Answers each request (keep-alive) once ``hold_until`` requests are waiting at once, or none are coming.

    Yields the URL and a list of counts: ``[connections opened, most requests waiting at once]``.
    """
    seen = [0, 0]
    waiting: list[asyncio.Event] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen[0] += 1
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            while True:
                await reader.readuntil(b"\r\n\r\n")
                go = asyncio.Event()
                waiting.append(go)
                seen[1] = max(seen[1], len(waiting))
                if len(waiting) >= hold_until:
                    for event in waiting:
                        event.set()
                    waiting.clear()
                await go.wait()
                writer.write(OK)
                await writer.drain()
        writer.close()

    srv = await asyncio.start_server(handle, "127.0.0.1", 0)
    async with srv:
        yield f"http://127.0.0.1:{srv.sockets[0].getsockname()[1]}", seen


async def test_refused_connections_are_connection_errors(transport: str) -> None:
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    b = OpenAIBackend(model="m", base_url=f"http://127.0.0.1:{port}/v1", max_retries=0)
    assert _transport_of(b) == transport
    for early in (None, EarlyExit("margin_first", (0.5,))):
        with pytest.raises(BackendError, match="cannot reach") as info:
            await b.generate(["hi"], PARAMS, early_exit=early)
        assert not isinstance(info.value, BackendTimeoutError)
    await b.aclose()


async def test_the_pool_opens_at_most_max_connections_and_reuses_them() -> None:
    async with holding_server(hold_until=2) as (url, seen):
        client = aiohttp_client(2)
        assert isinstance(client, http_library().AsyncClient)  # what the openai client accepts
        answers = await asyncio.gather(*(client.get(url) for _ in range(6)))  # three waves of two
        await client.aclose()
    assert [a.status_code for a in answers] == [200] * 6 and {a.text for a in answers} == {"ok"}
    assert seen == [2, 2]  # two connections, each used three times; never a third


@pytest.fixture(params=["aiohttp", "default"])
def transport(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Each test below runs over both transports: aiohttp, and the openai client's default one (without the
    ``fast`` extra), which the rest of the suite no longer reaches when aiohttp is installed."""
    if request.param == "default":
        monkeypatch.setattr(openai_compat, "aiohttp_client", lambda max_connections: None)
    return str(request.param)


def _transport_of(b: OpenAIBackend) -> str:
    return "aiohttp" if type(b._client._client._transport).__name__ == "AiohttpTransport" else "default"


async def test_streamed_and_plain_answers_share_one_connection_and_an_early_exit_closes_it(transport: str) -> None:
    async with keep_alive_server() as (url, seen):
        b = OpenAIBackend(model="m", base_url=url, max_retries=0)
        assert _transport_of(b) == transport
        await b.generate(["Capital of France?"], PARAMS, early_exit=EXIT)
        await b.generate(["Capital of France?"], PARAMS)
        assert seen.connections == 1
        [cut] = await b.generate(["Capital of France?"], PARAMS, early_exit=EarlyExit("margin_first", (-1.0,)))
        await b.generate(["Capital of France?"], PARAMS)
        await b.aclose()
    assert cut.finish_reason == "early_exit" and seen.connections == 2  # the cut stream's connection was closed


async def test_a_server_that_drops_the_connection_is_a_connection_error_not_a_timeout(transport: str) -> None:
    async def drop(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.close()

    srv = await asyncio.start_server(drop, "127.0.0.1", 0)
    async with srv:
        url = f"http://127.0.0.1:{srv.sockets[0].getsockname()[1]}/v1"
        b = OpenAIBackend(model="m", base_url=url, max_retries=0)
        assert _transport_of(b) == transport
        for early in (None, EarlyExit("margin_first", (0.5,))):
            with pytest.raises(BackendError, match="cannot reach") as info:
                await b.generate(["hi"], PARAMS, early_exit=early)
            assert not isinstance(info.value, BackendTimeoutError) and info.value.public() == "cannot connect"
        await b.aclose()


def test_a_backend_moved_to_a_new_loop_leaves_no_unclosed_session(caplog: pytest.LogCaptureFixture) -> None:
    with SimServer(SimConfig(model="m")) as sim:
        b = OpenAIBackend(model="m", base_url=sim.base_url, max_retries=0)
        with caplog.at_level(logging.ERROR, logger="asyncio"):
            for _ in range(3):  # each asyncio.run is a new loop: the old one's client is dropped
                [g] = asyncio.run(b.generate(["hi"], PARAMS))
                assert g.text
            del b  # never closed: its last client goes with it
            gc.collect()
    assert not [r for r in caplog.records if "nclosed" in r.getMessage()]
