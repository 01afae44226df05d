"""`cascade serve` with a ``monitor:`` section, end to end on 127.0.0.1: the status endpoint and metrics, hot reload
of the artifact over HTTP and by SIGHUP under concurrent requests, refused artifacts keep serving."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from conftest import wait_until
from test_monitor import _artifact
from test_server import CHAT, ServerProcess, write_yaml

from cascade.simulate import SimConfig, SimServer


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServerProcess, Path]]:
    root = tmp_path_factory.mktemp("monitored")
    artifact = root / "artifact.json"
    _artifact(0.4).save(artifact)
    with SimServer(SimConfig(model="sim-small", seed=1, latency_per_request_s=0.01)) as small, \
            SimServer(SimConfig(model="sim-large", seed=1, latency_per_request_s=0.01)) as large:
        tier = {"kind": "openai", "max_retries": 0}
        config = write_yaml(root / "config.yaml", {
            "tiers": [{"name": "small", "backend": {**tier, "model": "sim-small", "base_url": small.base_url}},
                      {"name": "large", "backend": {**tier, "model": "sim-large", "base_url": large.base_url}}],
            "artifact": "artifact.json", "max_tokens": 6,
            "monitor": {"shadow_rate": 1.0, "shadow_concurrency": 8, "min_window": 10, "check_every": 5,
                        "log_path": "shadow.jsonl", "seed": 0},
        })
        server = ServerProcess(config, root / "server.log")
        yield server, root
        assert server.stopped_cleanly(), server.log.read_text()


def _chat(client: httpx.Client, i: int) -> dict[str, object]:
    r = client.post("/v1/chat/completions", json={"model": "cascade", "messages": [
        {"role": "user", "content": f"request {i}: {CHAT[0]['content']}"}]})
    assert r.status_code == 200, r.text
    return r.json()["cascade"]  # type: ignore[no-any-return]


def test_status_and_metrics_show_the_live_checks(served: tuple[ServerProcess, Path]) -> None:
    server, root = served
    with httpx.Client(base_url=server.url, timeout=30) as client:
        answers = [_chat(client, i) for i in range(30)]
        accepted = sum(not a["escalated"] for a in answers)
        log = root / "shadow.jsonl"
        wait_until(lambda: log.exists() and log.read_text().count("\n") >= 30,
                   "every sampled request's pair")  # accepted: the last tier asked; escalated: the first again
        status = client.get("/v1/cascade/status").json()
        assert status["enabled"] and status["state"] in ("ok", "drifting", "violated")
        stage = status["cascades"][0]["stages"][0]
        assert stage["tier"] == "small" and stage["requests"] >= 30
        assert stage["shadow"]["pairs"] >= accepted and stage["calibrated_escalation_rate"] == pytest.approx(0.6)
        assert stage["drift"]["p_value"] is not None and stage["drift"]["reference_n"] == 500
        text = client.get("/metrics").text
        for name in ("cascade_drift_statistic{", "cascade_drift_state{", "cascade_shadow_pairs_total{",
                     "cascade_shadow_cost_total{", "cascade_shadow_dropped_total{"):
            assert name in text, name


def test_reload_over_http_under_concurrent_requests(served: tuple[ServerProcess, Path]) -> None:
    server, _ = served

    async def run() -> tuple[list[dict[str, object]], httpx.Response, list[httpx.Response]]:
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
            async def ask(i: int) -> dict[str, object]:
                r = await client.post("/v1/chat/completions", json={"model": "cascade", "messages": [
                    {"role": "user", "content": f"reload {i}"}]})
                assert r.status_code == 200, r.text
                return r.json()["cascade"]  # type: ignore[no-any-return]

            first = [asyncio.create_task(ask(i)) for i in range(40)]
            swapped = await client.post("/v1/cascade/artifact", content=_artifact(0.7).to_json(),
                                        headers={"content-type": "application/json"})
            later = [asyncio.create_task(ask(100 + i)) for i in range(20)]
            bad = [await client.post("/v1/cascade/artifact", content=body, headers={"content-type": "application/json"})
                   for body in (b"{not json", _artifact(0.1, ("x", "y")).to_json().encode(),
                                _artifact(0.1).to_json().replace("margin_first", "entropy_first").encode())]
            return [*(await asyncio.gather(*first)), *(await asyncio.gather(*later))], swapped, bad

    answers, swapped, bad = asyncio.run(run())
    assert swapped.status_code == 200 and swapped.json()["thresholds"] == [0.7]
    assert all(a["threshold"] in (0.4, 0.7) for a in answers)  # old or new, per request, never anything else
    assert all(a["threshold"] == 0.7 for a in answers[40:])  # started after the swap
    assert [r.status_code for r in bad] == [400, 400, 400]
    assert all(r.json()["error"]["code"] == "artifact_refused" for r in bad)
    with httpx.Client(base_url=server.url, timeout=30) as client:
        assert _chat(client, 999)["threshold"] == 0.7  # the refused artifacts changed nothing


def test_sighup_reads_the_artifact_file_again(served: tuple[ServerProcess, Path]) -> None:
    server, root = served
    _artifact(0.25).save(root / "artifact.json")
    server.proc.send_signal(signal.SIGHUP)
    with httpx.Client(base_url=server.url, timeout=30) as client:
        wait_until(lambda: _chat(client, 1000)["threshold"] == 0.25, "the reloaded thresholds")
        (root / "artifact.json").write_text("{broken")
        server.proc.send_signal(signal.SIGHUP)
        wait_until(lambda: "SIGHUP: artifact refused" in server.log.read_text(), "the refusal in the log")
        assert _chat(client, 1001)["threshold"] == 0.25


async def test_reload_needs_auth_unless_bound_to_loopback() -> None:
    from cascade.engine import Cascade
    from cascade.policy import Policy
    from cascade.server import create_app
    from cascade.server.admin import Reloader

    with SimServer(SimConfig(model="sim-small")) as small, SimServer(SimConfig(model="sim-large")) as large:
        from cascade.backends.openai_compat import OpenAIBackend

        engine = Cascade(small=OpenAIBackend(model="sim-small", base_url=small.base_url),
                         large=OpenAIBackend(model="sim-large", base_url=large.base_url),
                         policy=Policy.from_artifact(_artifact(0.4)))
        body = _artifact(0.6).to_json()
        for loopback, status in ((False, 403), (True, 200)):
            app = create_app(engine, reloader=Reloader(engine, loopback=loopback))
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
                r = await client.post("/v1/cascade/artifact", content=body,
                                      headers={"content-type": "application/json"})
                assert r.status_code == status, r.text
                assert (await client.get("/v1/cascade/status")).json() == {"enabled": False}
        assert engine.policy.thresholds == (0.6,)
        await engine.aclose()
