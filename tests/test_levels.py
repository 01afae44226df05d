"""Certified per-request levels at request time and tier skipping: the artifact's levels (and old artifacts
without them), the lookup, and what the engine, streaming, the server and `cascade run` do with them."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx
import pytest

from cascade.artifact import Artifact, load
from cascade.engine import Cascade
from cascade.errors import ArtifactError, BackendError, InvalidRequestError
from cascade.levels import Level, Levels
from cascade.policy import Policy, Target
from cascade.types import CascadeChunk, CascadeResult, EarlyExit, Generation, GenerationParams, Prompt

DATA = Path(__file__).parent / "data"
INF = math.inf


def _levels(stages: int = 1, **changes: Any) -> Levels:
    sets = {0.02: (-INF,) * stages, 0.05: (0.5,) * stages, 0.10: (INF,) * stages}
    items = tuple(Level(e, t, e * 0.9 if math.isfinite(t[0]) or t[0] > 0 else 0.0, t[0] != -INF,
                        1.0 if t[0] == -INF else 0.3, 1.0) for e, t in sets.items())
    fields: dict[str, Any] = {"items": items, "confidence": 0.9, "delta_per_level": 0.1 / 3,
                              "correction": "bonferroni", "claim": "accuracy", "family": "common", **changes}
    return Levels(**fields)


def _artifact(models: Sequence[str] = ("s", "l"), levels: Levels | None = None) -> Artifact:
    return Artifact(tuple(models), "margin_first", (0.5,) * (len(models) - 1), "quality",
                    {"max_quality_loss": 0.05}, "0" * 64, 300, True, "test",
                    levels=_levels(len(models) - 1) if levels is None else levels)


class Counting:
    """A real backend with fixed answers and scores that counts the prompts it is asked to answer."""

    def __init__(self, name: str, score: float = 0.25, fail: bool = False) -> None:
        self.name, self.score, self.fail = name, score, fail
        self.prompts = 0

    async def generate(self, prompts: Sequence[Prompt], params: GenerationParams, *, scores: bool = True,
                       early_exit: EarlyExit | None = None) -> list[Generation]:
        self.prompts += len(prompts)
        if self.fail:
            raise BackendError(f"{self.name} is down", reason="down")
        return [Generation(text=self.name, model=self.name, prompt_tokens=3, completion_tokens=2,
                           scores={"margin_first": self.score}) for _ in prompts]

    async def aclose(self) -> None:
        return None


def test_old_artifacts_load_without_levels_and_new_ones_round_trip(tmp_path: Path) -> None:
    old = load(DATA / "artifact_v1.json")
    assert old.levels is None and old.schema_version == 2 and old.models == ("smollm2-135m", "qwen2.5-coder-0.5b")
    assert Policy.from_artifact(old).resolve(target=Target(max_quality_loss=0.05)).source == "curve"
    raw = json.loads((DATA / "artifact_v1.json").read_text())
    raw.pop("measure")
    (tmp_path / "v1.json").write_text(json.dumps(raw))
    with pytest.raises(ArtifactError, match=r"schema_version 1\) is missing field\(s\) \['measure'\]"):
        load(tmp_path / "v1.json")
    raw = json.loads((DATA / "artifact_v1.json").read_text()) | {"levels": None}
    (tmp_path / "v1l.json").write_text(json.dumps(raw))
    with pytest.raises(ArtifactError, match="unknown field"):  # version 1 had no levels
        load(tmp_path / "v1l.json")
    art = _artifact()
    back = load(art.save(tmp_path / "v2.json"))
    assert back.levels == art.levels and back.levels is not None and back.levels.targets == (0.02, 0.05, 0.10)
    assert json.loads((tmp_path / "v2.json").read_text())["levels"]["items"][0]["thresholds"] == ["-inf"]
    with pytest.raises(ArtifactError, match="ascending"):
        _levels(items=tuple(reversed(_levels().items)))
    with pytest.raises(ArtifactError, match="threshold"):
        _artifact(models=("a", "b", "c"), levels=_levels(1))


def test_a_request_gets_the_loosest_certified_level_at_or_below_its_target() -> None:
    policy = Policy.from_artifact(_artifact())
    for tau, level in ((0.02, 0.02), (0.049, 0.02), (0.05, 0.05), (0.07, 0.05), (0.10, 0.10), (1.0, 0.10)):
        got = policy.resolve(target=Target(max_quality_loss=tau))
        assert (got.source, got.level) == ("certified", level)
    with pytest.raises(InvalidRequestError, match=r"below every certified level of this artifact \(0.02, 0.05"):
        policy.resolve(target=Target(max_quality_loss=0.01))
    assert policy.resolve().source == "artifact" and Policy.fixed(0.3).resolve().source == "fixed"
    with pytest.raises(InvalidRequestError, match="measured curve"):  # a share target still reads the curve
        policy.resolve(target=Target(max_large_share=0.3))


async def test_a_stage_with_threshold_minus_inf_is_skipped_not_called() -> None:
    small, mid, large = Counting("s"), Counting("m", score=0.9), Counting("l")
    art = _artifact(models=("s", "m", "l"))
    cascade = Cascade([_tier("s", small), _tier("m", mid), _tier("l", large)], policy=Policy.from_artifact(art))
    strict = await cascade.run_batch(["a", "b"], target={"max_quality_loss": 0.03})  # level 0.02: (-inf, -inf)
    assert (small.prompts, mid.prompts, large.prompts) == (0, 0, 2)
    for r in strict:
        assert (r.tier, r.skipped, r.threshold_source, r.certified_level) == ("l", ("s", "m"), "certified", 0.02)
        assert r.escalated and math.isnan(r.uncertainty) and r.threshold == -INF and len(r.calls) == 1
        assert r.cost == pytest.approx(3 / 1e6)  # the large tier's 3 prompt tokens only and "'s' skipped" in r.reason
    loose = await cascade.run("c", target={"max_quality_loss": 0.2})  # level 0.10: never escalate
    assert (loose.tier, loose.skipped, small.prompts, loose.certified_level) == ("s", (), 1, 0.10)
    plain = await cascade.run("d")
    assert plain.threshold_source == "artifact" and plain.certified_level is None
    with pytest.raises(InvalidRequestError, match="below every certified level"):
        await cascade.run("e", target={"max_quality_loss": 0.001})


async def test_skipped_lower_tiers_leave_nothing_to_degrade_to() -> None:
    cascade = Cascade([_tier("s", Counting("s")), _tier("l", Counting("l", fail=True))],
                      policy=Policy.fixed(-INF), on_error="degrade")
    with pytest.raises(BackendError, match="down"):
        await cascade.run("x")
    half = Cascade([_tier("s", Counting("s")), _tier("m", Counting("m")), _tier("l", Counting("l", fail=True))],
                   policy=Policy.fixed([0.1, -INF]), on_error="degrade")
    r = await half.run("y")  # the first tier answered (score 0.25 > 0.1: escalated), the middle one skipped
    assert r.degraded and r.tier == "s" and r.skipped == ("m",)


async def test_streaming_skips_too() -> None:
    small, large = Counting("s"), Counting("l")
    cascade = Cascade([_tier("s", small), _tier("l", large)], policy=Policy.from_artifact(_artifact()))
    items = [x async for x in cascade.stream("hi", target={"max_quality_loss": 0.02})]
    result = items[-1]
    assert isinstance(result, CascadeResult) and result.skipped == ("s",) and result.tier == "l"
    assert [c.text for c in items if isinstance(c, CascadeChunk)] == ["l"] and small.prompts == 0


async def test_server_reports_the_threshold_source_and_rejects_targets_below_every_level() -> None:
    from cascade.server import create_app

    small, large = Counting("s"), Counting("l")
    engine = Cascade(small=small, large=large, policy=Policy.from_artifact(_artifact()))
    chat = [{"role": "user", "content": "hi"}]
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=create_app(engine)), base_url="http://t") as c:
        body = {"model": "cascade", "messages": chat, "cascade": {"target": {"max_quality_loss": 0.05}}}
        r = await c.post("/v1/chat/completions", json=body)
        assert r.status_code == 200, r.text
        d = r.json()["cascade"]
        assert (d["threshold_source"], d["certified_level"], d["skipped"]) == ("certified", 0.05, [])
        assert r.headers["x-cascade-threshold-source"] == "certified"
        assert r.headers["x-cascade-certified-level"] == "0.05"
        body["cascade"] = {"target": {"max_quality_loss": 0.02}}
        d = (await c.post("/v1/chat/completions", json=body)).json()["cascade"]
        assert d["skipped"] == ["small"] and d["tier"] == "large" and small.prompts == 1
        body["cascade"] = {"target": {"max_quality_loss": 0.01}}
        bad = await c.post("/v1/chat/completions", json=body)
        assert bad.status_code == 400 and "below every certified level" in bad.text
        plain = (await c.post("/v1/chat/completions", json={"model": "cascade", "messages": chat})).json()
        assert plain["cascade"]["threshold_source"] == "artifact"


def test_cascade_run_reads_levels_per_line(tmp_path: Path) -> None:
    from conftest import make_model, make_tokenizer

    from cascade.cli import main

    for seed in (0, 1):
        make_model(seed).save_pretrained(tmp_path / f"tiny{seed}")
        make_tokenizer().save_pretrained(tmp_path / f"tiny{seed}")
    cfg = tmp_path / "cascade.yaml"
    cfg.write_text("measure: margin_first\nartifact: cal.json\nmax_tokens: 3\ntiers:\n" + "".join(
        f"  - {{name: {n}, backend: {{model: '{tmp_path / f'tiny{s}'}'}}, price_input_per_mtok: {p}}}\n"
        for n, s, p in (("small", 0, 1.0), ("large", 1, 10.0))))
    _artifact(models=[str(tmp_path / "tiny0"), str(tmp_path / "tiny1")]).save(tmp_path / "cal.json")
    lines = [{"id": "strict", "prompt": "the movie", "target": {"max_quality_loss": 0.03}},
             {"id": "loose", "prompt": "the movie", "target": {"max_quality_loss": 0.5}},
             {"id": "below", "prompt": "the movie", "target": {"max_quality_loss": 0.001}},
             {"id": "plain", "prompt": "the movie"}]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    code = main(["run", "--config", str(cfg), "--input", str(tmp_path / "in.jsonl"), "--output",
                 str(tmp_path / "out.jsonl")])
    out = {r["id"]: r for r in map(json.loads, (tmp_path / "out.jsonl").read_text().splitlines())}
    assert code == 1 and "below every certified level" in out["below"]["error"]
    assert out["strict"]["skipped"] == ["small"] and out["strict"]["tier"] == "large"
    assert [c["tier"] for c in out["strict"]["calls"]] == ["large"] and out["strict"]["certified_level"] == 0.02
    assert out["loose"]["tier"] == "small" and out["loose"]["threshold_source"] == "certified"
    assert out["plain"]["threshold_source"] == "artifact" and out["plain"]["skipped"] == []


def _tier(name: str, backend: Counting) -> Any:
    from cascade.engine import Price, Tier

    return Tier(name, backend, Price(1.0, 0.0))
