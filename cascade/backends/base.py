"""The backend interface: I/O only, one main method.

A backend turns a batch of prompts into a batch of :class:`~cascade.types.Generation`. It knows nothing of
thresholds or tiers; when asked for scores it fills ``Generation.scores`` with every uncertainty measure
it can compute (see :mod:`cascade.uncertainty`).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from typing import Protocol, runtime_checkable

from cascade.types import EarlyExit, Generation, GenerationParams, Prompt, StreamEvent

__all__ = ["Backend", "StreamingBackend"]


@runtime_checkable
class Backend(Protocol):
    """A model behind one small async interface.

    Attributes:
        name: the model identity (recorded in results and calibration artifacts).
    """

    name: str

    async def generate(
        self,
        prompts: Sequence[Prompt],
        params: GenerationParams,
        *,
        scores: bool = True,
        early_exit: EarlyExit | None = None,
    ) -> list[Generation]:
        """Answer every prompt; the i-th generation answers the i-th prompt.

        Args:
            prompts: B prompts (strings or chat message lists).
            params: decoding parameters shared by the batch.
            scores: compute token statistics and uncertainty scores (False for a last tier saves work).
            early_exit: stop sequences whose first token is too uncertain (only with ``scores``).

        Raises:
            BackendError: the model or server failed; BackendTimeoutError on a timeout.
        """
        ...

    async def aclose(self) -> None:
        """Release connections, threads and memory."""
        ...


@runtime_checkable
class StreamingBackend(Backend, Protocol):
    """A backend that can also stream one answer as it is generated (token streaming to clients)."""

    def stream(
        self,
        prompt: Prompt,
        params: GenerationParams,
        *,
        scores: bool = True,
        early_exit: EarlyExit | None = None,
    ) -> AsyncIterator[StreamEvent]:
        """Yield ``"first"`` (with scores), ``"delta"`` events as text arrives, and one final ``"done"``.

        ``early_exit`` (one threshold) ends the generation after the first token when its score is above
        the threshold; the ``"done"`` generation then has finish reason ``"early_exit"``. Closing the
        iterator early stops the generation.
        """
        ...
