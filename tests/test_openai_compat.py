"""OpenAIBackend against the real simulated server on 127.0.0.1 (no patched clients)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import socket
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest
from conftest import PATIENCE_S, until
from test_openai_send import keep_alive_server

from cascade.backends.base import Backend
from cascade.backends.openai_compat import DUMMY_API_KEY, OpenAIBackend, render_messages
from cascade.errors import BackendError, BackendTimeoutError, ConfigError, InvalidRequestError
from cascade.simulate import SimConfig, SimServer, simulate_answer
from cascade.types import FREE_MEASURES as MEASURES
from cascade.types import EarlyExit, GenerationParams
from cascade.uncertainty import REMOTE_VOCAB_SIZE

MODEL = "sim-model"
UNSURE = "Name a river. [[sim:confidence=0.0]]"  # first-token margin ~ 0: score ~ 1
SURE = "Name a river. [[sim:confidence=1.0]]"  # first-token margin ~ 1: score ~ 0
PARAMS = GenerationParams(max_tokens=24)


@pytest.fixture(scope="module")
def server() -> Iterator[SimServer]:
    with SimServer(SimConfig(model=MODEL, seed=11)) as s:
        yield s


@pytest.fixture
async def backend(server: SimServer) -> AsyncIterator[OpenAIBackend]:
    b = OpenAIBackend(model=MODEL, base_url=server.base_url, max_retries=0)
    yield b
    await b.aclose()


def hand_scores(steps: list[tuple[float, list[float]]]) -> dict[str, float]:
    """Every measure from (chosen logprob, top logprobs) pairs, in plain float64 Python."""
    margins, entropies = [], []
    for _, top in steps:
        p = sorted((math.exp(v) for v in top), reverse=True)
        margins.append(p[0] - p[1])
        rest = max(0.0, 1.0 - sum(p))  # spread evenly over the unlisted tokens of an assumed vocabulary
        spread = rest * (math.log(REMOTE_VOCAB_SIZE - len(p)) - math.log(rest)) if rest > 0 else 0.0
        entropies.append(-sum(q * math.log(q) for q in p) + spread)
    lps = [lp for lp, _ in steps]
    return {
        "margin_first": 1 - margins[0], "margin_mean": 1 - sum(margins) / len(margins),
        "margin_min": 1 - min(margins), "entropy_first": entropies[0],
        "entropy_mean": sum(entropies) / len(entropies), "entropy_max": max(entropies),
        "logprob_mean": -sum(lps) / len(lps),
    }


def raw_answer(server: SimServer, api: str, prompt: str, params: GenerationParams) -> tuple[str, Any, list[Any]]:
    """Ask the server directly (httpx, no openai client) what it answers with top-5 logprobs."""
    body: dict[str, Any] = {"model": MODEL, "max_tokens": params.max_tokens, "temperature": 0.0}
    if api == "chat":
        body.update(messages=[{"role": "user", "content": prompt}], logprobs=True, top_logprobs=5)
        data = httpx.post(server.base_url + "/chat/completions", json=body).json()
        choice = data["choices"][0]
        steps = [(e["logprob"], [t["logprob"] for t in e["top_logprobs"]]) for e in choice["logprobs"]["content"]]
        return choice["message"]["content"], data["usage"], steps
    body.update(prompt=prompt, logprobs=5)
    data = httpx.post(server.base_url + "/completions", json=body).json()
    lp = data["choices"][0]["logprobs"]
    steps = [(c, list(t.values())) for c, t in zip(lp["token_logprobs"], lp["top_logprobs"], strict=True)]
    return data["choices"][0]["text"], data["usage"], steps


def test_is_a_backend(server: SimServer) -> None:
    b = OpenAIBackend(model=MODEL, base_url=server.base_url)
    assert isinstance(b, Backend) and b.name == MODEL


@pytest.mark.parametrize("api", ["chat", "completions"])
async def test_scores_equal_a_hand_computation_from_the_servers_logprobs(server: SimServer, api: str) -> None:
    prompts = ["What is 2+2?", UNSURE, SURE, "Translate 'cat' to French."]
    backend = OpenAIBackend(model=MODEL, base_url=server.base_url, api=api, max_retries=0)
    gens = await backend.generate(prompts, PARAMS)
    await backend.aclose()
    lengths = set()
    for prompt, g in zip(prompts, gens, strict=True):
        text, usage, steps = raw_answer(server, api, prompt, PARAMS)
        assert g.text == text and g.model == MODEL
        assert (g.prompt_tokens, g.completion_tokens) == (usage["prompt_tokens"], usage["completion_tokens"])
        assert set(g.scores) == set(MEASURES)
        expected = hand_scores(steps)
        for name in MEASURES:
            assert g.scores[name] == pytest.approx(expected[name], abs=1e-5), name
        assert g.token_stats is not None and not g.token_stats.entropy_exact
        assert g.token_stats.logprob == tuple(lp for lp, _ in steps)
        assert len(g.token_stats.margin) == len(g.token_stats.entropy) == len(steps)
        lengths.add(len(steps))
    assert len(lengths) > 1  # the batch really was padded
    assert gens[1].scores["margin_first"] > 0.9 > 0.1 > gens[2].scores["margin_first"]


async def test_a_batch_scores_each_prompt_as_if_alone(backend: OpenAIBackend) -> None:
    prompts = ["a", "bb", UNSURE, SURE, "ccc"]
    together = await backend.generate(prompts, PARAMS)
    for prompt, g in zip(prompts, together, strict=True):
        (alone,) = await backend.generate([prompt], PARAMS)
        assert alone.text == g.text
        assert alone.scores == pytest.approx(g.scores, rel=1e-6)  # float32 sums over other widths: ulps


async def test_prompts_are_sent_as_documented(server: SimServer) -> None:
    cfg, messages = server.config, [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Hi"}]
    chat = OpenAIBackend(model=MODEL, base_url=server.base_url, api="chat")
    comp = OpenAIBackend(model=MODEL, base_url=server.base_url, api="completions")
    g_chat_text, g_chat_msgs = await chat.generate(["Hi", messages], PARAMS, scores=False)
    (g_comp,) = await comp.generate([messages], PARAMS, scores=False)
    await chat.aclose()
    await comp.aclose()
    assert g_chat_text.text == simulate_answer(cfg, "user: Hi", 24).text  # a string is one user message
    assert g_chat_msgs.text == simulate_answer(cfg, "system: Be terse.\nuser: Hi", 24).text
    assert render_messages(messages) == "system: Be terse.\nuser: Hi\nassistant:"
    assert g_comp.text == simulate_answer(cfg, render_messages(messages), 24).text


async def test_without_scores_nothing_is_scored(backend: OpenAIBackend) -> None:
    (g,) = await backend.generate(["hello"], PARAMS, scores=False)
    assert g.text and g.scores == {} and g.token_stats is None and g.completion_tokens > 0


async def test_stop_and_max_tokens_reach_the_server(backend: OpenAIBackend, server: SimServer) -> None:
    full = simulate_answer(server.config, "user: tell me", 1000)
    (cut,) = await backend.generate(["tell me"], GenerationParams(max_tokens=3))
    assert cut.text == "".join(full.tokens[:3]) and cut.finish_reason == "length" and cut.completion_tokens == 3
    (stopped,) = await backend.generate(["tell me"], GenerationParams(max_tokens=100, stop=(full.tokens[5],)))
    assert stopped.text == "".join(full.tokens[:5]) and stopped.finish_reason == "stop"


async def test_an_empty_answer_is_maximally_uncertain(backend: OpenAIBackend, server: SimServer) -> None:
    first = simulate_answer(server.config, "user: tell me", 1000).tokens[0]
    (g,) = await backend.generate(["tell me"], GenerationParams(stop=(first,)))
    assert g.text == "" and g.completion_tokens == 0
    assert g.token_stats is not None and g.token_stats.margin == ()
    assert g.scores["margin_first"] == pytest.approx(1.0)
    assert g.scores["entropy_first"] == pytest.approx(math.log(REMOTE_VOCAB_SIZE))  # uniform over every token


# -- early exit ----------------------------------------------------------------------------------------


async def test_early_exit_stops_the_stream_after_the_first_token() -> None:
    cfg = SimConfig(model=MODEL, latency_per_token_s=0.03, max_answer_tokens=40)
    async with SimServer(cfg) as s:
        b = OpenAIBackend(model=MODEL, base_url=s.base_url, max_retries=0)
        params = GenerationParams(max_tokens=30)
        (full,) = await b.generate([UNSURE], params)
        (cut,) = await b.generate([UNSURE], params, early_exit=EarlyExit("margin_first", (0.5,)))
        await b.aclose()
        await until(lambda: s.stats.streams_cancelled == 1, "the server saw the stream closed")
        assert full.completion_tokens >= 10 and full.finish_reason != "early_exit"
        assert cut.finish_reason == "early_exit" and cut.completion_tokens == 1
        assert cut.token_stats is not None and len(cut.token_stats.margin) == 1
        assert full.text.startswith(cut.text) and cut.text == simulate_answer(cfg, f"user: {UNSURE}", 30).tokens[0]
        assert cut.scores["margin_first"] == full.scores["margin_first"] > 0.5
        assert s.stats.streams_cancelled == 1 and s.stats.streams_completed == 0
        # the cut answer cost the server at most 2 of the >= 10 tokens of the full one: it stopped generating,
        # not just the client reading
        assert s.stats.tokens_sent <= 2


async def test_early_exit_keeps_answers_at_or_below_their_threshold(server: SimServer) -> None:
    for api in ("chat", "completions"):
        b = OpenAIBackend(model=MODEL, base_url=server.base_url, api=api, max_retries=0)
        prompts = [SURE, UNSURE, "What is 2+2?", "What is 3+3?"]
        plain = await b.generate(prompts, PARAMS)
        u = [g.scores["entropy_first"] for g in plain]
        # Exactly at the threshold stays; one float step below it exits; inf never exits (not streamed).
        thresholds = (u[0], math.nextafter(u[1], -math.inf), math.inf, 0.0)
        before = server.stats.streams_completed + server.stats.streams_cancelled
        gens = await b.generate(prompts, PARAMS, early_exit=EarlyExit("entropy_first", thresholds))
        await b.aclose()
        await until(lambda: server.stats.streams_completed + server.stats.streams_cancelled - before >= 3,  # noqa: B023
                    "the server saw three streams end")
        assert [g.finish_reason == "early_exit" for g in gens] == [False, True, False, True]
        assert gens[0].text == plain[0].text and gens[0].scores == plain[0].scores
        assert gens[2].text == plain[2].text and gens[2].scores == plain[2].scores
        assert [g.scores["entropy_first"] for g in gens] == u  # the decision used the reported score
        assert server.stats.streams_completed + server.stats.streams_cancelled - before == 3


async def test_a_minus_inf_threshold_exits_after_any_first_token(backend: OpenAIBackend) -> None:
    (g,) = await backend.generate([SURE], PARAMS, early_exit=EarlyExit("margin_first", (-math.inf,)))
    assert g.finish_reason == "early_exit" and g.completion_tokens == 1


def test_the_sync_face_works_call_after_call(server: SimServer) -> None:
    """Each run_batch_sync runs its own event loop; the backends follow it (connections, semaphores)."""
    from cascade import Cascade

    cascade = Cascade(small=OpenAIBackend(model=MODEL, base_url=server.base_url, max_retries=0),
                      large=OpenAIBackend(model=MODEL, base_url=server.base_url, max_retries=0, rate_limit_per_s=50),
                      threshold=0.5)
    first = cascade.run_batch_sync([UNSURE, SURE])
    assert [r.tier for r in first] == ["large", "small"]
    for _ in range(3):
        again = cascade.run_batch_sync([UNSURE, SURE])
        assert [(r.tier, r.text) for r in again] == [(r.tier, r.text) for r in first]
    asyncio.run(cascade.aclose())


async def test_early_exit_arguments_are_checked(backend: OpenAIBackend) -> None:
    with pytest.raises(InvalidRequestError, match="thresholds"):
        await backend.generate(["a", "b"], PARAMS, early_exit=EarlyExit("margin_first", (0.5,)))
    with pytest.raises(InvalidRequestError, match="scores"):
        await backend.generate(["a"], PARAMS, scores=False, early_exit=EarlyExit("margin_first", (0.5,)))


# -- failures ------------------------------------------------------------------------------------------


async def test_http_500_is_a_backend_error_with_status_and_message() -> None:
    async with SimServer(SimConfig(model=MODEL, error_rate=1.0)) as s:
        b = OpenAIBackend(model=MODEL, base_url=s.base_url, max_retries=0)
        with pytest.raises(BackendError, match=r"HTTP 500.*simulated internal server error") as info:
            await b.generate(["hi"], PARAMS)
        assert not isinstance(info.value, BackendTimeoutError)
        await b.aclose()
        retrying = OpenAIBackend(model=MODEL, base_url=s.base_url, max_retries=1)
        t0 = time.perf_counter()
        with pytest.raises(BackendError, match="HTTP 500"):
            await retrying.generate(["hi"], PARAMS)
        assert s.stats.requests == 3 and time.perf_counter() - t0 >= 0.3  # one retry after a backoff
        await retrying.aclose()


async def test_a_hanging_server_is_a_timeout() -> None:
    async with SimServer(SimConfig(model=MODEL, timeout_rate=1.0, hang_s=600.0)) as s:  # hangs past the test
        for n, early in enumerate((None, EarlyExit("margin_first", (0.5,))), 1):
            b = OpenAIBackend(model=MODEL, base_url=s.base_url, timeout_s=0.2, max_retries=0)
            with pytest.raises(BackendTimeoutError, match=r"within 0\.2 s"):  # not the end of PATIENCE_S
                await asyncio.wait_for(b.generate(["hi"], PARAMS, early_exit=early), PATIENCE_S)
            await until(lambda: s.stats.hangs == n, "the server got the request")  # noqa: B023
            assert s.stats.in_flight == n  # the client gave up while the server still hangs
            await b.aclose()


_CHUNK = {"id": "c1", "object": "chat.completion.chunk", "created": 0, "model": MODEL,
          "choices": [{"index": 0, "delta": {"content": "Hi"}, "finish_reason": None,
                       "logprobs": {"content": [{"token": "Hi", "logprob": -0.1,
                                                 "top_logprobs": [{"token": "Hi", "logprob": -0.1},
                                                                  {"token": "Yo", "logprob": -2.5}]}]}}]}


def _chunked(data: bytes) -> bytes:
    return f"{len(data):x}\r\n".encode() + data + b"\r\n"


@contextlib.asynccontextmanager
async def broken_stream_server(then: bytes | None) -> AsyncIterator[str]:
    """A loopback HTTP server answering every request with a chunked SSE stream: one good event, then the
    event ``then`` and a proper end, or (``then=None``) half a chunk and a closed connection. Yields the URL."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                       if line.lower().startswith(b"content-length:")), 0)
        await reader.readexactly(length)
        body = _chunked(b"data: " + json.dumps(_CHUNK).encode() + b"\n\n")
        body += b"40\r\ndata: {" if then is None else _chunked(b"data: " + then + b"\n\n") + b"0\r\n\r\n"
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
                     + body)
        await writer.drain()
        writer.close()

    srv = await asyncio.start_server(handle, "127.0.0.1", 0)
    async with srv:
        yield f"http://127.0.0.1:{srv.sockets[0].getsockname()[1]}/v1"


@pytest.mark.parametrize(("then", "message"), [
    (None, r"connection to .* failed"),  # cut inside a chunk: the body is incomplete
    (b'{"error": {"message": "GPU fell off"}}', "GPU fell off"),  # an error event with HTTP 200
    (b"[1, 2]", "malformed answer"),
])
async def test_a_stream_that_breaks_after_the_first_token_is_a_backend_error(then: bytes | None,
                                                                             message: str) -> None:
    async with broken_stream_server(then) as url:
        b = OpenAIBackend(model=MODEL, base_url=url, max_retries=0)
        with pytest.raises(BackendError, match=message):  # the first token is sure: the stream is read on
            await b.generate(["hi"], PARAMS, early_exit=EarlyExit("margin_first", (0.99,)))
        await b.aclose()


async def test_connection_refused_and_unknown_model_are_backend_errors(server: SimServer) -> None:
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    b = OpenAIBackend(model=MODEL, base_url=f"http://127.0.0.1:{port}/v1", max_retries=0)
    with pytest.raises(BackendError, match="cannot reach"):
        await b.generate(["hi"], PARAMS)
    await b.aclose()
    b = OpenAIBackend(model="other-model", base_url=server.base_url, max_retries=0)
    with pytest.raises(BackendError, match=r"HTTP 404.*does not exist"):
        await b.generate(["hi"], PARAMS)
    await b.aclose()


async def test_a_server_without_logprobs_is_named_as_such() -> None:
    async with SimServer(SimConfig(model=MODEL, logprobs=False)) as s:
        for api in ("chat", "completions"):
            b = OpenAIBackend(model=MODEL, base_url=s.base_url, api=api, max_retries=0)
            for early in (None, EarlyExit("margin_first", (0.5,))):
                with pytest.raises(BackendError, match=r"returned no logprobs.*top_logprobs"):
                    await b.generate(["hi"], PARAMS, early_exit=early)
            (g,) = await b.generate(["hi"], PARAMS, scores=False)  # a last tier needs no logprobs
            assert g.text
            await b.aclose()


async def test_bad_prompts_are_rejected_before_any_request(backend: OpenAIBackend, server: SimServer) -> None:
    before = server.stats.requests
    for bad in ([""], ["ok", "  "], [[]], [[{"role": "user"}]]):
        with pytest.raises(InvalidRequestError):
            await backend.generate(bad, PARAMS)  # type: ignore[arg-type]
    assert server.stats.requests == before
    assert await backend.generate([], PARAMS) == []


# -- concurrency, rate, config --------------------------------------------------------------------------


async def test_concurrency_cap_is_respected() -> None:
    async with SimServer(SimConfig(model=MODEL, latency_per_request_s=0.1)) as s:
        b = OpenAIBackend(model=MODEL, base_url=s.base_url, max_concurrency=3)
        gens = await b.generate([f"q{i}" for i in range(10)], PARAMS)
        await b.aclose()
        assert len(gens) == 10 and s.stats.requests == 10 and s.stats.max_in_flight == 3  # waves of at most three
        wide = OpenAIBackend(model=MODEL, base_url=s.base_url, max_concurrency=64)
        s.stats.reset()
        await wide.generate([f"q{i}" for i in range(10)], PARAMS)
        await wide.aclose()
        assert s.stats.max_in_flight == 10  # a batch really is sent concurrently


async def test_rate_limit_spaces_requests(server: SimServer) -> None:
    b = OpenAIBackend(model=MODEL, base_url=server.base_url, rate_limit_per_s=20)
    t0 = time.perf_counter()
    await b.generate([f"q{i}" for i in range(10)], PARAMS)
    await b.aclose()
    assert time.perf_counter() - t0 >= 0.35  # 10 requests at 20/s: the last starts >= 0.4 s in (bursts of 2)


async def test_api_key_comes_from_the_environment_or_a_dummy(monkeypatch: pytest.MonkeyPatch) -> None:
    async with keep_alive_server() as (url, seen):
        monkeypatch.delenv("CASCADE_TEST_KEY", raising=False)
        keys = [{"api_key_env": "CASCADE_TEST_KEY"}, {"api_key_env": "CASCADE_TEST_KEY"},
                {"api_key": "sk-given", "api_key_env": "CASCADE_TEST_KEY"}]
        for i, key in enumerate(keys):
            if i == 1:
                monkeypatch.setenv("CASCADE_TEST_KEY", "sk-from-env")
            b = OpenAIBackend(model="m", base_url=url, max_retries=0, **key)
            await b.generate(["hi"], PARAMS)
            await b.aclose()
    sent = [h.split(b"authorization: ", 1)[1].split(b"\r\n", 1)[0] for h in (x.lower() for x in seen.heads)]
    assert sent == [f"bearer {k}".encode() for k in (DUMMY_API_KEY, "sk-from-env", "sk-given")]


@pytest.mark.parametrize(
    "bad",
    [{"model": ""}, {"api": "responses"}, {"timeout_s": 0}, {"timeout_s": math.inf}, {"max_retries": -1},
     {"max_concurrency": 0}, {"rate_limit_per_s": 0.0}, {"top_logprobs": 0}, {"top_logprobs": 21}],
)
def test_config_is_validated(bad: dict[str, Any]) -> None:
    with pytest.raises(ConfigError):
        OpenAIBackend(**{"model": "m", **bad})


async def test_aclose_closes_the_client(server: SimServer) -> None:
    b = OpenAIBackend(model=MODEL, base_url=server.base_url, max_retries=0)
    await b.generate(["hi"], PARAMS)
    await b.aclose()
    with pytest.raises(BackendError, match="closed"):
        await b.generate(["hi"], PARAMS)
