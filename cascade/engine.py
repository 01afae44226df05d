"""The Cascade: cheapest tier first, escalate while the uncertainty is above the stage's threshold.

Async first (:meth:`Cascade.run`, :meth:`Cascade.run_batch`, ``async with``) with a thin sync face
(:meth:`Cascade.run_sync`, :meth:`Cascade.run_batch_sync`). All decisions go through
:func:`cascade.policy.escalates`; all I/O through the tiers' backends.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import replace
from typing import Any

from cascade.backends.base import Backend
from cascade.chain import Chain, OnError, Price, Tier
from cascade.errors import BatchError, InvalidRequestError
from cascade.monitor import Monitor, MonitorConfig
from cascade.pending import Pending
from cascade.policy import Policy, Target
from cascade.shadow import Shadow
from cascade.types import (
    FIRST_TOKEN_MEASURES,
    CascadeChunk,
    CascadeResult,
    Generation,
    GenerationParams,
    Prompt,
    validate_choices,
    validate_prompt,
)

__all__ = ["Cascade", "Price", "Tier"]


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
        self.max_prompt_chars = max_prompt_chars
        self.monitor: Monitor | None = None
        self.shadow: Shadow | None = None
        if monitor is not None:
            self.monitor = Monitor.for_policy(monitor, policy, self.tier_names)
            self.shadow = Shadow(self.monitor, monitor, self._shadow_call, self.tier_names, policy.scorer)
        early = early_exit and policy.measure in FIRST_TOKEN_MEASURES
        self.chain = Chain(self.tiers, policy.measure, on_error, early, length_normalize, self.monitor)

    @property
    def on_error(self) -> OnError:
        """What a failing higher tier does: ``"raise"`` or ``"degrade"``."""
        return self.chain.on_error

    @property
    def early_exit(self) -> bool:
        """True when small answers stop after one token once a first-token measure escalates them."""
        return self.chain.early_exit

    @property
    def length_normalize(self) -> bool:
        """True when constrained answers are ranked by mean token log-probability."""
        return self.chain.length_normalize

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
        got = (await self.chain.outcomes(t, [prompt], params, False, None, None if choices is None else [choices]))[0]
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
            up = await self.chain.stage(level, tier, called, params) if called else []
            active = sorted(up + skipped, key=lambda p: p.index)
        latency = time.perf_counter() - started
        if self.shadow is not None:
            self.shadow.consider(pending, params)
        failed = [p.error for p in pending if p.error is not None]
        if not failed:
            return [self.chain.result(p, latency) for p in pending]
        if len(failed) == len(pending):
            raise failed[0]
        raise BatchError([p.error if p.error is not None else self.chain.result(p, latency) for p in pending])

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
        :func:`cascade.streaming.stream_chain`.
        """
        from cascade.streaming import stream_chain

        if choices is not None:
            return self._stream_constrained(prompt, params, target, cluster, choices)

        def start() -> tuple[Pending, GenerationParams]:
            resolved = self.resolve_params(params)
            checked = validate_prompt(prompt, self.max_prompt_chars)
            return Pending.start(0, checked, self.policy, cluster, Target.parse(target)), resolved

        shadow = self.shadow
        return stream_chain(self.chain, start, None if shadow is None else lambda p, ps: shadow.consider([p], ps))

    async def _stream_constrained(self, prompt: Prompt, params: GenerationParams | Mapping[str, Any] | None,
                                  target: Target | dict[str, float] | None, cluster: int | None,
                                  choices: Sequence[str]) -> AsyncIterator[CascadeChunk | CascadeResult]:
        """A constrained answer is decided as :meth:`run` decides it and sent in one chunk."""
        result = await self.run(prompt, params=params, target=target, cluster=cluster, choices=choices)
        yield CascadeChunk(result.text, result.tier)
        yield result

    def run_sync(self, prompt: Prompt, **kwargs: Any) -> CascadeResult:
        """Blocking :meth:`run` for scripts (not from inside a running event loop: await :meth:`run`)."""
        _no_running_loop("run_sync")
        return asyncio.run(self.run(prompt, **kwargs))

    def run_batch_sync(self, prompts: Sequence[Prompt], **kwargs: Any) -> list[CascadeResult]:
        """Blocking :meth:`run_batch` for scripts (not from inside a running event loop)."""
        _no_running_loop("run_batch_sync")
        return asyncio.run(self.run_batch(prompts, **kwargs))


def _no_running_loop(name: str) -> None:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return
    raise InvalidRequestError(f"Cascade.{name} cannot run inside a running event loop; await the async method")

