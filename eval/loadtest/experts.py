"""The expert-router mode under load: k clusters each with its own replica pool, against one shared pool.

:class:`RoutedCascade` starts the two simulated servers of :class:`~eval.loadtest.sim.SimOptions` (child
processes), fits a real :class:`~cascade.router.pool.FittedRouter` (k-means over MiniLM embeddings, the
embedder ``cascade serve`` uses) on 1,000 held-out generated prompts, and builds ``k x replicas`` replica
cascades. A replica stands for one inference server: its tiers are ``OpenAIBackend`` clients allowed
``capacity`` requests in flight (a server's batch slots), so a replica that is busy makes requests wait.

* ``shared=False``: cluster ``c`` is served by replicas ``c*r .. c*r + r - 1`` only (Expert Router's layout).
* ``shared=True``: the same router embeds and assigns every prompt as before, but every cluster sends it to
  one pool of all ``k x r`` replicas (least loaded first). Routing costs the same in both layouts; only the
  partition of the capacity differs.

The simulated experts are identical models, so this measures what partitioning the capacity does to
throughput and latency, not what specialised experts would gain in quality. ``embedder="hash"`` routes with
:class:`HashEmbedder` (hashed word counts: microseconds per prompt) instead of MiniLM, for runs where the
question is the pools and MiniLM on this CPU would be the bottleneck.
"""

from __future__ import annotations

import asyncio
import re
import zlib
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from cascade.errors import ConfigError
from cascade.simulate import SimConfig
from cascade.types import Prompt
from eval.loadtest.sim import SimOptions
from eval.loadtest.simbackends import SimProcess
from eval.loadtest.targets import CascadeTarget, Started

__all__ = ["ExpertOptions", "HashEmbedder", "RoutedCascade"]


class HashEmbedder:
    """Bag-of-words feature hashing: each lower-cased word adds +-1 to one of ``dim`` coordinates (CRC32 of the
    word), rows scaled to unit length. Deterministic, about as cheap as reading the text; clusters by wording
    (tasks, templates), not by meaning."""

    def __init__(self, dim: int = 256) -> None:
        self.dim = dim
        self.id = f"hashed-words-{dim}"

    def embed(self, texts: Sequence[str]) -> npt.NDArray[np.float64]:
        out = np.zeros((len(texts), self.dim))
        for i, text in enumerate(texts):
            for word in re.findall(r"\w+", text.lower()):
                h = zlib.crc32(word.encode())
                out[i, h % self.dim] += 1.0 if h & 0x80000000 else -1.0
        norms = np.linalg.norm(out, axis=1, keepdims=True)
        return out / np.where(norms > 0, norms, 1.0)


@dataclass(frozen=True)
class ExpertOptions:
    """The routed layout: clusters, replicas per cluster, capacity per replica, shared or not."""

    k: int = 4
    replicas: int = 1  # per cluster
    capacity: int = 8  # requests in flight per replica and tier
    shared: bool = False  # every cluster on one pool of all k x replicas replicas
    sim: SimOptions = field(default_factory=SimOptions)
    embedder: str = "minilm"  # "minilm" (what cascade serve uses) or "hash" (HashEmbedder)
    fit_prompts: tuple[Prompt, ...] = ()  # held-out prompts to fit the router on (default: 1,000 generated)

    def __post_init__(self) -> None:
        if min(self.k, self.replicas, self.capacity) < 1 or self.embedder not in ("minilm", "hash"):
            raise ConfigError("experts, replicas and capacity must be >= 1; embedder 'minilm' or 'hash'")


class RoutedCascade(Started):
    """Servers, router and replicas of one layout; use ``async with``, then ``.target``."""

    def __init__(self, options: ExpertOptions) -> None:
        self.options = options
        self.servers: dict[str, SimProcess] = {}
        self.target: CascadeTarget | None = None
        self.router: Any = None
        self.fit_sizes: list[int] = []
        self.clusters: Counter[int] = Counter()  # answers per cluster

    async def start(self) -> None:
        from cascade.backends.openai_compat import OpenAIBackend
        from cascade.engine import Cascade, Price, Tier
        from cascade.router import MINILM_ID, ExpertRouter, ReplicaPool, fit_router, make_embedder
        from cascade.types import GenerationParams
        from eval.loadtest.prompts import generated_prompts

        o, s = self.options, self.options.sim
        configs: dict[str, SimConfig] = {"small": s.small, "large": s.large}
        for name, config in configs.items():
            self.servers[name] = await asyncio.to_thread(SimProcess(config).start)
        embedder = make_embedder(MINILM_ID) if o.embedder == "minilm" else HashEmbedder()
        held_out = list(o.fit_prompts) or generated_prompts(1000, seed=20_001)
        fitted = await asyncio.to_thread(fit_router, embedder, held_out, o.k, seed=0)
        self.fit_sizes = list(fitted.sizes)

        def replica() -> Cascade:
            tiers = [Tier(name, OpenAIBackend(model=configs[name].model, base_url=self.servers[name].base_url,
                                              api_key="sim", timeout_s=s.backend_timeout_s,
                                              max_retries=s.backend_retries, max_concurrency=o.capacity),
                          price, timeout)
                     for name, price, timeout in (("small", Price(0.135, 0.135), None),
                                                  ("large", Price(0.5, 0.5), s.large_timeout_s))]
            return Cascade(tiers, measure=s.measure, threshold=s.threshold, early_exit=s.early_exit,
                           params=GenerationParams(max_tokens=s.max_tokens), on_error=s.on_error)  # type: ignore[arg-type]

        replicas = [replica() for _ in range(o.k * o.replicas)]
        if o.shared:
            self.router = ExpertRouter(fitted, embedder, {}, default=ReplicaPool(replicas))
        else:
            self.router = ExpertRouter(fitted, embedder, {c: ReplicaPool(replicas[c * o.replicas:(c + 1) * o.replicas])
                                                          for c in range(o.k)})
        layout = "one shared pool" if o.shared else "a pool per cluster"
        name = (f"expert router ({o.embedder} embeddings): {o.k} clusters, {o.k * o.replicas} replicas ({layout}), "
                f"{o.capacity} in flight per replica and tier")
        self.target = CascadeTarget(self._run, name, closers=(self.router.aclose,))

    async def _run(self, prompt: Any) -> Any:
        result = await self.router.run(prompt)
        self.clusters[result.cluster] += 1
        return result

    def report(self) -> dict[str, Any]:
        """The layout, the router's cluster sizes on its fit prompts, the answers per cluster and the requests
        each replica served."""
        o = self.options
        pools = {id(p): p for p in self.router.experts.values()} if self.router is not None else {}
        return {"k": o.k, "replicas_per_cluster": o.replicas, "capacity": o.capacity, "shared": o.shared,
                "embedder": o.embedder, "embedding_calls": self.router._embeds.calls if self.router else None,
                "fit_cluster_sizes": self.fit_sizes,
                "answers_per_cluster": {str(k): v for k, v in sorted(self.clusters.items())},
                "served_per_replica": [list(p.served) for p in pools.values()]}

    async def aclose(self) -> None:
        """Close the router (every replica) and stop the servers."""
        if self.target is not None:
            await self.target.aclose()
            self.target = None
        for server in self.servers.values():
            await asyncio.to_thread(server.stop)
        self.servers.clear()
