"""The hot endpoints' raw ASGI path (cascade.server.asgi): it answers exactly as the Starlette routes do.

Each request goes once through the app (the fast dispatch) and once through Starlette's own middleware stack and
router (``Starlette.__call__``, which routes to the same handlers); status, headers and body must agree.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.responses import JSONResponse

from cascade.server import ServerConfig, create_app
from cascade.server.asgi import json_reply, read_body
from cascade.server.wire import HTTPError
from cascade.types import Generation

CHAT = [{"role": "user", "content": "the movie was good"}]
KEY_ENV = "CASCADE_TEST_ASGI_KEY"


class Fixed:
    """A real backend answering its own name with a fixed margin."""

    def __init__(self, name: str) -> None:
        self.name = name

    async def generate(self, prompts: Any, params: Any, *, scores: bool = True, early_exit: Any = None) -> Any:
        return [Generation(text=f"{self.name} é", model=self.name, prompt_tokens=3, completion_tokens=2,
                           scores={"margin_first": 0.75}) for _ in prompts]

    async def aclose(self) -> None:
        return None


def _app(**config: Any) -> Any:
    from cascade.engine import Cascade

    engine = Cascade(small=Fixed("s"), large=Fixed("l"), threshold=2.0)  # never escalates
    return create_app(engine, ServerConfig(**config))


def _routed(app: Any) -> Any:
    """The same app, every request through Starlette's middleware stack and router."""

    async def routed(scope: Any, receive: Any, send: Any) -> None:
        await Starlette.__call__(app, scope, receive, send)

    return routed


_VOLATILE = {"id", "created", "latency_s", "pid"}


def _stable(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _stable(v) for k, v in value.items() if k not in _VOLATILE}
    if isinstance(value, list):
        return [_stable(v) for v in value]
    return value


def _seen(r: httpx.Response) -> tuple[int, list[tuple[str, str]], Any]:
    """Status, headers and body of an answer, without what differs between two answers (ids, times, lengths)."""
    assert r.request.method == "HEAD" or int(r.headers.get("content-length", len(r.content))) == len(r.content)
    headers = [(k, v) for k, v in r.headers.multi_items() if k not in ("x-request-id", "content-length")]
    body: Any = r.text
    if r.headers.get("content-type", "").startswith("text/event-stream"):
        body = [e if e == "data: [DONE]" else _stable(json.loads(e.removeprefix("data: ")))
                for e in r.text.split("\n\n") if e]
    elif r.text:
        body = _stable(r.json())
    return r.status_code, headers, body


REQUESTS: list[tuple[str, str, dict[str, str], Any]] = [  # method, path, headers, body (bytes or JSON)
    ("POST", "/v1/chat/completions", {}, {"model": "cascade", "messages": CHAT}),
    ("POST", "/v1/completions", {}, {"model": "cascade", "prompt": ["a", "b"]}),
    ("POST", "/v1/chat/completions", {}, {"model": "cascade", "messages": CHAT, "stream": True}),
    ("POST", "/v1/completions", {}, {"model": "cascade", "prompt": ["a", "b"], "stream": True}),
    ("POST", "/v1/chat/completions", {}, {"model": "other", "messages": CHAT}),
    ("POST", "/v1/chat/completions", {}, {"model": "cascade", "messages": CHAT, "tools": []}),
    ("POST", "/v1/chat/completions", {}, b"{not json"),
    ("POST", "/v1/chat/completions", {}, b'{"model": NaN}'),
    ("POST", "/v1/chat/completions", {"content-type": "text/plain"}, b"{}"),
    ("POST", "/v1/chat/completions", {}, b"x" * 2000),
    ("POST", "/v1/chat/completions", {"host": "evil.example"}, {"model": "cascade", "messages": CHAT}),
    ("POST", "/v1/chat/completions", {"origin": "http://evil.example"}, {"model": "cascade", "messages": CHAT}),
    ("POST", "/v1/chat/completions", {"authorization": "Bearer wrong"}, {"model": "cascade", "messages": CHAT}),
    ("GET", "/v1/chat/completions", {}, None),
    ("GET", "/health", {}, None),
    ("HEAD", "/health", {}, None),
    ("POST", "/health", {}, b"{}"),
]


@pytest.mark.parametrize("auth", [False, True])
async def test_the_fast_dispatch_answers_as_the_starlette_routes(auth: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    config: dict[str, Any] = {"allowed_hosts": ("localhost",), "max_body_bytes": 1000}
    if auth:
        monkeypatch.setenv(KEY_ENV, "sesame")
        config["api_key_env"] = KEY_ENV
    app = _app(**config)
    answers: dict[str, list[Any]] = {}
    for name, asgi in (("fast", app), ("routed", _routed(app))):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=asgi), base_url="http://localhost") as c:
            for method, path, headers, body in REQUESTS:
                sent = {"authorization": "Bearer sesame"} if auth else {}
                sent.update(headers)
                content = body if isinstance(body, bytes) else None if body is None else json.dumps(body).encode()
                if content is not None:
                    sent.setdefault("content-type", "application/json")
                r = await c.request(method, path, headers=sent, content=content)
                answers.setdefault(name, []).append(_seen(r))
    for request, fast, routed in zip(REQUESTS, answers["fast"], answers["routed"]):
        assert fast == routed, request
    statuses = [status for status, _, _ in answers["fast"]]
    assert statuses == [200, 200, 200, 200, 404, 400, 400, 400, 415, 413, 421, 403, 401 if auth else 200, 405,
                        200, 200, 405]
    assert app.middleware_stack is not None  # built by the routed round


async def test_hot_requests_skip_starlettes_stack_and_the_rest_goes_through_it() -> None:
    app = _app()
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        r = await c.post("/v1/chat/completions", json={"model": "cascade", "messages": CHAT})
        assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == "s é"
        assert r.headers["x-cascade-tier"] == "small" and r.headers["x-request-id"] == r.json()["id"]
        assert (await c.get("/health")).json()["status"] == "ok"
        assert app.middleware_stack is None  # Starlette builds it on the first request it routes
        assert (await c.get("/v1/models")).json()["data"][0]["id"] == "cascade"
        assert app.middleware_stack is not None
    metrics = app.state.service.metrics.render(0, 0)
    assert 'cascade_requests_total{endpoint="chat",status="200",tier="small"} 1.0' in metrics


async def test_under_a_root_path_starlette_routes_the_hot_endpoints() -> None:
    app = _app()
    transport = httpx.ASGITransport(app=app, root_path="/api")
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
        r = await c.post("/api/v1/chat/completions", json={"model": "cascade", "messages": CHAT})
        assert r.status_code == 200, r.text
    assert app.middleware_stack is not None


async def test_a_body_in_pieces_is_joined_and_limited() -> None:
    async def pieces(chunks: list[bytes], end: str = "done") -> Any:
        messages = [{"type": "http.request", "body": c, "more_body": True} for c in chunks]
        messages.append({"type": "http.request", "body": b"", "more_body": False} if end == "done"
                        else {"type": "http.disconnect"})
        messages.insert(1, {"type": "http.ping"})  # an unknown message is skipped

        async def receive() -> Any:
            if not messages:
                await asyncio.Event().wait()  # the client stays until the answer is sent
            return messages.pop(0)

        return receive

    assert await read_body(await pieces([b"ab", b"", b"cd"]), 10) == b"abcd"
    with pytest.raises(HTTPError) as err:
        await read_body(await pieces([b"abcdef", b"ghijkl"]), 10)
    assert err.value.status == 413
    app = _app()
    body = json.dumps({"model": "cascade", "messages": CHAT}).encode()
    for end, status in (("done", 200), ("gone", 499)):
        receive = await pieces([body[:10], body[10:]], end)
        sent: list[dict[str, Any]] = []
        scope = {"type": "http", "method": "POST", "path": "/v1/chat/completions", "root_path": "",
                 "headers": [(b"content-type", b"application/json")], "query_string": b""}
        await app(scope, receive, _recorder(sent))
        assert sent[0]["status"] == status


def _recorder(sent: list[dict[str, Any]]) -> Any:
    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    return send


def test_json_replies_are_the_bytes_starlette_sends() -> None:
    for payload, status, headers in (({"a": "é\u2028", "b": [1, 2.5, None]}, 200, {"X-Cascade-Tier": "small"}),
                                     ({"status": "ok"}, 503, None), ({}, 204, {"Retry-After": "1"})):
        ours, theirs = json_reply(payload, status, headers), JSONResponse(payload, status, headers)
        assert (ours.status, ours.headers, ours.body) == (theirs.status_code, theirs.raw_headers, theirs.body)


async def test_a_stream_deadline_ends_the_wait_for_the_next_item_only() -> None:
    from cascade.errors import CascadeError
    from cascade.server.flow import StreamDeadline

    stuck = asyncio.Event()

    async def items(n: int, then_stuck: bool) -> Any:
        for i in range(n):
            yield i
        if then_stuck:
            await stuck.wait()  # never set: only the deadline ends this wait

    stream = StreamDeadline(items(3, False), time.monotonic() + 600.0)
    assert [await stream.next() for _ in range(3)] == [0, 1, 2]
    with pytest.raises(CascadeError, match="ended without a result"):
        await stream.next()
    stream.close()

    stream = StreamDeadline(items(2, True), time.monotonic() + 0.2)
    assert [await stream.next() for _ in range(2)] == [0, 1]
    with pytest.raises(asyncio.TimeoutError):
        await stream.next()
    task = asyncio.current_task()
    assert task is not None and task.cancelling() == 0  # the timer's cancellation was taken back
    stream.close()

    later = StreamDeadline(items(2, True), time.monotonic() - 1.0)  # already past: ready items still come
    await asyncio.sleep(0)  # the timer fires with no one waiting
    assert [await later.next(), await later.next()] == [0, 1]
    with pytest.raises(asyncio.TimeoutError):
        await later.next()
    later.close()


async def test_an_sse_reply_sends_what_starlettes_streaming_response_sends() -> None:
    from starlette.responses import StreamingResponse

    from cascade.server.flow import StreamReply

    async def events() -> Any:
        for text in ("data: {\"a\":\"é\"}\n\n", "data: [DONE]\n\n"):
            yield text

    async def receive() -> Any:
        await asyncio.Event().wait()  # the client stays

    cleaned: list[bool] = []

    async def cleanup() -> None:
        cleaned.append(True)

    headers = {"x-request-id": "chatcmpl-1", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    ours: list[dict[str, Any]] = []
    theirs: list[dict[str, Any]] = []
    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}}
    await StreamReply(events(), headers, cleanup)(scope, receive, _recorder(ours))
    await StreamingResponse(events(), headers=headers, media_type="text/event-stream")(scope, receive,
                                                                                     _recorder(theirs))
    assert ours == theirs and cleaned == [True]
