"""The evaluated models and model pairs, and the decoding of every evaluation (shared by the eval tools)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["MODELS", "PAIRS", "ModelRef", "gen_params"]


@dataclass(frozen=True)
class ModelRef:
    """One evaluated model: its short name in tables, embedded model name and weights dtype."""

    label: str
    source: str
    dtype: str

    @property
    def identity(self) -> str:
        """The cache identity (as :func:`calibration.generation_cache.model_identity` computes it after loading)."""
        return f"{self.source}@{self.dtype}"


MODELS: dict[str, ModelRef] = {
    "SmolLM2-135M": ModelRef("SmolLM2-135M", "smollm2-135m", "float32"),
    "Qwen-0.5B": ModelRef("Qwen-0.5B", "qwen2.5-coder-0.5b", "bfloat16"),
    "Qwen-1.5B": ModelRef("Qwen-1.5B", "qwen2.5-coder-1.5b", "bfloat16"),
}
PAIRS: dict[str, tuple[str, str]] = {
    "SmolLM2-135M -> Qwen-0.5B": ("SmolLM2-135M", "Qwen-0.5B"),
    "Qwen-0.5B -> Qwen-1.5B": ("Qwen-0.5B", "Qwen-1.5B"),
    "SmolLM2-135M -> Qwen-1.5B": ("SmolLM2-135M", "Qwen-1.5B"),
}


def gen_params(task: Any) -> Any:
    """Greedy decoding with the task's few new tokens."""
    from cascade.types import GenerationParams

    return GenerationParams(max_tokens=task.max_tokens)
