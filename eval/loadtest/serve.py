"""The simulated cascade behind a real ``cascade serve`` child process, loaded over loopback HTTP.

Two :mod:`cascade.simulate` servers run as child processes; a YAML config pointing two ``openai`` tiers at
them is written to a temporary folder; ``cascade serve --config ... --port P`` runs as a third child process.
The fault ``large-down`` stops the large tier's server mid-run (the other faults need the in-process target).
"""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from cascade.errors import ConfigError
from eval.loadtest.sim import SimOptions
from eval.loadtest.simbackends import SimProcess, child_code, process_cpu_s
from eval.loadtest.targets import Started

__all__ = ["ServedCascade", "child_code", "free_port", "serve_config"]


def serve_config(options: SimOptions, small_url: str, large_url: str, *, max_in_flight: int = 256,
                 max_queue: int = 1024) -> dict[str, Any]:
    """The ``cascade serve`` config (as a mapping) for the simulated two-tier cascade.

    Args:
        options: the simulated cascade (threshold, tokens, batching, timeouts).
        small_url: the small server's OpenAI base URL.
        large_url: the large server's OpenAI base URL.
        max_in_flight: the server's ``max_in_flight`` (requests in the engine at once).
        max_queue: the server's ``max_queue`` (requests waiting; more get HTTP 429).
    """

    def backend(model: str, url: str) -> dict[str, Any]:
        return {"kind": "openai", "model": model, "base_url": url, "max_concurrency": options.backend_concurrency,
                "max_retries": options.backend_retries, "timeout_s": options.backend_timeout_s}

    large: dict[str, Any] = {"name": "large", "backend": backend(options.large.model, large_url),
                             "price_input_per_mtok": 0.5, "price_output_per_mtok": 0.5}
    if options.large_timeout_s is not None:
        large["timeout_s"] = options.large_timeout_s
    return {
        "tiers": [{"name": "small", "backend": backend(options.small.model, small_url),
                   "price_input_per_mtok": 0.135, "price_output_per_mtok": 0.135}, large],
        "measure": options.measure,
        "thresholds": [options.threshold],
        "max_tokens": options.max_tokens,
        "early_exit": options.early_exit,
        "on_error": options.on_error,
        "batching": {"enabled": options.batching, "max_batch_size": options.batch_size,
                     "max_wait_ms": options.batch_wait_ms, "max_queue": options.batch_queue},
        "extra": {"server": {"max_in_flight": max_in_flight, "max_queue": max_queue, "drain_timeout_s": 5.0}},
    }


def free_port() -> int:
    """A free TCP port on 127.0.0.1 (free when asked: bind it soon)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ServedCascade(Started):
    """Start the two simulated servers and ``cascade serve`` in front of them; ``url`` is the server root.

    Use ``async with ServedCascade(options) as served:`` then load ``served.url`` with an HTTP target.

    Args:
        options: the simulated cascade.
        max_in_flight: the server's ``max_in_flight``.
        max_queue: the server's ``max_queue``.
        serve_args: more ``cascade serve`` arguments (e.g. ``["--workers", "2"]``).
        pythonpath: the ``PYTHONPATH`` of the ``cascade serve`` child and of both simulated servers (another
            checkout's code, for a before/after comparison); None inherits this process's.
        server: more keys of the config's ``server`` section.
    """

    def __init__(self, options: SimOptions, *, max_in_flight: int = 256, max_queue: int = 1024,
                 serve_args: Sequence[str] = (), pythonpath: str | None = None,
                 server: Mapping[str, Any] | None = None) -> None:
        if options.fault not in (None, "large-down"):
            raise ConfigError("behind cascade serve only the large-down fault can be injected mid-run")
        self.options = options
        self.max_in_flight, self.max_queue = max_in_flight, max_queue
        self.serve_args, self.pythonpath, self.server = list(serve_args), pythonpath, dict(server or {})
        self.servers: dict[str, SimProcess] = {}
        self.url = ""
        self._proc: subprocess.Popen[bytes] | None = None
        self._dir: tempfile.TemporaryDirectory[str] | None = None

    async def start(self) -> None:
        """Start the servers and ``cascade serve`` (blocking work, in a thread)."""
        await asyncio.to_thread(self._start)

    def _start(self) -> None:
        import yaml

        o = self.options
        for name, cfg in (("small", o.small), ("large", o.large)):
            self.servers[name] = SimProcess(cfg, pythonpath=self.pythonpath).start()
        config = serve_config(o, self.servers["small"].base_url, self.servers["large"].base_url,
                              max_in_flight=self.max_in_flight, max_queue=self.max_queue)
        config["extra"]["server"].update(self.server)
        self._dir = tempfile.TemporaryDirectory(prefix="loadtest-serve-")
        path = Path(self._dir.name) / "cascade.yaml"
        path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
        port = free_port()
        log = (Path(self._dir.name) / "serve.log").open("wb")
        argv = [sys.executable, "-c", "from cascade.cli import main; raise SystemExit(main())", "serve",
                "--config", str(path), "--host", "127.0.0.1", "--port", str(port), *self.serve_args]
        env, cwd = child_code(self.pythonpath)
        self._proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                      cwd=cwd)
        log.close()
        self.url = f"http://127.0.0.1:{port}"
        self._wait_healthy(60.0)

    def _wait_healthy(self, timeout_s: float) -> None:
        import httpx

        assert self._proc is not None and self._dir is not None
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                break
            try:
                if httpx.get(self.url + "/health", timeout=1.0, trust_env=False).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        text = (Path(self._dir.name) / "serve.log").read_text(errors="replace")[-800:]
        raise ConfigError(f"cascade serve did not become healthy at {self.url}: {text}")

    def cpu_s(self) -> float | None:
        """CPU seconds ``cascade serve`` has used so far, its worker processes included (Linux; else None)."""
        return None if self._proc is None else process_cpu_s(self._proc.pid, children=True)

    def cpu_by_process(self) -> dict[str, float | None]:
        """CPU seconds used so far by ``cascade serve`` (``gateway``) and each simulated server (Linux; else None)."""
        return {"gateway": self.cpu_s(), **{name: server.cpu_s() for name, server in self.servers.items()}}

    async def inject(self) -> str:
        """Stop the large tier's server (the ``large-down`` fault)."""
        await asyncio.to_thread(self.servers["large"].stop)
        return "large tier's server stopped (behind cascade serve)"

    def reset_counters(self) -> None:
        """Nothing to reset: the child processes keep their counters to themselves."""

    async def aclose(self) -> None:
        """Stop ``cascade serve`` (SIGTERM, then SIGKILL after 15 s) and both simulated servers."""
        if self._proc is not None:
            proc, self._proc = self._proc, None
            if proc.poll() is None:
                proc.terminate()
                try:
                    await asyncio.to_thread(proc.wait, 15.0)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    await asyncio.to_thread(proc.wait, 5.0)
        for server in self.servers.values():
            await asyncio.to_thread(server.stop)
        self.servers.clear()
        if self._dir is not None:
            self._dir.cleanup()
            self._dir = None
