"""The chain of tiers and how each tier's answers are booked: shared by :meth:`cascade.engine.Cascade.run_batch`
and the streaming path (:mod:`cascade.streaming`).

A :class:`Chain` calls one tier for the requests that reached it (:meth:`Chain.stage`), books each answer
against the request's own thresholds (:meth:`Chain.record`: accept, or escalate), and when a higher tier fails
returns the lower answer marked degraded (:meth:`Chain.degrade`). The per-request state is
:class:`cascade.pending.Pending`; the policy a request uses is the one it started with (``Pending.policy``),
so a policy swapped in meanwhile never changes a request halfway.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from cascade.backends.base import Backend
from cascade.deadlines import within
from cascade.errors import (
    BackendError,
    BackendTimeoutError,
    BatchError,
    CascadeError,
    ChoicesUnsupportedError,
    public_reason,
)
from cascade.monitor import Monitor
from cascade.pending import Pending
from cascade.policy import escalates
from cascade.types import CHOICE_MEASURES, CascadeResult, EarlyExit, Generation, GenerationParams, Prompt, TierCall

__all__ = ["Chain", "OnError", "Price", "Tier", "tier_timeout"]

OnError = Literal["raise", "degrade"]
log = logging.getLogger("cascade.engine")


@dataclass(frozen=True)
class Price:
    """Per-token prices of a tier, in any currency unit per million tokens.

    Attributes:
        input_per_mtok: price of one million prompt tokens (default 0).
        output_per_mtok: price of one million generated tokens (default 0).
    """

    input_per_mtok: float = 0.0
    output_per_mtok: float = 0.0

    def cost(self, prompt_tokens: int, completion_tokens: int) -> float:
        """Cost of one call."""
        return (prompt_tokens * self.input_per_mtok + completion_tokens * self.output_per_mtok) / 1e6


@dataclass(frozen=True)
class Tier:
    """One model of the chain.

    Attributes:
        name: the tier's name in results (``"small"``, ``"large"``, ...).
        backend: the model behind it.
        price: its per-token prices.
        timeout_s: seconds before a call to this tier is abandoned (None: no limit beyond the backend's).
    """

    name: str
    backend: Backend
    price: Price = Price()
    timeout_s: float | None = None


class Chain:
    """The tiers, cheapest first, and the rules that book their answers.

    Args:
        tiers: the chain (at least two).
        measure: the uncertainty measure (of every policy the cascade may swap in).
        on_error: a failing higher tier raises (``"raise"``) or degrades to the lower answer (``"degrade"``).
        early_exit: stop a free answer after one token when a first-token measure escalates it.
        length_normalize: rank constrained answers by mean token log-probability instead of the sum.
        monitor: live calibration checks fed by :meth:`record`, or None.
    """

    def __init__(self, tiers: Sequence[Tier], measure: str, on_error: OnError, early_exit: bool,
                 length_normalize: bool, monitor: Monitor | None = None) -> None:
        self.tiers = tuple(tiers)
        self.measure, self.on_error, self.early_exit = measure, on_error, early_exit
        self.length_normalize, self.monitor = length_normalize, monitor

    async def call(self, tier: Tier, prompts: Sequence[Prompt], params: GenerationParams, scores: bool,
                   early_exit: EarlyExit | None, choices: Sequence[Sequence[str]] | None = None) -> list[Generation]:
        """One tier call: free prompts generated, constrained ones chosen; within the tier's ``timeout_s``."""
        if choices is None:
            call = tier.backend.generate(prompts, params, scores=scores, early_exit=early_exit)
        else:
            choose = getattr(tier.backend, "choose", None)
            if not callable(choose):
                raise ChoicesUnsupportedError(f"tier {tier.name!r} ({tier.backend.name}) cannot answer with "
                                              f"choices: its backend has no 'choose' method")
            call = choose(prompts, choices, scores=scores, length_normalize=self.length_normalize)
        if tier.timeout_s is None:
            return await call
        try:
            return await within(call, tier.timeout_s)
        except asyncio.TimeoutError as exc:
            raise tier_timeout(tier) from exc

    async def outcomes(self, tier: Tier, prompts: Sequence[Prompt], params: GenerationParams, scores: bool,
                       early_exit: EarlyExit | None, choices: Sequence[Sequence[str]] | None = None
                       ) -> list[Generation | BaseException]:
        """One tier call: each prompt's generation or the exception that failed it (never raises a failure)."""
        try:
            gens: Sequence[Generation | BaseException] = await self.call(tier, prompts, params, scores, early_exit,
                                                                         choices)
        except BatchError as exc:
            gens = exc.outcomes  # type: ignore[assignment]
        except (CascadeError, asyncio.TimeoutError) as exc:
            gens = [exc] * len(prompts)
        if len(gens) != len(prompts):
            gens = [BackendError(f"tier {tier.name!r} returned {len(gens)} answers for {len(prompts)} prompts",
                                 reason="wrong number of answers")] * len(prompts)
        for failure in {id(g): g for g in gens if isinstance(g, BaseException)}.values():
            if isinstance(failure, BackendError) and failure.tier is None:
                failure.tier = tier.name
            n = sum(g is failure for g in gens)
            log.warning("tier %r failed for %d of %d request(s): %s", tier.name, n, len(gens), failure)
        return list(gens)

    async def stage(self, level: int, tier: Tier, active: list[Pending],
                    params: GenerationParams) -> list[Pending]:
        """Call one tier for the requests that reached it; return those that go on up."""
        t0 = time.perf_counter()
        outcomes = await self.answers(level, tier, active, params)
        elapsed = time.perf_counter() - t0
        failed = [(p, o) for p, o in zip(active, outcomes) if isinstance(o, BaseException)]
        # Any failure of a higher tier (an error, a timeout, a full queue, a prompt too long for its context)
        # follows on_error; a request with no lower answer (the first tier, or lower tiers skipped) fails.
        for p, exc in failed:
            if p.answer is None or self.on_error == "raise":
                p.error = exc
        if any(p.error is None for p, _ in failed):
            await self.degrade(level, tier, [(p, e) for p, e in failed if p.error is None], params, elapsed)
        return [p for p, g in zip(active, outcomes)
                if not isinstance(g, BaseException) and self.record(level, tier, p, g, elapsed)]

    async def answers(self, level: int, tier: Tier, active: list[Pending], params: GenerationParams
                      ) -> list[Generation | BaseException]:
        """One tier's outcome for each request that reached it: free ones generated, constrained ones chosen."""
        last = level == len(self.tiers) - 1
        out: list[Generation | BaseException | None] = [None] * len(active)
        for constrained in (False, True):
            idx = [i for i, p in enumerate(active) if (p.choices is not None) == constrained]
            if not idx:
                continue
            early = None
            if not last and self.early_exit and not constrained:
                early = EarlyExit(self.measure, tuple(active[i].thresholds[level] for i in idx))
            lists = [active[i].choices or () for i in idx] if constrained else None
            got = await self.outcomes(tier, [active[i].prompt for i in idx], params, not last, early, lists)
            for i, g in zip(idx, got):
                out[i] = g
        return [g for g in out if g is not None]

    def record(self, level: int, tier: Tier, p: Pending, g: Generation, elapsed: float) -> bool:
        """Book one tier's answer for one request; True when the request goes on up the chain."""
        last = level == len(self.tiers) - 1
        policy = p.policy
        assert policy is not None  # Pending.start sets it
        if p.choices is not None and g.choice_logprobs:
            offsets = policy.prior_for(level, p.choices)
            if offsets is not None:  # the tier's calibrated prior over these answers (cascade.choice_prior)
                from cascade.choice_prior import apply_prior

                g = apply_prior(g, p.choices, offsets)
        u = math.nan if last else policy.uncertainty(level, g.scores, g.text)
        thr = None if last else p.thresholds[level]
        p.calls.append(self._tier_call(tier, g, elapsed, None if last else u, thr))
        if level == 0:
            p.first_uncertainty, p.first_answer = u, g
        p.answer, p.answer_tier = g, level  # an escalated answer is kept in case a higher tier fails
        if thr is None:
            p.reason += f"answered by {tier.name!r} (last tier)"
            return False
        up = escalates(u, thr)
        if self.monitor is not None:
            self.monitor.observe(level, u, up, p.on_own_thresholds)
        if math.isnan(u):
            why = "the request has no choices" if p.choices is None and self.measure in CHOICE_MEASURES else \
                "the tier reported no such score"
            p.reason += f"{self.measure} undefined ({why}) at {tier.name!r}: escalated; "
        elif up:
            p.reason += f"{self.measure}={u:.4f} > {thr:.4f} at {tier.name!r}: escalated; "
        else:
            p.reason += f"{self.measure}={u:.4f} <= {thr:.4f}: {tier.name!r} answer accepted"
        return up

    async def degrade(self, level: int, tier: Tier, failed: Sequence[tuple[Pending, BaseException]],
                      params: GenerationParams, elapsed: float) -> None:
        """A higher tier failed for these requests: return each one's lower-tier answer, marked degraded.

        The failure is recorded in the request's calls as :func:`~cascade.errors.public_reason` (the tier's
        name and a short reason, no URL): results reach clients of the server. The detail went to the log.
        """
        active = [p for p, _ in failed]
        cut_short = [p for p in active if p.answer is not None and p.answer.finish_reason == "early_exit"]
        for below_level in sorted({p.answer_tier for p in cut_short}):  # early exit kept one token only: finish
            below = self.tiers[below_level]  # those answers without early exit (the tier below, or lower: skips)
            redo_for = [p for p in cut_short if p.answer_tier == below_level]
            t0 = time.perf_counter()
            redo = await self.outcomes(below, [p.prompt for p in redo_for], params, True, None)
            for p, g in zip(redo_for, redo):
                if isinstance(g, BaseException):  # keep the one-token answer
                    p.reason += f"finishing {below.name!r}'s answer failed ({type(g).__name__}); "
                else:
                    p.calls.append(self._tier_call(below, g, time.perf_counter() - t0, None, None))
                    p.answer = g
        for p, exc in failed:
            p.calls.append(TierCall(tier.name, tier.backend.name, 0, 0, 0.0, elapsed, error=_tier_error(tier, exc)))
            p.degraded = True
            p.reason += f"{tier.name!r} failed ({type(exc).__name__}): lower tier's answer returned (degraded)"

    @staticmethod
    def _tier_call(tier: Tier, g: Generation, elapsed: float, u: float | None, thr: float | None) -> TierCall:
        cost = tier.price.cost(g.prompt_tokens, g.completion_tokens)
        return TierCall(tier.name, g.model, g.prompt_tokens, g.completion_tokens, cost, elapsed, u, thr,
                        g.finish_reason, usage_estimated=g.usage_estimated)

    def result(self, p: Pending, latency: float) -> CascadeResult:
        """The finished request's result."""
        return p.result([t.name for t in self.tiers], self.measure, latency)


def tier_timeout(tier: Tier) -> BackendTimeoutError:
    """The error of a call to ``tier`` that ran past the tier's ``timeout_s``."""
    exc = BackendTimeoutError(f"tier {tier.name!r} timed out after {tier.timeout_s} s",
                              reason=f"timed out after {tier.timeout_s} s")
    exc.tier = tier.name
    return exc


def _tier_error(tier: Tier, exc: BaseException) -> str:
    """What a result says about a failed tier call: the tier's name and a short reason (no URL, no detail)."""
    text = public_reason(exc)
    return text if isinstance(exc, BackendError) and exc.tier else f"tier {tier.name!r}: {text}"
