"""Dynamic micro-batching: concurrent ``generate`` calls merged into one batched call of the wrapped backend.

A model answers a batch of B prompts in little more time than one prompt, so a server that calls its
backend once per request wastes most of the hardware. :class:`MicroBatcher` wraps any
:class:`~cascade.backends.base.Backend` and is one itself: each call is queued, and a worker task merges
queued calls that share decoding parameters into one inner ``generate`` call (at most ``max_batch_size``
prompts, sent at the latest ``max_wait_ms`` after the first of them arrived), then hands every caller its
own generations. Batching changes nothing but speed: the inner backend sees the same prompts, parameters
and early-exit thresholds, only more of them at once.

It also offers ``stream`` (one prompt through the same queue, its text in one piece when the batch is
done), so a streaming cascade keeps batching and early exit.

Guarantees:
    * the queue is bounded: a call that would overflow it raises :class:`~cascade.errors.OverloadedError`;
    * a caller cancelled before its prompts were dispatched has them dropped from the queue;
    * an inner error reaches every caller of that batch and no other (a batch that fails with
      :class:`~cascade.errors.InvalidRequestError` is retried call by call, so one bad prompt fails
      only its own caller); when the inner call fails for some prompts only
      (:class:`~cascade.errors.BatchError`), each caller gets its own prompts' answers or failure;
    * every accepted call gets exactly one answer: its generations or an exception.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

from cascade.backends.base import Backend
from cascade.deadlines import within
from cascade.errors import BackendError, BatchError, InvalidRequestError, OverloadedError
from cascade.types import EarlyExit, Generation, GenerationParams, Prompt, StreamEvent

__all__ = ["MicroBatcher"]

_CHOOSE_PARAMS = GenerationParams()  # constrained calls do not decode: one key whatever the request's params

_Key = tuple[GenerationParams, bool, "str | None", "bool | None"]


@dataclass(eq=False)
class _Item:
    """One queued ``generate`` call."""

    prompts: list[Prompt]
    params: GenerationParams
    scores: bool
    early_exit: EarlyExit | None
    future: asyncio.Future[list[Generation]]
    enqueued: float
    choices: list[Sequence[str]] | None = None  # a ``choose`` call: one list of allowed answers per prompt
    length_normalize: bool = False

    @property
    def key(self) -> _Key:
        """Calls with equal keys can share one inner call (``choose`` calls never share with ``generate``)."""
        mode = None if self.choices is None else self.length_normalize
        return (self.params, self.scores, self.early_exit.measure if self.early_exit else None, mode)


@dataclass(eq=False)
class _LoopState:
    """Queue and worker of one event loop."""

    loop: asyncio.AbstractEventLoop
    slots: asyncio.Semaphore
    pending: collections.deque[_Item] = field(default_factory=collections.deque)
    wakeup: asyncio.Event = field(default_factory=asyncio.Event)
    worker: asyncio.Task[None] | None = None
    running: set[asyncio.Task[None]] = field(default_factory=set)
    depth: int = 0  # prompts waiting in `pending`
    in_flight: int = 0  # prompts in dispatched batches


class MicroBatcher:
    """A backend that merges concurrent calls into batched calls of the backend it wraps.

    Args:
        backend: the wrapped backend.
        max_batch_size: prompts per inner call at most (default 16). A single call with more prompts is
            sent alone, unsplit (the wrapped backend splits it as it needs).
        max_wait_ms: how long the first queued call waits for company, in milliseconds (default 5.0).
        max_queue: prompts waiting at most (default 1024); a call that would exceed it raises
            :class:`OverloadedError` (a call larger than the whole queue is accepted only into an empty
            queue).
        max_concurrent_batches: inner calls running at once (default 1: a local model runs one batch at a
            time anyway, and the next batch fills while the current one runs; raise it for remote servers).

    Attributes:
        name: the wrapped backend's model identity.
        batches: inner calls made so far.
        batched_prompts: prompts sent in those calls.
    """

    def __init__(
        self,
        backend: Backend,
        max_batch_size: int = 16,
        max_wait_ms: float = 5.0,
        max_queue: int = 1024,
        max_concurrent_batches: int = 1,
    ) -> None:
        if isinstance(max_batch_size, bool) or not isinstance(max_batch_size, int) or max_batch_size < 1:
            raise InvalidRequestError(f"max_batch_size must be a positive integer, got {max_batch_size!r}")
        if not 0.0 <= float(max_wait_ms) < 60_000.0:
            raise InvalidRequestError(f"max_wait_ms must be in [0, 60000), got {max_wait_ms!r}")
        if isinstance(max_queue, bool) or not isinstance(max_queue, int) or max_queue < 1:
            raise InvalidRequestError(f"max_queue must be a positive integer, got {max_queue!r}")
        if max_concurrent_batches < 1:
            raise InvalidRequestError("max_concurrent_batches must be >= 1")
        self.backend = backend
        self.name = backend.name
        self.max_batch_size = max_batch_size
        self.max_wait_s = float(max_wait_ms) / 1000.0
        self.max_queue = max_queue
        self.max_concurrent_batches = max_concurrent_batches
        self.batches = 0
        self.batched_prompts = 0
        self._state: _LoopState | None = None
        self._closed = False

    # ------------------------------------------------------------------ public face

    @property
    def queue_depth(self) -> int:
        """Prompts waiting to be dispatched."""
        return self._state.depth if self._state is not None else 0

    @property
    def in_flight(self) -> int:
        """Prompts in inner calls that have not returned yet."""
        return self._state.in_flight if self._state is not None else 0

    async def generate(
        self,
        prompts: Sequence[Prompt],
        params: GenerationParams,
        *,
        scores: bool = True,
        early_exit: EarlyExit | None = None,
    ) -> list[Generation]:
        """Queue the call and wait for its share of a batched inner call (see :class:`Backend`).

        Raises:
            OverloadedError: the queue is full.
            InvalidRequestError: early-exit thresholds do not match the prompts.
            BackendError: the inner call failed, or the batcher was closed.
        """
        if self._closed:
            raise BackendError(f"{self.name}: the micro-batcher is closed")
        if not prompts:
            return []
        if early_exit is not None and len(early_exit.thresholds) != len(prompts):
            raise InvalidRequestError("early_exit needs one threshold per prompt")
        st = self._loop_state()
        return await self._enqueue(st, _Item(list(prompts), params, scores, early_exit if scores else None,
                                             st.loop.create_future(), st.loop.time()))

    async def choose(
        self,
        prompts: Sequence[Prompt],
        choices: Sequence[Sequence[str]],
        *,
        scores: bool = True,
        length_normalize: bool = False,
    ) -> list[Generation]:
        """Queue a constrained call (see ``HFLocalBackend.choose``); concurrent ones share one inner call.

        Raises:
            ChoicesUnsupportedError: the wrapped backend cannot score choices.
            OverloadedError: the queue is full.
            InvalidRequestError: one choice list per prompt is missing.
            BackendError: the inner call failed, or the batcher was closed.
        """
        if not callable(getattr(self.backend, "choose", None)):
            from cascade.errors import ChoicesUnsupportedError

            raise ChoicesUnsupportedError(f"{self.name} cannot score choices (its backend has no 'choose')")
        if self._closed:
            raise BackendError(f"{self.name}: the micro-batcher is closed")
        if len(choices) != len(prompts):
            raise InvalidRequestError(f"{len(prompts)} prompts need {len(prompts)} choice lists, got {len(choices)}")
        if not prompts:
            return []
        st = self._loop_state()
        return await self._enqueue(st, _Item(list(prompts), _CHOOSE_PARAMS, scores, None, st.loop.create_future(),
                                             st.loop.time(), list(choices), length_normalize))

    async def _enqueue(self, st: _LoopState, item: _Item) -> list[Generation]:
        """Queue one call (or raise OverloadedError) and wait for its generations."""
        n = len(item.prompts)
        if st.depth > 0 and st.depth + n > self.max_queue:
            retry = max(self.max_wait_s, 0.05) * (1 + st.depth // self.max_batch_size)
            raise OverloadedError(f"{self.name}: {st.depth} prompts queued (limit {self.max_queue})",
                                  retry_after_s=round(min(retry, 60.0), 3))
        st.pending.append(item)
        st.depth += n
        st.wakeup.set()
        self._ensure_worker(st)
        try:
            return await item.future
        except asyncio.CancelledError:
            self._drop(st, item)
            raise

    async def stream(
        self,
        prompt: Prompt,
        params: GenerationParams,
        *,
        scores: bool = True,
        early_exit: EarlyExit | None = None,
    ) -> AsyncIterator[StreamEvent]:
        """Answer one prompt through the batch queue, as stream events (see ``StreamingBackend.stream``).

        Batching wins over token streaming: the prompt joins a batch like any ``generate`` call (with its
        early exit), and its text arrives in one ``"delta"`` when the batch finishes. Closing the iterator
        before then drops the prompt from the queue.
        """
        [gen] = await self.generate([prompt], params, scores=scores, early_exit=early_exit)
        if scores:
            yield StreamEvent("first", scores=dict(gen.scores))
        if gen.text:
            yield StreamEvent("delta", text=gen.text)
        yield StreamEvent("done", generation=gen)

    async def aclose(self) -> None:
        """Stop the worker, fail queued calls with :class:`BackendError`, then close the wrapped backend."""
        self._closed = True
        st, self._state = self._state, None
        if st is not None:
            tasks = [t for t in (st.worker, *st.running) if t is not None and not t.done()]
            for t in tasks:
                t.cancel()
            if tasks and st.loop is asyncio.get_running_loop():
                await asyncio.gather(*tasks, return_exceptions=True)
            self._fail_all(st, BackendError(f"{self.name}: the micro-batcher was closed"))
        await self.backend.aclose()

    # ------------------------------------------------------------------ queue

    def _loop_state(self) -> _LoopState:
        """The state of the running loop (a new one when the batcher moves to another loop)."""
        loop = asyncio.get_running_loop()
        if self._state is None or self._state.loop is not loop:
            self._state = _LoopState(loop, asyncio.Semaphore(self.max_concurrent_batches))
        return self._state

    def _ensure_worker(self, st: _LoopState) -> None:
        if st.worker is None or st.worker.done():
            st.worker = st.loop.create_task(self._work(st), name=f"micro-batcher {self.name}")

    @staticmethod
    def _drop(st: _LoopState, item: _Item) -> None:
        """Remove a cancelled caller's call if it was not dispatched yet."""
        try:
            st.pending.remove(item)
        except ValueError:
            return
        st.depth -= len(item.prompts)
        st.wakeup.set()

    @staticmethod
    def _fail_all(st: _LoopState, exc: BaseException) -> None:
        while st.pending:
            item = st.pending.popleft()
            if not item.future.done():
                item.future.set_exception(exc)
        st.depth = 0

    def _ready(self, st: _LoopState, key: _Key) -> int:
        """Prompts queued that could join a batch of ``key``."""
        return sum(len(it.prompts) for it in st.pending if it.key == key)

    def _take(self, st: _LoopState) -> list[_Item]:
        """Remove and return the next batch: the head call plus later compatible calls that fit."""
        head = st.pending.popleft()
        batch, size, keep = [head], len(head.prompts), collections.deque[_Item]()
        while st.pending:
            it = st.pending.popleft()
            if it.key == head.key and size + len(it.prompts) <= self.max_batch_size:
                batch.append(it)
                size += len(it.prompts)
            else:
                keep.append(it)
        st.pending = keep
        st.depth -= size
        return batch

    async def _work(self, st: _LoopState) -> None:
        """Form batches forever: wait for a free slot, then for a full batch or the head's deadline."""
        try:
            while True:
                await st.slots.acquire()
                try:
                    while not st.pending:
                        st.wakeup.clear()
                        await st.wakeup.wait()
                    head = st.pending[0]
                    deadline = head.enqueued + self.max_wait_s
                    while st.pending and st.pending[0] is head and self._ready(st, head.key) < self.max_batch_size:
                        remaining = deadline - st.loop.time()
                        if remaining <= 0:
                            break
                        st.wakeup.clear()
                        try:
                            await within(st.wakeup.wait(), remaining)
                        except asyncio.TimeoutError:
                            break
                    if not st.pending or st.pending[0] is not head:  # the head was cancelled: start over
                        st.slots.release()
                        continue
                    batch = self._take(st)
                except BaseException:
                    st.slots.release()
                    raise
                task = st.loop.create_task(self._dispatch(st, batch))
                st.running.add(task)
                task.add_done_callback(st.running.discard)
                task.add_done_callback(lambda _t: st.slots.release())
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # never leave a caller waiting on a dead worker
            self._fail_all(st, BackendError(f"{self.name}: micro-batcher failed: {exc!r}"))
            raise

    # ------------------------------------------------------------------ dispatch

    async def _dispatch(self, st: _LoopState, batch: list[_Item]) -> None:
        """Run one inner call for ``batch`` and resolve each caller's future exactly once."""
        live = [it for it in batch if not it.future.done()]
        if not live:
            return
        size = sum(len(it.prompts) for it in live)
        st.in_flight += size
        try:
            try:
                results = await self._call(live)
            except BatchError as exc:
                self._split(live, exc.outcomes)
                return
            except InvalidRequestError as exc:
                if len(live) == 1:
                    raise
                del exc  # one caller's bad prompt: retry call by call so only that caller fails
                for it in live:
                    if it.future.done():
                        continue
                    try:
                        self._resolve(it, (await self._call([it]))[0])
                    except Exception as one:
                        self._reject(it, one)
                return
            for it, gens in zip(live, results):
                self._resolve(it, gens)
        except asyncio.CancelledError:
            for it in live:
                self._reject(it, BackendError(f"{self.name}: the micro-batcher was closed"))
            raise
        except Exception as exc:
            for it in live:
                self._reject(it, exc)
        finally:
            st.in_flight -= size

    async def _call(self, items: list[_Item]) -> list[list[Generation]]:
        """One inner call for ``items`` (all of one key); returns each item's generations."""
        prompts = [p for it in items for p in it.prompts]
        head = items[0]
        early = None
        if head.early_exit is not None:
            thresholds = tuple(t for it in items for t in (it.early_exit.thresholds if it.early_exit else ()))
            early = EarlyExit(head.early_exit.measure, thresholds)
        self.batches += 1
        self.batched_prompts += len(prompts)
        if head.choices is not None:
            lists = [c for it in items for c in (it.choices or ())]
            gens = await self.backend.choose(prompts, lists, scores=head.scores,  # type: ignore[attr-defined]
                                             length_normalize=head.length_normalize)
        else:
            gens = await self.backend.generate(prompts, head.params, scores=head.scores, early_exit=early)
        if len(gens) != len(prompts):
            raise BackendError(f"{self.name}: returned {len(gens)} answers for {len(prompts)} prompts")
        out, start = [], 0
        for it in items:
            out.append(list(gens[start : start + len(it.prompts)]))
            start += len(it.prompts)
        return out

    def _split(self, items: list[_Item], outcomes: Sequence[object]) -> None:
        """Hand each caller its own part of a partly failed inner call."""
        if len(outcomes) != sum(len(it.prompts) for it in items):
            error = BackendError(f"{self.name}: returned {len(outcomes)} outcomes for a batch of "
                                 f"{sum(len(it.prompts) for it in items)} prompts", reason="wrong number of answers")
            for it in items:
                self._reject(it, error)
            return
        start = 0
        for it in items:
            part = list(outcomes[start : start + len(it.prompts)])
            start += len(it.prompts)
            failures = [o for o in part if isinstance(o, BaseException)]
            if not failures:
                self._resolve(it, [o for o in part if isinstance(o, Generation)])
            else:
                self._reject(it, failures[0] if len(failures) == len(part) else BatchError(part))

    @staticmethod
    def _resolve(item: _Item, gens: list[Generation]) -> None:
        if not item.future.done():
            item.future.set_result(gens)

    @staticmethod
    def _reject(item: _Item, exc: BaseException) -> None:
        if not item.future.done():
            item.future.set_exception(exc)
