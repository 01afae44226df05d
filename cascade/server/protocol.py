"""What the server needs of an engine: both :class:`~cascade.engine.Cascade` and
:class:`~cascade.router.ExpertRouter` provide it."""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol

from cascade.types import CascadeChunk, CascadeResult, GenerationParams, Prompt

if TYPE_CHECKING:
    from cascade.engine import Cascade

__all__ = ["Engine"]


class Engine(Protocol):
    """A cascade or an expert router, as ``cascade serve`` drives it."""

    params: GenerationParams  # the decoding defaults a request's own parameters apply over

    async def run_batch(self, prompts: Sequence[Prompt], *,
                        params: GenerationParams | Mapping[str, Any] | None = None, target: Any = None,
                        choices: Sequence[Sequence[str] | None] | None = None) -> list[CascadeResult]:
        """Answer a batch (see :meth:`cascade.engine.Cascade.run_batch`)."""
        ...

    def stream(self, prompt: Prompt, *, params: GenerationParams | Mapping[str, Any] | None = None,
               target: Any = None) -> AsyncIterator[CascadeChunk | CascadeResult]:
        """Stream one answer (see :meth:`cascade.engine.Cascade.stream`)."""
        ...

    def cascades(self) -> list[Cascade]:
        """Every cascade inside (one for a cascade; every replica of every expert for a router)."""
        ...

    async def aclose(self) -> None:
        """Release the backends."""
        ...
