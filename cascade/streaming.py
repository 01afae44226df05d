"""Streaming one request through a cascade: text flows as soon as the answering tier is known.

With a first-token measure a tier's decision is taken on its first token: an escalated request moves on
at once (the tier stops there), an accepted one streams the rest of its answer as it is generated. With a
whole-answer measure a non-last tier must finish before the decision, and its answer is sent in one piece
if accepted. The last tier always streams. Backends without ``stream`` are called with ``generate``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable

from cascade.chain import Chain, Tier, tier_timeout
from cascade.deadlines import within
from cascade.errors import BackendError, CascadeError
from cascade.pending import Pending
from cascade.policy import escalates
from cascade.types import CascadeChunk, CascadeResult, EarlyExit, Generation, GenerationParams

__all__ = ["stream_chain"]

log = logging.getLogger("cascade.engine")


async def _next(events: AsyncIterator[object], deadline: float | None, tier: Tier) -> object:
    if deadline is None:
        return await events.__anext__()
    try:
        return await within(events.__anext__(), max(0.0, deadline - time.perf_counter()))
    except asyncio.TimeoutError as exc:
        raise tier_timeout(tier) from exc


async def _stream_tier(
    chain: Chain, level: int, tier: Tier, p: Pending, params: GenerationParams
) -> AsyncIterator[CascadeChunk | Generation]:
    """Yield this tier's chunks if it answers (decided on the first token), then its Generation."""
    from cascade.types import StreamEvent

    last = level == len(chain.tiers) - 1
    threshold = None if last else p.thresholds[level]
    early = None if threshold is None else EarlyExit(chain.measure, (threshold,))
    events = tier.backend.stream(p.prompt, params, scores=not last, early_exit=early)  # type: ignore[attr-defined]
    deadline = None if tier.timeout_s is None else time.perf_counter() + tier.timeout_s
    accepted = last
    sent = ""
    try:
        while True:
            try:
                ev = await _next(events, deadline, tier)
            except StopAsyncIteration:
                raise BackendError(f"tier {tier.name!r} ended its stream without an answer") from None
            assert isinstance(ev, StreamEvent)
            if ev.kind == "first" and threshold is not None:
                accepted = not escalates(float(ev.scores.get(chain.measure, float("nan"))), threshold)
            elif ev.kind == "delta" and accepted:
                sent += ev.text
                yield CascadeChunk(ev.text, tier.name)
            elif ev.kind == "done":
                assert ev.generation is not None
                if accepted and ev.generation.text.startswith(sent) and len(ev.generation.text) > len(sent):
                    yield CascadeChunk(ev.generation.text[len(sent) :], tier.name)
                yield ev.generation
                return
    finally:
        await events.aclose()


async def stream_chain(
    chain: Chain,
    start: Callable[[], tuple[Pending, GenerationParams]],
    done: Callable[[Pending, GenerationParams], None] | None = None,
) -> AsyncIterator[CascadeChunk | CascadeResult]:
    """Yield :class:`CascadeChunk` pieces of one free answer, then the :class:`CascadeResult` (always last).

    Args:
        chain: the cascade's tiers and rules.
        start: checks the request and returns its state and decoding parameters; called on the first
            iteration, so its InvalidRequestError comes before anything is yielded.
        done: called with the finished request before its result is yielded (shadow checks).

    Raises:
        InvalidRequestError: bad prompt, parameters or target (before anything is yielded).
        BackendError: the first tier failed; or a higher tier failed with ``on_error="raise"``, or after
            part of its answer was already sent (a streamed answer cannot be taken back).
    """
    p, params = start()
    started = time.perf_counter()
    for level, tier in enumerate(chain.tiers):
        last = level == len(chain.tiers) - 1
        if p.skips(level):  # the stage escalates everything: the tier is not called
            p.skip(tier.name)
            continue
        streams = hasattr(tier.backend, "stream") and (last or chain.early_exit)
        t0 = time.perf_counter()
        gen: Generation | None = None
        chunks = 0
        try:
            if streams:
                async for item in _stream_tier(chain, level, tier, p, params):
                    if isinstance(item, CascadeChunk):
                        chunks += 1
                        yield item
                    else:
                        gen = item
            else:
                gen = (await chain.call(tier, [p.prompt], params, not last, None))[0]
        except (CascadeError, asyncio.TimeoutError) as exc:  # as Cascade.run_batch does
            if isinstance(exc, BackendError) and exc.tier is None:
                exc.tier = tier.name
            log.warning("tier %r failed for a streamed request: %s", tier.name, exc)
            if p.answer is None or chain.on_error == "raise" or chunks:
                raise
            await chain.degrade(level, tier, [(p, exc)], params, time.perf_counter() - t0)
            assert p.answer is not None
            if p.answer.text:
                yield CascadeChunk(p.answer.text, chain.tiers[p.answer_tier].name)
            break
        assert gen is not None
        if not chain.record(level, tier, p, gen, time.perf_counter() - t0):
            if not streams and gen.text:  # decided on the whole answer: send it in one piece
                yield CascadeChunk(gen.text, tier.name)
            break
    if done is not None:
        done(p, params)
    yield chain.result(p, time.perf_counter() - started)
