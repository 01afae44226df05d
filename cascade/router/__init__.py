"""Expert-router mode: k-means clusters of prompt embeddings, one expert cascade (or replica pool) each.

See :mod:`cascade.router.pool` for the router, :mod:`cascade.router.embed` for the embedders and
:mod:`cascade.router.kmeans` for the clustering. Importing this package loads numpy only; torch and
transformers are imported when an embedder first runs.
"""

from cascade.router.embed import MINILM_ID, Embedder, HiddenStateEmbedder, MiniLMEmbedder, make_embedder
from cascade.router.kmeans import KMeansResult, assign, kmeans
from cascade.router.pool import ExpertRouter, FittedRouter, ReplicaPool, build_router, fit_router

__all__ = [
    "MINILM_ID",
    "Embedder",
    "ExpertRouter",
    "FittedRouter",
    "HiddenStateEmbedder",
    "KMeansResult",
    "MiniLMEmbedder",
    "ReplicaPool",
    "assign",
    "build_router",
    "fit_router",
    "kmeans",
    "make_embedder",
]
