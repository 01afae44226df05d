"""The simulated OpenAI-compatible server, exercised over real loopback HTTP (httpx and the openai client)."""

from __future__ import annotations

import asyncio
import json
import math
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
from conftest import PATIENCE_S, until

import cascade.simulate as sim
from cascade.errors import ConfigError
from cascade.simulate import SimConfig, SimServer, simulate_answer

MODEL = "sim-model"
CHAT = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def server() -> Iterator[SimServer]:
    with SimServer(SimConfig(model=MODEL, seed=7)) as s:
        yield s


def test_all_is_honest() -> None:
    for name in sim.__all__:
        assert hasattr(sim, name), name


# -- the model ---------------------------------------------------------------------------------------


def test_answers_are_deterministic_per_seed_and_prompt() -> None:
    cfg = SimConfig(seed=3)
    a, b = simulate_answer(cfg, "hello", 64), simulate_answer(cfg, "hello", 64)
    assert a == b
    assert simulate_answer(SimConfig(seed=4), "hello", 64) != a
    confidences = {simulate_answer(cfg, f"prompt {i}", 8).confidence for i in range(20)}
    assert len(confidences) == 20  # the confidence varies by prompt
    for step, chosen, lp in zip(a.top, a.tokens, a.logprobs, strict=True):
        values = [v for _, v in step]
        assert len(step) == 20 and len({t for t, _ in step}) == 20  # distinct alternatives
        assert values == sorted(values, reverse=True) and step[0] == (chosen, lp)  # greedy decoding
        assert sum(math.exp(v) for v in values) < 1.0  # the rest of the vocabulary keeps some mass
    assert a.text == "".join(a.tokens)


def test_the_fast_sample_draws_what_random_sample_draws() -> None:
    import random

    from cascade.simulate.model import _sample, _vocabulary

    for population in (_vocabulary(), tuple("abcdefghij")):  # the set path, and the pool path it hands over
        for seed in range(200):
            a, b = random.Random(seed), random.Random(seed)
            assert [_sample(a, population, 8) for _ in range(5)] == [b.sample(population, 8) for _ in range(5)]
            assert a.random() == b.random()  # the generator is left in the same state


def test_an_answer_computed_step_by_step_is_the_whole_answer() -> None:
    from cascade.simulate.model import AnswerSteps

    for i, max_tokens in enumerate((1, 5, 16, 200)):
        cfg = SimConfig(seed=i, max_answer_tokens=[48, 8][i % 2])
        whole, steps = simulate_answer(cfg, f"prompt {i}", max_tokens), AnswerSteps(cfg, f"prompt {i}", max_tokens)
        steps.ensure(0)
        assert len(steps.tokens) == 1 and steps.tokens[0] == whole.tokens[0]  # one step asked for, one made
        steps.ensure(10**6)
        made = (tuple(steps.tokens), tuple(steps.logprobs), tuple(steps.top))
        assert made == (whole.tokens, whole.logprobs, whole.top)
        assert (steps.length, steps.finish_reason, steps.confidence) == (len(whole.tokens), whole.finish_reason,
                                                                         whole.confidence)


def test_streamed_chat_events_are_the_json_of_openai_chunks() -> None:
    from cascade.simulate.formats import StreamEvents
    from cascade.simulate.request import parse

    cfg = SimConfig(model=MODEL)
    body = {"model": MODEL, "messages": [{"role": "user", "content": "caf\u00e9 \"quoted\""}], "max_tokens": 9,
            "stream": True, "logprobs": True, "top_logprobs": 4}
    req = parse(body, True, cfg)
    answer = simulate_answer(cfg, req.keys[0], 9)
    events = StreamEvents(req, [answer], cfg)
    for t in range(events.steps):
        (event,) = events.step(t)
        head = json.loads(event[len(b"data: "):])
        token = answer.tokens[t]
        expected = {"id": head["id"], "created": head["created"], "model": MODEL, "object": "chat.completion.chunk",
                    "choices": [{"index": 0, "delta": {"content": token}, "logprobs": {"content": [{
                        "token": token, "logprob": answer.logprobs[t], "bytes": list(token.encode()),
                        "top_logprobs": [{"token": w, "logprob": v, "bytes": list(w.encode())}
                                         for w, v in answer.top[t][:4]]}]}, "finish_reason": None}]}
        assert event == b"data: " + json.dumps(expected).encode() + b"\n\n"  # the bytes json.dumps writes


def test_confidence_marker_sets_how_peaked_the_answer_is() -> None:
    cfg = SimConfig()

    def mean_margin(conf: float) -> float:
        ans = simulate_answer(cfg, f"question [[sim:confidence={conf}]]", 32)
        assert ans.confidence == conf
        return sum(math.exp(s[0][1]) - math.exp(s[1][1]) for s in ans.top) / len(ans.top)

    margins = [mean_margin(c) for c in (0.0, 0.3, 0.6, 1.0)]
    assert margins == sorted(margins) and margins[0] < 0.1 and margins[-1] > 0.9


def test_max_tokens_and_stop_are_respected() -> None:
    cfg = SimConfig(max_answer_tokens=40)
    full = simulate_answer(cfg, "tell me", 1000)
    assert full.finish_reason == "stop" and 10 <= len(full.tokens) <= 40
    cut = simulate_answer(cfg, "tell me", 3)
    assert cut.tokens == full.tokens[:3] and cut.finish_reason == "length"
    stopped = simulate_answer(cfg, "tell me", 1000, stop=(full.tokens[4],))
    assert stopped.tokens == full.tokens[:4] and stopped.finish_reason == "stop"
    assert simulate_answer(cfg, "tell me", 1000, stop=(full.tokens[0],)).tokens == ()


def test_config_is_validated() -> None:
    for bad in ({"error_rate": 1.5}, {"timeout_rate": -0.1}, {"latency_per_token_s": -1.0},
                {"hang_s": 0.0}, {"hang_s": 1e9}, {"model": " "}, {"max_answer_tokens": 0}):
        with pytest.raises(ConfigError):
            SimConfig(**bad)  # type: ignore[arg-type]


def test_binds_loopback_only() -> None:
    for host in ("0.0.0.0", "192.168.1.10", "example.com", "::"):
        with pytest.raises(ConfigError, match="loopback"):
            SimServer(host=host)


# -- the HTTP API ------------------------------------------------------------------------------------


def test_chat_through_the_openai_client(server: SimServer) -> None:
    client = openai.OpenAI(base_url=server.base_url, api_key="x", max_retries=0)
    resp = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=6, logprobs=True,  # type: ignore[arg-type]
                                          top_logprobs=4)
    choice = resp.choices[0]
    assert resp.object == "chat.completion" and resp.model == MODEL
    assert choice.finish_reason == "length" and choice.message.role == "assistant"
    assert choice.logprobs is not None and choice.logprobs.content is not None
    content = choice.logprobs.content
    assert "".join(e.token for e in content) == choice.message.content
    assert all(len(e.top_logprobs) == 4 and e.top_logprobs[0].logprob == e.logprob for e in content)
    assert all(bytes(e.bytes or []) == e.token.encode() for e in content)
    assert resp.usage is not None and resp.usage.completion_tokens == 6 == len(content)
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + 6
    again = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=6)  # type: ignore[arg-type]
    assert again.choices[0].message.content == choice.message.content and again.choices[0].logprobs is None
    client.close()


@pytest.mark.parametrize("api", ["chat", "completions"])
def test_openai_client_streaming_matches_plain(server: SimServer, api: str) -> None:
    client = openai.OpenAI(base_url=server.base_url, api_key="x", max_retries=0)
    if api == "chat":
        kwargs: dict[str, Any] = {"messages": CHAT, "logprobs": True, "top_logprobs": 3}
        create: Any = client.chat.completions.create
    else:
        kwargs, create = {"prompt": "Once upon a time", "logprobs": 3}, client.completions.create
    plain = create(model=MODEL, max_tokens=12, **kwargs)
    texts, tokens, finish, usage = [], [], None, None
    for chunk in create(model=MODEL, max_tokens=12, stream=True, stream_options={"include_usage": True}, **kwargs):
        if chunk.usage is not None:
            usage = chunk.usage
        if not chunk.choices:
            continue
        c = chunk.choices[0]
        finish = c.finish_reason or finish
        if api == "chat":
            texts.append(c.delta.content or "")
            tokens += [e.token for e in (c.logprobs.content if c.logprobs else None) or []]
        else:
            texts.append(c.text)
            tokens += c.logprobs.tokens if c.logprobs else []
    p = plain.choices[0]
    plain_text = p.message.content if api == "chat" else p.text
    plain_tokens = [e.token for e in p.logprobs.content] if api == "chat" else p.logprobs.tokens
    assert "".join(texts) == plain_text and tokens == plain_tokens and finish == p.finish_reason
    assert usage == plain.usage
    client.close()


def test_completions_logprobs_format(server: SimServer) -> None:
    body = {"model": MODEL, "prompt": ["one", "two"], "max_tokens": 5, "logprobs": 2}
    data = httpx.post(server.base_url + "/completions", json=body).json()
    assert data["object"] == "text_completion" and [c["index"] for c in data["choices"]] == [0, 1]
    for c in data["choices"]:
        lp = c["logprobs"]
        assert "".join(lp["tokens"]) == c["text"]
        assert lp["text_offset"] == [sum(len(t) for t in lp["tokens"][:i]) for i in range(len(lp["tokens"]))]
        assert all(len(top) == 2 and max(top.values()) == chosen
                   for top, chosen in zip(lp["top_logprobs"], lp["token_logprobs"], strict=True))
    assert data["usage"]["completion_tokens"] == sum(len(c["logprobs"]["tokens"]) for c in data["choices"])


@pytest.mark.parametrize("path", ["/chat/completions", "/completions"])
def test_raw_sse_format(server: SimServer, path: str) -> None:
    body: dict[str, Any] = {"model": MODEL, "max_tokens": 4, "stream": True}
    body.update({"messages": CHAT} if path == "/chat/completions" else {"prompt": "hi"})
    with httpx.stream("POST", server.base_url + path, json=body) as resp:
        assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/event-stream")
        raw = resp.read().decode()
    assert raw.endswith("data: [DONE]\n\n")
    events = raw.split("\n\n")[:-1]
    assert all(e.startswith("data: ") and "\n" not in e for e in events)
    chunks = [json.loads(e[len("data: "):]) for e in events[:-1]]
    kind = "chat.completion.chunk" if path == "/chat/completions" else "text_completion"
    assert all(c["object"] == kind and c["id"] == chunks[0]["id"] for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])


@pytest.mark.parametrize(
    ("path", "body", "status", "param"),
    [
        ("/chat/completions", {"messages": CHAT}, 400, "model"),
        ("/chat/completions", {"model": "other", "messages": CHAT}, 404, "model"),
        ("/chat/completions", {"model": MODEL}, 400, "messages"),
        ("/chat/completions", {"model": MODEL, "messages": []}, 400, "messages"),
        ("/chat/completions", {"model": MODEL, "messages": [{"role": "wizard", "content": "x"}]}, 400, "messages"),
        ("/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": 3}]}, 400, "messages"),
        ("/chat/completions", {"model": MODEL, "messages": CHAT, "max_tokens": 0}, 400, "max_tokens"),
        ("/chat/completions", {"model": MODEL, "messages": CHAT, "max_tokens": "9"}, 400, "max_tokens"),
        ("/chat/completions", {"model": MODEL, "messages": CHAT, "temperature": 3}, 400, "temperature"),
        ("/chat/completions", {"model": MODEL, "messages": CHAT, "top_logprobs": 2}, 400, "top_logprobs"),
        ("/chat/completions", {"model": MODEL, "messages": CHAT, "logprobs": True, "top_logprobs": 21}, 400,
         "top_logprobs"),
        ("/chat/completions", {"model": MODEL, "messages": CHAT, "stream": "yes"}, 400, "stream"),
        ("/chat/completions", {"model": MODEL, "messages": CHAT, "stream_options": {}}, 400, "stream_options"),
        ("/chat/completions", {"model": MODEL, "messages": CHAT, "n": 2}, 400, "n"),
        ("/chat/completions", {"model": MODEL, "messages": CHAT, "stop": [""]}, 400, "stop"),
        ("/completions", {"model": MODEL}, 400, "prompt"),
        ("/completions", {"model": MODEL, "prompt": [1, 2]}, 400, "prompt"),
        ("/completions", {"model": MODEL, "prompt": "x", "logprobs": True}, 400, "logprobs"),
        ("/completions", {"model": MODEL, "prompt": "x", "echo": True, "stream": True}, 400, "stream"),
        ("/chat/completions", {"model": MODEL, "messages": CHAT, "guided_choice": []}, 400, "guided_choice"),
        ("/chat/completions", {"model": MODEL, "messages": CHAT, "guided_choice": ["a"],
                               "structured_outputs": {"choice": ["b"]}}, 400, "guided_choice"),
        ("/chat/completions", {"model": MODEL, "messages": CHAT, "structured_outputs": {"choice": "a"}}, 400,
         "structured_outputs"),
        ("/completions", ["not", "an", "object"], 400, None),
    ],
)
def test_bad_requests_get_openai_style_json_errors(server: SimServer, path: str, body: Any, status: int,
                                                   param: str | None) -> None:
    resp = httpx.post(server.base_url + path, json=body)
    assert resp.status_code == status
    error = resp.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param and error["message"]


def test_malformed_json_unknown_routes_and_methods(server: SimServer) -> None:
    bad = httpx.post(server.base_url + "/chat/completions", content=b"{nope", headers={"content-type": "x"})
    assert bad.status_code == 400 and "JSON" in bad.json()["error"]["message"]
    assert httpx.get(server.base_url + "/chat/completions").status_code == 405
    missing = httpx.get(server.url + "/v2/anything")
    assert missing.status_code == 404 and missing.json()["error"]["message"]
    too_big = httpx.post(server.base_url + "/completions", content=b"x" * 1_000_001)
    assert too_big.status_code == 413


def test_models_and_health(server: SimServer) -> None:
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}
    client = openai.OpenAI(base_url=server.base_url, api_key="x")
    assert [m.id for m in client.models.list()] == [MODEL]
    client.close()


def test_no_logprobs_mode_imitates_a_server_without_them() -> None:
    with SimServer(SimConfig(logprobs=False)) as s:
        body = {"model": "sim-model", "messages": CHAT, "logprobs": True, "top_logprobs": 5}
        choice = httpx.post(s.base_url + "/chat/completions", json=body).json()["choices"][0]
    assert choice["message"]["content"] and choice["logprobs"] is None


# -- latency, failures, counters -----------------------------------------------------------------------


async def test_latency_is_simulated_without_blocking_the_loop() -> None:
    cfg = SimConfig(latency_per_token_s=0.02, latency_per_request_s=0.05)
    async with SimServer(cfg) as s, httpx.AsyncClient(base_url=s.base_url, timeout=60) as client:
        body = {"model": "sim-model", "prompt": "p", "max_tokens": 10}
        t0 = time.perf_counter()
        await client.post("/completions", json=body)
        one = time.perf_counter() - t0
        answers = await asyncio.gather(*(client.post("/completions", json=body) for _ in range(20)))
        assert all(a.status_code == 200 for a in answers)
    assert one >= 0.05 + 10 * 0.02  # a lower bound: the latency was waited (a slow machine only adds to it)
    # 20 requests that each wait 10 minutes are all in flight at once: the waits never block the event loop
    # (a blocking sleep would hold the server at one request)
    async with SimServer(SimConfig(latency_per_request_s=600.0)) as s, httpx.AsyncClient(timeout=None) as client:
        waiting = [asyncio.create_task(client.post(s.base_url + "/completions", json=body)) for _ in range(20)]
        await until(lambda: s.stats.in_flight == 20, "20 requests waiting in the server at once")
        assert s.stats.max_in_flight == 20
        for task in waiting:
            task.cancel()
        await asyncio.gather(*waiting, return_exceptions=True)


async def test_error_rate_gives_http_500_and_is_seeded() -> None:
    async def statuses(seed: int) -> list[int]:
        async with SimServer(SimConfig(error_rate=0.5, seed=seed)) as s, httpx.AsyncClient() as client:
            body = {"model": "sim-model", "prompt": "p", "max_tokens": 2}
            codes = [(await client.post(s.base_url + "/completions", json=body)).status_code for _ in range(16)]
            assert s.stats.errors == codes.count(500)
            return codes

    first = await statuses(1)
    assert set(first) == {200, 500} and first == await statuses(1)


async def test_hangs_outlast_client_timeouts_but_are_bounded() -> None:
    async with SimServer(SimConfig(timeout_rate=1.0, hang_s=0.6)) as s, httpx.AsyncClient() as client:
        body = {"model": "sim-model", "prompt": "p", "max_tokens": 2}
        with pytest.raises(httpx.ReadTimeout):
            await client.post(s.base_url + "/completions", json=body, timeout=0.2)
        t0 = time.perf_counter()
        resp = await client.post(s.base_url + "/completions", json=body, timeout=PATIENCE_S)
        assert resp.status_code == 200 and time.perf_counter() - t0 >= 0.55  # answered after its hang: bounded
        assert s.stats.hangs == 2


def test_standalone_command_serves_until_stopped() -> None:
    command = [sys.executable, "-m", "cascade.simulate", "--port", "0", "--model", "m1"]
    with subprocess.Popen(command, stdout=subprocess.PIPE, text=True) as proc:
        try:
            assert proc.stdout is not None
            line = proc.stdout.readline()
            port = int(line.rsplit(":", 1)[1])
            resp = httpx.post(f"http://127.0.0.1:{port}/v1/completions", json={"model": "m1", "prompt": "x"})
            assert resp.status_code == 200 and resp.json()["usage"]["completion_tokens"] > 0
        finally:
            proc.terminate()
            # uvicorn shuts down gracefully, then re-raises the signal so the exit status reports it.
            assert proc.wait(timeout=10) in (0, -signal.SIGTERM)
    bad = subprocess.run([sys.executable, "-m", "cascade.simulate", "--host", "0.0.0.0"], capture_output=True,
                         text=True, timeout=30)
    assert bad.returncode == 2 and "loopback" in bad.stderr


def test_keep_alive_requests_do_not_wait_for_delayed_acks(server: SimServer) -> None:
    # Without TCP_NODELAY on accepted sockets each keep-alive response stalls ~40 ms (Nagle + delayed ACK).
    # asyncio sets it on accepted sockets only when the listening socket says IPPROTO_TCP: check the server's
    # side of a real keep-alive connection.
    with httpx.Client(base_url=server.url) as client:
        for _ in range(3):
            assert client.get("/health").status_code == 200
        sockets = [c.transport.get_extra_info("socket") for c in list(server._server.server_state.connections)]
        assert sockets and all(s.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) for s in sockets)


def test_echo_and_guided_choice_can_be_switched_off() -> None:
    with SimServer(SimConfig(model=MODEL, echo=False, guided_choice=False)) as s:
        echo = httpx.post(s.base_url + "/completions", json={"model": MODEL, "prompt": "x", "echo": True})
        assert echo.status_code == 400 and echo.json()["error"]["param"] == "echo"
        for field, value in (("guided_choice", ["a", "b"]), ("structured_outputs", {"choice": ["a", "b"]})):
            resp = httpx.post(s.base_url + "/chat/completions", json={"model": MODEL, "messages": CHAT, field: value})
            assert resp.status_code == 400 and "Unrecognized request argument" in resp.json()["error"]["message"]


def test_echo_returns_the_prompt_tokens_logprobs_then_the_answer(server: SimServer) -> None:
    body = {"model": MODEL, "prompt": ["user: hi\nassistant: yes", "no, thanks"], "echo": True, "logprobs": 2,
            "max_tokens": 1}
    data = httpx.post(server.base_url + "/completions", json=body).json()
    for prompt, choice in zip(body["prompt"], data["choices"], strict=True):
        lp = choice["logprobs"]
        assert choice["text"].startswith(prompt) and lp["token_logprobs"][0] is None
        assert "".join(lp["tokens"]) == choice["text"] and lp["text_offset"][0] == 0
        assert all(v < 0 for v in lp["token_logprobs"][1:])
        assert [choice["text"][o:o + len(t)] for t, o in zip(lp["tokens"], lp["text_offset"], strict=True)] == \
            lp["tokens"]
