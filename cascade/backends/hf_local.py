"""Local transformers models as a tier: batched generation with on-device uncertainty scoring.

Scoring costs almost nothing on top of generation: a logits processor
(:class:`~cascade.backends.hf_steps.StepRecorder`) reduces each step's ``(B, V)`` logits to three ``(B,)``
values (margin, entropy, log-normaliser) as they are produced, on the model's device, so the ``B x T x V``
tensor is never kept. After generation one call to :func:`cascade.uncertainty.aggregate` turns the
``(B, T)`` values and the validity mask into every measure.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Sequence
from typing import TYPE_CHECKING, Any

from cascade.backends.hf_prefix import cache_arg, split_prefix
from cascade.backends.hf_steps import StepRecorder, StopTracker
from cascade.errors import BackendError, InvalidRequestError
from cascade.types import EarlyExit, Generation, GenerationParams, Prompt, StreamEvent, TokenStats, chat_lines

if TYPE_CHECKING:
    import torch

    from cascade.backends.hf_stream import StreamSink

__all__ = ["HFLocalBackend"]


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
        from cascade.embedded_models import pad_left

        pad_left(tokenizer)
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
            return chat_lines(messages) + "\nassistant:"
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

        t0 = time.perf_counter()
        device = self.device
        enc, prompt_tokens = self._prepare(prompts, params)
        batch, prompt_len = enc["input_ids"].shape
        eos_ids = self._eos_ids()
        recorder = StepRecorder()
        tracker = StopTracker(recorder, prompt_len, torch.tensor(eos_ids, device=device), params.stop,
                              self.tokenizer, early_exit if want_scores else None, batch, device,
                              sink.cancel if sink is not None else cancel)
        if params.seed is not None:
            torch.manual_seed(params.seed)
        gen_kwargs = self._generate_kwargs(params, eos_ids, recorder, tracker, sink)
        with torch.inference_mode():
            sequences = self.model.generate(**enc, **gen_kwargs)
        new = sequences[:, prompt_len:]
        finished_at, scored_to = tracker.ends(new)
        score_rows: list[dict[str, float]] = [{} for _ in range(batch)]
        stat_rows: list[TokenStats | None] = [None] * batch
        if want_scores:
            score_rows, stat_rows = recorder.scores(new, scored_to)
        lengths, reasons, token_rows = (finished_at + 1).tolist(), tracker.finish_reasons(), new.tolist()
        latency = time.perf_counter() - t0
        results = []
        for b in range(batch):
            ids = token_rows[b][: lengths[b]]
            results.append(Generation(
                text=self._answer_text(ids, params.stop), model=self.name, token_ids=tuple(ids),
                prompt_tokens=int(prompt_tokens[b]), completion_tokens=len(ids), finish_reason=reasons[b],
                scores=score_rows[b], token_stats=stat_rows[b], latency_s=latency))
        return results

    def _prepare(self, prompts: Sequence[Prompt], params: GenerationParams) -> tuple[Any, list[int]]:
        """The model inputs on the device (a prefix every prompt shares already in a KV cache, see
        :mod:`cascade.backends.hf_prefix`) and each prompt's token count."""
        import torch

        enc = self._encode(prompts, params).to(self.device)
        prompt_tokens: list[int] = enc["attention_mask"].sum(dim=1).tolist()
        with torch.inference_mode():
            split = split_prefix(self.model, enc["input_ids"], enc["attention_mask"])
        if split is not None:
            enc = {"input_ids": split.input_ids, "attention_mask": split.attention_mask,
                   **cache_arg(self.model, split.cache)}
        return enc, prompt_tokens

    def _generate_kwargs(self, params: GenerationParams, eos_ids: list[int], recorder: StepRecorder,
                         tracker: StopTracker, sink: StreamSink | None) -> dict[str, Any]:
        """The keyword arguments of ``model.generate`` for ``params``, with the recorder and tracker attached."""
        from transformers import LogitsProcessorList, StoppingCriteriaList

        sample = params.temperature > 0
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
        return gen_kwargs

    def _answer_text(self, ids: list[int], stop: tuple[str, ...]) -> str:
        """The decoded answer, cut before the first stop string (stripped when the chat template is on)."""
        text: str = self.tokenizer.decode(ids, skip_special_tokens=True)
        for s in stop:
            cut = text.find(s)
            if cut >= 0:
                text = text[:cut]
        return text.strip() if self.chat_template else text

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
