"""`cascade serve` end to end: the real server in a subprocess on 127.0.0.1, driven with the openai client.

Two servers: tiny random-weight transformers models (saved to a temp folder) in expert-router mode with
bearer auth, and simulated OpenAI-compatible tiers (SimServer) with slow answers and a tiny queue for
overload, disconnect and shutdown behaviour.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import yaml
from conftest import PATIENCE_S, make_model, make_tokenizer, wait_until

from cascade.simulate import SimConfig, SimServer
from cascade.types import GenerationParams

KEY = "test-secret-key"
CHAT = [{"role": "user", "content": "the movie was good"}]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ServerProcess:
    """``python -m cascade.cli serve --config ...`` in a subprocess, ready once /health answers."""

    def __init__(self, config: Path, log: Path, env: dict[str, str] | None = None, args: tuple[str, ...] = ()) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        full_env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", **(env or {})}
        self._out = log.open("w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "cascade.cli", "serve", "--config", str(config), "--port", str(self.port), *args],
            env=full_env, stdout=self._out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{log.read_text()}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"server did not become healthy:\n{log.read_text()}")

    def stop(self, timeout: float = 30) -> int:
        """SIGTERM, wait; returns the exit status (uvicorn re-raises SIGTERM after a graceful shutdown)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._out.close()
        return int(self.proc.returncode)

    def stopped_cleanly(self) -> bool:
        """Stop; True when the exit was graceful (SIGTERM re-raised after shutdown, no traceback)."""
        code = self.stop()
        return code in (0, -signal.SIGTERM) and "Traceback" not in self.log.read_text()


def write_yaml(path: Path, data: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture(scope="module")
def tiny_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """Tiny models in expert-router mode (2 clusters; cluster 1 always escalates), auth on."""
    from cascade.backends.hf_local import HFLocalBackend
    from cascade.router import HiddenStateEmbedder, fit_router

    root = tmp_path_factory.mktemp("tiny")
    for seed, name in ((0, "small"), (1, "large")):
        make_model(seed).save_pretrained(root / name)
        make_tokenizer().save_pretrained(root / name)
    small = HFLocalBackend.from_pretrained(str(root / "small"))
    prompts = ["the movie was good", "a bad movie", "what is the capital of france", "answer yes or no",
               "one two three", "it is great"]
    router = fit_router(HiddenStateEmbedder.from_backend(small), prompts, 2, seed=0).save(root / "router.json")
    config = write_yaml(root / "config.yaml", {
        "tiers": [{"name": "small", "backend": {"kind": "hf", "model": str(root / "small")}},
                  {"name": "large", "backend": {"kind": "hf", "model": str(root / "large")},
                   "price_output_per_mtok": 1.0}],
        "thresholds": [0.5], "max_tokens": 6, "router": str(router),
        "extra": {"experts": {"1": {"thresholds": [-math.inf]}},
                  "server": {"api_key_env": "CASCADE_TEST_KEY", "model_name": "tiny-cascade"}},
    })
    server = ServerProcess(config, root / "server.log", {"CASCADE_TEST_KEY": KEY})
    yield server
    assert server.stopped_cleanly(), server.log.read_text()


@pytest.fixture(scope="module")
def sim_tiers() -> Iterator[tuple[SimServer, SimServer]]:
    with SimServer(SimConfig(model="sim-small", latency_per_request_s=0.3)) as small, \
            SimServer(SimConfig(model="sim-large", latency_per_request_s=0.3)) as large:
        yield small, large


def sim_config(path: Path, small: SimServer, large: SimServer, tier_timeout_s: float = 30, **server: Any) -> Path:
    tier = {"kind": "openai", "max_retries": 0, "timeout_s": tier_timeout_s}
    return write_yaml(path, {
        "tiers": [{"name": "small", "backend": {**tier, "model": "sim-small", "base_url": small.base_url}},
                  {"name": "large", "backend": {**tier, "model": "sim-large", "base_url": large.base_url}}],
        "thresholds": [0.5], "max_tokens": 8,
        "extra": {"server": {"max_in_flight": 1, "max_queue": 1, "drain_timeout_s": 10, **server}},
    })


@pytest.fixture
def client(tiny_server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=tiny_server.url + "/v1", api_key=KEY, max_retries=0)


def test_chat_answer_is_openai_shaped_with_the_decision(client: openai.OpenAI) -> None:
    raw = client.chat.completions.with_raw_response.create(model="tiny-cascade", messages=CHAT)  # type: ignore[arg-type]
    done = raw.parse()
    assert done.object == "chat.completion" and done.model == "tiny-cascade"
    assert isinstance(done.choices[0].message.content, str) and done.choices[0].finish_reason in ("stop", "length")
    assert done.usage is not None and done.usage.total_tokens == done.usage.prompt_tokens + done.usage.completion_tokens
    assert done.usage.prompt_tokens > 0
    decision = (done.model_extra or {})["cascade"]
    assert decision["tier"] in ("small", "large") and decision["measure"] == "margin_first"
    assert decision["cluster"] in (0, 1)
    assert decision["escalated"] == (decision["tier"] == "large")
    if decision["cluster"] == 1:
        assert decision["escalated"] and decision["threshold"] is None  # -inf: always escalate
    assert raw.headers["x-cascade-tier"] == decision["tier"]
    assert raw.headers["x-cascade-cluster"] == str(decision["cluster"])
    assert raw.headers["x-cascade-escalated"] == str(decision["escalated"]).lower()


def test_vllm_clients_choice_fields_work_unchanged(client: openai.OpenAI) -> None:
    """An openai client sending vLLM's structured-output fields over real HTTP, in expert-router mode."""
    for extra in ({"guided_choice": ["yes", "no"]}, {"structured_outputs": {"choice": ["yes", "no"]}}):
        done = client.chat.completions.create(model="tiny-cascade", messages=CHAT, extra_body=extra)  # type: ignore[arg-type]
        assert done.choices[0].message.content in ("yes", "no")
        assert (done.model_extra or {})["cascade"]["cluster"] in (0, 1)


def test_a_loopback_server_refuses_foreign_hosts_origins_and_non_json(tiny_server: ServerProcess) -> None:
    """DNS rebinding (a foreign Host), a cross-site page (a foreign Origin, a text/plain body) get 4xx."""
    url, auth = tiny_server.url + "/v1/chat/completions", {"Authorization": f"Bearer {KEY}"}
    body = json.dumps({"model": "tiny-cascade", "messages": CHAT})
    as_json = {**auth, "Content-Type": "application/json"}
    assert httpx.post(url, content=body, headers={**as_json, "Host": "attacker.example"}).status_code == 421
    assert httpx.post(url, content=body, headers={**as_json, "Origin": "http://attacker.example"}).status_code == 403
    assert httpx.post(url, content=body, headers={**auth, "Content-Type": "text/plain"}).status_code == 415
    local = {**as_json, "Host": f"localhost:{tiny_server.port}"}
    assert httpx.post(url, content=body, headers=local).status_code == 200


def test_completions_with_several_prompts(client: openai.OpenAI) -> None:
    done = client.completions.create(model="tiny-cascade", prompt=["a bad movie", "answer yes or no"], max_tokens=4)
    assert [c.index for c in done.choices] == [0, 1]
    assert done.object == "text_completion"
    assert len((done.model_extra or {})["cascade"]) == 2


def test_streaming_matches_the_plain_answer(client: openai.OpenAI, tiny_server: ServerProcess) -> None:
    plain = client.chat.completions.create(model="tiny-cascade", messages=CHAT)  # type: ignore[arg-type]
    chunks = list(client.chat.completions.create(model="tiny-cascade", messages=CHAT, stream=True,  # type: ignore[arg-type]
                                                 stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == plain.choices[0].message.content
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finals) == 1 and finals[0].choices[0].finish_reason == plain.choices[0].finish_reason
    assert (finals[0].model_extra or {})["cascade"]["tier"] == (plain.model_extra or {})["cascade"]["tier"]
    assert chunks[-1].usage is not None and chunks[-1].usage.total_tokens == plain.usage.total_tokens  # type: ignore[union-attr]
    body = {"model": "tiny-cascade", "prompt": "it is great", "stream": True}
    raw = httpx.post(tiny_server.url + "/v1/completions", json=body, headers={"Authorization": f"Bearer {KEY}"})
    assert raw.headers["content-type"].startswith("text/event-stream")
    events = [line for line in raw.text.split("\n\n") if line]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"


def test_client_mistakes_are_4xx_json(client: openai.OpenAI, tiny_server: ServerProcess) -> None:
    auth = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    for body in (b"{not json", b"[]", b'{"model": "tiny-cascade"}', b"\xff\xfe\x00"):
        r = httpx.post(tiny_server.url + "/v1/chat/completions", content=body, headers=auth)
        assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="tiny-cascade", messages=CHAT, temperature=5)  # type: ignore[arg-type]
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="tiny-cascade", messages=[])
    with pytest.raises(openai.BadRequestError):  # per-request targets need a calibration artifact
        client.chat.completions.create(model="tiny-cascade", messages=CHAT,  # type: ignore[arg-type]
                                       extra_body={"cascade": {"target": {"max_large_share": 0.3}}})
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4", messages=CHAT)  # type: ignore[arg-type]
    big = httpx.post(tiny_server.url + "/v1/completions", headers=auth,
                     json={"model": "tiny-cascade", "prompt": "x" * 2_000_000})
    assert big.status_code == 413
    for body in (b'{"model": "tiny-cascade", "prompt": "hi \\ud800 there"}',  # a lone surrogate escape
                 b'{"model": "tiny-cascade", "prompt": "hi", "\\udc00": 1}',  # ... as a field name
                 b'{"model": "tiny-cascade", "prompt": "hi", "stop": "\\ud800"}',
                 b'{"model": "tiny-cascade", "prompt": "hi", "seed": 18446744073709551615}'):  # beyond int64
        r = httpx.post(tiny_server.url + "/v1/completions", content=body, headers=auth)
        assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error", r.text
    assert httpx.get(tiny_server.url + "/v1/nothing", headers=auth).status_code == 404


def test_a_bad_request_in_a_micro_batch_fails_alone(tiny_server: ServerProcess) -> None:
    auth = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    good = json.dumps({"model": "tiny-cascade", "prompt": "the movie was good", "max_tokens": 3}).encode()
    bad = b'{"model": "tiny-cascade", "prompt": "hi \\ud800 there", "max_tokens": 3}'
    statuses: dict[int, int] = {}

    def hit(i: int) -> None:
        statuses[i] = httpx.post(tiny_server.url + "/v1/completions", content=bad if i == 3 else good,
                                 headers=auth, timeout=60).status_code

    threads = [threading.Thread(target=hit, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert statuses == {i: 400 if i == 3 else 200 for i in range(8)}


def test_auth_is_required_except_for_health(tiny_server: ServerProcess) -> None:
    anon = openai.OpenAI(base_url=tiny_server.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        anon.chat.completions.create(model="tiny-cascade", messages=CHAT)  # type: ignore[arg-type]
    assert httpx.get(tiny_server.url + "/v1/models").status_code == 401
    assert httpx.get(tiny_server.url + "/health").json()["status"] == "ok"


def test_models_and_metrics(client: openai.OpenAI, tiny_server: ServerProcess) -> None:
    assert [m.id for m in client.models.list()] == ["tiny-cascade"]
    client.chat.completions.create(model="tiny-cascade", messages=CHAT)  # type: ignore[arg-type]
    text = httpx.get(tiny_server.url + "/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
    assert 'cascade_requests_total{endpoint="chat",status="200",tier=' in text
    for name in ("cascade_escalations_total", "cascade_tokens_total", "cascade_cost_total",
                 "cascade_request_latency_seconds_bucket", "cascade_queue_depth", "cascade_in_flight_requests"):
        assert name in text


def test_full_queue_gets_429_with_retry_after(tmp_path: Path, sim_tiers: tuple[SimServer, SimServer]) -> None:
    server = ServerProcess(sim_config(tmp_path / "sim.yaml", *sim_tiers), tmp_path / "log.txt")
    try:
        statuses: list[int] = []
        retry_after: list[str | None] = []

        def hit(stream: bool) -> None:
            r = httpx.post(server.url + "/v1/chat/completions",
                           json={"model": "cascade", "messages": CHAT, "stream": stream}, timeout=30)
            statuses.append(r.status_code)
            retry_after.append(r.headers.get("retry-after"))

        threads = [threading.Thread(target=hit, args=(i % 2 == 0,)) for i in range(6)]  # streams get 429 too
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert statuses.count(200) >= 2 and statuses.count(429) >= 1, statuses
        assert all(ra is not None and int(ra) >= 1 for s, ra in zip(statuses, retry_after) if s == 429)
        assert httpx.get(server.url + "/health").status_code == 200
    finally:
        assert server.stopped_cleanly(), server.log.read_text()


ESCALATES = {"model": "cascade", "messages": [{"role": "user", "content": "[[sim:confidence=0.0]] hi"}]}


def test_disconnect_cancels_work(tmp_path: Path, sim_tiers: tuple[SimServer, SimServer]) -> None:
    small, _large = sim_tiers
    with SimServer(SimConfig(model="sim-large", latency_per_request_s=600.0)) as never:  # never answers in time
        server = ServerProcess(sim_config(tmp_path / "sim.yaml", small, never, tier_timeout_s=600, max_in_flight=4),
                               tmp_path / "log.txt")
        with contextlib.suppress(httpx.ReadTimeout):  # the client gives up while the large tier works
            httpx.post(server.url + "/v1/chat/completions", json=ESCALATES, timeout=1.5)
        # only a cancellation ends this request early (counted as 499): its large tier would take 10 minutes
        cancelled = 'cascade_requests_total{endpoint="chat",status="499",tier="none"} 1'
        wait_until(lambda: cancelled in httpx.get(server.url + "/metrics", timeout=PATIENCE_S).text,
                   "the abandoned request cancelled")
        assert server_in_flight(server) == 0
        assert server.stopped_cleanly(), server.log.read_text()


def test_shutdown_drains(tmp_path: Path, sim_tiers: tuple[SimServer, SimServer]) -> None:
    small, _large = sim_tiers
    with SimServer(SimConfig(model="sim-large", latency_per_request_s=2.0)) as slow:
        # the drain may take as long as the request needs (its first scoring imports torch: seconds under load)
        server = ServerProcess(sim_config(tmp_path / "sim.yaml", small, slow, max_in_flight=4,
                                          drain_timeout_s=PATIENCE_S), tmp_path / "log.txt")
        # graceful shutdown: a request in flight when SIGTERM arrives still gets its answer
        result: dict[str, Any] = {}
        t = threading.Thread(target=lambda: result.update(r=httpx.post(
            server.url + "/v1/chat/completions", json=ESCALATES, timeout=PATIENCE_S)))
        t.start()
        wait_until(lambda: server_in_flight(server) == 1, "the request in flight")
        server.proc.send_signal(signal.SIGTERM)
        t.join()
        assert result["r"].status_code == 200 and result["r"].json()["cascade"]["tier"] == "large"
        assert server.stopped_cleanly(), server.log.read_text()


def test_requests_still_running_past_the_drain_deadline_get_a_json_503(
        tmp_path: Path, sim_tiers: tuple[SimServer, SimServer]) -> None:
    small, _large = sim_tiers
    with SimServer(SimConfig(model="sim-large", latency_per_request_s=600.0)) as never:  # never answers in time
        server = ServerProcess(sim_config(tmp_path / "sim.yaml", small, never, tier_timeout_s=600, max_in_flight=4,
                                          drain_timeout_s=1), tmp_path / "log.txt")
        results: list[httpx.Response] = []
        threads = [threading.Thread(target=lambda: results.append(httpx.post(
            server.url + "/v1/chat/completions", json=ESCALATES, timeout=PATIENCE_S))) for _ in range(3)]
        for t in threads:
            t.start()
        wait_until(lambda: server_in_flight(server) == 3, "three requests in flight")
        server.proc.send_signal(signal.SIGTERM)
        for t in threads:
            t.join()
        assert [r.status_code for r in results] == [503, 503, 503]
        assert all(r.json()["error"]["code"] == "shutting_down" for r in results)
        assert server.stopped_cleanly(), server.log.read_text()  # no traceback
        assert server.log.read_text().count("still running: answering them 503") == 1


def server_in_flight(server: ServerProcess) -> int:
    # a generous timeout: the server's first scoring imports torch, which can hold its loop for seconds
    return int(httpx.get(server.url + "/health", timeout=PATIENCE_S).json()["in_flight"])


def test_server_config_is_validated(tmp_path: Path) -> None:
    from cascade.cli import main
    from cascade.errors import ConfigError
    from cascade.server import ServerConfig

    with pytest.raises(ConfigError):
        ServerConfig.from_mapping({"max_in_flight": 0})
    with pytest.raises(ConfigError):
        ServerConfig.from_mapping({"bogus": 1})
    assert ServerConfig.from_mapping(None) == ServerConfig()
    cfg = write_yaml(tmp_path / "c.yaml", {"thresholds": [0.5],
                                           "extra": {"server": {"api_key_env": "CASCADE_UNSET_KEY_VAR"}}})
    os.environ.pop("CASCADE_UNSET_KEY_VAR", None)
    assert main(["serve", "--config", str(cfg), "--port", "0"]) == 2  # refused before loading any model


async def test_per_request_target_picks_thresholds_from_the_artifact_curve() -> None:
    from cascade.artifact import Artifact
    from cascade.curve import Curve
    from cascade.engine import Cascade
    from cascade.policy import Policy
    from cascade.server import create_app
    from cascade.types import Generation

    class Fixed:
        def __init__(self, name: str) -> None:
            self.name = name

        async def generate(self, prompts: Any, params: Any, *, scores: bool = True,
                           early_exit: Any = None) -> list[Generation]:
            return [Generation(text=self.name, model=self.name, scores={"margin_first": 0.25}) for _ in prompts]

        async def aclose(self) -> None:
            return None

    curve = Curve("sweep", ((math.inf,), (0.5,), (-math.inf,)), (0.0, 0.5, 1.0), (0.7, 0.8, 0.9), (0.1, 0.5, 1.0),
                  0.9)
    artifact = Artifact(("s", "l"), "margin_first", (0.5,), "budget", {"max_large_share": 0.5}, "0" * 64, 100, True,
                        "test", curve=curve)
    engine = Cascade(small=Fixed("s"), large=Fixed("l"), policy=Policy.from_artifact(artifact, models=("s", "l")))
    app = create_app(engine)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
        got = {}
        for share in (0.0, 1.0):
            body = {"model": "cascade", "messages": CHAT, "cascade": {"target": {"max_large_share": share}}}
            r = await client.post("/v1/chat/completions", json=body)
            assert r.status_code == 200, r.text
            got[share] = r.json()["cascade"]
            assert r.headers["x-cascade-target"] == f"max_large_share={share:g}"
        assert got[0.0]["tier"] == "small" and got[0.0]["threshold"] is None  # inf: never escalate
        assert got[1.0]["tier"] == "large" and got[1.0]["escalated"]
        plain = (await client.post("/v1/chat/completions", json={"model": "cascade", "messages": CHAT})).json()
        assert plain["cascade"]["threshold"] == 0.5 and plain["cascade"]["target"] is None
        body = {"model": "cascade", "messages": CHAT, "cascade": {"target": {"max_large_share": 7}}}
        bad = await client.post("/v1/chat/completions", json=body)
        assert bad.status_code == 400


async def test_live_token_stream_from_the_engine() -> None:
    from conftest import make_backend

    from cascade.engine import Cascade
    from cascade.server import create_app

    small, large = make_backend(0), make_backend(1)
    engine = Cascade(small=small, large=large, threshold=2.0, params=GenerationParams(max_tokens=12))  # never escalates
    app = create_app(engine)
    body = {"model": "cascade", "messages": [{"role": "user", "content": "is it good"}]}  # a six-word answer
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
        plain = (await client.post("/v1/chat/completions", json=body)).json()
        r = await client.post("/v1/chat/completions", json={**body, "stream": True})
    assert r.headers["x-cascade-tier"] == "small"
    events = [e.removeprefix("data: ") for e in r.text.split("\n\n") if e]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    pieces = [c["choices"][0]["delta"].get("content") for c in chunks if c["choices"][0]["delta"].get("content")]
    assert len(pieces) > 1  # token by token, not one piece
    assert "".join(pieces) == plain["choices"][0]["message"]["content"]
    assert chunks[-1]["cascade"]["tier"] == "small" and chunks[-1]["choices"][0]["finish_reason"] == "length"


class SlowStreamer:
    """A real streaming backend: its first word at once, each next one only when ``more`` is set (the test never
    sets it, so only closing the stream ends it); records whether its stream was closed early."""

    def __init__(self, name: str) -> None:
        self.name, self.closed_early, self.words_sent = name, False, 0
        self.more = asyncio.Event()

    async def generate(self, prompts: Any, params: Any, *, scores: bool = True, early_exit: Any = None) -> Any:
        from cascade.types import Generation

        return [Generation(text="w " * 100, model=self.name, scores={"margin_first": 0.1}) for _ in prompts]

    async def stream(self, prompt: Any, params: Any, *, scores: bool = True, early_exit: Any = None) -> Any:
        from cascade.types import Generation, StreamEvent

        finished = False
        try:
            yield StreamEvent("first", scores={"margin_first": 0.1})
            for _ in range(100):
                if self.words_sent:
                    await self.more.wait()
                self.words_sent += 1
                yield StreamEvent("delta", text="w ")
            finished = True
            yield StreamEvent("done", generation=Generation(text="w " * 100, model=self.name))
        finally:
            self.closed_early = not finished

    async def aclose(self) -> None:
        return None


async def test_client_leaving_mid_stream_stops_generation_and_frees_the_slot() -> None:
    from cascade.engine import Cascade
    from cascade.server import create_app

    small = SlowStreamer("slow")
    app = create_app(Cascade(small=small, large=SlowStreamer("big"), threshold=0.5))
    service = app.state.service
    body = json.dumps({"model": "cascade", "messages": CHAT, "stream": True}).encode()
    leave = asyncio.Event()
    sent: list[dict[str, Any]] = []
    requested = False

    async def receive() -> dict[str, Any]:
        nonlocal requested
        if not requested:
            requested = True
            return {"type": "http.request", "body": body, "more_body": False}
        await leave.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)
        if message["type"] == "http.response.body" and b"w " in message.get("body", b""):
            leave.set()  # the client goes away after its first words

    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
             "method": "POST", "path": "/v1/chat/completions", "raw_path": b"/v1/chat/completions",
             "query_string": b"", "headers": [(b"content-type", b"application/json")], "scheme": "http",
             "server": ("127.0.0.1", 8000), "client": ("127.0.0.1", 5000), "root_path": "", "app": app}
    await asyncio.wait_for(app(scope, receive, send), PATIENCE_S)  # ends only if the server closes the stream
    assert sent[0]["status"] == 200
    assert small.closed_early and small.words_sent < 20
    assert service.admission.running == 0 and service.admission.waiting == 0
    assert 'status="499"' in service.metrics.render(0, 0)
