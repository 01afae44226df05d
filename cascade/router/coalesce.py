"""Coalescing the router's embedding calls: concurrent requests share one forward pass.

Every routed request needs its prompt embedded before it can go to an expert. Embedding one prompt per call
costs a whole forward pass each (and the embedders serialise their calls), so under many concurrent users the
router's embedding caps throughput: measured here, MiniLM on 2 CPU cores held an expert router to about 23
answers/s at 1,000 users (``eval/RESULTS.md`` section 10). :class:`EmbedBatcher` queues the texts of
concurrent calls and embeds everything waiting in one call (at most ``max_batch`` texts), in a worker thread,
one batch at a time: the batch grows with the load, as the micro-batcher's does for generation.

A caller that is cancelled while waiting is dropped from its batch's results; a failed batch fails each of its
callers with the same exception; the worker stops when the queue is empty and starts again with the next call.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from cascade.errors import ConfigError
from cascade.router.embed import Embedder

__all__ = ["EmbedBatcher"]


class EmbedBatcher:
    """Embeds the texts of concurrent calls together (see the module docstring).

    Args:
        embedder: the embedder (its ``embed`` runs in a worker thread).
        max_batch: most texts per embedding call (default 64).

    Attributes:
        calls: embedding calls made so far (fewer than the requests under load).
    """

    def __init__(self, embedder: Embedder, max_batch: int = 64) -> None:
        if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
            raise ConfigError(f"max_batch must be an integer >= 1, got {max_batch!r}")
        self.embedder = embedder
        self.max_batch = max_batch
        self.calls = 0
        self._queue: deque[tuple[list[str], asyncio.Future[npt.NDArray[np.float64]]]] = deque()
        self._worker: asyncio.Task[None] | None = None

    @property
    def id(self) -> str:
        """The wrapped embedder's id."""
        return self.embedder.id

    async def embed(self, texts: Sequence[str]) -> npt.NDArray[np.float64]:
        """``N`` texts -> ``(N, D)`` rows, embedded together with whatever else is waiting."""
        future: asyncio.Future[npt.NDArray[np.float64]] = asyncio.get_running_loop().create_future()
        self._queue.append((list(texts), future))
        if self._worker is None or self._worker.done():
            self._worker = asyncio.ensure_future(self._drain())
        return await future

    async def _drain(self) -> None:
        while self._queue:
            batch: list[tuple[list[str], asyncio.Future[npt.NDArray[np.float64]]]] = []
            size = 0
            while self._queue and (not batch or size + len(self._queue[0][0]) <= self.max_batch):
                texts, future = self._queue.popleft()
                if not future.cancelled():
                    batch.append((texts, future))
                    size += len(texts)
            if not batch:
                continue
            self.calls += 1
            try:
                rows = await asyncio.to_thread(self.embedder.embed, [t for texts, _ in batch for t in texts])
            except asyncio.CancelledError:  # the worker itself was cancelled: so are the calls it holds
                for _, future in batch:
                    future.cancel()
                raise
            except Exception as exc:  # every caller of the batch gets the failure
                for _, future in batch:
                    if not future.done():
                        future.set_exception(exc)
                continue
            start = 0
            for texts, future in batch:
                if not future.done():
                    future.set_result(rows[start:start + len(texts)])
                start += len(texts)
