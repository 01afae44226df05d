"""`cascade serve` under an outside probe: what clients and logs may see of a failing tier, slow and
oversized bodies, browser-reachable requests, and shutdown past the drain timeout. Real servers on 127.0.0.1.
"""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import PATIENCE_S, wait_until
from test_openai_failures import dead_port, with_userinfo
from test_server import CHAT, ServerProcess, write_yaml

from cascade.errors import ConfigError
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


# ---------------------------------------------------------------- browser reachability (issue 13, item 6)


def _app(**server: Any) -> Any:
    from conftest import make_backend

    from cascade import Cascade
    from cascade.server import ServerConfig, create_app

    return create_app(Cascade(small=make_backend(0), large=make_backend(1), threshold=0.5),
                      ServerConfig(**server))


async def _post(app: Any, headers: dict[str, str], content: bytes = b'{"model": "cascade", "prompt": "a movie"}'
                ) -> Any:
    import httpx

    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://127.0.0.1:8000") as c:
        return await c.post("/v1/completions", content=content, headers=headers)


async def test_loopback_hosts_only_json_bodies_and_no_foreign_origins() -> None:
    from cascade.server.config import ServerConfig, guard_binding

    loopback = guard_binding(ServerConfig(), "127.0.0.1")
    assert loopback.allowed_hosts == ("localhost", "127.0.0.1", "::1")
    app = _app(allowed_hosts=list(loopback.allowed_hosts))
    json_type = {"content-type": "application/json"}
    assert (await _post(app, json_type)).status_code == 200
    assert (await _post(app, {**json_type, "host": "[::1]:8000"})).status_code == 200
    rebinding = await _post(app, {**json_type, "host": "attacker.example:8000"})
    assert rebinding.status_code == 421 and rebinding.json()["error"]["code"] == "host_not_allowed"
    foreign = await _post(app, {**json_type, "origin": "http://attacker.example"})
    assert foreign.status_code == 403 and foreign.json()["error"]["code"] == "origin_not_allowed"
    plain = await _post(app, {"content-type": "text/plain"})  # what a page's no-preflight "simple request" sends
    assert plain.status_code == 415 and plain.json()["error"]["code"] == "unsupported_media_type"
    opened = _app(allowed_hosts=["*"], allowed_origins=["http://app.example"])
    assert (await _post(opened, {**json_type, "host": "gateway.internal", "origin": "http://app.example"})
            ).status_code == 200


def test_binding_beyond_loopback_without_auth_warns_loudly(caplog: pytest.LogCaptureFixture) -> None:
    from cascade.server.config import ServerConfig, guard_binding

    with caplog.at_level("WARNING", logger="cascade.server"):
        cfg = guard_binding(ServerConfig(), "0.0.0.0")
    assert cfg.allowed_hosts is None and "SECURITY" in caplog.text and "without auth" in caplog.text
    with pytest.raises(ConfigError):
        ServerConfig(allowed_origins="http://a.example")  # type: ignore[arg-type]


# ---------------------------------------------------------------- slow request bodies (issue 13, item 5)


def _stalled_body(port: int, declared: int = 1000, sent: bytes = b'{"model": "cascade", ') -> socket.socket:
    """A POST whose body stops after a few bytes (the connection stays open)."""
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 + f"Content-Length: {declared}\r\n\r\n".encode() + sent)
    return sock


def _status(sock: socket.socket) -> int:
    sock.settimeout(PATIENCE_S)
    head = sock.recv(4096).split(b"\r\n", 1)[0]
    return int(head.split()[1])


def _sim_server(tmp_path: Path, small: SimServer, large: SimServer, **server: Any) -> ServerProcess:
    tier = {"kind": "openai", "max_retries": 0}
    config = write_yaml(tmp_path / "c.yaml", {
        "tiers": [{"name": "small", "backend": {**tier, "model": "s", "base_url": small.base_url}},
                  {"name": "large", "backend": {**tier, "model": "l", "base_url": large.base_url}}],
        "thresholds": [0.5], "extra": {"server": server}})
    return ServerProcess(config, tmp_path / "log.txt")


def _reading(server: ServerProcess) -> int:
    return int(httpx.get(server.url + "/health", timeout=PATIENCE_S).json()["bodies_reading"])


def test_slow_bodies_cannot_pile_up(tmp_path: Path) -> None:
    """No order of events matters: the stalled bodies' own timeout is far longer than the test."""
    with SimServer(SimConfig(model="s")) as small, SimServer(SimConfig(model="l")) as large:
        server = _sim_server(tmp_path, small, large, body_timeout_s=600, max_bodies_reading=2)
        try:
            slow = [_stalled_body(server.port), _stalled_body(server.port)]
            wait_until(lambda: _reading(server) == 2, "two bodies being received")
            third = _stalled_body(server.port)
            assert _status(third) == 503  # no third slow body is read: memory stays bounded
            for s in [*slow, third]:
                s.close()  # the senders go away: their bodies stop counting
            wait_until(lambda: _reading(server) == 0, "reading none")
            ok = httpx.post(server.url + "/v1/chat/completions", json={"model": "cascade", "messages": CHAT},
                            timeout=PATIENCE_S)
            assert ok.status_code == 200
        finally:
            assert server.stopped_cleanly(), server.log.read_text()


def test_a_slow_body_times_out(tmp_path: Path) -> None:
    with SimServer(SimConfig(model="s")) as small, SimServer(SimConfig(model="l")) as large:
        server = _sim_server(tmp_path, small, large, body_timeout_s=1)
        try:
            stalled = _stalled_body(server.port)
            assert _status(stalled) == 408  # it gave up on its body_timeout_s
            stalled.close()
            wait_until(lambda: _reading(server) == 0, "reading none")
        finally:
            assert server.stopped_cleanly(), server.log.read_text()
