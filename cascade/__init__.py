"""uncertainty-cascade: answer with a small LLM first, escalate on calibrated uncertainty.

``import cascade`` is cheap: torch, transformers and openai are imported only when a backend that needs
them is built.
"""

from cascade.engine import Cascade, Price, Tier
from cascade.errors import (
    ArtifactError,
    BackendError,
    BackendTimeoutError,
    CascadeError,
    ConfigError,
    InvalidRequestError,
    ModelNotInstalledError,
    OverloadedError,
)
from cascade.policy import Policy, Target
from cascade.types import MEASURES, CascadeResult, Generation, GenerationParams, TierCall

__all__ = [
    "MEASURES",
    "ArtifactError",
    "BackendError",
    "BackendTimeoutError",
    "Cascade",
    "CascadeError",
    "CascadeResult",
    "ConfigError",
    "Generation",
    "GenerationParams",
    "InvalidRequestError",
    "ModelNotInstalledError",
    "OverloadedError",
    "Policy",
    "Price",
    "Target",
    "Tier",
    "TierCall",
]
__version__ = "0.1.0"
