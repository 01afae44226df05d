"""Expert-router mode: cluster each prompt, send it to its cluster's expert (after Pichlmeier et al. 2024).

* :class:`FittedRouter`: k-means centroids over prompt embeddings plus the embedder's id, saved and loaded
  as a versioned JSON file (written atomically).
* :class:`ReplicaPool`: replicas of one expert; each call goes to the replica with fewest requests in flight.
* :class:`ExpertRouter`: embeds prompts, picks clusters, runs each cluster's expert (its own
  :class:`~cascade.engine.Cascade` with its own thresholds; per-cluster thresholds of a policy apply too),
  and returns one :class:`~cascade.types.CascadeResult` per prompt with ``cluster`` set.
"""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from cascade.atomic_files import write_text_atomic
from cascade.engine import Cascade
from cascade.errors import ArtifactError, CascadeError, ConfigError, InvalidRequestError
from cascade.router.coalesce import EmbedBatcher
from cascade.router.embed import Embedder, make_embedder, prompt_text
from cascade.router.kmeans import assign, kmeans
from cascade.types import CascadeChunk, CascadeResult, GenerationParams, Prompt, validate_prompt

__all__ = ["ROUTER_SCHEMA", "ROUTER_VERSION", "ExpertRouter", "FittedRouter", "ReplicaPool", "build_router",
           "fit_router"]

ROUTER_SCHEMA = "uncertainty-cascade/router"
ROUTER_VERSION = 1


@dataclass(frozen=True, eq=False)
class FittedRouter:
    """k-means centroids over prompt embeddings.

    Attributes:
        centroids: ``(k, D)`` cluster centres.
        embedder: id of the embedder the centroids live in (another embedder is refused).
        seed: k-means seed used to fit.
        n_train: number of prompts fitted on.
        inertia: k-means inertia on the training prompts.
        sizes: training prompts per cluster (``()`` when unknown, e.g. a router file written without them).
    """

    centroids: npt.NDArray[np.float64]
    embedder: str
    seed: int = 0
    n_train: int = 0
    inertia: float = math.nan
    sizes: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        c = np.asarray(self.centroids, dtype=np.float64)
        if c.ndim != 2 or c.shape[0] < 1 or c.shape[1] < 1 or not np.isfinite(c).all():
            raise ArtifactError(f"router centroids must be a finite non-empty (k, D) array, got shape {c.shape}")
        object.__setattr__(self, "centroids", c)
        if not isinstance(self.embedder, str) or not self.embedder:
            raise ArtifactError("router embedder id must be a non-empty string")
        if self.sizes and (len(self.sizes) != c.shape[0] or any(
                isinstance(n, bool) or not isinstance(n, int) or n < 0 for n in self.sizes)):
            raise ArtifactError(f"router sizes must be {c.shape[0]} counts, got {self.sizes!r}")

    @property
    def k(self) -> int:
        """Number of clusters."""
        return int(self.centroids.shape[0])

    @property
    def dim(self) -> int:
        """Embedding dimension D."""
        return int(self.centroids.shape[1])

    @classmethod
    def fit(cls, embeddings: npt.ArrayLike, k: int, *, embedder: str, seed: int = 0) -> FittedRouter:
        """Fit ``k`` clusters on ``(N, D)`` embeddings (seeded k-means++; same inputs, same centroids)."""
        x = np.asarray(embeddings, dtype=np.float64)
        km = kmeans(x, k, seed=seed)
        sizes = tuple(int(n) for n in np.bincount(km.labels, minlength=k))
        return cls(km.centroids, embedder, seed=seed, n_train=int(x.shape[0]), inertia=km.inertia, sizes=sizes)

    def assign(self, embeddings: npt.ArrayLike) -> list[int]:
        """Cluster of each of ``(N, D)`` embeddings."""
        x = np.asarray(embeddings, dtype=np.float64)
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise InvalidRequestError(f"embeddings of shape {x.shape} do not match the router's D={self.dim}")
        return [int(c) for c in assign(x, self.centroids)]

    def to_json(self) -> dict[str, Any]:
        """The versioned JSON form (floats are written exactly, so a reload assigns identically)."""
        return {
            "schema": ROUTER_SCHEMA,
            "version": ROUTER_VERSION,
            "embedder": self.embedder,
            "k": self.k,
            "dim": self.dim,
            "seed": self.seed,
            "n_train": self.n_train,
            "inertia": self.inertia if math.isfinite(self.inertia) else None,
            "sizes": list(self.sizes),
            "centroids": self.centroids.tolist(),
        }

    def save(self, path: str | Path) -> Path:
        """Write atomically (temporary file in the same folder, then rename); returns the path."""
        return write_text_atomic(path, json.dumps(self.to_json(), indent=1) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> FittedRouter:
        """Read a router file.

        Raises:
            ArtifactError: unreadable, not a router file, of an unknown version, or inconsistent.
        """
        try:
            raw = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ArtifactError(f"cannot read router file {path}: {exc}") from exc
        if not isinstance(raw, dict) or raw.get("schema") != ROUTER_SCHEMA:
            raise ArtifactError(f"{path} is not a router file (schema must be {ROUTER_SCHEMA!r})")
        if raw.get("version") != ROUTER_VERSION:
            raise ArtifactError(f"{path}: router version {raw.get('version')!r} is not supported "
                                f"(this library reads version {ROUTER_VERSION})")
        try:
            centroids = np.asarray(raw["centroids"], dtype=np.float64)
            fitted = cls(centroids, str(raw["embedder"]), seed=int(raw.get("seed", 0)),
                         n_train=int(raw.get("n_train", 0)),
                         inertia=float(raw["inertia"]) if raw.get("inertia") is not None else math.nan,
                         sizes=tuple(raw.get("sizes") or ()))
        except (KeyError, TypeError, ValueError) as exc:
            raise ArtifactError(f"{path}: malformed router file: {exc}") from exc
        if fitted.k != raw.get("k") or fitted.dim != raw.get("dim"):
            raise ArtifactError(f"{path}: k/dim fields do not match the centroids' shape {centroids.shape}")
        return fitted


def fit_router(embedder: Embedder, prompts: Sequence[Prompt], k: int, *, seed: int = 0) -> FittedRouter:
    """Embed ``prompts`` with ``embedder`` and fit ``k`` clusters (blocking)."""
    from cascade.router.embed import prompt_text

    x = embedder.embed([prompt_text(validate_prompt(p)) for p in prompts])
    return FittedRouter.fit(x, k, embedder=embedder.id, seed=seed)


class ReplicaPool:
    """Replicas of one expert; each call goes to the replica with the fewest requests in flight.

    Ties go to the replica that has served fewer requests so far, then to the lowest index.

    Args:
        replicas: one or more cascades answering the same way (e.g. on different servers or devices).
    """

    def __init__(self, replicas: Sequence[Cascade]) -> None:
        if not replicas:
            raise ConfigError("a replica pool needs at least one cascade")
        self.replicas = tuple(replicas)
        self.in_flight = [0] * len(self.replicas)
        self.served = [0] * len(self.replicas)

    def pick(self) -> int:
        """Index of the least-loaded replica."""
        return min(range(len(self.replicas)), key=lambda i: (self.in_flight[i], self.served[i], i))

    async def run_batch(self, prompts: Sequence[Prompt], *, params: GenerationParams | Mapping[str, Any] | None = None,
                        target: Any = None, clusters: Sequence[int | None] | None = None,
                        choices: Sequence[Sequence[str] | None] | None = None) -> list[CascadeResult]:
        """Answer ``prompts`` on the least-loaded replica (see :meth:`Cascade.run_batch`)."""
        i = self.pick()
        self.in_flight[i] += len(prompts)
        self.served[i] += len(prompts)
        try:
            return await self.replicas[i].run_batch(prompts, params=params, target=target, clusters=clusters,
                                                    choices=choices)
        finally:
            self.in_flight[i] -= len(prompts)


    async def stream(self, prompt: Prompt, *, params: GenerationParams | Mapping[str, Any] | None = None,
                     target: Any = None, cluster: int | None = None) -> AsyncIterator[CascadeChunk | CascadeResult]:
        """Stream one answer from the least-loaded replica (see :meth:`Cascade.stream`)."""
        i = self.pick()
        self.in_flight[i] += 1
        self.served[i] += 1
        items = self.replicas[i].stream(prompt, params=params, target=target, cluster=cluster)
        try:
            async for item in items:
                yield item
        finally:
            await _aclose(items)
            self.in_flight[i] -= 1


async def _aclose(items: AsyncIterator[Any]) -> None:
    aclose = getattr(items, "aclose", None)
    if aclose is not None:
        await aclose()


class ExpertRouter:
    """Route each prompt to its cluster's expert.

    Args:
        fitted: the centroids.
        embedder: the embedder they were fitted with (ids must match).
        experts: cluster id -> expert (a :class:`Cascade` or a :class:`ReplicaPool`).
        default: expert for clusters without their own (None: every cluster needs one).

    Raises:
        ConfigError: embedder mismatch, cluster ids out of range, or a cluster without an expert.
    """

    def __init__(self, fitted: FittedRouter, embedder: Embedder,
                 experts: Mapping[int, Cascade | ReplicaPool], *, default: Cascade | ReplicaPool | None = None) -> None:
        if embedder.id != fitted.embedder:
            raise ConfigError(f"router fitted with embedder {fitted.embedder!r}, given {embedder.id!r}")
        bad = [c for c in experts if isinstance(c, bool) or not isinstance(c, int) or not 0 <= c < fitted.k]
        if bad:
            raise ConfigError(f"expert cluster ids {bad} are not in 0..{fitted.k - 1}")
        missing = [c for c in range(fitted.k) if c not in experts]
        if missing and default is None:
            raise ConfigError(f"clusters {missing} have no expert and there is no default")
        as_pool = {c: e if isinstance(e, ReplicaPool) else ReplicaPool([e]) for c, e in experts.items()}
        fallback = None if default is None else default if isinstance(default, ReplicaPool) else ReplicaPool([default])
        self.fitted = fitted
        self.embedder = embedder
        self._embeds = EmbedBatcher(embedder)  # concurrent requests share one embedding pass
        self.experts: dict[int, ReplicaPool] = {c: as_pool.get(c) or fallback for c in range(fitted.k)}  # type: ignore[misc]
        self.params = (fallback or next(iter(self.experts.values()))).replicas[0].params  # the top-level defaults

    def cascades(self) -> list[Cascade]:
        """Every distinct cascade behind the router."""
        seen: dict[int, Cascade] = {}
        for pool in self.experts.values():
            for c in pool.replicas:
                seen.setdefault(id(c), c)
        return list(seen.values())

    async def route(self, prompts: Sequence[Prompt]) -> list[int]:
        """Cluster of each prompt."""
        return self.fitted.assign(await self._embeds.embed([prompt_text(p) for p in prompts]))

    async def run(self, prompt: Prompt, *, params: GenerationParams | Mapping[str, Any] | None = None,
                  target: Any = None) -> CascadeResult:
        """Answer one prompt on its cluster's expert."""
        return (await self.run_batch([prompt], params=params, target=target))[0]

    async def run_batch(self, prompts: Sequence[Prompt], *, params: GenerationParams | Mapping[str, Any] | None = None,
                        target: Any = None, choices: Sequence[Sequence[str] | None] | None = None
                        ) -> list[CascadeResult]:
        """Answer a batch: one call per cluster's expert, concurrently; results in input order.

        Raises:
            InvalidRequestError: a malformed prompt (before anything runs).
            CascadeError: an expert failed (raised after every other expert finished).
        """
        checked = [validate_prompt(p) for p in prompts]
        if not checked:
            return []
        clusters = await self.route(checked)
        groups: dict[int, list[int]] = {}
        for i, c in enumerate(clusters):
            groups.setdefault(c, []).append(i)
        calls = [self.experts[c].run_batch([checked[i] for i in idx], params=params, target=target,
                                           clusters=[c] * len(idx),
                                           choices=None if choices is None else [choices[i] for i in idx])
                 for c, idx in groups.items()]
        answers = await asyncio.gather(*calls, return_exceptions=True)
        out: list[CascadeResult | None] = [None] * len(checked)
        for (c, idx), got in zip(groups.items(), answers):
            if isinstance(got, BaseException):
                raise got
            for i, r in zip(idx, got):
                out[i] = r if r.cluster == c else replace(r, cluster=c)
        return [r for r in out if r is not None]

    async def stream(self, prompt: Prompt, *, params: GenerationParams | Mapping[str, Any] | None = None,
                     target: Any = None) -> AsyncIterator[CascadeChunk | CascadeResult]:
        """Stream one answer from its cluster's expert: chunks, then the result (``cluster`` set)."""
        checked = validate_prompt(prompt)
        [cluster] = await self.route([checked])
        items = self.experts[cluster].stream(checked, params=params, target=target, cluster=cluster)
        try:
            async for item in items:
                yield item
        finally:
            await _aclose(items)

    async def aclose(self) -> None:
        """Close every distinct backend once."""
        seen: set[int] = set()
        for cascade in self.cascades():
            for tier in cascade.tiers:
                if id(tier.backend) not in seen:
                    seen.add(id(tier.backend))
                    await tier.backend.aclose()

    async def __aenter__(self) -> ExpertRouter:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


def build_router(config: Any, *, backends: Mapping[str, Any] | None = None) -> ExpertRouter:
    """Build the expert router a :class:`~cascade.config.CascadeConfig` describes (``config.router`` set).

    The top-level tiers form the default expert. ``config.extra["experts"]`` may give per-cluster experts::

        experts:
          "0": {config: experts/code.yaml, replicas: 2}   # its own tiers, two replicas
          "2": {thresholds: [0.25]}                        # the default tiers with its own thresholds

    Raises:
        ConfigError, ArtifactError: bad router file or expert section.
    """
    from cascade.config import build_cascade, load_config

    if not config.router:
        raise ConfigError("expert-router mode needs `router` (a fitted router file)")
    fitted = FittedRouter.load(config.router)
    base = replace(config, router=None)
    default = build_cascade(base, backends=backends)
    shared = {t.name: t.backend for t in default.tiers}
    spec = config.extra.get("experts", {}) if isinstance(config.extra, Mapping) else {}
    if not isinstance(spec, Mapping):
        raise ConfigError("extra.experts must be a mapping of cluster id -> expert")
    experts: dict[int, Cascade | ReplicaPool] = {}
    for key, raw in spec.items():
        try:
            cluster = int(key)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"expert key {key!r} is not a cluster id") from exc
        if not isinstance(raw, Mapping) or set(raw) - {"config", "replicas", "thresholds"}:
            raise ConfigError(f"experts[{key!r}] takes config, replicas and thresholds")
        replicas = raw.get("replicas", 1)
        if isinstance(replicas, bool) or not isinstance(replicas, int) or replicas < 1:
            raise ConfigError(f"experts[{key!r}].replicas must be a positive integer")
        cfg = load_config(raw["config"]) if raw.get("config") else base
        reuse = None if raw.get("config") else shared
        if raw.get("thresholds") is not None:
            try:
                cfg = replace(cfg, thresholds=tuple(float(t) for t in raw["thresholds"]), artifact=None)
            except (CascadeError, TypeError, ValueError) as exc:
                raise ConfigError(f"experts[{key!r}].thresholds: {exc}") from exc
        experts[cluster] = ReplicaPool([build_cascade(cfg, backends=reuse) for _ in range(replicas)])
    local = [b for c in [default, *(r for p in experts.values() if isinstance(p, ReplicaPool) for r in p.replicas)]
             for b in (t.backend for t in c.tiers)]
    embedder = make_embedder(fitted.embedder, backends=local)
    return ExpertRouter(fitted, embedder, experts, default=default)
