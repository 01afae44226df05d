"""The floor under ``cascade serve``'s CPU per request: ``python -m eval.gateway_floor [--rate 80]``.

What would the cheapest gateway that does the same job on the same stack cost? This module holds one: a bare
ASGI app on uvicorn (uvloop and httptools when installed, as ``cascade serve``), which answers each
``POST /v1/chat/completions`` with one streamed request to the small tier through the package's own HTTP/1.1
client (:class:`cascade.backends.http1.Http1Client`), scores the first token, reads the rest in one piece (as
``cascade serve`` does once it has decided), parses every event and sends a minimal OpenAI answer: no
validation, limits, metrics, logging, engine or error handling. The benchmark runs, in one run and in turn,
open-loop load at ``--rate`` against

* ``canned``: the bare app answering at once, no tier call (what uvicorn and the load's HTTP cost),
* ``floor``: the bare app with its tier call (the above),
* ``cascade serve`` with the same simulated small tier, every answer accepted (threshold 2),

and prints each one's CPU milliseconds per request from ``/proc`` (the same measure as
:mod:`eval.bench_gateway`), so a run says how far the product is above what the stack itself costs. Last, the
platform's own price of a streamed token: the CPU microseconds one wake-up of the event loop costs a process
that receives one small write every ``latency_per_token_s`` of the small tier (a child process writes, nothing
is parsed); a streamed answer costs about one per token.

``--in-process`` measures the other way: both apps called directly (no uvicorn, no client sockets), one request
at a time, against a small tier that answers at once, so the process never idles and its caches stay warm. The
difference is the CPU of ``cascade serve``'s own work per request (validation, limits, engine, scoring, metrics,
rendering) when warm; a process that idles between requests and tokens pays it about twice over.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import replace
from typing import Any

from eval.loadtest.load import run
from eval.loadtest.simbackends import SimProcess, process_cpu_s
from eval.loadtest.targets import Started

__all__ = ["FloorGateway", "main"]

Send = Callable[[dict[str, Any]], Awaitable[None]]
Receive = Callable[[], Awaitable[dict[str, Any]]]


def floor_app(small_url: str | None) -> Callable[[dict[str, Any], Receive, Send], Awaitable[None]]:
    """The bare ASGI app; ``small_url`` None answers at once (``canned``)."""
    from cascade.backends.http1 import Http1Client
    from cascade.backends.openai_answer import sse_chunks
    from cascade.backends.openai_scores import first_token_scores

    state: dict[str, Any] = {}

    async def reply(send: Send, body: bytes) -> None:
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]})
        await send({"type": "http.response.body", "body": body})

    async def app(scope: dict[str, Any], receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        if scope["method"] == "GET":
            await reply(send, b'{"data": [{"id": "floor"}]}' if scope["path"].endswith("models") else b"{}")
            return
        body = bytearray()
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        request = json.loads(body)
        text, margin = "positive", 1.0
        if small_url is not None:
            client = state.get("client") or state.setdefault(
                "client", Http1Client(small_url, api_key="k", max_retries=0, user_agent="floor"))
            stream = await client.open_stream("/chat/completions", {
                "model": "sim-small", "messages": request["messages"], "max_tokens": request.get("max_tokens", 16),
                "logprobs": True, "top_logprobs": 5, "stream": True})
            parts: list[str] = []
            try:
                async for event in sse_chunks(stream.chunks()):
                    for choice in event.get("choices") or ():
                        parts.append((choice.get("delta") or {}).get("content") or "")
                        content = (choice.get("logprobs") or {}).get("content") or ()
                        if content and margin == 1.0:
                            top = [t["logprob"] for t in content[0]["top_logprobs"]]
                            margin = first_token_scores(top, 5)["margin_first"]
                            stream.quiet()  # decided: the rest in one piece, as cascade serve reads it
            finally:
                await stream.aclose()
            text = "".join(parts)
        await reply(send, json.dumps({"object": "chat.completion", "model": "floor", "choices": [
            {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
            "cascade": {"tier": "small", "uncertainty": margin}}).encode())

    return app


class FloorGateway(Started):
    """The bare app in a child process on a free port (``small_url`` None: ``canned``)."""

    def __init__(self, small_url: str | None) -> None:
        self.small_url = small_url
        self.url = ""
        self._proc: subprocess.Popen[bytes] | None = None

    async def start(self) -> None:
        import httpx

        from eval.loadtest.serve import free_port

        port = free_port()
        argv = [sys.executable, "-m", "eval.gateway_floor", "serve", "--port", str(port)]
        if self.small_url:
            argv += ["--small", self.small_url]
        self._proc = await asyncio.to_thread(subprocess.Popen, argv, stdin=subprocess.DEVNULL)
        self.url = f"http://127.0.0.1:{port}"
        async with httpx.AsyncClient(trust_env=False) as client:
            for _ in range(150):
                try:
                    if (await client.get(self.url + "/health")).status_code == 200:
                        return
                except httpx.HTTPError:
                    await asyncio.sleep(0.2)
        raise RuntimeError("the floor gateway did not start")

    def cpu_s(self) -> float | None:
        return None if self._proc is None else process_cpu_s(self._proc.pid)

    async def aclose(self) -> None:
        if self._proc is not None:
            self._proc.terminate()
            await asyncio.to_thread(self._proc.wait)
            self._proc = None


_WRITER = """
import socket, sys, time
sock = socket.socket(fileno=int(sys.argv[1]))
for _ in range(int(sys.argv[3])):
    time.sleep(float(sys.argv[2]))
    sock.send(b"x" * 400)
sock.send(b"end")
"""


async def _wakes(gap_s: float, n: int) -> float:
    """CPU microseconds per wake-up of this process's loop, receiving one write every ``gap_s`` seconds."""
    import socket

    ours, theirs = socket.socketpair()
    writer = await asyncio.to_thread(subprocess.Popen, [sys.executable, "-c", _WRITER, str(theirs.fileno()),
                                                         str(gap_s), str(n)], pass_fds=[theirs.fileno()])
    theirs.close()
    loop = asyncio.get_running_loop()
    done: asyncio.Future[int] = loop.create_future()
    calls = [0]

    class Counter(asyncio.Protocol):
        def data_received(self, data: bytes) -> None:
            calls[0] += 1
            if data.endswith(b"end") and not done.done():
                done.set_result(calls[0])

    transport, _ = await loop.connect_accepted_socket(Counter, ours)
    started = time.process_time()
    wakes = await done
    used = time.process_time() - started
    transport.close()
    await asyncio.to_thread(writer.wait)
    return 1e6 * used / wakes


async def _measure(url: str, cpu: Callable[[], float | None], prompts: Sequence[Any], rate: float,
                   duration: float) -> dict[str, Any]:
    from eval.bench_gateway import phase

    row = await phase(url, lambda: {"gateway": cpu()}, prompts, rate=rate, duration_s=duration, stream=False,
                      max_tokens=16)
    return {"answered": row["answered"], "failed": row["failed"],
            "cpu_ms_per_request": row["cpu_ms_per_request"]["gateway"]}


_BODY = json.dumps({"model": "cascade", "max_tokens": 16,
                    "messages": [{"role": "user", "content": "Is this review positive? It was wonderful."}]}).encode()


@contextlib.asynccontextmanager
async def _running(app: Any) -> AsyncIterator[None]:
    """The ASGI lifespan of ``app`` around the block: started before, shut down after."""
    inbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    outbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    task = asyncio.ensure_future(app({"type": "lifespan", "asgi": {"version": "3.0"}}, inbox.get, outbox.put))
    await inbox.put({"type": "lifespan.startup"})
    if (await outbox.get())["type"] != "lifespan.startup.complete":
        raise RuntimeError("the app did not start")
    try:
        yield
    finally:
        await inbox.put({"type": "lifespan.shutdown"})
        await outbox.get()
        await task


async def _hot_cpu_ms(app: Any, requests: int) -> float:
    """CPU milliseconds of this process per ``POST /v1/chat/completions`` sent straight to ``app``, in turn."""
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": "/v1/chat/completions", "raw_path": b"/v1/chat/completions", "root_path": "",
             "query_string": b"", "client": ("127.0.0.1", 5000), "server": ("127.0.0.1", 8000),
             "headers": [(b"host", b"127.0.0.1:8000"), (b"content-type", b"application/json"),
                         (b"content-length", b"%d" % len(_BODY))]}

    async def one() -> None:
        replied: list[dict[str, Any]] = []
        answered = asyncio.Event()
        messages = [{"type": "http.request", "body": _BODY, "more_body": False}]

        async def receive() -> dict[str, Any]:
            if messages:
                return messages.pop()
            await answered.wait()
            return {"type": "http.disconnect"}

        async def send(message: dict[str, Any]) -> None:
            replied.append(message)

        await app(dict(scope), receive, send)
        answered.set()
        if replied[0].get("status") != 200:
            raise RuntimeError(f"the app answered {replied}")

    for _ in range(min(30, requests)):  # warm-up
        await one()
    started = time.process_time()
    for _ in range(requests):
        await one()
    return 1000 * (time.process_time() - started) / requests


async def in_process(requests: int) -> dict[str, Any]:
    """The floor app and ``cascade serve``'s app, each twice in turn: hot CPU ms per request."""
    import tempfile
    from pathlib import Path

    import yaml

    from cascade.config import build_cascade, load_config
    from cascade.server import ServerConfig, create_app
    from eval.loadtest.serve import serve_config
    from eval.loadtest.sim import SimOptions

    options = replace(SimOptions(max_tokens=16), threshold=2.0)
    small = SimProcess(replace(options.small, latency_per_request_s=0.0, latency_per_token_s=0.0)).start()
    large = SimProcess(options.large).start()
    out: dict[str, Any] = {"requests": requests, "floor": [], "cascade serve": []}
    try:
        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / "cascade.yaml"
            path.write_text(yaml.safe_dump(serve_config(options, small.base_url, large.base_url)), encoding="utf-8")
            config = load_config(path)
        server = ServerConfig.from_mapping((config.extra or {}).get("server"))
        for _ in range(2):
            for label, app in (("floor", floor_app(small.base_url)), ("cascade serve", create_app(
                    build_cascade(config), server))):
                async with _running(app):
                    out[label].append(round(await _hot_cpu_ms(app, requests), 3))
            print(f"in process, warm: floor {out['floor'][-1]} ms, cascade serve {out['cascade serve'][-1]} ms "
                  "of CPU per request", flush=True)
    finally:
        small.stop()
        large.stop()
    return out


async def bench(args: argparse.Namespace) -> dict[str, Any]:
    from eval.loadtest.prompts import generated_prompts
    from eval.loadtest.serve import ServedCascade
    from eval.loadtest.sim import SimOptions

    prompts = generated_prompts(1000, seed=0)
    out: dict[str, Any] = {"rate_rps": args.rate, "duration_s": args.duration, "loadavg_at_start": os.getloadavg()}
    options = replace(SimOptions(max_tokens=16), threshold=2.0)
    small = SimProcess(options.small).start()
    try:
        for label, url in (("canned", None), ("floor", small.base_url)):
            async with FloorGateway(url) as gw:
                out[label] = await _measure(gw.url, gw.cpu_s, prompts, args.rate, args.duration)
            print(f"{label:>14}: CPU ms/req {out[label]['cpu_ms_per_request']}", flush=True)
    finally:
        small.stop()
    async with ServedCascade(options) as served:
        out["cascade serve"] = await _measure(served.url, served.cpu_s, prompts, args.rate, args.duration)
    print(f"{'cascade serve':>14}: CPU ms/req {out['cascade serve']['cpu_ms_per_request']}", flush=True)
    gap = options.small.latency_per_token_s
    wakes = await asyncio.to_thread(subprocess.run, [sys.executable, "-m", "eval.gateway_floor", "wakes", "--gap",
                                                     str(gap)], check=True, capture_output=True, text=True)
    out["wake_us"] = {"gap_ms": 1000 * gap, "cpu_us_per_wake": round(json.loads(wakes.stdout), 1)}
    print(f"{'one wake-up':>14}: CPU us {out['wake_us']['cpu_us_per_wake']} (a write every {1000 * gap:g} ms, "
          f"on the loop cascade serve uses)", flush=True)
    out["loadavg_at_end"] = os.getloadavg()
    return out


def _serve(port: int, small: str | None) -> None:
    import uvicorn

    from cascade.server.flow import fast_http, fast_loop

    uvicorn.run(floor_app(small), host="127.0.0.1", port=port, log_level="warning", access_log=False,
                lifespan="on", loop=fast_loop(), http=fast_http())  # type: ignore[arg-type]


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: the benchmark (or with ``--in-process`` its warm variant), ``serve`` (the bare app itself) or
    ``wakes`` (the price of one wake-up, as JSON)."""
    p = argparse.ArgumentParser(prog="python -m eval.gateway_floor", description=__doc__.split("\n\n")[0])
    p.add_argument("command", nargs="?", choices=["bench", "serve", "wakes"], default="bench")
    p.add_argument("--rate", type=float, default=80.0, help="offered requests/s (open loop)")
    p.add_argument("--duration", type=float, default=10.0, help="seconds of sending per phase")
    p.add_argument("--report-json", metavar="F", help="write the numbers as JSON")
    p.add_argument("--port", type=int, default=0, help="(serve) the port")
    p.add_argument("--small", help="(serve) the small tier's base URL; none: answer at once")
    p.add_argument("--gap", type=float, default=0.004, help="(wakes) seconds between two writes")
    p.add_argument("--in-process", action="store_true", help="instead: both apps called directly, warm (see above)")
    p.add_argument("--requests", type=int, default=300, help="(--in-process) requests per measurement")
    args = p.parse_args(argv)
    if args.command == "wakes":
        print(json.dumps(run(_wakes(args.gap, 1000))))
        return 0
    if args.command == "serve":
        _serve(args.port, args.small)
        return 0
    started = time.time()
    out = run(in_process(args.requests) if args.in_process else bench(args))
    out["elapsed_s"] = round(time.time() - started, 1)
    if args.report_json:
        with open(args.report_json, "w", encoding="utf-8") as f:
            json.dump(out, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
