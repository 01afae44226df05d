"""Property-based fuzzing of the server: malformed bodies, parameters, headers, paths and methods.

Thousands of requests go through the real app in-process (httpx.ASGITransport); a smaller run goes to the
real server in a subprocess. Every malformed request must get a 4xx with an OpenAI-style JSON error, no
request may get a 5xx, and the server must still answer a valid request afterwards.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cascade.engine import Cascade
from cascade.server import ServerConfig, create_app
from cascade.simulate import SimConfig, SimServer
from cascade.types import EarlyExit, Generation, GenerationParams, Prompt

KEY = "fuzz-key"
VALID = {"model": "cascade", "messages": [{"role": "user", "content": "hello"}]}
FUZZ = settings(deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)


class InstantBackend:
    """A real backend that answers at once (so valid requests found by the fuzzer cost nothing)."""

    def __init__(self, name: str) -> None:
        self.name = name

    async def generate(self, prompts: Sequence[Prompt], params: GenerationParams, *, scores: bool = True,
                       early_exit: EarlyExit | None = None) -> list[Generation]:
        return [Generation(text="ok", model=self.name, prompt_tokens=3, completion_tokens=1,
                           scores={"margin_first": 0.25}) for _ in prompts]

    async def aclose(self) -> None:
        return None


class InProcess:
    """The app and an httpx client on one event loop kept across hypothesis examples."""

    def __init__(self, auth: bool) -> None:
        self.loop = asyncio.new_event_loop()
        engine = Cascade(small=InstantBackend("s"), large=InstantBackend("l"), threshold=0.5)
        config = ServerConfig(api_key_env="CASCADE_FUZZ_KEY" if auth else None, max_body_bytes=20_000)
        self.app = create_app(engine, config)
        self.client = httpx.AsyncClient(transport=httpx.ASGITransport(app=self.app), base_url="http://fuzz")

    def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        return self.loop.run_until_complete(self.client.request(method, path, **kwargs))

    def close(self) -> None:
        self.loop.run_until_complete(self.client.aclose())
        self.loop.close()


@pytest.fixture(scope="module")
def app() -> Iterator[InProcess]:
    it = InProcess(auth=False)
    yield it
    it.close()


@pytest.fixture(scope="module")
def auth_app() -> Iterator[InProcess]:
    os.environ["CASCADE_FUZZ_KEY"] = KEY
    try:
        it = InProcess(auth=True)
    finally:
        del os.environ["CASCADE_FUZZ_KEY"]
    yield it
    it.close()


def assert_json_error(r: httpx.Response, low: int = 400, high: int = 499) -> None:
    assert low <= r.status_code <= high, (r.status_code, r.text[:300])
    body = r.json()
    assert set(body) == {"error"} and isinstance(body["error"]["message"], str)
    assert isinstance(body["error"]["type"], str)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4),
    max_leaves=12,
)
FIELDS = ["model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "stop", "seed", "n",
          "stream", "stream_options", "logprobs", "top_logprobs", "presence_penalty", "logit_bias", "user",
          "cascade", "tools", "response_format", "prompt", "echo"]


def _is_valid_value(field: str, value: Any) -> bool:
    """Values a mutated field may legitimately take (the request then succeeds with 200)."""
    num = isinstance(value, (int, float)) and not isinstance(value, bool)
    if value is None:
        return field not in ("model", "messages")
    return {
        "max_tokens": isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= 4096,
        "max_completion_tokens": isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= 4096,
        "temperature": num and 0 <= value <= 2,
        "top_p": num and 0 < value <= 1,
        "presence_penalty": num and value == 0,
        "seed": isinstance(value, int) and not isinstance(value, bool) and -(2**63) <= value < 2**64,
        "n": value == 1 and not isinstance(value, bool) and isinstance(value, int),
        "stream": isinstance(value, bool),
        "logprobs": value is False or (type(value) is int and value == 0),
        "echo": value is False or (type(value) is int and value == 0),
        "logit_bias": value == {},
        "user": isinstance(value, str),
        "cascade": value == {},
        "stop": (isinstance(value, str) and 0 < len(value) <= 256)
        or (isinstance(value, list) and len(value) <= 8
            and all(isinstance(s, str) and 0 < len(s) <= 256 for s in value)),
    }.get(field, False)


@settings(FUZZ, max_examples=800)
@given(body=st.binary(max_size=300))
def test_random_bytes_bodies_get_400(app: InProcess, body: bytes) -> None:
    try:
        parsed = json.loads(body)
    except ValueError:
        parsed = None
    if parsed == VALID:
        return
    r = app.request("POST", "/v1/chat/completions", content=body, headers={"content-type": "application/json"})
    assert_json_error(r)


@settings(FUZZ, max_examples=800)
@given(body=json_values, path=st.sampled_from(["/v1/chat/completions", "/v1/completions"]))
def test_random_json_bodies_get_4xx(app: InProcess, body: Any, path: str) -> None:
    r = app.request("POST", path, json=body)
    assert_json_error(r)


@settings(FUZZ, max_examples=1200)
@given(field=st.sampled_from(FIELDS), value=json_values, kind=st.sampled_from(["chat", "completions"]))
def test_mutated_fields_are_400_or_answered(app: InProcess, field: str, value: Any, kind: str) -> None:
    body: dict[str, Any] = dict(VALID) if kind == "chat" else {"model": "cascade", "prompt": "hello"}
    body[field] = value
    r = app.request("POST", f"/v1/{'chat/completions' if kind == 'chat' else 'completions'}", json=body)
    assert r.status_code < 500, r.text[:300]
    if r.status_code == 200:
        assert _is_valid_value(field, value) or (field == "prompt" and kind == "completions") or \
            (field == "model" and value == "cascade") or (field == "messages" and kind == "chat"), (field, value)
    else:
        assert_json_error(r)


message = st.fixed_dictionaries(
    {"role": st.sampled_from(["user", "system", "assistant", "bot", "", "USER"]) | json_values,
     "content": st.text(max_size=20) | json_values
     | st.lists(st.fixed_dictionaries({"type": st.sampled_from(["text", "image_url"]), "text": json_values}),
                max_size=2)},
    optional={"name": json_values, "tool_calls": json_values})


def _valid_message(m: dict[str, Any]) -> bool:
    content = m["content"]
    text_parts = isinstance(content, list) and bool(content) and all(
        p["type"] == "text" and isinstance(p["text"], str) for p in content)
    return (m["role"] in ("user", "system", "assistant") and "tool_calls" not in m
            and isinstance(m.get("name", ""), str) and (isinstance(content, str) or text_parts))


@settings(FUZZ, max_examples=600)
@given(messages=st.lists(message, max_size=3))
def test_fuzzed_messages_are_400_unless_well_formed(app: InProcess, messages: list[dict[str, Any]]) -> None:
    r = app.request("POST", "/v1/chat/completions", json={"model": "cascade", "messages": messages})
    if r.status_code == 200:
        assert messages and all(_valid_message(m) for m in messages)
    else:
        assert_json_error(r)
        assert r.status_code == 400


@settings(FUZZ, max_examples=400)
@given(method=st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH"]),
       path=st.text(alphabet="abcdefv1/._-%", max_size=30))
def test_unknown_routes_and_methods_get_json_4xx(app: InProcess, method: str, path: str) -> None:
    known = {("POST", "/v1/chat/completions"), ("POST", "/v1/completions"), ("GET", "/v1/models"),
             ("GET", "/health"), ("GET", "/metrics")}
    url = "/" + path.lstrip("/")
    if (method, url) in known or (method == "GET" and url.startswith("/v1/models/")):
        return
    r = app.request(method, url, content=b"{}")
    assert_json_error(r)


header_text = st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=60)


@settings(FUZZ, max_examples=600)
@given(auth=st.one_of(st.none(), header_text, header_text.map(lambda t: "Bearer " + t)),
       content_type=st.one_of(st.none(), header_text), extra=st.dictionaries(
           st.text(alphabet="abcdefghijklmnopqrstuvwxyz-", min_size=1, max_size=12), header_text, max_size=3))
def test_random_headers_without_the_key_get_401(auth_app: InProcess, auth: str | None, content_type: str | None,
                                                 extra: dict[str, str]) -> None:
    headers = {k: v for k, v in extra.items() if k not in ("authorization", "content-length", "host",
                                                            "transfer-encoding")}
    if content_type is not None:
        headers["content-type"] = content_type
    if auth is not None:
        headers["authorization"] = auth
    r = auth_app.request("POST", "/v1/chat/completions", json=VALID, headers=headers)
    if auth is not None and auth.partition(" ")[0].lower() == "bearer" and auth.partition(" ")[2].strip() == KEY:
        assert r.status_code == 200
    else:
        assert r.status_code == 401
        assert_json_error(r)


def test_still_healthy_after_fuzzing(app: InProcess, auth_app: InProcess) -> None:
    assert app.request("GET", "/health").json()["status"] == "ok"
    r = app.request("POST", "/v1/chat/completions", json=VALID)
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == "ok"
    r = auth_app.request("POST", "/v1/chat/completions", json=VALID, headers={"authorization": f"Bearer {KEY}"})
    assert r.status_code == 200
    metrics = app.request("GET", "/metrics").text
    assert 'status="400"' in metrics and 'status="500"' not in metrics


def test_real_server_survives_malformed_requests(tmp_path: Path) -> None:
    from test_server import ServerProcess, sim_config

    with SimServer(SimConfig(model="sim-small")) as small, SimServer(SimConfig(model="sim-large")) as large:
        server = ServerProcess(sim_config(tmp_path / "c.yaml", small, large, max_in_flight=8, max_queue=64,
                                          max_body_bytes=20_000), tmp_path / "log.txt")
        try:
            with httpx.Client(base_url=server.url, timeout=10) as client:
                count = [0]

                @settings(FUZZ, max_examples=150)
                @given(body=st.one_of(st.binary(max_size=200), json_values.map(lambda v: json.dumps(v).encode())),
                       path=st.sampled_from(["/v1/chat/completions", "/v1/completions"]))
                def fuzz(body: bytes, path: str) -> None:
                    count[0] += 1
                    assert_json_error(client.post(path, content=body))

                fuzz()
                assert count[0] >= 100
                assert client.get("/health").json()["status"] == "ok"
                ok = client.post("/v1/chat/completions", json=VALID)
                assert ok.status_code == 200 and ok.json()["cascade"]["tier"] in ("small", "large")
        finally:
            assert server.stopped_cleanly(), server.log.read_text()
