"""Flow control of ``cascade serve``: admission (bounded running and waiting), client-disconnect
watching, and streamed responses that always clean up.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

from cascade.deadlines import within
from cascade.errors import CascadeError, OverloadedError

__all__ = ["Admission", "Disconnected", "StreamDeadline", "StreamReply", "close_quietly", "fast_http", "fast_loop",
           "next_before", "uvicorn_server", "watch"]

T = TypeVar("T")


class Disconnected(Exception):
    """The client went away before its answer was ready."""


class Admission:
    """At most ``running`` requests in the engine and ``waiting`` more queued; beyond that, 429."""

    def __init__(self, running: int, waiting: int, retry_after_s: float) -> None:
        self.sem = asyncio.Semaphore(running)
        self.max_waiting, self.retry_after_s = waiting, retry_after_s
        self.running = self.waiting = 0
        self.idle = asyncio.Event()
        self.idle.set()

    async def acquire(self) -> None:
        """Wait for a running slot; raise OverloadedError when the waiting line is full."""
        if self.sem.locked() and self.waiting >= self.max_waiting:
            raise OverloadedError("server busy: too many requests in flight", self.retry_after_s)
        self.waiting += 1
        self.idle.clear()
        try:
            await self.sem.acquire()
        except BaseException:
            self.waiting -= 1
            self._maybe_idle()
            raise
        self.waiting -= 1
        self.running += 1

    def release(self) -> None:
        """Give a slot back (exactly once per successful :meth:`acquire`)."""
        self.running -= 1
        self.sem.release()
        self._maybe_idle()

    @contextlib.asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        """Hold a running slot for the block."""
        await self.acquire()
        try:
            yield
        finally:
            self.release()

    def _maybe_idle(self) -> None:
        if not self.running and not self.waiting:
            self.idle.set()


async def _wait_disconnect(receive: Callable[[], Awaitable[Any]]) -> None:
    """Return when the client disconnects (the body has been read already)."""
    while True:
        message = await receive()
        if message.get("type") == "http.disconnect":
            return


async def watch(receive: Callable[[], Awaitable[Any]], coro: Awaitable[T], stop: asyncio.Future[Any] | None = None,
                stopped: Exception | None = None) -> T:
    """Await ``coro``; cancel it and raise :class:`Disconnected` if the client goes away first (``receive``: the
    request's ASGI receive, its body read already).

    With ``stop`` (a future that may be shared by many requests; it is not cancelled here): once it is done
    before ``coro``, cancel ``coro`` and raise ``stopped``, as when ``coro`` was cancelled by anything but the
    client going away.
    """
    work = asyncio.ensure_future(coro)
    watch = asyncio.ensure_future(_wait_disconnect(receive))
    try:
        await asyncio.wait({work, watch} if stop is None else {work, watch, stop}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone = watch.done()
        if not work.done():
            work.cancel()
        watch.cancel()
    if work.cancelled() or not work.done():
        with contextlib.suppress(BaseException):
            await work
        if stopped is not None and not gone:
            raise stopped
        raise Disconnected()
    return work.result()


async def next_before(items: AsyncIterator[Any], deadline: float) -> Any:
    """The next item of an engine stream, or asyncio.TimeoutError past ``deadline`` (monotonic seconds)."""
    try:
        return await within(items.__anext__(), max(0.0, deadline - time.monotonic()))
    except StopAsyncIteration:
        raise CascadeError("the engine's stream ended without a result") from None


class StreamDeadline:
    """The items of an engine stream up to a deadline, with one timer for the whole stream instead of one per item.

    :meth:`next` answers as :func:`next_before` does: the next item, or asyncio.TimeoutError once the deadline
    passes while waiting for it (the wait is cancelled, as by :func:`~cascade.deadlines.within`). Past the
    deadline, each call is ``next_before`` itself. Every item must be awaited from one task at a time; call
    :meth:`close` when the stream ends.
    """

    def __init__(self, items: AsyncIterator[Any], deadline: float) -> None:
        self.items, self.deadline = items, deadline
        self._waiter: asyncio.Task[Any] | None = None  # the task awaiting an item now
        self._expiring = False  # the timer cancelled the waiter, which has not seen it yet
        self._passed = False
        self._timer = asyncio.get_running_loop().call_later(max(0.0, deadline - time.monotonic()), self._expire)

    def _expire(self) -> None:
        self._passed = True
        if self._waiter is not None:
            self._expiring = True
            self._waiter.cancel()

    async def next(self) -> Any:
        """The stream's next item (CascadeError if it ends without a result; asyncio.TimeoutError past the
        deadline)."""
        task = asyncio.current_task()
        if self._passed or task is None or not hasattr(task, "uncancel"):  # Python 3.10: no uncancel
            return await next_before(self.items, self.deadline)
        self._waiter = task
        try:
            return await self.items.__anext__()
        except StopAsyncIteration:
            raise CascadeError("the engine's stream ended without a result") from None
        except asyncio.CancelledError:
            if self._expiring:
                self._expiring = False
                if task.uncancel() == 0:
                    raise asyncio.TimeoutError() from None
            raise
        finally:
            self._waiter = None
            if self._expiring:  # the item came anyway: the timer's cancellation is withdrawn
                self._expiring = False
                task.uncancel()

    def close(self) -> None:
        """Stop the timer."""
        self._timer.cancel()


async def close_quietly(items: AsyncIterator[Any]) -> None:
    """Close an engine stream (stopping its generation), shielded from the caller's cancellation."""
    import anyio

    aclose = getattr(items, "aclose", None)
    if aclose is None:
        return
    with anyio.CancelScope(shield=True), contextlib.suppress(Exception):
        await aclose()


class StreamReply:
    """A server-sent-event response as an ASGI app, sending what Starlette's ``StreamingResponse`` sends (the given
    headers lowercased, then ``content-type: text/event-stream; charset=utf-8``; each piece as it comes), and
    stopping as it does when the client leaves (the body is cancelled where it waits, the reply ends quietly),
    with one watcher task instead of a task group per stream. ``cleanup`` (if any) runs however it ends (finished,
    failed or client gone), shielded from cancellation."""

    def __init__(self, body: AsyncIterator[str], headers: dict[str, str],
                 cleanup: Callable[[], Awaitable[None]] | None = None) -> None:
        self.body, self.cleanup = body, cleanup
        self.headers = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()]
        self.headers.append((b"content-type", b"text/event-stream; charset=utf-8"))

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        import anyio

        task = asyncio.current_task()
        assert task is not None
        gone = False

        def left(watcher: asyncio.Future[None]) -> None:
            nonlocal gone
            if not watcher.cancelled() and watcher.exception() is None:
                gone = True
                task.cancel()

        watcher = asyncio.ensure_future(_wait_disconnect(receive))
        watcher.add_done_callback(left)
        try:
            await send({"type": "http.response.start", "status": 200, "headers": self.headers})
            async for text in self.body:
                await send({"type": "http.response.body", "body": text.encode("utf-8"), "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except asyncio.CancelledError:
            uncancel = getattr(task, "uncancel", None)  # Python 3.11+
            if not gone or (uncancel is not None and uncancel() > 0):
                raise
        finally:
            watcher.remove_done_callback(left)
            watcher.cancel()
            if self.cleanup is not None:
                with anyio.CancelScope(shield=True):
                    await self.cleanup()


def fast_loop() -> str:
    """uvicorn's event loop: ``uvloop`` when installed (the ``fast`` extra), else asyncio's."""
    import importlib.util

    return "uvloop" if importlib.util.find_spec("uvloop") is not None else "asyncio"


def fast_http() -> str:
    """uvicorn's HTTP/1.1 parser: ``httptools`` when installed (the ``fast`` extra), else h11."""
    import importlib.util

    return "httptools" if importlib.util.find_spec("httptools") is not None else "h11"


def uvicorn_server() -> type[Any]:
    """uvicorn's server class, telling the app when shutdown starts: the drain deadline runs from then."""
    import uvicorn

    class Server(uvicorn.Server):
        def __init__(self, config: Any, service: Any) -> None:
            super().__init__(config)
            self.service = service

        async def shutdown(self, sockets: Any = None) -> None:
            self.service.begin_drain()
            await super().shutdown(sockets=sockets)

    return Server
