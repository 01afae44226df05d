"""Shadow checks: a share of accepted answers is also sent to the last tier, after the user has the answer.

:class:`Shadow` is given each finished request. With probability ``shadow_rate`` (only requests on the
policy's own thresholds: a per-request target or a router cluster uses other thresholds) it starts a
background task that asks the last tier the same prompt and records whether the two answers agree
(:meth:`cascade.monitor.Monitor.observe_pair`): for constrained requests the same choice, for free ones the
artifact's scorer's notion of "the same answer" (:func:`cascade.scorers.get_same`; exact after normalisation
when it has none or needs choices). The task runs after the answer is returned, at most
``shadow_concurrency`` at once; a check that finds them all busy is dropped and counted, never queued, so
under load shadows go first. Their cost is monitoring cost (``Monitor.shadow_cost``), never the user's.

Sampled escalated requests already have both answers (the first tier's and the last tier's): they cost
nothing, unless early exit cut the first answer to one token, in which case the first tier is asked again
in the background for its full answer. Every pair goes to the JSONL log when ``log_path`` is set: the
records ``cascade-calibrate --from-log`` refits thresholds from (:mod:`calibration.from_log`). Sampled records
(``"sampled": true``) are a uniform sample of the traffic on the policy's thresholds; ``log_escalated`` adds
every other escalated request whose first answer was complete (``"sampled": false``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from cascade.monitor import Monitor, MonitorConfig
from cascade.pending import Pending
from cascade.run_lines import finite_json
from cascade.scorers import Same, get_same
from cascade.types import Generation, GenerationParams, Prompt

__all__ = ["Shadow", "ShadowCall"]

log = logging.getLogger("cascade.monitor")

#: ``(tier index, prompt, params, choices) -> (the tier's answer or the exception that failed it, its cost)``
ShadowCall = Callable[[int, Prompt, GenerationParams, "tuple[str, ...] | None"],
                      Awaitable["tuple[Generation | BaseException, float]"]]

_TEXT_SAME = ("exact", "contains", "numeric")


class Shadow:
    """Samples finished requests for shadow checks and runs them in the background (see the module docstring).

    Args:
        monitor: where pairs are counted.
        config: the ``monitor:`` settings (rate, concurrency, log).
        call: how to ask one tier (the engine's; failures are returned, not raised).
        tiers: the tiers' names, cheapest first.
        scorer: the artifact's scorer name (decides "the same answer" for free requests), or None.
    """

    def __init__(self, monitor: Monitor, config: MonitorConfig, call: ShadowCall, tiers: Sequence[str],
                 scorer: str | None = None) -> None:
        self.monitor = monitor
        self.config = config
        self.call = call
        self.tiers = tuple(tiers)
        self.same: Same = get_same(scorer if scorer in _TEXT_SAME else "exact")
        self.rng = random.Random(config.seed)
        self.tasks: set[asyncio.Task[None]] = set()

    def consider(self, pending: Sequence[Pending], params: GenerationParams) -> None:
        """Look at finished requests; start the shadow work of those sampled (never waits)."""
        last = len(self.tiers) - 1
        for p in pending:
            if p.error is not None or p.degraded or p.answer is None or not p.on_own_thresholds:
                continue
            sampled = self.config.shadow_rate > 0 and self.rng.random() < self.config.shadow_rate
            if p.answer_tier < last:
                if sampled:
                    self._start(self._check_accepted(p, params))
            elif p.first_answer is not None and p.first_answer is not p.answer and self.config.log_path:
                complete = p.first_answer.finish_reason != "early_exit"
                if sampled and not complete:
                    self._start(self._finish_first(p, params))
                elif sampled or (complete and self.config.log_escalated):
                    self._write(p, p.first_answer, p.answer, sampled)

    def _start(self, job: Awaitable[None]) -> None:
        if len(self.tasks) >= self.config.shadow_concurrency:
            self.monitor.shadow_dropped += 1
            if hasattr(job, "close"):
                job.close()  # never started: no "coroutine was never awaited" warning
            return
        task = asyncio.ensure_future(job)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _ask(self, tier: int, p: Pending, params: GenerationParams) -> Generation | None:
        self.monitor.shadow_calls += 1
        got, cost = await self.call(tier, p.prompt, params, p.choices)
        self.monitor.shadow_cost += cost
        if isinstance(got, BaseException):
            self.monitor.shadow_failed += 1
            log.info("shadow call to %r failed: %s", self.tiers[tier], type(got).__name__)
            return None
        return got

    async def _check_accepted(self, p: Pending, params: GenerationParams) -> None:
        generation = self.monitor.generation
        top = await self._ask(len(self.tiers) - 1, p, params)
        if top is None or p.answer is None or generation != self.monitor.generation:
            return  # failed, or the policy was swapped meanwhile: the pair describes old thresholds
        self.monitor.observe_pair(p.answer_tier, self._agree(p, p.answer, top))
        if self.config.log_path:
            self._write(p, p.answer, top, True)

    async def _finish_first(self, p: Pending, params: GenerationParams) -> None:
        first = await self._ask(0, p, params)
        if first is not None and p.answer is not None:
            self._write(p, first, p.answer, True)

    def _agree(self, p: Pending, a: Generation, b: Generation) -> bool:
        if p.choices is not None:
            return a.text == b.text
        return bool(self.same(a.text, b.text, {}))

    def _write(self, p: Pending, small: Generation, top: Generation, sampled: bool) -> None:
        """Append one pair to the log (a failed write is logged, never raised into the engine)."""
        assert self.config.log_path is not None
        stage = p.answer_tier if p.answer_tier < len(self.tiers) - 1 else 0
        record: dict[str, Any] = {
            "time": time.time(), "sampled": sampled, "accepted": p.answer_tier < len(self.tiers) - 1,
            "prompt": p.prompt, "choices": list(p.choices) if p.choices is not None else None,
            "tier": self.tiers[stage], "last_tier": self.tiers[-1], "threshold": p.thresholds[stage],
            "uncertainty": next((c.uncertainty for c in reversed(p.calls) if c.tier == self.tiers[stage]
                                 and c.uncertainty is not None), None),
            "scores": dict(small.scores),
            "answer": small.text, "finish_reason": small.finish_reason, "last_answer": top.text,
            "agree": self._agree(p, small, top),
        }
        try:
            with open(self.config.log_path, "a", encoding="utf-8") as f:
                f.write(json.dumps(finite_json(record), ensure_ascii=False, allow_nan=False, default=str) + "\n")
        except (OSError, ValueError) as exc:
            log.warning("shadow log %s: write failed (%s)", self.config.log_path, type(exc).__name__)

    async def aclose(self) -> None:
        """Cancel the shadow work still running and wait for it."""
        tasks = list(self.tasks)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
