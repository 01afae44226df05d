"""The Cascade: cheapest tier first, escalate while the uncertainty is above the stage's threshold.

Async first (:meth:`Cascade.run`, :meth:`Cascade.run_batch`, ``async with``) with a thin sync face
(:meth:`Cascade.run_sync`, :meth:`Cascade.run_batch_sync`). All decisions go through
:func:`cascade.policy.escalates`; all I/O through the tiers' backends.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal

from cascade.backends.base import Backend
from cascade.errors import (
    BackendError,
    BackendTimeoutError,
    BatchError,
    CascadeError,
    ChoicesUnsupportedError,
    InvalidRequestError,
    public_reason,
)
from cascade.monitor import Monitor, MonitorConfig
from cascade.pending import Pending
from cascade.policy import Policy, Target, escalates
from cascade.shadow import Shadow
from cascade.types import (
    CHOICE_MEASURES,
    FIRST_TOKEN_MEASURES,
    CascadeChunk,
    CascadeResult,
    EarlyExit,
    Generation,
    GenerationParams,
    Prompt,
    TierCall,
    validate_choices,
    validate_prompt,
)

__all__ = ["Cascade", "Price", "Tier"]

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


class Cascade:
    """Small model first; larger models only when the smaller one is unsure.

    Build it from tiers (cheapest first) or, for the common two-tier case, from ``small`` and ``large``::

        cascade = Cascade(small=small_backend, large=large_backend, measure="margin_first", threshold=0.4)
        result = await cascade.run("Is this review positive? ...")

    Args:
        tiers: the chain, cheapest first (at least two), or None when ``small``/``large`` are given.
        small: backend of the small tier (two-tier shortcut).
        large: backend of the large tier (two-tier shortcut).
        policy: measure and thresholds; or give ``measure`` with ``threshold`` or ``artifact``.
        measure: uncertainty measure name (default: the artifact's, else ``margin_first``); an artifact fitted
            for another measure is refused.
        threshold: one threshold per stage (a float for two tiers).
        artifact: path of a calibration artifact; its models and measure must match this cascade.
        params: default decoding parameters (per call overridable).
        on_error: a failing higher tier either raises (``"raise"``) or returns the lower tier's answer
            marked ``degraded`` (``"degrade"``, default).
        early_exit: with a first-token measure, stop the small answer after one token when it will be
            escalated anyway (default True).
        max_prompt_chars: longest prompt accepted, in characters (default 200,000).
        length_normalize: for requests with ``choices``, rank the allowed answers by their mean token
            log-probability instead of the sum (default False: the sum, the answer's likelihood).
        monitor: live calibration checks and shadow calls (:mod:`cascade.monitor`, :mod:`cascade.shadow`);
            None: none. ``self.monitor`` then holds the estimates.
    """

    def __init__(
        self,
        tiers: Sequence[Tier] | None = None,
        *,
        small: Backend | None = None,
        large: Backend | None = None,
        policy: Policy | None = None,
        measure: str | None = None,
        threshold: float | Sequence[float] | None = None,
        artifact: str | None = None,
        params: GenerationParams | None = None,
        on_error: OnError = "degrade",
        early_exit: bool = True,
        max_prompt_chars: int = 200_000,
        length_normalize: bool = False,
        monitor: MonitorConfig | None = None,
    ) -> None:
        if tiers is None:
            if small is None or large is None:
                raise InvalidRequestError("give either tiers or both small and large backends")
            tiers = (Tier("small", small), Tier("large", large))
        elif small is not None or large is not None:
            raise InvalidRequestError("give either tiers or small/large, not both")
        self.tiers: tuple[Tier, ...] = tuple(tiers)
        if len(self.tiers) < 2:
            raise InvalidRequestError("a cascade needs at least two tiers")
        if len({t.name for t in self.tiers}) != len(self.tiers):
            raise InvalidRequestError("tier names must be unique")
        models = [t.backend.name for t in self.tiers]
        if policy is None:
            if artifact is not None and threshold is not None:
                raise InvalidRequestError("give threshold or artifact, not both")
            if artifact is not None:  # without a measure, the artifact's; with one, they must agree
                policy = Policy.from_artifact(artifact, models=models, measure=measure)
            elif threshold is not None:
                policy = Policy.fixed(threshold, measure or "margin_first")
            else:
                raise InvalidRequestError("a cascade needs a threshold, an artifact or a policy")
        if len(policy) != len(self.tiers) - 1:
            raise InvalidRequestError(f"{len(self.tiers)} tiers need {len(self.tiers) - 1} thresholds, "
                                      f"the policy has {len(policy)}")
        if policy.models and tuple(policy.models) != tuple(models):
            raise InvalidRequestError(f"policy fitted for models {list(policy.models)}, tiers are {models}")
        if on_error not in ("raise", "degrade"):
            raise InvalidRequestError("on_error must be 'raise' or 'degrade'")
        self.policy = policy
        self.params = params or GenerationParams()
        self.on_error: OnError = on_error
        self.early_exit = early_exit and policy.measure in FIRST_TOKEN_MEASURES
        self.max_prompt_chars = max_prompt_chars
        self.length_normalize = length_normalize
        self.monitor: Monitor | None = None
        self.shadow: Shadow | None = None
        if monitor is not None:
            self.monitor = Monitor.for_policy(monitor, policy, self.tier_names)
            self.shadow = Shadow(self.monitor, monitor, self._shadow_call, self.tier_names, policy.scorer)

    @property
    def tier_names(self) -> list[str]:
        """The tiers' names, cheapest first."""
        return [t.name for t in self.tiers]

    @property
    def measure(self) -> str:
        """The uncertainty measure of the policy."""
        return self.policy.measure

    async def __aenter__(self) -> Cascade:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def cascades(self) -> list[Cascade]:
        """This cascade, as a list (the server's :class:`~cascade.server.protocol.Engine` interface)."""
        return [self]

    def swap_policy(self, policy: Policy) -> None:
        """Use ``policy`` for requests that start from now on; requests in flight finish on the old one.

        Raises:
            ArtifactError: the policy has another measure, another number of stages, or was fitted for other
                models; the old policy stays.
        """
        policy.check_replaces(self.policy, [t.backend.name for t in self.tiers])
        if self.monitor is not None:
            fresh = Monitor.for_policy(self.monitor.config, policy, self.tier_names)
            self.monitor.replace_references(fresh, policy.thresholds)
        self.policy = policy

    async def _shadow_call(self, tier: int, prompt: Prompt, params: GenerationParams,
                           choices: tuple[str, ...] | None) -> tuple[Generation | BaseException, float]:
        """One tier's answer for a shadow check (:mod:`cascade.shadow`) and its cost; a failure is returned."""
        t = self.tiers[tier]
        got = (await self._outcomes(t, [prompt], params, False, None, None if choices is None else [choices]))[0]
        cost = 0.0 if isinstance(got, BaseException) else t.price.cost(got.prompt_tokens, got.completion_tokens)
        return got, cost

    async def aclose(self) -> None:
        """Stop the shadow checks; close every tier's backend (each distinct backend once)."""
        if self.shadow is not None:
            await self.shadow.aclose()
        seen: set[int] = set()
        for tier in self.tiers:
            if id(tier.backend) not in seen:
                seen.add(id(tier.backend))
                await tier.backend.aclose()

    def resolve_params(self, params: GenerationParams | Mapping[str, Any] | None) -> GenerationParams:
        """Decoding parameters of a call: given in full, as overrides of this cascade's defaults, or None.

        Raises:
            InvalidRequestError: an override names no parameter or has a bad value.
        """
        if params is None:
            return self.params
        if isinstance(params, GenerationParams):
            return params
        try:
            return replace(self.params, **dict(params))
        except TypeError as exc:
            raise InvalidRequestError(f"bad decoding parameter: {exc}") from None

    async def run(
        self,
        prompt: Prompt,
        *,
        params: GenerationParams | Mapping[str, Any] | None = None,
        target: Target | dict[str, float] | None = None,
        cluster: int | None = None,
        choices: Sequence[str] | None = None,
    ) -> CascadeResult:
        """Answer one prompt (a string or chat messages). See :meth:`run_batch` for the arguments.

        With ``choices`` (e.g. ``["positive", "negative"]``) every tier answers with one of them, scored by
        the model rather than generated, and the ``choice_*`` measures apply.
        """
        return (await self.run_batch([prompt], params=params, target=target, clusters=[cluster],
                                     choices=None if choices is None else [choices]))[0]

    async def run_batch(
        self,
        prompts: Sequence[Prompt],
        *,
        params: GenerationParams | Mapping[str, Any] | None = None,
        target: Target | dict[str, float] | None = None,
        clusters: Sequence[int | None] | None = None,
        choices: Sequence[Sequence[str] | None] | None = None,
    ) -> list[CascadeResult]:
        """Answer a batch: each tier is called once with every request that reached it.

        Args:
            prompts: B prompts.
            params: decoding parameters: in full, as a mapping of overrides of the cascade's defaults, or
                None (the defaults).
            target: a per-request quality level for every prompt of the batch (needs an artifact policy).
            clusters: router cluster per prompt (per-cluster thresholds), or None.
            choices: per prompt, the answers it allows (a list of distinct strings) or None for a free
                answer; None for all free. A tier answers a constrained prompt with the most likely of its
                choices (see ``HFLocalBackend.choose``); a tier that cannot raises
                :class:`~cascade.errors.ChoicesUnsupportedError`, never a free answer instead.

        Returns:
            B results, in order.

        A tier call that fails for some requests of the batch fails only those: the others keep their answers
        and go on up the chain (a failing higher tier degrades or fails each of its requests on its own).

        Raises:
            InvalidRequestError: bad prompt, parameters or target.
            BackendError: the first tier failed, or a higher tier failed with ``on_error="raise"``, for every
                request of the batch.
            BatchError: that happened to some requests only; its ``outcomes`` hold each request's result or
                exception.
        """
        params = self.resolve_params(params)
        parsed_target = Target.parse(target)
        if clusters is not None and len(clusters) != len(prompts):
            raise InvalidRequestError("clusters must have one entry per prompt")
        if choices is not None and len(choices) != len(prompts):
            raise InvalidRequestError("choices must have one entry (a list or None) per prompt")
        allowed = [None if choices is None or choices[i] is None else validate_choices(choices[i])
                   for i in range(len(prompts))]
        checked = [validate_prompt(p, self.max_prompt_chars) for p in prompts]
        started = time.perf_counter()
        pending = [Pending.start(i, p, self.policy, clusters[i] if clusters is not None else None, parsed_target,
                                 allowed[i]) for i, p in enumerate(checked)]
        active = list(pending)
        for level, tier in enumerate(self.tiers):
            if not active:
                break
            skipped = [p for p in active if p.skips(level)]  # the stage escalates everything: no call
            for p in skipped:
                p.skip(tier.name)
            called = [p for p in active if not p.skips(level)]
            up = await self._stage(level, tier, called, params) if called else []
            active = sorted(up + skipped, key=lambda p: p.index)
        latency = time.perf_counter() - started
        if self.shadow is not None:
            self.shadow.consider(pending, params)
        failed = [p.error for p in pending if p.error is not None]
        if not failed:
            return [self._result(p, latency) for p in pending]
        if len(failed) == len(pending):
            raise failed[0]
        raise BatchError([p.error if p.error is not None else self._result(p, latency) for p in pending])

    async def _call(self, tier: Tier, prompts: Sequence[Prompt], params: GenerationParams, scores: bool,
                    early_exit: EarlyExit | None, choices: Sequence[Sequence[str]] | None = None) -> list[Generation]:
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
            return await asyncio.wait_for(call, tier.timeout_s)
        except asyncio.TimeoutError as exc:
            raise tier_timeout(tier) from exc

    async def _outcomes(self, tier: Tier, prompts: Sequence[Prompt], params: GenerationParams, scores: bool,
                        early_exit: EarlyExit | None, choices: Sequence[Sequence[str]] | None = None
                        ) -> list[Generation | BaseException]:
        """One tier call: each prompt's generation or the exception that failed it (never raises a failure)."""
        try:
            gens: Sequence[Generation | BaseException] = await self._call(tier, prompts, params, scores, early_exit,
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

    async def _stage(self, level: int, tier: Tier, active: list[Pending],
                     params: GenerationParams) -> list[Pending]:
        """Call one tier for the requests that reached it; return those that go on up."""
        t0 = time.perf_counter()
        outcomes = await self._answers(level, tier, active, params)
        elapsed = time.perf_counter() - t0
        failed = [(p, o) for p, o in zip(active, outcomes) if isinstance(o, BaseException)]
        # Any failure of a higher tier (an error, a timeout, a full queue, a prompt too long for its context)
        # follows on_error; a request with no lower answer (the first tier, or lower tiers skipped) fails.
        for p, exc in failed:
            if p.answer is None or self.on_error == "raise":
                p.error = exc
        if any(p.error is None for p, _ in failed):
            await self._degrade(level, tier, [(p, e) for p, e in failed if p.error is None], params, elapsed)
        return [p for p, g in zip(active, outcomes)
                if not isinstance(g, BaseException) and self._record(level, tier, p, g, elapsed)]

    async def _answers(self, level: int, tier: Tier, active: list[Pending], params: GenerationParams
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
            got = await self._outcomes(tier, [active[i].prompt for i in idx], params, not last, early, lists)
            for i, g in zip(idx, got):
                out[i] = g
        return [g for g in out if g is not None]

    def _record(self, level: int, tier: Tier, p: Pending, g: Generation, elapsed: float) -> bool:
        """Book one tier's answer for one request; True when the request goes on up the chain."""
        last = level == len(self.tiers) - 1
        policy = p.policy or self.policy
        if p.choices is not None and g.choice_logprobs:
            offsets = policy.prior_for(level, p.choices)
            if offsets is not None:  # the tier's calibrated prior over these answers (cascade.choice_prior)
                from cascade.choice_prior import apply_prior

                g = apply_prior(g, p.choices, offsets)
        u = math.nan if last else policy.uncertainty(level, g.scores)
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
            self.monitor.observe(level, u, up, p.source in ("artifact", "fixed"))
        if math.isnan(u):
            why = "the request has no choices" if p.choices is None and self.measure in CHOICE_MEASURES else \
                "the tier reported no such score"
            p.reason += f"{self.measure} undefined ({why}) at {tier.name!r}: escalated; "
        elif up:
            p.reason += f"{self.measure}={u:.4f} > {thr:.4f} at {tier.name!r}: escalated; "
        else:
            p.reason += f"{self.measure}={u:.4f} <= {thr:.4f}: {tier.name!r} answer accepted"
        return up

    async def _degrade(self, level: int, tier: Tier, failed: Sequence[tuple[Pending, BaseException]],
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
            redo = await self._outcomes(below, [p.prompt for p in redo_for], params, True, None)
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

    def _result(self, p: Pending, latency: float) -> CascadeResult:
        return p.result([t.name for t in self.tiers], self.measure, latency)

    def stream(
        self,
        prompt: Prompt,
        *,
        params: GenerationParams | Mapping[str, Any] | None = None,
        target: Target | dict[str, float] | None = None,
        cluster: int | None = None,
        choices: Sequence[str] | None = None,
    ) -> AsyncIterator[CascadeChunk | CascadeResult]:
        """Stream one answer: :class:`CascadeChunk` pieces as they are generated, then the result.

        The answering tier is decided before the first chunk (on the first token with a first-token
        measure), so every chunk comes from the tier named in the final result. A constrained answer
        (``choices``) is scored, not generated: it comes in one chunk. See
        :func:`cascade.streaming.stream_cascade`.
        """
        from cascade.streaming import stream_cascade

        return stream_cascade(self, prompt, params=params, target=target, cluster=cluster, choices=choices)

    def run_sync(self, prompt: Prompt, **kwargs: Any) -> CascadeResult:
        """Blocking :meth:`run` for scripts (not from inside a running event loop: await :meth:`run`)."""
        _no_running_loop("run_sync")
        return asyncio.run(self.run(prompt, **kwargs))

    def run_batch_sync(self, prompts: Sequence[Prompt], **kwargs: Any) -> list[CascadeResult]:
        """Blocking :meth:`run_batch` for scripts (not from inside a running event loop)."""
        _no_running_loop("run_batch_sync")
        return asyncio.run(self.run_batch(prompts, **kwargs))


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


def _no_running_loop(name: str) -> None:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return
    raise InvalidRequestError(f"Cascade.{name} cannot run inside a running event loop; await the async method")

