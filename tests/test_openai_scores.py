"""Remote answers scored in plain Python agree with the batched torch scorers (topk_stats + aggregate)."""

from __future__ import annotations

import math
import random

import pytest
import torch

from cascade.backends.openai_answer import Answer
from cascade.backends.openai_scores import first_token_scores, score_answers, step_stats
from cascade.types import FREE_MEASURES
from cascade.uncertainty import aggregate, topk_stats

K = 5


def _torch_scores(answer: Answer, k: int) -> dict[str, float]:
    """The same answer through the tensor path: one padded ``(1, T, k + 1)`` row."""
    width = k + 1
    n = len(answer.tokens)
    rows = [sorted(t, reverse=True)[:width] for t in answer.top] if n else [[]]
    rows = [r + [-math.inf] * (width - len(r)) for r in rows]
    margin, entropy = topk_stats(torch.tensor([rows], dtype=torch.float32))
    chosen = torch.tensor([answer.logprobs if n else [-math.log(width)]], dtype=torch.float32)
    measures = aggregate(margin, entropy, chosen, torch.ones_like(chosen, dtype=torch.bool))
    return {name: float(v[0]) for name, v in measures.items()}


def _answer(rng: random.Random, steps: int, listed: int) -> Answer:
    top = []
    for _ in range(steps):
        raw = [rng.gauss(0.0, 2.0) for _ in range(listed)]
        norm = math.log(sum(math.exp(v) for v in raw) / rng.uniform(0.3, 1.0))  # some mass left unlisted
        top.append([v - norm for v in raw])
    return Answer(tokens=["t"] * steps, logprobs=[max(t) for t in top], top=top, has_logprobs=True)


@pytest.mark.parametrize("steps,listed", [(1, 1), (1, 2), (3, K), (16, K), (16, K + 1), (8, K + 4)])
def test_plain_python_scores_agree_with_torch(steps: int, listed: int) -> None:
    rng = random.Random(steps * 100 + listed)
    for _ in range(20):
        answer = _answer(rng, steps, listed)
        [(stats, measures)] = score_answers([answer], K)
        assert set(measures) == set(FREE_MEASURES)
        assert measures == pytest.approx(_torch_scores(answer, K), rel=1e-5, abs=1e-5)
        assert len(stats.margin) == len(stats.entropy) == steps and not stats.entropy_exact
        first = first_token_scores(answer.top[0], K)
        assert first == {"margin_first": measures["margin_first"], "entropy_first": measures["entropy_first"]}


def test_an_empty_answer_is_as_unsure_as_can_be() -> None:
    [(stats, measures)] = score_answers([Answer()], K)
    assert measures == pytest.approx(_torch_scores(Answer(), K), rel=1e-6)
    assert measures["margin_first"] == 1.0 and stats.margin == () and stats.logprob == ()


def test_full_mass_listed_gives_the_exact_entropy() -> None:
    margin, entropy = step_stats([math.log(0.5), math.log(0.25), math.log(0.25)], K + 1)
    assert margin == pytest.approx(0.25) and entropy == pytest.approx(1.5 * math.log(2))
    assert step_stats([-math.inf, 0.0], K + 1) == pytest.approx((1.0, 0.0))  # -inf: not listed
