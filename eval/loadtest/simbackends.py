"""Parts of the simulated target: a simulated server in a child process, and three small real backends.

* :class:`SimProcess`: a :mod:`cascade.simulate` server in a child process on a free loopback port.
* :class:`SwitchBackend`: the large tier under fault injection (normal backend until switched, then faulty).
* :class:`TimedBackend`: a pass-through that records each call's duration and size (below the micro-batcher).
* :class:`LocalSimBackend`: the simulated model called in-process, no HTTP at all: the same answers and
  sleeps as the simulated server, scored in pure Python. It gives the engine's cost without the cost of
  HTTP clients and servers (``--sim-mode local``).
"""

from __future__ import annotations

import asyncio
import math
import os
import random
import select
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cascade.backends.base import Backend
from cascade.errors import BackendError, ConfigError
from cascade.simulate import SimConfig, simulate_answer
from cascade.types import EarlyExit, Generation, GenerationParams, Prompt, chat_lines

__all__ = ["LocalSimBackend", "SimProcess", "SwitchBackend", "TimedBackend", "child_code", "process_cpu_s"]


def process_cpu_s(pid: int, *, children: bool = False) -> float | None:
    """CPU seconds (user + system) process ``pid`` has used so far (Linux ``/proc``; None elsewhere).

    Args:
        pid: the process.
        children: also add its live child processes, recursively (``cascade serve --workers``).
    """
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    total = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    if children:
        try:
            kids = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        except OSError:
            kids = []
        total += sum(process_cpu_s(int(k), children=True) or 0.0 for k in kids)
    return total


def child_code(pythonpath: str | None) -> tuple[dict[str, str] | None, str | None]:
    """The environment and working directory of a ``python -c`` child that must run the code on ``pythonpath``
    (None: this process's environment and directory).

    ``python -c`` puts its working directory ahead of ``PYTHONPATH`` on ``sys.path``: started from another
    checkout, the child would import that checkout's ``cascade`` instead. So it starts in the first folder of
    ``pythonpath``.
    """
    if pythonpath is None:
        return None, None
    return {**os.environ, "PYTHONPATH": pythonpath}, pythonpath.split(os.pathsep)[0]


class SimProcess:
    """A :mod:`cascade.simulate` server in a child process on a free loopback port (same face as SimServer).

    Args:
        config: the server's behaviour.
        pythonpath: run the simulator of another checkout (see :func:`child_code`); None: this one's.
    """

    def __init__(self, config: SimConfig, *, pythonpath: str | None = None) -> None:
        self.config = config
        self.pythonpath = pythonpath
        self._proc: subprocess.Popen[bytes] | None = None
        self._port = 0
        self._log: Any = None

    @property
    def base_url(self) -> str:
        """The OpenAI base URL, e.g. ``http://127.0.0.1:41234/v1``."""
        return f"http://127.0.0.1:{self._port}/v1"

    def start(self, timeout_s: float = 30.0) -> SimProcess:
        """Start the child and wait for the line announcing its port.

        Raises:
            ConfigError: the child exits or says nothing within ``timeout_s``.
        """
        c = self.config
        argv = [sys.executable, "-m", "cascade.simulate", "--host", "127.0.0.1", "--port", "0", "--model", c.model,
                "--latency-per-token", repr(c.latency_per_token_s),
                "--latency-per-request", repr(c.latency_per_request_s), "--error-rate", repr(c.error_rate),
                "--timeout-rate", repr(c.timeout_rate), "--hang", repr(c.hang_s), "--seed", str(c.seed),
                "--max-answer-tokens", str(c.max_answer_tokens), "--confidence-scale", repr(c.confidence_scale)]
        if not c.logprobs:
            argv.append("--no-logprobs")
        self._log = tempfile.TemporaryFile()  # noqa: SIM115 - kept open for the child's lifetime
        env, cwd = child_code(self.pythonpath)
        self._proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=self._log, stdin=subprocess.DEVNULL, env=env,
                                      cwd=cwd)
        assert self._proc.stdout is not None
        deadline = time.monotonic() + timeout_s
        line = b""
        while time.monotonic() < deadline and self._proc.poll() is None:
            ready, _, _ = select.select([self._proc.stdout], [], [], 0.1)
            if ready:
                line = self._proc.stdout.readline()
                break
        if b" on 127.0.0.1:" not in line:
            self._log.seek(0)
            err = self._log.read().decode(errors="replace")[-500:]
            self.stop()
            raise ConfigError(f"the simulated server {c.model!r} did not start: {line!r} {err}")
        self._port = int(line.rsplit(b":", 1)[1])
        return self

    def cpu_s(self) -> float | None:
        """CPU seconds (user + system) the child has used so far (Linux ``/proc``; None elsewhere)."""
        return None if self._proc is None else process_cpu_s(self._proc.pid)

    def stop(self) -> None:
        """Terminate the child (kill it after 5 s) and wait for it."""
        if self._proc is not None:
            if self._proc.poll() is None:
                self._proc.terminate()
                try:
                    self._proc.wait(5.0)
                except subprocess.TimeoutExpired:
                    self._proc.kill()
                    self._proc.wait(5.0)
            if self._proc.stdout is not None:
                self._proc.stdout.close()
            self._proc = None
        if self._log is not None:
            self._log.close()
            self._log = None


class SwitchBackend:
    """The large tier under fault injection: calls go to ``normal`` until :meth:`switch`, then to ``faulty``.

    Both are real backends talking to real servers; this only chooses which one answers.
    """

    def __init__(self, normal: Backend, faulty: Backend) -> None:
        self.name = normal.name
        self._normal, self._faulty = normal, faulty
        self.switched = False

    def switch(self) -> None:
        """Send every later call to the faulty backend."""
        self.switched = True

    async def generate(self, prompts: Sequence[Prompt], params: GenerationParams, *, scores: bool = True,
                       early_exit: EarlyExit | None = None) -> list[Generation]:
        """Delegate to the current backend."""
        backend = self._faulty if self.switched else self._normal
        return await backend.generate(prompts, params, scores=scores, early_exit=early_exit)

    async def aclose(self) -> None:
        """Close both backends."""
        await self._normal.aclose()
        await self._faulty.aclose()


class TimedBackend:
    """A pass-through backend that records each call's duration and size (below the micro-batcher).

    Attributes:
        calls: (seconds, number of prompts) per call.
    """

    def __init__(self, inner: Backend) -> None:
        self.name = inner.name
        self.inner = inner
        self.calls: list[tuple[float, int]] = []

    async def generate(self, prompts: Sequence[Prompt], params: GenerationParams, *, scores: bool = True,
                       early_exit: EarlyExit | None = None) -> list[Generation]:
        """Delegate and time the call."""
        t0 = time.perf_counter()
        try:
            return await self.inner.generate(prompts, params, scores=scores, early_exit=early_exit)
        finally:
            self.calls.append((time.perf_counter() - t0, len(prompts)))

    async def aclose(self) -> None:
        """Close the inner backend."""
        await self.inner.aclose()


class LocalSimBackend:
    """The simulated model as an in-process backend: no sockets, no HTTP, no OpenAI SDK.

    Answers are :func:`cascade.simulate.simulate_answer` of the prompt (chat messages rendered as the
    simulated server renders them, one ``role: content`` line each), so they equal the server's. A call
    sleeps like the server would for its longest answer; ``error_rate`` raises :class:`BackendError`.
    Scores: ``margin_first``, ``margin_mean``, ``margin_min`` (as ``1 - margin``), ``entropy_first`` over the
    returned top-20 plus a rest bucket, and ``logprob_mean`` (negated); early exit follows ``margin_first`` or
    ``entropy_first`` exactly as ``OpenAIBackend`` does.
    """

    def __init__(self, config: SimConfig) -> None:
        self.name = config.model
        self.config = config
        self._draws = random.Random(config.seed)

    async def generate(self, prompts: Sequence[Prompt], params: GenerationParams, *, scores: bool = True,
                       early_exit: EarlyExit | None = None) -> list[Generation]:
        """Answer every prompt (see :class:`~cascade.backends.base.Backend`)."""
        c = self.config
        started = time.perf_counter()
        if self._draws.random() < c.error_rate:
            await asyncio.sleep(c.latency_per_request_s)
            raise BackendError(f"{self.name}: simulated HTTP 500")
        thresholds = early_exit.thresholds if early_exit is not None else (math.inf,) * len(prompts)
        parts = []  # (text, completion tokens, finish reason, measures) per prompt
        for prompt, threshold in zip(prompts, thresholds, strict=True):
            key = prompt if isinstance(prompt, str) else chat_lines(prompt)
            a = simulate_answer(c, key, params.max_tokens, params.stop)
            measures = _measures(a.top, a.logprobs)
            if early_exit is not None and a.tokens and measures[early_exit.measure] > threshold:
                parts.append((a.tokens[0], 1, "early_exit", measures))
            else:
                parts.append((a.text, len(a.tokens), a.finish_reason, measures))
        await asyncio.sleep(c.latency_per_request_s + max((n for _, n, _, _ in parts), default=0)
                            * c.latency_per_token_s)
        latency = time.perf_counter() - started
        return [Generation(text=text, model=self.name, prompt_tokens=max(1, len(str(p).split())),
                           completion_tokens=n, finish_reason=finish,  # type: ignore[arg-type]
                           scores=measures if scores else {}, latency_s=latency)
                for p, (text, n, finish, measures) in zip(prompts, parts, strict=True)]

    async def aclose(self) -> None:
        """Nothing to release."""


def _measures(top: Sequence[Sequence[tuple[str, float]]], logprobs: Sequence[float]) -> dict[str, float]:
    """The uncertainty measures of one simulated answer (T steps of top-20 ``(token, logprob)``)."""
    if not top:  # an empty answer: as unsure as can be
        return {"margin_first": 1.0, "margin_mean": 1.0, "margin_min": 1.0, "entropy_first": math.log(2),
                "logprob_mean": math.inf}
    margins = [math.exp(step[0][1]) - math.exp(step[1][1]) for step in top]
    ps = [math.exp(lp) for _, lp in top[0]]
    rest = max(0.0, 1.0 - sum(ps))
    entropy = -sum(p * math.log(p) for p in ps if p > 0) - (rest * math.log(rest) if rest > 0 else 0.0)
    return {"margin_first": 1 - margins[0], "margin_mean": 1 - sum(margins) / len(margins),
            "margin_min": 1 - min(margins), "entropy_first": entropy,
            "logprob_mean": -sum(logprobs) / len(logprobs)}
