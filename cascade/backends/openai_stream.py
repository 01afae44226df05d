"""Streamed answers of an OpenAI-compatible server, read chunk by chunk with a first-token early exit.

Used by :class:`~cascade.backends.openai_compat.OpenAIBackend`. The server-sent events are read as raw bytes
and decoded with :func:`json.loads`, whichever sender (:mod:`cascade.backends.openai_send`) sent the request.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Mapping
from typing import Any

from cascade.backends.openai_answer import Answer, Reader, add_usage, sse_chunks
from cascade.backends.openai_scores import first_token_scores

__all__ = ["stream_events"]


async def stream_events(sender: Any, route: str, body: Mapping[str, Any], reader: Reader, *, scores: bool,
                        measure: str, threshold: float, deltas: bool = True) -> AsyncGenerator[tuple[str, Any], None]:
    """Stream one answer: ``("first", scores)`` once the first token is scored, ``("delta", text)`` (unless not
    ``deltas``), and ``("answer", Answer)`` last. Above ``threshold`` on the first token (under ``measure``) the
    stream is closed at once and the answer is that token, finish reason ``"early_exit"``. Without ``deltas``,
    the rest of an answer that goes on is read in one piece (one wake-up instead of one per token).

    Args:
        sender: sends the request (:mod:`cascade.backends.openai_send`).
        route: ``/chat/completions`` or ``/completions``.
        body: the request body (``stream`` and ``stream_options`` are added).
        reader: how this server's answers are read.

    Raises:
        TruncatedAnswerError: the stream ended without a finish reason the protocol defines.
        BackendError: an error object in the stream, or no logprobs when ``scores`` asked for them.
    """
    answer = Answer()
    scored = not scores
    finished = False
    resp = await sender.open_stream(route, {**body, "stream": True, "stream_options": {"include_usage": True}})
    try:
        async for chunk in sse_chunks(resp.chunks()):
            add_usage(answer, chunk.get("usage"))
            if not chunk.get("choices"):
                continue
            choice = chunk["choices"][0]
            delta = reader.add_choice(answer, choice, "delta")
            if choice.get("finish_reason") is not None:
                answer.finish_reason = reader.finish(choice["finish_reason"], answer)
                finished = True
            if not scored and answer.top:
                scored = True
                reader.check_logprobs(answer)
                first = first_token_scores(answer.top[0], reader.k)
                yield "first", first
                if measure and first[measure] > threshold:
                    await resp.aclose()  # stop generation now: the server sees the disconnect
                    yield "answer", Answer(text=answer.tokens[0], tokens=answer.tokens[:1],
                                           logprobs=answer.logprobs[:1], top=answer.top[:1],
                                           finish_reason="early_exit", completion_tokens=1, has_logprobs=True)
                    return
                if not deltas:
                    resp.quiet()
            if delta and deltas:
                yield "delta", delta
    finally:
        await resp.aclose()
    if not finished:  # a bare [DONE] or a closed connection: the server cut the answer off
        reader.finish(None, answer)
    if scores:
        reader.check_logprobs(answer)
    yield "answer", answer

