"""Run the simulated server in a background thread (:class:`SimServer`) or the foreground (:func:`main`)."""

from __future__ import annotations

import argparse
import asyncio
import gc
import socket
import threading
import time
from collections.abc import Sequence
from typing import Any

from cascade.errors import ConfigError, InvalidRequestError
from cascade.simulate.app import SimStats, create_app
from cascade.simulate.model import SimConfig

__all__ = ["LOOPBACK_HOSTS", "SimServer", "main"]

#: The only hosts the simulator binds to.
LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})


def _bind(host: str, port: int) -> socket.socket:
    if host not in LOOPBACK_HOSTS:
        raise ConfigError(f"the simulator binds loopback only ({sorted(LOOPBACK_HOSTS)}), not {host!r}")
    if not isinstance(port, int) or not 0 <= port <= 65535:
        raise ConfigError(f"port must be an integer in [0, 65535], got {port!r}")
    family = socket.AF_INET6 if host == "::1" else socket.AF_INET
    # proto must be IPPROTO_TCP: asyncio only sets TCP_NODELAY on accepted sockets whose proto says TCP, and
    # without it every keep-alive response waits ~40 ms for a delayed ACK (Nagle).
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(("127.0.0.1" if host == "localhost" else host, port))
    except OSError as exc:
        sock.close()
        raise ConfigError(f"cannot bind {host}:{port}: {exc}") from exc
    sock.listen(2048)  # connections queue from now on, before uvicorn starts accepting
    return sock


class SimServer:
    """Run the simulated server with uvicorn in a background thread, on a free loopback port.

    Use as ``with SimServer(cfg) as s:``, ``async with SimServer(cfg) as s:`` or ``start()``/``stop()``.

    Attributes:
        config: the server's behaviour.
        stats: its live counters (:class:`SimStats`).
    """

    def __init__(self, config: SimConfig | None = None, *, host: str = "127.0.0.1", port: int = 0) -> None:
        """Prepare a server; nothing runs until :meth:`start`.

        Args:
            config: behaviour (default ``SimConfig()``).
            host: a loopback host (``127.0.0.1``, ``localhost`` or ``::1``); anything else is a ConfigError.
            port: TCP port; 0 picks a free one (default 0).
        """
        if host not in LOOPBACK_HOSTS:
            raise ConfigError(f"the simulator binds loopback only ({sorted(LOOPBACK_HOSTS)}), not {host!r}")
        self.config = config if config is not None else SimConfig()
        self.stats = SimStats()
        self._host, self._port = host, port
        self._server: Any = None
        self._thread: threading.Thread | None = None
        self._sock: socket.socket | None = None

    @property
    def url(self) -> str:
        """The server root, e.g. ``http://127.0.0.1:41234`` (only while running)."""
        if self._sock is None:
            raise InvalidRequestError("the server is not running")
        port = self._sock.getsockname()[1]
        return f"http://[::1]:{port}" if self._host == "::1" else f"http://127.0.0.1:{port}"

    @property
    def base_url(self) -> str:
        """The OpenAI base URL (the root plus ``/v1``), for ``openai.OpenAI(base_url=...)``."""
        return self.url + "/v1"

    def start(self, timeout_s: float = 10.0) -> SimServer:
        """Bind, start uvicorn in a daemon thread and wait until it accepts connections.

        Raises:
            ConfigError: already running, the port cannot be bound, or the server did not start in time.
        """
        import uvicorn

        if self._thread is not None:
            raise ConfigError("the server is already running")
        self._sock = _bind(self._host, self._port)
        uv_config = uvicorn.Config(create_app(self.config, self.stats), log_level="warning", access_log=False,
                                   lifespan="off", timeout_graceful_shutdown=1)
        self._server = uvicorn.Server(uv_config)
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self._sock]},
                                        name="cascade-simulate", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise ConfigError("the simulated server did not start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        """Ask uvicorn to exit, wait for its thread (at most a few seconds) and release the port."""
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=10.0)
        if self._sock is not None:
            self._sock.close()
        self._server = self._thread = self._sock = None

    def __enter__(self) -> SimServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    async def __aenter__(self) -> SimServer:
        return await asyncio.to_thread(self.start)

    async def __aexit__(self, *exc: object) -> None:
        await asyncio.to_thread(self.stop)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the simulated server in the foreground until interrupted. Returns the exit status."""
    import uvicorn

    p = argparse.ArgumentParser(prog="python -m cascade.simulate", description=__doc__.splitlines()[0])
    p.add_argument("--host", default="127.0.0.1", help="loopback host to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="TCP port; 0 picks a free one (default 8000)")
    p.add_argument("--model", default="sim-model", help="model id served (default sim-model)")
    p.add_argument("--latency-per-token", type=float, default=0.0, help="seconds per token (default 0)")
    p.add_argument("--latency-per-request", type=float, default=0.0, help="seconds per request (default 0)")
    p.add_argument("--error-rate", type=float, default=0.0, help="share of HTTP 500 answers (default 0)")
    p.add_argument("--timeout-rate", type=float, default=0.0, help="share of hanging requests (default 0)")
    p.add_argument("--hang", type=float, default=30.0, help="seconds a hanging request waits (default 30)")
    p.add_argument("--seed", type=int, default=0, help="seed of answers and draws (default 0)")
    p.add_argument("--max-answer-tokens", type=int, default=48, help="longest natural answer (default 48)")
    p.add_argument("--no-logprobs", action="store_true", help="imitate a server without logprobs support")
    p.add_argument("--confidence-scale", type=float, default=1.0,
                   help="multiply every prompt's confidence, in (0, 1]: a worse model (default 1)")
    args = p.parse_args(argv)
    try:
        config = SimConfig(model=args.model, latency_per_token_s=args.latency_per_token,
                           latency_per_request_s=args.latency_per_request, error_rate=args.error_rate,
                           timeout_rate=args.timeout_rate, hang_s=args.hang, seed=args.seed,
                           logprobs=not args.no_logprobs, max_answer_tokens=args.max_answer_tokens,
                           confidence_scale=args.confidence_scale)
        sock = _bind(args.host, args.port)
    except ConfigError as exc:
        p.error(str(exc))
    server = uvicorn.Server(uvicorn.Config(create_app(config), log_level="warning", access_log=False,
                                           lifespan="off", timeout_graceful_shutdown=1))
    gc.freeze()  # what was imported stays: the collector no longer walks it on every full pass (less CPU)
    print(f"cascade.simulate: serving {config.model} on {args.host}:{sock.getsockname()[1]}", flush=True)
    with sock:
        server.run(sockets=[sock])
    return 0


