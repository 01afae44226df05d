"""Reading HTTP/1.1 answers from a connection (:class:`Conn`, an :class:`asyncio.Protocol`): the head, then the
body de-framed (``Content-Length``, chunked, or up to the connection's end) and decoded (gzip, deflate) as it
arrives. The faults raised here are those of :mod:`cascade.backends.http1`, which sends the requests.
"""

from __future__ import annotations

import asyncio
import contextlib
import zlib
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["MAX_HEAD", "Conn", "ConnectionFault", "Decoder", "ProtocolFault", "StatusFault", "read_head"]

#: The largest response head (and chunk size line) accepted, in bytes.
MAX_HEAD = 64 * 1024


class ConnectionFault(Exception):
    """The connection failed (refused, dropped, or the server spoke no HTTP/1.x); ``sent``: bytes of the
    answer had arrived (the request reached the server)."""

    def __init__(self, message: str, *, received: bool = False) -> None:
        super().__init__(message)
        self.received = received


class ProtocolFault(ConnectionFault):
    """The server's answer is not valid HTTP/1.x."""


class StatusFault(Exception):
    """An HTTP error status: ``status`` (also as ``status_code``, as the openai client's errors name it), the
    server's ``message`` (from an OpenAI-style JSON error when it sent one) and ``headers``."""

    def __init__(self, status: int, message: str, headers: Mapping[str, str]) -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status = self.status_code = status
        self.message, self.headers = message, headers


class Conn(asyncio.Protocol):
    """One connection: the bytes received so far, and a future for a reader waiting for more."""

    def __init__(self) -> None:
        self.buf = bytearray()
        self.transport: asyncio.Transport | None = None
        self.waiter: asyncio.Future[None] | None = None
        self.lost = False
        self.error: BaseException | None = None
        self.idle_since = 0.0
        self.received = 0  # bytes received since the current request was sent
        self.hint: Callable[[], bool] | None = None  # set: wake a waiting reader only when it says so

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buf += data
        self.received += len(data)
        if self.hint is None or self.hint():
            self._wake()

    def eof_received(self) -> bool:
        self.lost = True
        self._wake()
        return False  # close the transport

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.error = exc
        self._wake()

    def _wake(self) -> None:
        waiter, self.waiter = self.waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def more(self) -> None:
        """Wait for more bytes; ConnectionFault when the connection is gone."""
        if self.lost:
            detail = f": {self.error}" if self.error else ""
            raise ConnectionFault(f"the server closed the connection{detail}", received=self.received > 0)
        self.waiter = asyncio.get_running_loop().create_future()
        await self.waiter

    def close(self) -> None:
        self.lost = True
        if self.transport is not None:
            with contextlib.suppress(RuntimeError):  # (a transport of a loop that is closed already)
                self.transport.close()


@dataclass
class Head:
    status: int
    headers: dict[str, str]
    keep_alive: bool


async def read_head(conn: Conn) -> Head:
    while True:
        end = conn.buf.find(b"\r\n\r\n")
        while end < 0:
            if len(conn.buf) > MAX_HEAD:
                raise ProtocolFault(f"response head longer than {MAX_HEAD} bytes", received=True)
            await conn.more()
            end = conn.buf.find(b"\r\n\r\n")
        lines = conn.buf[:end].decode("latin-1").split("\r\n")
        del conn.buf[:end + 4]
        version, _, rest = lines[0].partition(" ")
        code = rest[:3]
        if not version.startswith("HTTP/1.") or not code.isdigit():
            raise ProtocolFault(f"not an HTTP/1.x answer: {lines[0][:80]!r}", received=True)
        status = int(code)
        if 100 <= status < 200:  # an interim answer (100 Continue, 103 Early Hints): the real one follows
            continue
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if not sep:
                raise ProtocolFault(f"malformed header line {line[:80]!r}", received=True)
            key = name.strip().lower()
            headers[key] = f"{headers[key]}, {value.strip()}" if key in headers else value.strip()
        connection = headers.get("connection", "").lower()
        keep = "close" not in connection and (version != "HTTP/1.0" or "keep-alive" in connection)
        return Head(status, headers, keep)


class Decoder:
    """The bytes of a body in the order they arrive, de-framed (length, chunked, or up to the close)."""

    def __init__(self, conn: Conn, head: Head) -> None:
        self.conn = conn
        h = head.headers
        self.chunked = "chunked" in h.get("transfer-encoding", "").lower()
        length = "0" if head.status in (204, 304) else h.get("content-length")  # (these have no body)
        if not self.chunked and length is not None and not length.strip().isdigit():
            raise ProtocolFault(f"invalid Content-Length {length[:40]!r}", received=True)
        self.remaining = -1 if self.chunked or length is None else int(length)  # -1: unknown
        self.reusable = head.keep_alive and (self.chunked or length is not None)
        self.done = self.remaining == 0
        self.in_chunk = 0  # chunked: bytes left of the current chunk (then its CRLF)
        self.trailer = False
        encoding = h.get("content-encoding", "identity").strip().lower()
        self.inflate: Any = None
        if encoding in ("gzip", "x-gzip", "deflate"):
            self.inflate = zlib.decompressobj(wbits=47)  # gzip or zlib, told apart by the header
        elif encoding not in ("", "identity"):
            raise ProtocolFault(f"unsupported Content-Encoding {encoding[:40]!r}", received=True)

    def may_end(self) -> bool:
        """Whether the bytes received may complete the body (never wrongly False: a chunked body always ends
        with an empty line, after its last chunk or its trailers)."""
        buf = self.conn.buf
        if self.chunked:
            return buf.endswith(b"\r\n\r\n") or (self.trailer and buf.startswith(b"\r\n"))
        return self.remaining >= 0 and len(buf) >= self.remaining

    async def chunks(self) -> AsyncIterator[bytes]:
        """What arrived of the body at each wake-up (several network reads' worth when they queued up)."""
        conn = self.conn
        while not self.done:
            out = self._take()
            if out:
                yield self.inflate.decompress(out) if self.inflate is not None else out
            elif not self.done:
                try:
                    await conn.more()
                except ConnectionFault:
                    if self.remaining == -1 and not self.chunked:  # the body ran to the connection's end
                        self.done = True
                        break
                    raise
        if self.inflate is not None:
            tail = self.inflate.flush()
            if tail:
                yield tail

    def _take(self) -> bytes:
        buf = self.conn.buf
        if not self.chunked:
            if self.remaining == -1:
                out = bytes(buf)
                buf.clear()
                return out
            out = bytes(buf[:self.remaining])
            del buf[:len(out)]
            self.remaining -= len(out)
            self.done = self.remaining == 0
            return out
        parts: list[bytes] = []
        while True:
            if self.in_chunk > 0:
                piece = bytes(buf[:self.in_chunk])
                if not piece:
                    break
                del buf[:len(piece)]
                parts.append(piece)
                self.in_chunk -= len(piece)
                if self.in_chunk > 0:
                    break
                self.in_chunk = -2  # its CRLF next
            if self.in_chunk == -2:
                if len(buf) < 2:
                    break
                if buf[:2] != b"\r\n":
                    raise ProtocolFault("a chunk does not end with CRLF", received=True)
                del buf[:2]
                self.in_chunk = 0
            line_end = buf.find(b"\r\n")
            if line_end < 0:
                if len(buf) > MAX_HEAD:
                    raise ProtocolFault("chunk size line too long", received=True)
                break
            line = bytes(buf[:line_end])
            del buf[:line_end + 2]
            if self.trailer:
                if not line:  # the empty line that ends the trailers: the body is complete
                    self.done = True
                    break
                continue
            size_text = line.partition(b";")[0].strip()
            try:
                size = int(size_text, 16)
            except ValueError:
                raise ProtocolFault(f"invalid chunk size {size_text[:20]!r}", received=True) from None
            if size == 0:
                self.trailer = True
            else:
                self.in_chunk = size
        return b"".join(parts)
