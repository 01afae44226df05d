"""The simulated server in vLLM's mode (``SimConfig.vllm()``): vLLM's response shapes (``stop_reason`` on every
choice; with ``processed_logprobs``, guided-choice logprobs after the guide's mask, masked tokens at ``-9999.0``)
give the cascade's backend the same answers and measures as the plain OpenAI shapes."""

from __future__ import annotations

import math

import httpx
import pytest

from cascade.backends.openai_compat import OpenAIBackend
from cascade.simulate import SimConfig, SimServer
from cascade.types import GenerationParams

PROMPTS = [[{"role": "user", "content": f"review {i}: the plot was {'good' if i % 2 else 'dull'}. Opinion?"}]
           for i in range(12)]
CHOICES = ["positive", "negative", "neutral"]


def test_every_choice_carries_stop_reason_plain_and_streamed() -> None:
    with SimServer(SimConfig.vllm(model="m", max_answer_tokens=12)) as server:
        body = {"model": "m", "messages": PROMPTS[0], "max_tokens": 12}
        plain = httpx.post(server.base_url + "/chat/completions", json=body).json()["choices"][0]
        assert "stop_reason" in plain and plain["stop_reason"] is None
        words = plain["message"]["content"].split()
        assert len(words) >= 3
        stopped = httpx.post(server.base_url + "/chat/completions", json={**body, "stop": [words[2]]}).json()
        assert stopped["choices"][0]["stop_reason"] == words[2]
        assert stopped["choices"][0]["finish_reason"] == "stop"
        with httpx.stream("POST", server.base_url + "/completions",
                          json={"model": "m", "prompt": "hello", "max_tokens": 4, "stream": True}) as r:
            events = [line for line in r.iter_lines() if line.startswith("data: {")]
        assert '"stop_reason": null' in events[-1]
    with SimServer(SimConfig(model="m")) as server:  # the plain OpenAI shape has no such field
        plain = httpx.post(server.base_url + "/chat/completions", json={"model": "m", "messages": PROMPTS[0]}).json()
        assert "stop_reason" not in plain["choices"][0]


@pytest.mark.parametrize("api", ["chat", "completions"])
async def test_free_answers_and_measures_are_the_same_as_from_the_plain_shapes(api: str) -> None:
    params = GenerationParams(max_tokens=10)
    got = {}
    for name, config in (("plain", SimConfig(model="m", seed=3)), ("vllm", SimConfig.vllm(model="m", seed=3))):
        with SimServer(config) as server:
            backend = OpenAIBackend(model="m", base_url=server.base_url, api=api, max_retries=0, top_logprobs=20)
            got[name] = await backend.generate(PROMPTS, params)
            await backend.aclose()
    for a, b in zip(got["plain"], got["vllm"]):
        assert a.text == b.text and a.finish_reason == b.finish_reason
        assert a.scores == pytest.approx(b.scores)


async def test_processed_guided_logprobs_give_the_same_choice_measures() -> None:
    got = {}
    raw_body: dict[str, object] = {}
    for name, config in (("raw", SimConfig.vllm(model="m", seed=5)),
                         ("processed", SimConfig.vllm(model="m", seed=5, processed_logprobs=True))):
        with SimServer(config) as server:
            backend = OpenAIBackend(model="m", base_url=server.base_url, max_retries=0, top_logprobs=5,
                                    choices="guided")
            got[name] = await backend.choose(PROMPTS, [CHOICES] * len(PROMPTS))
            await backend.aclose()
            async with httpx.AsyncClient() as client:
                raw_body[name] = (await client.post(server.base_url + "/chat/completions", json={
                    "model": "m", "messages": PROMPTS[0], "logprobs": True, "top_logprobs": 5,
                    "structured_outputs": {"choice": CHOICES}})).json()
    masked = [e["logprob"] for e in raw_body["processed"]["choices"][0]["logprobs"]["content"][0]["top_logprobs"]]  # type: ignore[index]
    assert -9999.0 in masked  # the shape under test: masked alternatives at vLLM's stand-in for -inf
    first = [e["logprob"] for e in raw_body["raw"]["choices"][0]["logprobs"]["content"][0]["top_logprobs"]]  # type: ignore[index]
    assert -9999.0 not in first
    assert math.fsum(math.exp(x) for x in masked) == pytest.approx(1.0)  # the allowed tokens renormalised
    for a, b in zip(got["raw"], got["processed"]):
        assert a.text == b.text and a.text in CHOICES
        for measure in ("choice_margin", "choice_entropy"):
            assert a.scores[measure] == pytest.approx(b.scores[measure], abs=1e-6), measure  # float32 scoring
