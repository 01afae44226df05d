"""What a local generation records at each step: the uncertainty values, and where each answer ends.

:class:`~cascade.backends.hf_local.HFLocalBackend` hands both to ``model.generate``: a
:class:`StepRecorder` (logits processor) reduces each step's ``(B, V)`` logits to ``(B,)`` values on the
model's device, and a :class:`StopTracker` (stopping criterion) records the step and the reason each
sequence finished. The token streamer of :mod:`cascade.backends.hf_stream` reads the first step's values
from the recorder.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any

from cascade.types import EarlyExit, FinishReason, TokenStats
from cascade.uncertainty import aggregate, reduce_step

if TYPE_CHECKING:
    import torch

__all__ = ["StepRecorder", "StopTracker"]

_REASONS: tuple[FinishReason, ...] = ("length", "stop", "early_exit")  # StopTracker.reason codes 0, 1, 2


class StepRecorder:
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

    def scores(
        self, new: torch.Tensor, scored_to: torch.Tensor
    ) -> tuple[list[dict[str, float]], list[TokenStats | None]]:
        """Every measure of each answer and its per-token statistics, copied to the CPU once.

        Args:
            new: ``(B, T)`` the generated token ids.
            scored_to: ``(B,)`` the last scored step of each answer (see :meth:`StopTracker.ends`).

        Returns:
            B dicts of measure -> score, and B :class:`~cascade.types.TokenStats` of the scored steps.
        """
        import torch

        margin, entropy, logprob = self.finish(new[:, -1])
        mask = torch.arange(new.shape[1], device=scored_to.device)[None, :] <= scored_to[:, None]
        agg = aggregate(margin, entropy, logprob, mask)
        names = list(agg)
        table = torch.stack([agg[k] for k in names], dim=1).tolist()  # (B, n_measures), one copy
        per_token = torch.stack([margin, entropy, logprob], dim=0).tolist()  # (3, B, T)
        scored = (scored_to + 1).tolist()
        rows = [dict(zip(names, values)) for values in table]
        stats: list[TokenStats | None] = [
            TokenStats(tuple(per_token[0][b][:n]), tuple(per_token[1][b][:n]), tuple(per_token[2][b][:n]))
            for b, n in enumerate(scored)
        ]
        return rows, stats


class StopTracker:
    """Stopping criterion recording the step at which each sequence finished, and why.

    Ends a sequence on EOS, on a stop string, or (early exit) after its first token when that token's
    uncertainty is above the sequence's threshold. ``finished_at[b]`` is the index of the last valid step.
    """

    def __init__(
        self,
        recorder: StepRecorder,
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

    def ends(self, new: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(finished_at, scored_to)``, each ``(B,)``, once the ``(B, T)`` tokens ``new`` are generated.

        ``finished_at`` is each answer's last step (the last of all for an answer cut by the length limit).
        ``scored_to`` is its last scored step: one definition of a step on every backend, where the
        end-of-turn token is not one (servers send no logprob for it) unless it is the whole answer (an empty
        answer is scored on it).
        """
        import torch

        steps = new.shape[1]
        finished_at = torch.where(self.finished_at < 0, torch.full_like(self.finished_at, steps - 1),
                                  self.finished_at)
        last = new.gather(1, finished_at[:, None]).squeeze(1)
        ends_turn = torch.isin(last, self.eos_ids) & (finished_at > 0)
        return finished_at, finished_at - ends_turn.long()

    def finish_reasons(self) -> list[FinishReason]:
        """Why each sequence ended: ``"length"`` when no stopping condition ended it."""
        done = (self.finished_at >= 0).tolist()
        return [_REASONS[r] if d else "length" for r, d in zip(self.reason.tolist(), done)]
