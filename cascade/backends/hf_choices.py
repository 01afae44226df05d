"""Constrained answers on a local model: score every allowed answer, answer with the most likely one.

Like lm-eval-harness's ``loglikelihood`` requests: each choice is scored as a continuation of the prompt as
the model sees it (chat template applied, so the choice is the start of the assistant's turn), and nothing
is generated. One batch costs two forward passes:

1. the B prompts (left-padded), keeping their KV cache and only the last position's logits ``(B, V)``,
   which give every choice's first token;
2. when some choice is longer than one token, the R = sum of K_b choices at once (right-padded, all but
   their last token), each row attending to its own prompt's cache rows (the cache is indexed per choice,
   never recomputed).

A choice's log-likelihood is the sum of its tokens' log-probabilities, or their mean when length-normalised.
The answer is the choice with the highest one. Its scores are :func:`cascade.uncertainty.choice_measures`
over the choices, plus the seven token measures of :func:`cascade.uncertainty.aggregate` along the chosen
answer's tokens (so a policy on a free-form measure still gets a value).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from cascade.backends.hf_prefix import cache_arg, prompt_pass
from cascade.errors import InvalidRequestError
from cascade.types import Generation, Prompt, TokenStats
from cascade.uncertainty import aggregate, choice_measures, reduce_step

if TYPE_CHECKING:
    import torch

__all__ = ["choice_token_ids", "score_choices"]


def choice_token_ids(tokenizer: Any, choices: Sequence[Sequence[str]]) -> list[list[list[int]]]:
    """Token ids of every choice, tokenized on its own (as the model would generate it after the prompt).

    Raises:
        InvalidRequestError: a choice that encodes to no token.
    """
    out = []
    for row in choices:
        ids = [list(tokenizer(c, add_special_tokens=False)["input_ids"]) for c in row]
        for c, t in zip(row, ids):
            if not t:
                raise InvalidRequestError(f"choice {c!r} encodes to no token")
        out.append(ids)
    return out


def _continuation(model: Any, prompt_mask_b: torch.Tensor, cache: Any, owner: torch.Tensor, cont: torch.Tensor,
                  cont_mask: torch.Tensor) -> torch.Tensor:
    """Logits ``(R, L - 1, V)`` of every choice token after the first, on the prompts' shared cache."""
    import torch

    cache.reorder_cache(owner)  # (B, ...) -> (R, ...): each choice row gets its prompt's keys and values
    prompt_mask = prompt_mask_b[owner]
    lengths = prompt_mask.sum(dim=-1, keepdim=True)
    steps = cont.shape[1] - 1
    positions = lengths + torch.arange(steps, device=cont.device)[None, :]
    out = model(input_ids=cont[:, :steps], attention_mask=torch.cat([prompt_mask, cont_mask[:, :steps]], dim=1),
                position_ids=positions, use_cache=True, **cache_arg(model, cache))
    logits: torch.Tensor = out.logits
    return logits


def _choice_rows(
    choice_ids: Sequence[Sequence[Sequence[int]]], pad: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every choice of the batch as one row, R in all.

    Returns:
        ``owner`` ``(R,)`` its prompt; ``slot`` ``(R,)`` its place in that prompt's list; ``cont`` ``(R, L)``
        its token ids, right-padded with ``pad``; ``cont_mask`` ``(R, L)`` 1 on its tokens, 0 on padding.
    """
    import torch

    owner_list = [b for b, row in enumerate(choice_ids) for _ in row]
    flat = [list(ids) for row in choice_ids for ids in row]
    width = max(len(ids) for ids in flat)
    owner = torch.tensor(owner_list, dtype=torch.long, device=device)
    slot = torch.tensor([k for row in choice_ids for k in range(len(row))], dtype=torch.long, device=device)
    cont = torch.tensor([ids + [pad] * (width - len(ids)) for ids in flat], dtype=torch.long, device=device)
    cont_mask = torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids in flat], dtype=torch.long,
                             device=device)
    return owner, slot, cont, cont_mask


def _token_logprobs(model: Any, enc: Any, owner: torch.Tensor, cont: torch.Tensor,
                    cont_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The two forward passes (call under ``torch.inference_mode``).

    Returns:
        ``logits`` ``(R, L, V)`` float32, the logits that predict each choice token; ``token_lp`` ``(R, L)``
        each token's log-probability, 0 on padding.
    """
    import torch

    width = cont.shape[1]
    first, cache, prompt_mask = prompt_pass(model, enc, width > 1)  # (B, V)
    step_logits = [first[owner]]  # per choice token position: (R, V) logits that predict it
    if width > 1:
        rest = _continuation(model, prompt_mask, cache, owner, cont, cont_mask)  # (R, L - 1, V)
        step_logits += [rest[:, j, :] for j in range(width - 1)]
    logits = torch.stack(step_logits, dim=1).float()  # (R, L, V)
    token_lp = torch.log_softmax(logits, dim=-1).gather(-1, cont[:, :, None]).squeeze(-1)  # (R, L)
    token_lp = torch.where(cont_mask.bool(), token_lp, torch.zeros_like(token_lp))
    return logits, token_lp


def _measures(table: torch.Tensor, logits: torch.Tensor, token_lp: torch.Tensor, valid: torch.Tensor,
              best_row: torch.Tensor) -> tuple[dict[str, torch.Tensor], tuple[list[list[float]], ...]]:
    """The choice measures over ``table`` ``(B, K)`` and the token measures of each chosen row ``best_row``
    ``(B,)``, plus the chosen answers' per-token margin, entropy and log-probability ``(B, L)`` as lists."""
    batch, width = best_row.shape[0], logits.shape[1]
    measures = choice_measures(table)
    margin, entropy, _ = reduce_step(logits[best_row].reshape(-1, logits.shape[-1]))
    margin, entropy = margin.view(batch, width), entropy.view(batch, width)
    chosen_lp, mask = token_lp[best_row], valid[best_row]
    measures.update(aggregate(margin, entropy, chosen_lp, mask))
    return measures, (margin.tolist(), entropy.tolist(), chosen_lp.tolist())


def score_choices(
    model: Any,
    tokenizer: Any,
    enc: Any,
    choice_ids: Sequence[Sequence[Sequence[int]]],
    choices: Sequence[Sequence[str]],
    *,
    name: str,
    length_normalize: bool = False,
    scores: bool = True,
) -> list[Generation]:
    """Score one batch of prompts' choices (blocking; call under the backend's lock).

    Args:
        model: the causal LM.
        tokenizer: its tokenizer (only for the pad id).
        enc: the tokenized, left-padded prompts (``input_ids`` and ``attention_mask``, ``(B, T)``, on the
            model's device).
        choice_ids: per prompt, per choice, its token ids (see :func:`choice_token_ids`).
        choices: per prompt, the choice strings (the answer text is one of them).
        name: the model identity for the generations.
        length_normalize: rank and score choices by their mean token log-probability instead of the sum.
        scores: compute the uncertainty measures and token statistics.

    Returns:
        B generations: the best choice as text, every choice's log-likelihood in ``choice_logprobs``.
    """
    import torch

    t0 = time.perf_counter()
    device = enc["input_ids"].device
    batch = enc["input_ids"].shape[0]
    owner, slot, cont, cont_mask = _choice_rows(choice_ids, int(tokenizer.pad_token_id or 0), device)
    with torch.inference_mode():
        logits, token_lp = _token_logprobs(model, enc, owner, cont, cont_mask)  # (R, L, V), (R, L)
        lengths = cont_mask.sum(dim=-1)
        total = token_lp.sum(dim=-1)
        loglik = total / lengths if length_normalize else total  # (R,)
        k_max = max(len(row) for row in choice_ids)
        table = torch.full((batch, k_max), -torch.inf, device=device)
        table[owner, slot] = loglik
        best = table.argmax(dim=-1)  # (B,): the first of equal choices wins
        offsets = torch.tensor([0] + [len(row) for row in choice_ids[:-1]], device=device).cumsum(0)
        best_row = offsets + best
        measures: dict[str, torch.Tensor] = {}
        stats: tuple[list[list[float]], ...] = ()
        if scores:
            measures, stats = _measures(table, logits, token_lp, cont_mask.bool(), best_row)
    names = list(measures)
    values = torch.stack([measures[k] for k in names], dim=1).tolist() if names else [[]] * batch
    table_rows, best_list = table.tolist(), best.tolist()
    prompt_len = enc["attention_mask"].sum(dim=-1).tolist()
    latency = time.perf_counter() - t0
    out = []
    for b in range(batch):
        k = best_list[b]
        ids, n = tuple(choice_ids[b][k]), len(choice_ids[b][k])
        token_stats = TokenStats(tuple(stats[0][b][:n]), tuple(stats[1][b][:n]), tuple(stats[2][b][:n])) \
            if stats else None
        others = sum(len(t) for t in choice_ids[b]) - n  # every choice's tokens are read; the answer's are output
        out.append(Generation(
            text=choices[b][k], model=name, token_ids=ids, prompt_tokens=int(prompt_len[b]) + others,
            completion_tokens=n, finish_reason="stop", scores=dict(zip(names, values[b])),
            token_stats=token_stats, latency_s=latency,
            choice_logprobs=tuple(float(x) for x in table_rows[b][: len(choices[b])])))
    return out


def check_batch(prompts: Sequence[Prompt], choices: Sequence[Sequence[str]]) -> None:
    """Raise InvalidRequestError unless there is one choice list per prompt."""
    if len(choices) != len(prompts):
        raise InvalidRequestError(f"{len(prompts)} prompts need {len(prompts)} choice lists, got {len(choices)}")
