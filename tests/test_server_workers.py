"""`cascade serve --workers 2` end to end: two real worker processes on one loopback port, their /metrics
summed, SIGTERM stopping every one of them (no timing assumptions: conditions are polled)."""

from __future__ import annotations

import os
import re
import signal
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from conftest import PATIENCE_S, wait_until
from test_server import ServerProcess, sim_config

from cascade.simulate import SimConfig, SimServer

CHAT = {"model": "cascade", "messages": [{"role": "user", "content": "the movie was good"}], "max_tokens": 4}


@pytest.fixture(scope="module")
def tiers() -> Iterator[tuple[SimServer, SimServer]]:
    with SimServer(SimConfig(model="sim-small")) as small, SimServer(SimConfig(model="sim-large")) as large:
        yield small, large


def _workers(pid: int) -> set[int]:
    """The worker processes of the supervisor ``pid`` (not multiprocessing's resource tracker)."""
    kids = [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    return {k for k in kids if b"spawn_main" in Path(f"/proc/{k}/cmdline").read_bytes()}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat").read_text() if Path(f"/proc/{pid}/stat").exists() else ""
    return bool(stat) and stat.rsplit(")", 1)[1].split()[0] != "Z"


def _answered(text: str) -> float:
    """Sum of cascade_requests_total over every label set with status 200."""
    return sum(float(v) for v in re.findall(r'^cascade_requests_total\{[^}]*status="200"[^}]*\} (\S+)$', text, re.M))


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="reads worker processes from Linux /proc")
def test_two_workers_answer_sum_metrics_and_stop_on_sigterm(tmp_path: Path,
                                                            tiers: tuple[SimServer, SimServer]) -> None:
    small, large = tiers
    config = sim_config(tmp_path / "sim.yaml", small, large, max_in_flight=8, max_queue=8)
    server = ServerProcess(config, tmp_path / "log.txt", args=("--workers", "2"))
    try:
        wait_until(lambda: len(_workers(server.proc.pid)) == 2, "two worker processes")
        workers = _workers(server.proc.pid)
        seen: set[int] = set()
        sent = 0

        def both_answered() -> bool:  # a new connection each time: the kernel hands them to either worker
            nonlocal sent
            with httpx.Client(base_url=server.url, timeout=PATIENCE_S) as c:
                seen.add(int(c.get("/health").json()["pid"]))
                r = c.post("/v1/chat/completions", json=CHAT)
                assert r.status_code == 200, r.text
                sent += 1
            return seen >= workers

        wait_until(both_answered, "an answer from each worker")
        assert seen == workers and server.proc.pid not in seen
        # every answer is counted once, whichever worker serves the scrape
        wait_until(lambda: _answered(httpx.get(server.url + "/metrics", timeout=PATIENCE_S).text) == sent,
                   f"/metrics summing {sent} answers over both workers")
        text = httpx.get(server.url + "/metrics", timeout=PATIENCE_S).text
        for name in ("cascade_tokens_total", "cascade_request_latency_seconds_count", "cascade_in_flight_requests",
                     "cascade_queue_depth"):
            assert name in text, name
    finally:
        server.proc.send_signal(signal.SIGTERM)
        code = server.stop()
    assert code == 0, server.log.read_text()
    assert not any(_alive(pid) for pid in workers)
    assert "Traceback" not in server.log.read_text()


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="reads worker processes from Linux /proc")
def test_workers_stop_when_the_supervisor_is_killed(tmp_path: Path, tiers: tuple[SimServer, SimServer]) -> None:
    small, large = tiers
    server = ServerProcess(sim_config(tmp_path / "sim.yaml", small, large), tmp_path / "log.txt",
                           {"TMPDIR": str(tmp_path)}, args=("--workers", "2"))  # the metrics folder it leaves
    try:
        def detached() -> bool:  # each worker leaves the terminal's group first thing: Ctrl-C hits one
            found = _workers(server.proc.pid)
            return len(found) == 2 and all(os.getpgid(pid) == pid for pid in found)

        wait_until(detached, "two worker processes, each in its own process group")  # (a spawned worker's
        workers = _workers(server.proc.pid)  # interpreter starts before it can leave the group)
    finally:
        server.proc.kill()  # no SIGTERM to pass on: the workers notice their supervisor is gone
        server.stop()
    wait_until(lambda: not any(_alive(pid) for pid in workers), "the orphaned workers stopping")
