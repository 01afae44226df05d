"""``cascade serve``: an OpenAI-compatible HTTP server in front of a cascade (or an expert router).

Endpoints: ``POST /v1/chat/completions``, ``POST /v1/completions``, ``GET /v1/models``, ``GET /health``,
``GET /metrics`` (Prometheus text format), ``GET /v1/cascade/status`` and ``POST /v1/cascade/artifact``
(:mod:`cascade.server.admin`: live calibration checks, hot reload; SIGHUP reloads the configured artifact).
Responses are OpenAI-shaped; the cascade's decision rides along in an extra ``cascade`` field and in
``x-cascade-*`` headers. A request may carry a quality target:
``{"cascade": {"target": {"max_large_share": 0.3}}}``.

Safety: binds 127.0.0.1 unless told otherwise; optional bearer-token auth (key from an environment
variable named in the config); a request body size limit; a bounded number of requests running and
waiting (429 with ``Retry-After`` beyond it); a client that disconnects cancels its work; shutdown drains
the requests in flight. Client mistakes get 4xx with an OpenAI-style JSON error, never a 500.

Streaming (``"stream": true``) sends OpenAI server-sent-event chunks from :meth:`Cascade.stream` (and the
expert router's ``stream``): the answering tier is decided on the small model's first token, then its text
flows as it is generated. Tiers wrapped in a micro-batcher have no token stream of their own, so with
batching on, a tier's text arrives in one piece when its batch finishes. A completions request with
several prompts is answered first and then sent as word-sized chunks.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import math
import os
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any

from cascade.deadlines import within
from cascade.errors import (
    BackendError,
)
from cascade.server.admin import Reloader, monitor_status
from cascade.server.asgi import (
    ClientGone,
    Endpoint,
    Receive,
    Reply,
    Scope,
    Send,
    error_reply,
    gateway,
    json_reply,
    read_body,
    request_headers,
)
from cascade.server.config import ServerConfig
from cascade.server.flow import (
    Admission,
    Disconnected,
    StreamDeadline,
    StreamReply,
    close_quietly,
    next_before,
    watch,
)
from cascade.server.metrics import CONTENT_TYPE, Metrics
from cascade.server.protocol import Engine
from cascade.server.wire import HTTPError, as_http, parse_request, render_response, request_id, sse_events, sse_stream
from cascade.types import CascadeChunk

if TYPE_CHECKING:
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import Response

    Answer = Reply | StreamReply | Response  # what an endpoint answers: an ASGI app sending the response

__all__ = ["ANSWER_GRACE_S", "create_app"]

#: seconds requests still running at the drain deadline get to send their 503 (uvicorn's own shutdown timeout
#: is the drain deadline plus this): generous, since a loaded machine may be slow to answer them
ANSWER_GRACE_S = 15.0

log = logging.getLogger("cascade.server")


def _batchers(service: Engine) -> list[Any]:
    from cascade.batching import MicroBatcher

    found = {id(t.backend): t.backend for c in service.cascades() for t in c.tiers
             if isinstance(t.backend, MicroBatcher)}
    return list(found.values())


class _Service:
    """Per-app state: the engine, admission control, metrics and the shutdown flag (no globals)."""

    def __init__(self, engine: Engine, config: ServerConfig) -> None:
        self.engine, self.config = engine, config
        self.api_key = config.api_key()
        self.admission = Admission(config.max_in_flight, config.max_queue, config.retry_after_s)
        self.metrics = Metrics(lambda: monitor_status(engine))
        self.decoder = json.JSONDecoder(parse_constant=_no_constants)  # one per app: json.loads makes one per call
        self.batchers = _batchers(engine)
        self.draining = False
        self.reading = 0  # request bodies being received now
        self.expired = False  # True once drain_timeout_s has passed: requests still running get a 503
        self._expiry: asyncio.Future[None] | None = None  # done then (one future shared by all requests)
        self.started = int(time.time())

    def queue_depth(self) -> int:
        return int(self.admission.waiting + sum(b.queue_depth for b in self.batchers))

    def check_origin(self, scope: Scope) -> None:
        """Refuse a foreign Host (DNS rebinding) or a browser Origin that is not allowed (cross-site requests)."""
        hosts = self.config.allowed_hosts
        if hosts is not None and "*" not in hosts:
            host = request_headers(scope).get("host", "").lower()
            name = host[1:].partition("]")[0] if host.startswith("[") else host.rpartition(":")[0] or host
            if name not in hosts and host not in hosts:
                raise HTTPError(421, "this server does not answer for that Host (server.allowed_hosts)",
                                code="host_not_allowed")
        origin = request_headers(scope).get("origin")
        if origin and "*" not in self.config.allowed_origins \
                and origin.lower() not in self.config.allowed_origins:
            raise HTTPError(403, "cross-origin requests are refused (server.allowed_origins)",
                            code="origin_not_allowed")

    def check_access(self, scope: Scope) -> None:
        """The bearer token first (a request without it is a 401 whatever else it sends), then Host and Origin."""
        self.check_auth(scope)
        self.check_origin(scope)

    def check_auth(self, scope: Scope) -> None:
        if self.api_key is None:
            return
        header = request_headers(scope).get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.api_key.encode()):
            raise HTTPError(401, "invalid or missing API key (send 'Authorization: Bearer <key>')",
                            "invalid_request_error", "invalid_api_key", {"WWW-Authenticate": "Bearer"})

    async def read_json(self, scope: Scope, receive: Receive) -> Any:
        body = await self.read_body(scope, receive)
        try:
            return self.decoder.decode(body.decode(json.detect_encoding(body), "surrogatepass"))  # as json.loads
        except (ValueError, RecursionError) as exc:
            raise HTTPError(400, f"the body is not valid JSON: {str(exc)[:200]}") from None

    async def read_body(self, scope: Scope, receive: Receive) -> bytes:
        """A JSON request's body, within the size, time and concurrency limits (HTTPError otherwise)."""
        media = request_headers(scope).get("content-type", "").partition(";")[0].strip().lower()
        if media != "application/json":
            raise HTTPError(415, "the body must be sent as Content-Type: application/json",
                            code="unsupported_media_type")
        limit = self.config.max_body_bytes
        declared = request_headers(scope).get("content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > limit):
            raise HTTPError(413 if declared.isdigit() else 400,
                            f"request body larger than {limit} bytes" if declared.isdigit()
                            else "invalid Content-Length", code="request_too_large" if declared.isdigit() else None)
        if self.reading >= self.config.max_bodies_reading:  # slow senders cannot hold unbounded memory
            raise HTTPError(503, "too many request bodies are being received; try again", "server_error",
                            "overloaded", {"Retry-After": str(max(1, math.ceil(self.config.retry_after_s)))})
        self.reading += 1
        try:
            body = await within(read_body(receive, limit), self.config.body_timeout_s)
        except ClientGone:
            raise HTTPError(499, "the client went away while sending the body") from None
        except asyncio.TimeoutError:
            raise HTTPError(408, f"the request body did not arrive within {self.config.body_timeout_s:g} s",
                            code="request_timeout") from None
        finally:
            self.reading -= 1
        return body

    async def answer(self, scope: Scope, receive: Receive, kind: str) -> Answer:
        """The response to a chat or completions request; every error is answered as OpenAI-style JSON (nothing
        but cancellation escapes before the response starts)."""
        started = time.perf_counter()
        status, tiers = 500, ["none"]
        try:
            if self.draining:
                raise HTTPError(503, "the server is shutting down", "server_error", "shutting_down",
                                {"Retry-After": "1"})
            self.check_access(scope)
            body = await self.read_json(scope, receive)
            parsed = parse_request(kind, body, self.engine.params, self.config)
            if parsed.stream and len(parsed.prompts) == 1 and parsed.choices is None:
                response = await self._live_stream(receive, kind, parsed, started)
                status = 0  # the stream records its own outcome when it ends
                return response
            results = await self._run_watched(receive, parsed)
            status, tiers = 200, [r.tier for r in results]
            self.metrics.observe_results(results)
            payload, headers = render_response(kind, parsed, results, self.config.model_name)
            if parsed.stream:
                headers.update({"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
                return StreamReply(sse_events(kind, parsed, payload), headers)
            return json_reply(payload, headers=headers)
        except Disconnected:
            status = 499
            return Reply(499, b"", ())
        except Exception as exc:
            err = as_http(exc)
            status = err.status
            return error_reply(err)
        finally:
            if status:
                self.metrics.observe_request(kind, status, tiers, time.perf_counter() - started)
                self.metrics.note_load(self.admission.running, self.queue_depth)

    async def _run_watched(self, receive: Receive, parsed: Any) -> list[Any]:
        """Admission, timeout and the engine call, cancelled if the client disconnects meanwhile."""

        async def guarded() -> list[Any]:
            await self.admission.acquire()  # as `async with admission.slot()`, without a generator per request
            try:
                choices = None if parsed.choices is None else [parsed.choices] * len(parsed.prompts)
                return list(await within(self.engine.run_batch(
                    parsed.prompts, params=parsed.overrides, target=parsed.target, choices=choices),
                    self.config.request_timeout_s))
            except asyncio.TimeoutError as exc:
                if isinstance(exc, BackendError):
                    raise
                raise self._late() from None
            finally:
                self.admission.release()

        shut = HTTPError(503, "the server shut down before this request finished (drain_timeout_s)", "server_error",
                         "shutting_down")
        return await watch(receive, guarded(), self.expiry(), shut)

    def _late(self) -> HTTPError:
        return HTTPError(504, f"no answer within the server's request_timeout_s ({self.config.request_timeout_s:g} s)",
                         "server_error", "timeout")

    async def _live_stream(self, receive: Receive, kind: str, parsed: Any, started: float) -> StreamReply:
        """Stream ``engine.stream`` as SSE; errors before the first piece still get their HTTP status."""
        deadline = time.monotonic() + self.config.request_timeout_s
        await watch(receive, self.admission.acquire())
        items = self.engine.stream(parsed.prompts[0], params=parsed.overrides, target=parsed.target)
        try:
            first = await watch(receive, next_before(items, deadline))
        except BaseException:
            await close_quietly(items)
            self.admission.release()
            raise
        state: dict[str, Any] = {"status": 499, "result": None, "closed": False}
        rest = StreamDeadline(items, deadline)  # one timer for the items after the first

        async def chained() -> AsyncIterator[Any]:
            item = first
            while True:
                if not isinstance(item, CascadeChunk):
                    state["result"] = item
                yield item
                if not isinstance(item, CascadeChunk):
                    return
                item = await rest.next()

        async def body() -> AsyncIterator[str]:
            try:
                async for text in sse_stream(kind, parsed, response_id, self.config.model_name, chained()):
                    yield text
                state["status"] = 200
            except Exception as exc:  # after the first byte an error can only be reported in the stream
                err = as_http(exc)
                state["status"] = err.status
                yield f"data: {json.dumps(err.body())}\n\n"

        async def cleanup() -> None:
            if state["closed"]:
                return
            state["closed"] = True
            rest.close()
            await close_quietly(items)
            self.admission.release()
            result = state["result"]
            if result is not None:
                self.metrics.observe_results([result])
            tier = result.tier if result is not None else getattr(first, "tier", "none")
            self.metrics.observe_request(kind, state["status"], [tier], time.perf_counter() - started)
            self.metrics.note_load(self.admission.running, self.queue_depth)

        response_id = request_id("chatcmpl" if kind == "chat" else "cmpl")
        headers = {"x-request-id": response_id, "x-cascade-tier": str(getattr(first, "tier", "")),
                   "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        return StreamReply(body(), headers, cleanup)

    def begin_drain(self) -> None:
        """Refuse new requests from now on; after ``drain_timeout_s`` answer those still running with a 503."""
        if not self.draining:
            self.draining = True
            asyncio.get_running_loop().call_later(self.config.drain_timeout_s, self.expire)

    def expire(self) -> None:
        """The drain deadline: every request still running is answered with a JSON 503 (one log line)."""
        if not self.expired:
            if self.admission.running:
                log.warning("drain_timeout_s (%g s) passed with %d request(s) still running: answering them 503",
                            self.config.drain_timeout_s, self.admission.running)
            self.expired = True
            self.expiry()

    def expiry(self) -> asyncio.Future[None]:
        """A future of the running event loop, done once the drain deadline has passed (:meth:`expire`)."""
        if self._expiry is None or self._expiry.get_loop() is not asyncio.get_running_loop():
            self._expiry = asyncio.get_running_loop().create_future()
        if self.expired and not self._expiry.done():
            self._expiry.set_result(None)
        return self._expiry

    async def drain(self) -> None:
        """Refuse new requests and wait (up to ``drain_timeout_s``) for those in flight to finish; then the
        remaining ones are answered 503 (given a moment to send it) before the engine is closed."""
        self.begin_drain()
        with contextlib.suppress(asyncio.TimeoutError):
            await within(self.admission.idle.wait(), self.config.drain_timeout_s)
        self.expire()
        with contextlib.suppress(asyncio.TimeoutError):
            await within(self.admission.idle.wait(), ANSWER_GRACE_S)


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


Handler = Callable[["Request"], Awaitable["Answer"]]


def _checked(svc: _Service, handler: Handler) -> Handler:
    """``handler`` behind the access check (token, Host, Origin); an HTTPError it raises is answered as JSON."""

    async def checked(request: Request) -> Answer:
        try:
            svc.check_access(request.scope)
            return await handler(request)
        except HTTPError as exc:
            return error_reply(exc)

    return checked


async def _http_error(request: Request, exc: Exception) -> Answer:
    """Starlette's own errors (404, 405, ...) and anything unhandled, as OpenAI-style JSON."""
    from starlette.exceptions import HTTPException

    status = exc.status_code if isinstance(exc, HTTPException) else 500
    kind = "not_found_error" if status == 404 else "invalid_request_error" if status < 500 else "server_error"
    detail = exc.detail if isinstance(exc, HTTPException) else "internal server error"
    return error_reply(HTTPError(status, f"{request.method} {request.url.path}: {detail}", kind))


def create_app(engine: Engine, config: ServerConfig | None = None, reloader: Reloader | None = None) -> Starlette:
    """The ASGI app serving ``engine`` (a :class:`~cascade.engine.Cascade` or an expert router).

    The app owns the engine: shutting the app down drains requests in flight, then closes the engine.
    ``reloader`` swaps in new thresholds (``POST /v1/cascade/artifact``, SIGHUP when it has a file); by default
    one without a file that refuses HTTP reloads unless auth is on.

    Raises:
        ConfigError: bad server settings, or auth configured without its key in the environment.
    """
    from starlette.exceptions import HTTPException
    from starlette.responses import Response
    from starlette.routing import Route

    svc = _Service(engine, config or ServerConfig())
    reload = reloader or Reloader(engine)

    async def chat(scope: Scope, receive: Receive, send: Send) -> None:
        await (await svc.answer(scope, receive, "chat"))(scope, receive, send)

    async def completions(scope: Scope, receive: Receive, send: Send) -> None:
        await (await svc.answer(scope, receive, "completions"))(scope, receive, send)

    async def models(request: Request) -> Answer:
        card = {"id": svc.config.model_name, "object": "model", "created": svc.started,
                "owned_by": "uncertainty-cascade"}
        wanted = request.path_params.get("model")
        if wanted is None:
            return json_reply({"object": "list", "data": [card]})
        if wanted != svc.config.model_name:
            return error_reply(HTTPError(404, f"model {wanted!r} does not exist", code="model_not_found"))
        return json_reply(card)

    async def health(scope: Scope, receive: Receive, send: Send) -> None:
        body = {"status": "draining" if svc.draining else "ok", "model": svc.config.model_name, "pid": os.getpid(),
                "in_flight": svc.admission.running, "queue_depth": svc.queue_depth(), "bodies_reading": svc.reading}
        await json_reply(body, 503 if svc.draining else 200)(scope, receive, send)

    async def metrics(request: Request) -> Response:
        return Response(svc.metrics.render(svc.admission.running, svc.queue_depth()), media_type=CONTENT_TYPE)

    async def status(request: Request) -> Answer:
        return json_reply(monitor_status(engine))

    async def artifact(request: Request) -> Answer:
        reload.allowed(svc.api_key is not None)
        return json_reply(reload.swap(await svc.read_body(request.scope, request.receive)))

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        hup = reload.path is not None and hasattr(signal, "SIGHUP")
        if hup:
            asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, reload.on_sighup)
        try:
            yield
        finally:
            if hup:
                asyncio.get_running_loop().remove_signal_handler(signal.SIGHUP)
            await svc.drain()
            await engine.aclose()

    hot = {("POST", "/v1/chat/completions"): chat, ("POST", "/v1/completions"): completions,
           ("GET", "/health"): health}  # answered past Starlette's middleware and router (cascade.server.asgi)
    routes = [
        *(Route(path, Endpoint(handler), methods=[method]) for (method, path), handler in hot.items()),
        Route("/v1/models", _checked(svc, models), methods=["GET"]),
        Route("/v1/models/{model:path}", _checked(svc, models), methods=["GET"]),
        Route("/metrics", _checked(svc, metrics), methods=["GET"]),
        Route("/v1/cascade/status", _checked(svc, status), methods=["GET"]),
        Route("/v1/cascade/artifact", _checked(svc, artifact), methods=["POST"]),
    ]
    app = gateway(hot, routes=routes, lifespan=lifespan,
                  exception_handlers={HTTPException: _http_error, Exception: _http_error})
    app.state.service = svc
    return app
