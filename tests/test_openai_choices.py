"""Constrained answers from OpenAI-compatible servers, each path against a real loopback simulated server."""

from __future__ import annotations

import math

import pytest
from conftest import make_backend

from cascade import Cascade
from cascade.backends.openai_choices import choice_logliks_from_top, echo_texts
from cascade.backends.openai_compat import OpenAIBackend
from cascade.errors import ChoicesUnsupportedError, ConfigError
from cascade.simulate import SimConfig, SimServer
from cascade.simulate import choices as sim

PROMPTS = ["[[sim:confidence=0.9]] is it good", "[[sim:confidence=0.1]] a movie", "which city"]
CHOICES = [["positive", "negative"], ["good", "bad", "very bad"], ["paris", "rome"]]


def backend(server: SimServer, **kw: object) -> OpenAIBackend:
    return OpenAIBackend(model=server.config.model, base_url=server.base_url, **kw)  # type: ignore[arg-type]


def expected_echo(cfg: SimConfig, b: OpenAIBackend, prompt: str, choices: list[str]) -> list[float]:
    """Each choice's summed logprob over the simulated tokens that overlap it, computed without the server."""
    _, texts = echo_texts(b, prompt, choices)
    out = []
    for c, text in zip(choices, texts, strict=True):
        start, pos, total = len(text) - len(c), 0, 0.0
        for i, tok in enumerate(sim.tokens(text)):
            if i and pos + len(tok) > start:
                total += sim.token_logprob(cfg, text[:pos], tok)
            pos += len(tok)
        out.append(total)
    return out


async def test_guided_choice_on_a_vllm_like_server() -> None:
    async with SimServer(SimConfig(model="m")) as s:
        b = backend(s)
        gens = await b.choose(PROMPTS, CHOICES)
        for prompt, choices, g in zip(PROMPTS, CHOICES, gens, strict=True):
            picked = sim.choose(s.config, f"user: {prompt}", choices)
            assert g.text == picked.text
            first = dict(picked.top[0])
            assert list(g.choice_logprobs) == pytest.approx(choice_logliks_from_top(first, choices))
            assert 0.0 <= g.scores["choice_margin"] <= 1.0 and 0.0 <= g.scores["choice_entropy"] <= 1.0
            assert "margin_first" in g.scores and g.prompt_tokens > 0 and g.completion_tokens >= 1
        assert b.choice_methods == {"guided": ""}
        sure, unsure = gens[0].scores["choice_margin"], gens[1].scores["choice_margin"]
        assert sure < unsure  # the confident prompt separates its choices more
        await b.aclose()


async def test_echo_scores_each_choice_from_prompt_logprobs() -> None:
    async with SimServer(SimConfig(model="m", guided_choice=False)) as s:
        for api in ("completions", "chat"):  # chat: guided is refused (HTTP 400), echo answers
            b = backend(s, api=api)
            gens = await b.choose(PROMPTS, CHOICES)
            for prompt, choices, g in zip(PROMPTS, CHOICES, gens, strict=True):
                want = expected_echo(s.config, b, prompt, choices)
                assert list(g.choice_logprobs) == pytest.approx(want, abs=1e-9)
                assert g.text == choices[max(range(len(choices)), key=want.__getitem__)]
            assert b.choice_methods["echo"] == ""
            if api == "chat":
                assert "HTTP 400" in b.choice_methods["guided"]
            normalized = await b.choose(PROMPTS[1:2], CHOICES[1:2], length_normalize=True)
            assert normalized[0].choice_logprobs[2] == pytest.approx(
                expected_echo(s.config, b, PROMPTS[1], ["very bad"])[0] / 2)
            await b.aclose()


async def test_a_server_with_neither_gets_a_typed_error_never_a_free_answer() -> None:
    async with SimServer(SimConfig(model="m", guided_choice=False, echo=False)) as s:
        b = backend(s)
        with pytest.raises(ChoicesUnsupportedError) as info:
            await b.choose(PROMPTS[:1], CHOICES[:1])
        assert "guided choice" in str(info.value) and "echo" in str(info.value)
        assert "HTTP 400" in str(info.value) and s.base_url not in info.value.reason
        assert s.stats.requests == 2  # one attempt each, no free generation
        cascade = Cascade(small=make_backend(0), large=b, threshold=-1.0, on_error="raise")
        with pytest.raises(ChoicesUnsupportedError):
            await cascade.run("is it good", choices=["yes", "no"])
        await b.aclose()
    with pytest.raises(ConfigError):
        OpenAIBackend(model="m", choices="sometimes")


async def test_choices_none_and_a_guided_only_backend() -> None:
    async with SimServer(SimConfig(model="m", echo=False)) as s:
        off = backend(s, choices="none")
        with pytest.raises(ChoicesUnsupportedError, match="choices='none'"):
            await off.choose(PROMPTS[:1], CHOICES[:1])
        assert s.stats.requests == 0
        guided = backend(s, api="completions", choices="guided")
        g = (await guided.choose(PROMPTS[:1], CHOICES[:1]))[0]
        assert g.text == sim.choose(s.config, PROMPTS[0], CHOICES[0]).text
        await off.aclose()
        await guided.aclose()


async def test_a_cascade_with_a_remote_large_tier_answers_with_a_choice() -> None:
    async with SimServer(SimConfig(model="m")) as s:
        cascade = Cascade(small=make_backend(0), large=backend(s), measure="choice_margin", threshold=-1.0)
        r = await cascade.run("is it good", choices=["yes", "no"])
        assert r.escalated and r.tier == "large" and r.text in ("yes", "no") and not r.degraded
        await cascade.aclose()


def test_choice_logliks_from_top() -> None:
    top = {" pos": -0.2, "neg": -1.5, " positively": -3.0, "x": -4.0}
    assert choice_logliks_from_top(top, ["positive", "negative", "neutral"]) == [-0.2, -1.5, -4.0]
    assert choice_logliks_from_top({}, ["a"]) == [0.0]
    assert not math.isnan(choice_logliks_from_top(top, ["positively"])[0])
