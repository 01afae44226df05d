"""The request fields the server and the simulated server share (:mod:`cascade.request_fields`): one table of
bodies sent to both, over real loopback HTTP to a :class:`SimServer` and through the server app in-process
(httpx's ASGI transport; its tiers are the same simulated server), must be accepted or refused alike, the
refusals naming the same field.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest

from cascade import Cascade
from cascade.backends.openai_compat import OpenAIBackend
from cascade.request_fields import MAX_TOKENS_LIMIT, FieldError, RunLineFields, ServerFields, validated
from cascade.server import ServerConfig, create_app
from cascade.simulate import SimConfig, SimServer
from cascade.simulate.request import MAX_TOKENS

CHAT = [{"role": "user", "content": "Is it good?"}]
OK, BAD = True, False
# (fields added to a valid chat body, accepted?, the refused field's top-level name)
TABLE: list[tuple[dict[str, Any], bool, str | None]] = [
    ({"max_tokens": 1}, OK, None),
    ({"max_tokens": MAX_TOKENS}, OK, None),
    ({"max_tokens": MAX_TOKENS + 1}, BAD, "max_tokens"),
    ({"max_tokens": 0}, BAD, "max_tokens"),
    ({"max_tokens": "9"}, BAD, "max_tokens"),
    ({"max_tokens": True}, BAD, "max_tokens"),
    ({"max_tokens": 4.0}, BAD, "max_tokens"),
    ({"max_completion_tokens": 3}, OK, None),
    ({"max_completion_tokens": 0}, BAD, "max_completion_tokens"),
    ({"temperature": 0}, OK, None),
    ({"temperature": 2}, OK, None),
    ({"temperature": 0.7}, OK, None),
    ({"temperature": 2.01}, BAD, "temperature"),
    ({"temperature": -0.1}, BAD, "temperature"),
    ({"temperature": True}, BAD, "temperature"),
    ({"temperature": "1"}, BAD, "temperature"),
    ({"top_p": 1}, OK, None),
    ({"top_p": 0.5}, OK, None),
    ({"top_p": 0}, BAD, "top_p"),
    ({"top_p": 1.5}, BAD, "top_p"),
    ({"seed": 2**63 - 1}, OK, None),
    ({"seed": -(2**63)}, OK, None),
    ({"seed": 2**63}, BAD, "seed"),
    ({"seed": 1.5}, BAD, "seed"),
    ({"seed": False}, BAD, "seed"),
    ({"n": 1}, OK, None),
    ({"n": 2}, BAD, "n"),
    ({"n": True}, BAD, "n"),
    ({"stop": "\n"}, OK, None),
    ({"stop": []}, OK, None),
    ({"stop": ["a"] * 8}, OK, None),
    ({"stop": ["x" * 256]}, OK, None),
    ({"stop": ["a"] * 9}, BAD, "stop"),
    ({"stop": ["x" * 257]}, BAD, "stop"),
    ({"stop": ""}, BAD, "stop"),
    ({"stop": [""]}, BAD, "stop"),
    ({"stop": 5}, BAD, "stop"),
    ({"stop": ["a", None]}, BAD, "stop"),
    ({"stream": False}, OK, None),
    ({"stream": None}, OK, None),
    ({"stream": "yes"}, BAD, "stream"),
    ({"stream": 1}, BAD, "stream"),
    ({"stream": True, "stream_options": {"include_usage": True}}, OK, None),
    ({"stream_options": {"include_usage": True}}, BAD, "stream_options"),
    ({"stream": True, "stream_options": {"include_usage": "yes"}}, BAD, "stream_options"),
    ({"stream": True, "stream_options": {"other": 1}}, BAD, "stream_options"),
    ({"guided_choice": ["yes", "no"]}, OK, None),
    ({"structured_outputs": {"choice": ["yes", "no"]}}, OK, None),
    ({"guided_choice": ["yes", "no"], "structured_outputs": {"choice": ["yes", "no"]}}, OK, None),
    ({"guided_choice": ["yes"], "structured_outputs": {"choice": ["no"]}}, BAD, "guided_choice"),
    ({"guided_choice": []}, BAD, "guided_choice"),
    ({"guided_choice": ["a", "a"]}, BAD, "guided_choice"),
    ({"guided_choice": [""]}, BAD, "guided_choice"),
    ({"guided_choice": "yes"}, BAD, "guided_choice"),
    ({"guided_choice": ["yes", 3]}, BAD, "guided_choice"),
    ({"guided_choice": [str(i) for i in range(65)]}, BAD, "guided_choice"),
    ({"structured_outputs": {"choice": "a"}}, BAD, "structured_outputs"),
    ({"structured_outputs": {"json": {"type": "object"}}}, BAD, "structured_outputs"),
    ({"structured_outputs": ["a"]}, BAD, "structured_outputs"),
]


@pytest.fixture(scope="module")
def sim() -> Iterator[SimServer]:
    with SimServer(SimConfig(model="sim", seed=3)) as s:
        yield s


@pytest.fixture
async def cascade_client(sim: SimServer) -> AsyncIterator[httpx.AsyncClient]:
    backend = OpenAIBackend(model="sim", base_url=sim.base_url, max_retries=0)
    engine = Cascade(small=backend, large=backend, threshold=0.5)
    app = create_app(engine, ServerConfig(max_tokens_limit=MAX_TOKENS))  # the simulator's limit, to compare
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
        yield client
    await backend.aclose()


def _outcome(r: httpx.Response) -> tuple[bool, str | None]:
    if r.status_code == 200:
        return True, None
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error" and error["message"]
    return False, error["param"]


@pytest.mark.parametrize(("extra", "ok", "param"), TABLE, ids=[json.dumps(row[0])[:60] for row in TABLE])
async def test_the_server_and_the_simulator_accept_and_refuse_the_same_values(
        sim: SimServer, cascade_client: httpx.AsyncClient, extra: dict[str, Any], ok: bool, param: str | None) -> None:
    async with httpx.AsyncClient(timeout=30) as direct:
        simulated = _outcome(await direct.post(sim.base_url + "/chat/completions",
                                               json={"model": "sim", "messages": CHAT, **extra}))
    served = _outcome(await cascade_client.post("/v1/chat/completions",
                                                json={"model": "cascade", "messages": CHAT, **extra}))
    assert simulated[0] == served[0] == ok, (simulated, served)
    if not ok:  # the server names the path ("structured_outputs.choice"), the simulator its top-level field
        assert simulated[1] == param and served[1] is not None and served[1].partition(".")[0] == param


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity"])
async def test_both_refuse_non_finite_numbers(sim: SimServer, cascade_client: httpx.AsyncClient,
                                              literal: str) -> None:
    for path, model, client in (("/chat/completions", "sim", httpx.AsyncClient(base_url=sim.base_url)),
                                ("/v1/chat/completions", "cascade", cascade_client)):
        body = f'{{"model": "{model}", "messages": {json.dumps(CHAT)}, "temperature": {literal}}}'
        r = await client.post(path, content=body, headers={"content-type": "application/json"})
        assert r.status_code == 400 and r.json()["error"]["message"], r.text
        if client is not cascade_client:
            await client.aclose()


def test_the_server_limit_is_validation_context_and_errors_name_the_path() -> None:
    assert validated(ServerFields, {"max_tokens": MAX_TOKENS_LIMIT}).max_tokens == MAX_TOKENS_LIMIT
    with pytest.raises(FieldError) as err:
        validated(ServerFields, {"max_tokens": MAX_TOKENS_LIMIT + 1})
    assert err.value.param == "max_tokens" and str(MAX_TOKENS_LIMIT) in err.value.message
    assert validated(ServerFields, {"max_tokens": 9000}, max_tokens_limit=9000).overrides() == {"max_tokens": 9000}
    for body, param in (({"structured_outputs": {"choice": [1]}}, "structured_outputs.choice"),
                        ({"cascade": {"choices": ["a"], "x": 1}}, "cascade"),
                        ({"cascade": {"choices": "a"}}, "cascade.choices")):
        with pytest.raises(FieldError) as err:
            validated(ServerFields, body)
        assert err.value.param == param


def test_overrides_and_choices_of_a_run_line() -> None:
    fields = validated(RunLineFields, {"max_tokens": 5, "max_completion_tokens": 7, "temperature": 1, "stop": "x",
                                       "choices": ["a", "b"], "guided_choice": ["a", "b"], "answer": "ignored"})
    assert fields.overrides() == {"max_tokens": 7, "temperature": 1.0, "stop": ("x",)}
    assert fields.choices() == ("a", "b")
    with pytest.raises(FieldError) as err:
        validated(RunLineFields, {"choices": ["a"], "structured_outputs": {"choice": ["b"]}}).choices()
    assert err.value.param == "choices" and "structured_outputs.choice" in err.value.message
