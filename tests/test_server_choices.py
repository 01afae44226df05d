"""Constrained answers over HTTP: ``cascade.choices`` and vLLM's ``guided_choice`` / ``structured_outputs``.

The app runs in-process on tiny random-weight models (httpx's ASGI transport); the same request through the
engine directly gives the same answer and uncertainty.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from conftest import make_backend

from cascade import Cascade, Price, Tier
from cascade.server import create_app

CHAT = [{"role": "user", "content": "Is this review negative or positive? a fine film"}]
LABELS = ["negative", "positive"]


@pytest.fixture
async def served() -> AsyncIterator[tuple[Cascade, httpx.AsyncClient]]:
    tiers = [Tier("small", make_backend(0), Price(1.0, 1.0)), Tier("large", make_backend(1), Price(5.0, 5.0))]
    engine = Cascade(tiers, measure="choice_margin", threshold=0.5)
    app = create_app(engine)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
        yield engine, client


@pytest.mark.parametrize("field", [{"cascade": {"choices": LABELS}}, {"guided_choice": LABELS},
                                   {"structured_outputs": {"choice": LABELS}}])
async def test_every_choice_field_answers_with_one_of_the_choices(served: tuple[Cascade, httpx.AsyncClient],
                                                                  field: dict[str, Any]) -> None:
    engine, client = served
    r = await client.post("/v1/chat/completions", json={"model": "cascade", "messages": CHAT, **field})
    assert r.status_code == 200, r.text
    body = r.json()
    decision = body["cascade"]
    direct = await engine.run(CHAT, choices=LABELS)  # type: ignore[arg-type]
    assert body["choices"][0]["message"]["content"] == direct.text and direct.text in LABELS
    assert decision["measure"] == "choice_margin" and decision["uncertainty"] == pytest.approx(direct.uncertainty)
    assert decision["tier"] == direct.tier and 0.0 <= decision["uncertainty"] <= 1.0


async def test_completions_apply_the_choices_to_every_prompt(served: tuple[Cascade, httpx.AsyncClient]) -> None:
    _, client = served
    body = {"model": "cascade", "prompt": ["a fine film", "a dull film"], "guided_choice": ["yes", "no", "maybe"]}
    r = await client.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    assert [c["text"] in ("yes", "no", "maybe") for c in r.json()["choices"]] == [True, True]
    assert all(d["measure"] == "choice_margin" for d in r.json()["cascade"])


async def test_a_streamed_request_with_choices_gets_the_chosen_answer(served: tuple[Cascade, httpx.AsyncClient]
                                                                       ) -> None:
    _, client = served
    body = {"model": "cascade", "messages": CHAT, "stream": True, "guided_choice": LABELS}
    async with client.stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200
        events = [line[6:] async for line in r.aiter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text in LABELS and chunks[-1]["cascade"]["measure"] == "choice_margin"


@pytest.mark.parametrize(("extra", "param"), [
    ({"guided_choice": LABELS, "cascade": {"choices": ["yes", "no"]}}, "cascade.choices"),
    ({"guided_choice": []}, "guided_choice"),
    ({"guided_choice": ["a", "a"]}, "guided_choice"),
    ({"guided_choice": "negative"}, "guided_choice"),
    ({"guided_choice": ["ok", 3]}, "guided_choice"),
    ({"structured_outputs": {"json": {"type": "object"}}}, "structured_outputs"),
    ({"structured_outputs": {"choice": [""]}}, "structured_outputs.choice"),
    ({"cascade": {"choices": LABELS, "other": 1}}, "cascade"),
])
async def test_bad_or_conflicting_choices_are_400_naming_the_field(served: tuple[Cascade, httpx.AsyncClient],
                                                                   extra: dict[str, Any], param: str) -> None:
    _, client = served
    r = await client.post("/v1/chat/completions", json={"model": "cascade", "messages": CHAT, **extra})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


async def test_the_same_choices_in_two_fields_are_accepted(served: tuple[Cascade, httpx.AsyncClient]) -> None:
    _, client = served
    body = {"model": "cascade", "messages": CHAT, "guided_choice": LABELS, "structured_outputs": {"choice": LABELS}}
    r = await client.post("/v1/chat/completions", json=body)
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] in LABELS
