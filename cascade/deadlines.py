"""Awaiting with a time limit, without a task per wait.

On Python 3.11, :func:`asyncio.wait_for` wraps what it awaits in a new task (and a waiter future), which a
gateway pays several times per request and once per streamed event; :func:`asyncio.timeout` cancels the current
task instead. On 3.12+ ``wait_for`` is built on ``timeout`` itself; on 3.10 (no ``asyncio.timeout``) this falls
back to ``wait_for``. Either way a time limit raises :class:`asyncio.TimeoutError` (``TimeoutError`` from 3.11).
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Awaitable
from typing import TypeVar

__all__ = ["within"]

_T = TypeVar("_T")


async def within(awaitable: Awaitable[_T], seconds: float | None) -> _T:
    """Await ``awaitable`` for at most ``seconds`` (None: no limit); past it, cancel it and raise
    :class:`asyncio.TimeoutError`. From Python 3.11 a limit <= 0 still lets it run up to its first suspension."""
    if seconds is None:
        return await awaitable
    if sys.version_info >= (3, 11):
        async with asyncio.timeout(seconds):
            return await awaitable
    return await asyncio.wait_for(awaitable, seconds)  # pragma: no cover (Python 3.10)
