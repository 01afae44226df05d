"""`cascade serve` under an outside probe: what clients and logs may see of a failing tier, slow and
oversized bodies, browser-reachable requests, and shutdown past the drain timeout. Real servers on 127.0.0.1.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
from test_openai_failures import dead_port, with_userinfo
from test_server import CHAT, ServerProcess, write_yaml

from cascade.simulate import SimConfig, SimServer

SECRET = "topsecret"


def tiers_config(path: Path, small_url: str, large_url: str, **top: Any) -> Path:
    tier = {"kind": "openai", "max_retries": 0, "timeout_s": 30}
    server = top.pop("server", {})
    return write_yaml(path, {
        "tiers": [{"name": "small", "backend": {**tier, "model": "sim-small", "base_url": small_url}},
                  {"name": "large", "backend": {**tier, "model": "sim-large", "base_url": large_url}}],
        "thresholds": [-1.0], "max_tokens": 8, **top,  # every request escalates
        "extra": {"server": {"drain_timeout_s": 10, **server}},
    })


def test_a_down_tier_with_credentials_in_its_url_leaks_nothing(tmp_path: Path) -> None:
    large_url = with_userinfo(f"http://127.0.0.1:{dead_port()}/v1")
    with SimServer(SimConfig(model="sim-small")) as small:
        for on_error in ("degrade", "raise"):
            log = tmp_path / f"{on_error}.log"
            server = ServerProcess(tiers_config(tmp_path / f"{on_error}.yaml", small.base_url, large_url,
                                                on_error=on_error), log)
            try:
                r = httpx.post(server.url + "/v1/chat/completions", json={"model": "cascade", "messages": CHAT},
                               timeout=30)
                assert SECRET not in r.text and "svc:" not in r.text and "127.0.0.1" not in r.text
                if on_error == "degrade":
                    decision = r.json()["cascade"]
                    assert r.status_code == 200 and decision["degraded"] and decision["tier"] == "small"
                    assert decision["calls"][-1]["error"] == "tier 'large': cannot connect"
                else:
                    assert r.status_code == 502
                    assert r.json()["error"]["message"] == "a model backend failed: tier 'large': cannot connect"
            finally:
                assert server.stopped_cleanly(), log.read_text()
            text = log.read_text()
            assert SECRET not in text and "http://***@127.0.0.1" in text  # the detail is logged, redacted
