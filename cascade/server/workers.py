"""``cascade serve --workers N``: N server processes answering on one listening socket.

The supervisor (the ``cascade serve`` process) takes the port (:func:`reserve`), points prometheus-client's
multiprocess mode at a fresh folder (``PROMETHEUS_MULTIPROC_DIR``) and starts N worker processes (``spawn``:
nothing of the supervisor's state is inherited but the environment). Each worker builds its own engine (its
own tiers: local models are loaded N times, remote tiers cost a connection pool each) and serves the port
with uvicorn; the kernel hands each new connection to one of them (``SO_REUSEPORT``). ``/metrics`` sums the
counters of all workers; ``/health``, ``/v1/cascade/status`` and the live checks are per worker.

SIGTERM or SIGINT to the supervisor is passed to every worker as SIGTERM (the workers leave the terminal's
process group, so Ctrl-C reaches them once, through the supervisor; a worker whose supervisor dies stops
too): each stops accepting, drains its requests in flight (``drain_timeout_s``) and exits; the supervisor
waits for all of them, then removes the metrics folder. SIGHUP is passed on too (each worker reloads its
artifact). A worker that exits on its own (a crash, or a failed start) stops the others: the supervisor
exits with status 1 rather than serve degraded.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import multiprocessing.connection
import os
import shutil
import signal
import socket
import tempfile
import threading
import time
from collections.abc import Callable
from typing import Any

from cascade.server.metrics import MULTIPROC_ENV

__all__ = ["Listener", "bind_socket", "detach", "reserve", "supervise", "worker_socket"]

log = logging.getLogger("cascade.server")


REUSE_PORT = hasattr(socket, "SO_REUSEPORT")

#: What a worker is given to serve: the shared listening socket, or (host, port) to bind with SO_REUSEPORT.
Listener = socket.socket | tuple[str, int]


def bind_socket(host: str, port: int, *, reuse_port: bool = False, listen: bool = True) -> socket.socket:
    """A TCP socket bound to ``host:port`` (``port`` 0: any free port), listening unless told otherwise."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host.strip("[]"), port))
        if listen:
            sock.listen(2048)
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


def reserve(host: str, port: int) -> tuple[socket.socket, Listener]:
    """The supervisor's socket and what each worker gets to serve the same port.

    With ``SO_REUSEPORT`` (Linux, the BSDs) the supervisor's socket only holds the port (bound, not listening)
    and every worker binds and listens on its own: the kernel spreads new connections evenly over them. A
    shared listening socket instead goes to whichever worker wakes first, which under light load is mostly
    one of them. Elsewhere the workers share the supervisor's listening socket.
    """
    if REUSE_PORT:
        sock = bind_socket(host, port, reuse_port=True, listen=False)
        return sock, (host, int(sock.getsockname()[1]))
    sock = bind_socket(host, port)
    return sock, sock


def worker_socket(listener: Listener) -> socket.socket:
    """In a worker: the listening socket to serve (see :func:`reserve`)."""
    if isinstance(listener, socket.socket):
        return listener
    return bind_socket(*listener, reuse_port=True)


def detach(supervisor: int) -> None:
    """In a worker, first thing: leave the terminal's process group, so that Ctrl-C reaches the supervisor
    alone and each worker gets one SIGTERM (a second signal would make uvicorn skip the drain), and stop by
    SIGTERM if the supervisor itself dies (checked every second)."""
    with contextlib.suppress(OSError):
        os.setpgid(0, 0)

    def watch() -> None:
        while os.getppid() == supervisor:
            time.sleep(1.0)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="cascade-supervisor-watch", daemon=True).start()


def supervise(target: Callable[[Listener], Any], workers: int, listener: Listener, *, stop_timeout_s: float) -> int:
    """Run ``target(listener)`` in ``workers`` processes until a signal (or a worker's exit) stops them all.

    Args:
        target: a module-level function (it is pickled for ``spawn``) serving ``worker_socket(listener)``
            until SIGTERM.
        workers: number of processes, >= 1.
        listener: from :func:`reserve`.
        stop_timeout_s: seconds each worker gets to drain after SIGTERM before it is killed.

    Returns:
        0 after a shutdown by signal, 1 when a worker exited by itself.
    """
    metrics_dir = tempfile.mkdtemp(prefix="cascade-metrics-")
    previous_env = os.environ.get(MULTIPROC_ENV)
    os.environ[MULTIPROC_ENV] = metrics_dir
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=target, args=(listener,), name=f"cascade-worker-{i}", daemon=False)
             for i in range(workers)]
    stop: list[int] = []

    def forward(sig: int, frame: Any) -> None:
        for p in procs:
            if p.pid is not None and p.is_alive():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(p.pid, sig)

    handlers = {s: signal.signal(s, lambda sig, frame: stop.append(sig)) for s in (signal.SIGTERM, signal.SIGINT)}
    if hasattr(signal, "SIGHUP"):
        handlers[signal.SIGHUP] = signal.signal(signal.SIGHUP, forward)
    failed = False
    try:
        for p in procs:
            p.start()
        log.info("started %d workers: %s", workers, ", ".join(str(p.pid) for p in procs))
        while not stop:
            ended = multiprocessing.connection.wait([p.sentinel for p in procs], timeout=0.5)
            if ended and not stop:
                dead = [p for p in procs if not p.is_alive()]
                log.error("worker %s exited with status %s: stopping the others",
                          ", ".join(str(p.pid) for p in dead), ", ".join(str(p.exitcode) for p in dead))
                failed = True
                break
    finally:
        _stop_all(procs, stop_timeout_s)
        for s, h in handlers.items():
            signal.signal(s, h)
        if previous_env is None:
            os.environ.pop(MULTIPROC_ENV, None)
        else:
            os.environ[MULTIPROC_ENV] = previous_env
        shutil.rmtree(metrics_dir, ignore_errors=True)
    return 1 if failed else 0


def _stop_all(procs: list[Any], timeout_s: float) -> None:
    """SIGTERM every live worker, wait up to ``timeout_s`` for all, kill the ones still running."""
    for p in procs:
        if p.pid is not None and p.is_alive():
            with contextlib.suppress(ProcessLookupError):
                os.kill(p.pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    for p in procs:
        if p.pid is not None:
            p.join(max(0.0, deadline - time.monotonic()))
    for p in procs:
        if p.pid is not None and p.is_alive():
            log.warning("worker %d did not stop within %g s: killing it", p.pid, timeout_s)
            p.kill()
            p.join()
