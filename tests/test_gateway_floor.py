"""The bare gateway that eval.gateway_floor measures as the floor under cascade serve: it really asks the tier."""

from __future__ import annotations

import httpx
import pytest

from cascade.simulate import SimConfig, SimServer
from eval.gateway_floor import FloorGateway, main


async def test_the_floor_gateway_answers_with_the_small_tier_s_streamed_text() -> None:
    with SimServer(SimConfig(model="sim-small", latency_per_token_s=0.0)) as sim:
        async with FloorGateway(sim.base_url) as gw, httpx.AsyncClient(trust_env=False, timeout=30) as client:
            resp = await client.post(gw.url + "/v1/chat/completions",
                                     json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4})
            assert gw.cpu_s() is not None
    data = resp.json()
    assert resp.status_code == 200 and data["choices"][0]["message"]["content"]
    assert 0.0 <= data["cascade"]["uncertainty"] < 1.0  # the first token's margin, scored
    assert sim.stats.requests == 1


def test_the_wake_up_price_is_measured_from_a_writing_child(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["wakes", "--gap", "0"]) == 0
    assert float(capsys.readouterr().out) > 0.0  # CPU microseconds per wake-up (the 1,000 writes may coalesce)


def test_in_process_both_apps_answer_and_are_measured() -> None:
    from eval.gateway_floor import in_process
    from eval.loadtest.load import run

    out = run(in_process(5))  # (each app's answers are checked: HTTP 200 or it raises)
    assert len(out["floor"]) == len(out["cascade serve"]) == 2
    assert all(ms > 0.0 for ms in out["floor"] + out["cascade serve"])
