"""Token streaming for :class:`~cascade.backends.hf_local.HFLocalBackend`.

``generate`` runs in a worker thread as usual; a transformers streamer hands each new token to a
:class:`StreamSink`, which turns it into :class:`~cascade.types.StreamEvent` objects on the caller's event
loop: a ``"first"`` event with the first token's scores (so a cascade can decide before any text is sent),
``"delta"`` events with text, then ``"done"`` with the full :class:`~cascade.types.Generation`.

The backend reaches this module through :class:`LocalGenerator`, what streaming needs of it, so the import
goes one way (``hf_local`` -> ``hf_stream``).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable, Sequence
from typing import TYPE_CHECKING, Any, Protocol

from cascade.errors import InvalidRequestError
from cascade.types import EarlyExit, Generation, GenerationParams, Prompt, StreamEvent, validate_prompt

if TYPE_CHECKING:
    from cascade.backends.hf_steps import StepRecorder

__all__ = ["LocalGenerator", "StreamSink", "stream_local"]


class LocalGenerator(Protocol):
    """What streaming needs of a local backend (:class:`~cascade.backends.hf_local.HFLocalBackend` is one)."""

    tokenizer: Any
    chat_template: bool  # answers are stripped of surrounding white space

    def generate_sync(self, prompts: Sequence[Prompt], params: GenerationParams, scores: bool,
                      early_exit: EarlyExit | None, sink: StreamSink | None) -> list[Generation]:
        """Blocking generation of one batch; ``sink`` receives the answer of a one-prompt batch token by token."""
        ...


def _partial_stop(text: str, stops: tuple[str, ...]) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of a stop string (held back)."""
    best = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:n]):
                best = n
                break
    return best


class _Streamer:
    """transformers streamer: receives the prompt once, then one token per step (batch of one)."""

    def __init__(self, sink: StreamSink, recorder: StepRecorder) -> None:
        self.sink = sink
        self.recorder = recorder
        self.ids: list[int] = []
        self.prompt_seen = False
        self.sent = 0
        self.finished = False

    def put(self, value: Any) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        self.ids.append(int(value.reshape(-1)[0]))
        if len(self.ids) == 1 and self.recorder.margin:
            self.sink.emit(StreamEvent("first", scores={
                "margin_first": float((1.0 - self.recorder.margin[0])[0]),  # float32, as aggregate() does
                "entropy_first": float(self.recorder.entropy[0][0]),
            }))
        if self.finished:
            return
        text = self.sink.decode(self.ids)
        if text.endswith("\ufffd"):  # an incomplete multi-byte character: wait for the next token
            return
        for s in self.sink.stop:
            cut = text.find(s)
            if cut >= 0:
                text, self.finished = text[:cut], True
        safe = text if self.finished else text[: len(text) - _partial_stop(text, self.sink.stop)]
        safe = safe.rstrip() if self.sink.strip else safe  # trailing space may be the answer's end
        if len(safe) > self.sent:
            self.sink.emit(StreamEvent("delta", text=safe[self.sent :]))
            self.sent = len(safe)

    def end(self) -> None:
        pass


class StreamSink:
    """Carries streamed tokens from the generation thread to an asyncio queue, and a cancel flag back."""

    def __init__(self, loop: asyncio.AbstractEventLoop, emit: Callable[[StreamEvent], None], tokenizer: Any,
                 stop: tuple[str, ...], strip: bool) -> None:
        self.loop = loop
        self._emit = emit
        self.tokenizer = tokenizer
        self.stop = stop
        self.strip = strip
        self.cancel = threading.Event()

    def emit(self, event: StreamEvent) -> None:
        """Hand an event to the event loop (called from the generation thread)."""
        self.loop.call_soon_threadsafe(self._emit, event)

    def decode(self, ids: list[int]) -> str:
        """The answer text so far (leading space removed when the backend strips answers)."""
        text = str(self.tokenizer.decode(ids, skip_special_tokens=True))
        return text.lstrip() if self.strip else text

    def streamer(self, recorder: StepRecorder) -> _Streamer:
        """A transformers streamer feeding this sink, reading first-token scores from ``recorder``."""
        return _Streamer(self, recorder)


async def stream_local(
    backend: LocalGenerator,
    prompt: Prompt,
    params: GenerationParams,
    *,
    scores: bool = True,
    early_exit: EarlyExit | None = None,
) -> AsyncIterator[StreamEvent]:
    """Stream one answer of a local model; closing the iterator stops the generation at the next token."""
    validate_prompt(prompt)
    if early_exit is not None and len(early_exit.thresholds) != 1:
        raise InvalidRequestError("a streamed early exit takes exactly one threshold")
    queue: asyncio.Queue[StreamEvent] = asyncio.Queue()
    sink = StreamSink(asyncio.get_running_loop(), queue.put_nowait, backend.tokenizer, params.stop,
                      backend.chat_template)
    task = asyncio.ensure_future(asyncio.to_thread(backend.generate_sync, [prompt], params, scores,
                                                   early_exit if scores else None, sink))
    try:
        while True:
            getter = asyncio.ensure_future(queue.get())
            await asyncio.wait({getter, task}, return_when=asyncio.FIRST_COMPLETED)
            if getter.done():
                yield getter.result()
                continue
            getter.cancel()
            while not queue.empty():  # events emitted just before the thread finished
                yield queue.get_nowait()
            yield StreamEvent("done", generation=task.result()[0])  # raises the backend's error, if any
            return
    finally:
        sink.cancel.set()  # a consumer that stops early ends the generation at the next step
