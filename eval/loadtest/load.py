"""Load shapes on one asyncio loop: closed loop (users who think between answers) and open loop (Poisson).

Both stop by themselves: no request is sent after ``duration_s`` or once ``max_requests`` were sent; requests
still in flight then get ``grace_s`` seconds, after which they are cancelled and counted as failed with kind
``unfinished_at_stop``. Every request sent gets exactly one outcome in the :class:`Recorder`.
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from cascade.errors import ConfigError
from cascade.types import Prompt
from eval.loadtest.stats import Outcome, Recorder, Sample
from eval.loadtest.targets import LoadTarget, RequestFailed

__all__ = ["LoadShape", "RunResult", "run", "run_load", "warm_up"]

T = TypeVar("T")

#: A scheduled action: (seconds after the start, coroutine function returning a description).
Event = tuple[float, Callable[[], Awaitable[str]]]


@dataclass(frozen=True)
class LoadShape:
    """How load is applied."""

    users: int = 10  # closed loop: concurrent users, each waiting for its answer, then thinking
    duration_s: float = 30.0  # no request is sent after this many seconds
    think_time_s: float = 5.0  # closed loop: mean think time between an answer and the next request, seconds
    think: str = "exp"  # closed loop: "exp" (exponential with that mean) or "fixed"
    rate: float | None = None  # open loop when set: Poisson arrivals per second (users/think are ignored)
    ramp_up_s: float = 0.0  # closed: users start evenly over this time; open: the rate rises linearly to `rate`
    max_requests: int | None = None  # send at most this many requests (None = no limit)
    grace_s: float = 10.0  # seconds in-flight requests may still finish after sending stopped
    stream: bool = False  # ask for streamed answers (HTTP targets; gives time to first token)
    sample_interval_s: float = 0.5  # period of the in-flight / queue-depth time series, seconds
    seed: int = 0  # seed of think times and arrivals

    def __post_init__(self) -> None:
        if not (math.isfinite(self.duration_s) and self.duration_s > 0):
            raise ConfigError(f"duration must be a positive number of seconds, got {self.duration_s!r}")
        if self.rate is None and self.users < 1:
            raise ConfigError(f"users must be >= 1, got {self.users!r}")
        if self.rate is not None and not (math.isfinite(self.rate) and self.rate > 0):
            raise ConfigError(f"rate must be a positive number of requests per second, got {self.rate!r}")
        if self.think not in ("exp", "fixed"):
            raise ConfigError(f"think must be 'exp' or 'fixed', got {self.think!r}")
        if self.think_time_s < 0 or self.ramp_up_s < 0 or self.grace_s < 0:
            raise ConfigError("think time, ramp-up and grace period must be >= 0")
        if self.max_requests is not None and self.max_requests < 1:
            raise ConfigError(f"max_requests must be >= 1, got {self.max_requests!r}")
        if not self.sample_interval_s > 0:
            raise ConfigError("sample_interval_s must be > 0")

    @property
    def kind(self) -> str:
        """``"open"`` (Poisson arrivals) or ``"closed"`` (users)."""
        return "open" if self.rate is not None else "closed"


@dataclass
class RunResult:
    """A finished run.

    Attributes:
        recorder: counters, outcomes and the time series.
        sending_s: seconds from the start until sending stopped.
        elapsed_s: seconds from the start until the last outcome (the run's measured span).
        events: (seconds after start, description) of injected events such as faults.
        cpu_s: CPU seconds (user + system) this process used during the run.
        stopped_by: why sending stopped: ``"max_requests"`` (that many were sent) or ``"duration"``.
    """

    recorder: Recorder
    sending_s: float = 0.0
    elapsed_s: float = 0.0
    events: list[tuple[float, str]] = field(default_factory=list)
    cpu_s: float = 0.0
    stopped_by: str = "duration"


class _Run:
    def __init__(self, target: LoadTarget, prompts: Sequence[Prompt], shape: LoadShape) -> None:
        if not prompts:
            raise ConfigError("no prompts to send")
        self.target, self.prompts, self.shape = target, prompts, shape
        self.rec = Recorder()
        self.rng = random.Random(shape.seed)
        self.t0 = time.perf_counter()
        self.sending = True
        self.stopped_sending_at: float | None = None
        self.stopped_by = "duration"

    def now(self) -> float:
        return time.perf_counter() - self.t0

    def may_send(self) -> bool:
        s = self.shape
        if self.sending and (self.now() >= s.duration_s or
                             (s.max_requests is not None and self.rec.sent >= s.max_requests)):
            self.sending = False
            self.stopped_sending_at = min(self.now(), s.duration_s)
            if s.max_requests is not None and self.rec.sent >= s.max_requests:
                self.stopped_by = "max_requests"
        return self.sending

    async def one(self, rid: int | None = None, start: float | None = None) -> None:
        """Send one request and record its one outcome, whatever happens (even cancellation).

        Args:
            rid: the id from ``Recorder.begin`` when the caller already counted the request as sent.
            start: when the request was due (open loop: its scheduled arrival, so that a late harness shows
                up as latency instead of being hidden; "coordinated omission"); default now.
        """
        rid = self.rec.begin() if rid is None else rid
        prompt = self.prompts[rid % len(self.prompts)]
        sent = self.now()
        start = sent if start is None else start
        try:
            reply = await self.target.send(prompt, stream=self.shape.stream)
        except RequestFailed as exc:
            self.rec.finish(Outcome(rid, start, self.now(), exc.kind, detail=str(exc)[:300], sent_s=sent))
        except asyncio.CancelledError:
            self.rec.finish(Outcome(rid, start, self.now(), "unfinished_at_stop", sent_s=sent,
                                    detail=f"still in flight {self.shape.grace_s:g} s after sending stopped"))
            raise
        except Exception as exc:  # any other failure is still an outcome, classified by its type
            self.rec.finish(Outcome(rid, start, self.now(), type(exc).__name__, detail=str(exc)[:300], sent_s=sent))
        else:
            ttft = None if reply.ttft_s is None else reply.ttft_s + (sent - start)
            self.rec.finish(Outcome(rid, start, self.now(), None, reply.tier, reply.escalated, reply.degraded,
                                    reply.cost, reply.backend_s, ttft, reply.calls, engine_s=reply.engine_s,
                                    sent_s=sent))

    async def user(self, index: int) -> None:
        s = self.shape
        await self.sleep_until(s.ramp_up_s * index / s.users)
        while self.may_send():
            await self.one()
            if s.think == "fixed" or s.think_time_s == 0:
                pause = s.think_time_s
            else:
                pause = self.rng.expovariate(1.0 / s.think_time_s)
            await self.sleep_until(self.now() + pause)

    async def sleep_until(self, t: float) -> None:
        """Sleep until ``t`` seconds after the start, but never past the end of the sending phase."""
        delay = min(t, self.shape.duration_s) - self.now()
        await asyncio.sleep(max(0.0, delay))

    async def arrivals(self, tasks: set[asyncio.Task[None]]) -> None:
        """Poisson arrivals at ``rate`` (thinned linearly during the ramp-up); one task per request."""
        s = self.shape
        assert s.rate is not None
        t = 0.0
        while True:
            t += self.rng.expovariate(s.rate)
            if t >= s.duration_s:
                break
            if s.ramp_up_s > 0 and t < s.ramp_up_s and self.rng.random() >= t / s.ramp_up_s:
                continue
            if t > self.now():
                await asyncio.sleep(t - self.now())
            if not self.may_send():
                break
            task = asyncio.create_task(self.one(self.rec.begin(), t))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        self.may_send()

    async def sampler(self) -> None:
        interval = self.shape.sample_interval_s
        due = self.now()
        while True:
            lag = max(0.0, self.now() - due)
            r = self.rec
            self.rec.samples.append(Sample(round(self.now(), 4), r.in_flight, r.sent, r.answered, r.failed,
                                           self.target.queue_depth(), round(lag * 1000, 3)))
            due += interval
            if due <= self.now():  # more than one interval late: skip the missed samples
                due = self.now() + interval
            await asyncio.sleep(max(0.0, due - self.now()))

    async def scheduled(self, events: Sequence[Event], log: list[tuple[float, str]]) -> None:
        for at, action in sorted(events, key=lambda e: e[0]):
            await asyncio.sleep(max(0.0, at - self.now()))
            if not self.sending:
                log.append((round(self.now(), 3), "skipped: sending had already stopped"))
                return
            when = self.now()
            log.append((round(when, 3), await action()))


async def run_load(target: LoadTarget, prompts: Sequence[Prompt], shape: LoadShape,
                   events: Sequence[Event] = ()) -> RunResult:
    """Apply the load and return when every request has its outcome (at most ``duration + grace`` seconds).

    Args:
        target: what to load.
        prompts: P prompts, sent in turn (request i gets prompt i mod P).
        shape: closed or open loop, stop conditions.
        events: actions to run at given times during the sending phase (fault injection).
    """
    import resource

    usage0 = resource.getrusage(resource.RUSAGE_SELF)
    run = _Run(target, prompts, shape)
    result = RunResult(run.rec)
    helpers = [asyncio.create_task(run.sampler()), asyncio.create_task(run.scheduled(events, result.events))]
    in_flight: set[asyncio.Task[None]] = set()
    try:
        if shape.rate is None:
            workers = [asyncio.create_task(run.user(i)) for i in range(shape.users)]
            await asyncio.wait(workers, timeout=max(0.0, shape.duration_s - run.now()))
            pending = {w for w in workers if not w.done()}
        else:
            await run.arrivals(in_flight)
            pending = set(in_flight)
        run.may_send()
        run.sending = False
        result.sending_s = run.stopped_sending_at if run.stopped_sending_at is not None else run.now()
        result.stopped_by = run.stopped_by
        if pending:
            grace_end = result.sending_s + shape.grace_s
            _, pending = await asyncio.wait(pending, timeout=max(0.0, grace_end - run.now()))
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
    finally:
        for h in helpers:
            h.cancel()
        await asyncio.gather(*helpers, return_exceptions=True)
    last = max((o.end_s for o in run.rec.outcomes), default=run.now())
    result.elapsed_s = max(last, 1e-9)
    usage1 = resource.getrusage(resource.RUSAGE_SELF)
    result.cpu_s = (usage1.ru_utime - usage0.ru_utime) + (usage1.ru_stime - usage0.ru_stime)
    return result


async def warm_up(target: LoadTarget, prompts: Sequence[Prompt], n: int = 4, stream: bool = False) -> None:
    """Send ``n`` requests that are not counted (imports, connections); fail clearly if none is answered.

    Raises:
        ConfigError: every warm-up request failed (the target is down or refuses the requests).
    """
    if n <= 0:
        return
    results = await asyncio.gather(*(target.send(prompts[i % len(prompts)], stream=stream) for i in range(n)),
                                   return_exceptions=True)
    errors = [r for r in results if isinstance(r, BaseException)]
    if len(errors) == len(results):
        raise ConfigError(f"the target {target.name} failed every warm-up request: {errors[0]!r}")


def run(main: Coroutine[Any, Any, T]) -> T:
    """``asyncio.run(main)``, on uvloop's event loop when it is installed (the ``fast`` extra).

    The load generator shares the machine with the servers it measures; uvloop's loop takes less of its CPU per
    request than asyncio's (timers, socket reads), as it does in ``cascade serve``.
    """
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(main)
