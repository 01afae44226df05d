"""Local transformers models as a tier: batched generation with on-device uncertainty scoring.

Scoring costs almost nothing on top of generation: a logits processor reduces each step's ``(B, V)``
logits to three ``(B,)`` values (margin, entropy, log-normaliser) as they are produced, on the model's
device, so the ``B x T x V`` tensor is never kept. After generation one call to
:func:`cascade.uncertainty.aggregate` turns the ``(B, T)`` values and the validity mask into every measure.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Sequence
from typing import TYPE_CHECKING, Any

from cascade.backends.hf_prefix import cache_arg, split_prefix
from cascade.errors import BackendError, InvalidRequestError
from cascade.types import (
    EarlyExit,
    FinishReason,
    Generation,
    GenerationParams,
    Prompt,
    StreamEvent,
    TokenStats,
)
from cascade.uncertainty import aggregate, reduce_step

if TYPE_CHECKING:
    import torch

    from cascade.backends.hf_stream import StreamSink

__all__ = ["HFLocalBackend"]


class _StepRecorder:
    """Logits processor that records margin, entropy and the chosen token's log-probability per step.

    transformers places user processors before the sampling warpers, so it sees the raw logits (the
    model's own distribution at temperature 1) for greedy and sampled decoding alike. Only ``(B,)`` values
    are kept per step, plus the last step's ``(B, V)`` distribution until its chosen token is known.
    """

    def __init__(self) -> None:
        self.margin: list[torch.Tensor] = []
        self.entropy: list[torch.Tensor] = []
        self.chosen_prob: list[torch.Tensor] = []
        self.last_probs: torch.Tensor | None = None

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.last_probs is not None:  # the token chosen at the previous step is now known
            self.chosen_prob.append(self.last_probs.gather(1, input_ids[:, -1:]).squeeze(1))
        margin, entropy, self.last_probs = reduce_step(scores)
        self.margin.append(margin)
        self.entropy.append(entropy)
        return scores

    def finish(self, last_tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Return ``(margin, entropy, logprob)``, each ``(B, T)``, once generation is over."""
        import torch

        assert self.last_probs is not None
        self.chosen_prob.append(self.last_probs.gather(1, last_tokens[:, None]).squeeze(1))
        self.last_probs = None
        logprob = torch.log(torch.stack(self.chosen_prob, dim=1))
        return torch.stack(self.margin, dim=1), torch.stack(self.entropy, dim=1), logprob


class _StopTracker:
    """Stopping criterion recording the step at which each sequence finished, and why.

    Ends a sequence on EOS, on a stop string, or (early exit) after its first token when that token's
    uncertainty is above the sequence's threshold. ``finished_at[b]`` is the index of the last valid step.
    """

    def __init__(
        self,
        recorder: _StepRecorder,
        prompt_len: int,
        eos_ids: torch.Tensor,
        stop: tuple[str, ...],
        tokenizer: Any,
        early_exit: EarlyExit | None,
        batch_size: int,
        device: torch.device,
        cancel: threading.Event | None = None,
    ) -> None:
        import torch

        self.cancel = cancel
        self.recorder = recorder
        self.prompt_len = prompt_len
        self.eos_ids = eos_ids
        self.stop = stop
        self.tokenizer = tokenizer
        self.window = max((len(s) for s in stop), default=0) + 2  # tokens decoded per check (>= 1 char each)
        self.early_exit = early_exit
        self.thresholds = (
            torch.tensor(early_exit.thresholds, dtype=torch.float32, device=device) if early_exit else None
        )
        self.finished_at = torch.full((batch_size,), -1, dtype=torch.long, device=device)
        self.reason = torch.zeros((batch_size,), dtype=torch.long, device=device)  # 0 len, 1 stop, 2 exit

    def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
        import torch

        step = input_ids.shape[1] - self.prompt_len - 1
        done = torch.isin(input_ids[:, -1], self.eos_ids)
        if self.stop:
            done |= self._stop_strings(input_ids, device=done.device)
        reason = torch.ones_like(self.reason)
        if self.thresholds is not None and self.early_exit is not None and step == 0:
            if self.early_exit.measure == "margin_first":
                first = 1.0 - self.recorder.margin[0]
            else:
                first = self.recorder.entropy[0]
            exit_now = (first > self.thresholds) & ~done
            reason = torch.where(exit_now, torch.full_like(reason, 2), reason)
            done |= exit_now
        if self.cancel is not None and self.cancel.is_set():  # the consumer of a stream went away
            done = torch.ones_like(done)
        new = done & (self.finished_at < 0)
        self.finished_at = torch.where(new, torch.full_like(self.finished_at, step), self.finished_at)
        self.reason = torch.where(new, reason, self.reason)
        return self.finished_at >= 0

    def _stop_strings(self, input_ids: torch.Tensor, device: torch.device) -> torch.Tensor:
        """True for rows whose newest tokens complete a stop string (decodes a short tail per row)."""
        import torch

        tails = input_ids[:, max(self.prompt_len, input_ids.shape[1] - self.window) :].tolist()
        hits = [any(s in self.tokenizer.decode(t, skip_special_tokens=True) for s in self.stop) for t in tails]
        return torch.tensor(hits, dtype=torch.bool, device=device)


class HFLocalBackend:
    """A transformers causal LM answering batches of prompts on one device (or an accelerate device map).

    Args:
        model: a loaded ``AutoModelForCausalLM``.
        tokenizer: its tokenizer (left padding is enforced; EOS is used as pad when there is no pad token).
        name: model identity recorded in results and artifacts (default: the model's ``name_or_path``).
        chat_template: wrap plain prompts as one user message and apply the tokenizer's chat template
            (default True when the tokenizer has one).
        max_batch_size: largest batch sent to ``generate`` at once; bigger calls are split (default 32).
        max_prompt_tokens: longer prompts are rejected with :class:`InvalidRequestError` (default: the
            model's ``max_position_embeddings`` minus ``max_tokens``).
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        name: str | None = None,
        chat_template: bool | None = None,
        max_batch_size: int = 32,
        max_prompt_tokens: int | None = None,
    ) -> None:
        if max_batch_size < 1:
            raise InvalidRequestError("max_batch_size must be >= 1")
        self.model = model.eval()
        self.tokenizer = tokenizer
        tokenizer.padding_side = "left"
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        self.name = name or str(getattr(model.config, "name_or_path", "") or type(model).__name__)
        has_template = bool(getattr(tokenizer, "chat_template", None))
        self.chat_template = has_template if chat_template is None else chat_template and has_template
        self.max_batch_size = max_batch_size
        self.max_prompt_tokens = max_prompt_tokens
        self._lock = threading.Lock()

    @classmethod
    def from_pretrained(
        cls,
        source: str,
        *,
        device: str = "cpu",
        dtype: str | None = None,
        device_map: str | None = None,
        **kwargs: Any,
    ) -> HFLocalBackend:
        """Load ``source`` (an embedded model name, a folder, a ``.gguf`` file or a hub id).

        Args:
            source: what to load; see :func:`cascade.embedded_models.load_pretrained`.
            device: torch device for the model and all scoring (``"cpu"``, ``"cuda"``, ``"cuda:1"``, ``"mps"``).
            dtype: ``"float32"``, ``"bfloat16"`` or ``"float16"`` (default float32 on CPU).
            device_map: an accelerate device map (e.g. ``"auto"``) for models larger than one device.
            **kwargs: passed to the constructor.
        """
        from cascade.embedded_models import load_pretrained

        model, tokenizer = load_pretrained(source, device=device, dtype=dtype, device_map=device_map)
        return cls(model, tokenizer, name=kwargs.pop("name", source), **kwargs)

    @property
    def device(self) -> torch.device:
        """The device the inputs and scores live on."""
        import torch

        return torch.device(getattr(self.model, "device", "cpu"))

    def render(self, prompt: Prompt) -> str:
        """The exact text fed to the model for ``prompt`` (chat template applied when enabled)."""
        if isinstance(prompt, str) and not self.chat_template:
            return prompt
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
        if not self.chat_template:
            return "\n".join(f"{m['role']}: {m['content']}" for m in messages) + "\nassistant:"
        return str(self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))

    async def generate(
        self,
        prompts: Sequence[Prompt],
        params: GenerationParams,
        *,
        scores: bool = True,
        early_exit: EarlyExit | None = None,
    ) -> list[Generation]:
        """Answer ``prompts`` in batches of at most ``max_batch_size`` (see :class:`~cascade.backends.base.Backend`)."""
        if early_exit is not None and len(early_exit.thresholds) != len(prompts):
            raise InvalidRequestError("early_exit needs one threshold per prompt")
        out: list[Generation] = []
        for start in range(0, len(prompts), self.max_batch_size):
            chunk = list(prompts[start : start + self.max_batch_size])
            chunk_exit = None
            if early_exit is not None and scores:
                chunk_exit = EarlyExit(
                    early_exit.measure, early_exit.thresholds[start : start + self.max_batch_size]
                )
            cancel = threading.Event()
            try:
                out.extend(await asyncio.to_thread(self.generate_sync, chunk, params, scores, chunk_exit,
                                                   cancel=cancel))
            except asyncio.CancelledError:  # a tier timeout or a caller that left: stop at the next step
                cancel.set()
                raise
        return out

    def generate_sync(
        self,
        prompts: Sequence[Prompt],
        params: GenerationParams,
        scores: bool = True,
        early_exit: EarlyExit | None = None,
        sink: StreamSink | None = None,
        *,
        cancel: threading.Event | None = None,
    ) -> list[Generation]:
        """Blocking batched generation of one batch; thread-safe (one batch at a time per model).

        ``sink`` (one prompt only) receives the answer token by token: see :mod:`cascade.backends.hf_stream`.
        Setting ``cancel`` ends the generation at its next step (the answers are then cut short).

        A sampled request with a seed is generated in a batch of its own, so its answer depends on its seed
        alone and not on the requests it happened to be batched with.
        """
        if not prompts:
            return []
        if params.seed is not None and params.temperature > 0 and len(prompts) > 1 and sink is None:
            return [g for i, p in enumerate(prompts) for g in self.generate_sync(
                [p], params, scores, None if early_exit is None else
                EarlyExit(early_exit.measure, early_exit.thresholds[i : i + 1]), cancel=cancel)]
        with self._lock:
            try:
                return self._generate_locked(prompts, params, scores, early_exit, sink, cancel)
            except (InvalidRequestError, BackendError):
                raise
            except Exception as exc:  # a model failure must reach the caller typed, never crash the loop
                raise BackendError(f"{self.name}: generation failed: {type(exc).__name__}: {exc}") from exc

    def _encode(self, prompts: Sequence[Prompt], params: GenerationParams) -> Any:
        texts = [self.render(p) for p in prompts]
        enc = self.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=not self.chat_template)
        limit = self.max_prompt_tokens
        if limit is None:
            positions = int(getattr(self.model.config, "max_position_embeddings", 1 << 30))
            limit = positions - params.max_tokens
            if limit < 1:
                raise InvalidRequestError(f"max_tokens {params.max_tokens} leaves no room for a prompt in the "
                                          f"{positions} positions of {self.name}")
        lengths = enc["attention_mask"].sum(dim=1)
        if int(lengths.max()) > limit:
            raise InvalidRequestError(f"prompt has {int(lengths.max())} tokens; the limit is {limit}")
        return enc

    def _eos_ids(self) -> list[int]:
        eos = getattr(self.model.generation_config, "eos_token_id", None)
        ids = eos if isinstance(eos, list) else [eos]
        ids = [int(i) for i in ids if i is not None]
        if self.tokenizer.eos_token_id is not None:
            ids.append(int(self.tokenizer.eos_token_id))
        return sorted(set(ids))

    def _generate_locked(
        self,
        prompts: Sequence[Prompt],
        params: GenerationParams,
        want_scores: bool,
        early_exit: EarlyExit | None,
        sink: StreamSink | None = None,
        cancel: threading.Event | None = None,
    ) -> list[Generation]:
        import torch
        from transformers import LogitsProcessorList, StoppingCriteriaList

        t0 = time.perf_counter()
        device = self.device
        enc = self._encode(prompts, params).to(device)
        prompt_tokens = enc["attention_mask"].sum(dim=1).tolist()
        with torch.inference_mode():  # a prefix every prompt shares is computed once (see hf_prefix)
            split = split_prefix(self.model, enc["input_ids"], enc["attention_mask"])
        if split is not None:
            enc = {"input_ids": split.input_ids, "attention_mask": split.attention_mask,
                   **cache_arg(self.model, split.cache)}
        batch, prompt_len = enc["input_ids"].shape
        eos_ids = self._eos_ids()
        recorder = _StepRecorder()
        tracker = _StopTracker(
            recorder,
            prompt_len,
            torch.tensor(eos_ids, device=device),
            params.stop,
            self.tokenizer,
            early_exit if want_scores else None,
            batch,
            device,
            sink.cancel if sink is not None else cancel,
        )
        sample = params.temperature > 0
        if params.seed is not None:
            torch.manual_seed(params.seed)
        gen_kwargs: dict[str, Any] = {
            "max_new_tokens": params.max_tokens,
            "do_sample": sample,
            "pad_token_id": self.tokenizer.pad_token_id,
            "eos_token_id": eos_ids,
            "logits_processor": LogitsProcessorList([recorder]),
            "stopping_criteria": StoppingCriteriaList([tracker]),
        }
        if sink is not None:
            gen_kwargs["streamer"] = sink.streamer(recorder)
        if sample:
            gen_kwargs.update(temperature=params.temperature, top_p=params.top_p, top_k=0)
        else:
            gen_kwargs.update(temperature=None, top_p=None, top_k=None)
        with torch.inference_mode():
            sequences = self.model.generate(**enc, **gen_kwargs)
        new = sequences[:, prompt_len:]
        steps = new.shape[1]
        finished_at = torch.where(tracker.finished_at < 0, torch.full_like(tracker.finished_at, steps - 1),
                                  tracker.finished_at)
        lengths = (finished_at + 1).tolist()
        reasons = tracker.reason.tolist()
        # One definition of a step on every backend: the end-of-turn token is not one (servers send no logprob
        # for it), unless it is the whole answer (an empty answer is scored on it).
        last = new.gather(1, finished_at[:, None]).squeeze(1)
        ends_turn = torch.isin(last, tracker.eos_ids) & (finished_at > 0)
        scored_to = finished_at - ends_turn.long()
        score_rows: list[dict[str, float]] = [{} for _ in range(batch)]
        stat_rows: list[TokenStats | None] = [None] * batch
        if want_scores:
            margin, entropy, logprob = recorder.finish(new[:, -1])
            mask = torch.arange(steps, device=device)[None, :] <= scored_to[:, None]
            agg = aggregate(margin, entropy, logprob, mask)
            names = list(agg)
            table = torch.stack([agg[k] for k in names], dim=1).tolist()  # (B, n_measures), one copy
            per_token = torch.stack([margin, entropy, logprob], dim=0).tolist()  # (3, B, T)
            scored = (scored_to + 1).tolist()
            for b in range(batch):
                score_rows[b] = dict(zip(names, table[b]))
                n = scored[b]
                stat_rows[b] = TokenStats(
                    tuple(per_token[0][b][:n]), tuple(per_token[1][b][:n]), tuple(per_token[2][b][:n])
                )
        token_rows = new.tolist()
        latency = time.perf_counter() - t0
        results = []
        for b in range(batch):
            ids = token_rows[b][: lengths[b]]
            finish: FinishReason = ("length", "stop", "early_exit")[reasons[b]] if tracker.finished_at[b] >= 0 \
                else "length"
            text = self.tokenizer.decode(ids, skip_special_tokens=True)
            for s in params.stop:
                cut = text.find(s)
                if cut >= 0:
                    text = text[:cut]
            results.append(
                Generation(
                    text=text.strip() if self.chat_template else text,
                    model=self.name,
                    token_ids=tuple(ids),
                    prompt_tokens=int(prompt_tokens[b]),
                    completion_tokens=len(ids),
                    finish_reason=finish,
                    scores=score_rows[b],
                    token_stats=stat_rows[b],
                    latency_s=latency,
                )
            )
        return results

    async def choose(
        self,
        prompts: Sequence[Prompt],
        choices: Sequence[Sequence[str]],
        *,
        scores: bool = True,
        length_normalize: bool = False,
    ) -> list[Generation]:
        """Answer each prompt with the most likely of its allowed answers (see :mod:`cascade.backends.hf_choices`).

        Args:
            prompts: B prompts.
            choices: B lists of allowed answers (see :func:`cascade.types.validate_choices`).
            scores: compute ``choice_margin``, ``choice_entropy`` and the token measures of the chosen answer.
            length_normalize: rank choices by mean instead of summed token log-probability.

        Raises:
            InvalidRequestError: mismatched lengths, a bad choice list or a too-long prompt.
            BackendError: the model failed.
        """
        from cascade.backends.hf_choices import check_batch
        from cascade.types import validate_choices

        check_batch(prompts, choices)
        checked = [validate_choices(c) for c in choices]
        out: list[Generation] = []
        for start in range(0, len(prompts), self.max_batch_size):
            end = start + self.max_batch_size
            out.extend(await asyncio.to_thread(self.choose_sync, prompts[start:end], checked[start:end], scores,
                                               length_normalize))
        return out

    def choose_sync(self, prompts: Sequence[Prompt], choices: Sequence[Sequence[str]], scores: bool = True,
                    length_normalize: bool = False) -> list[Generation]:
        """Blocking :meth:`choose` of one batch; thread-safe (one batch at a time per model)."""
        from cascade.backends.hf_choices import choice_token_ids, score_choices

        if not prompts:
            return []
        ids = choice_token_ids(self.tokenizer, choices)
        longest = max(len(t) for row in ids for t in row)
        with self._lock:
            try:
                enc = self._encode(prompts, GenerationParams(max_tokens=longest)).to(self.device)
                return score_choices(self.model, self.tokenizer, enc, ids, choices, name=self.name,
                                     length_normalize=length_normalize, scores=scores)
            except (InvalidRequestError, BackendError):
                raise
            except Exception as exc:  # a model failure must reach the caller typed, never crash the loop
                raise BackendError(f"{self.name}: choice scoring failed: {type(exc).__name__}: {exc}") from exc

    def stream(
        self,
        prompt: Prompt,
        params: GenerationParams,
        *,
        scores: bool = True,
        early_exit: EarlyExit | None = None,
    ) -> AsyncIterator[StreamEvent]:
        """Stream one answer token by token (see :class:`~cascade.backends.base.StreamingBackend`)."""
        from cascade.backends.hf_stream import stream_local

        return stream_local(self, prompt, params, scores=scores, early_exit=early_exit)

    async def aclose(self) -> None:
        """Drop the reference to the model so its memory can be freed."""
        self.model = None
