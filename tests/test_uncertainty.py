"""Every measure against an independent, obviously-correct per-token computation."""

from __future__ import annotations

import asyncio
import math

import numpy as np
import pytest
import torch
from conftest import make_backend

from cascade.types import FREE_MEASURES as MEASURES
from cascade.types import EarlyExit, GenerationParams
from cascade.uncertainty import aggregate, check_measure, reduce_step, topk_stats

PROMPTS = [
    "the movie was good",
    "what capital of france is it",
    [{"role": "system", "content": "answer yes no"}, {"role": "user", "content": "is paris the capital"}],
    "a",
]


def reference_per_token(backend, prompt, token_ids):
    """Recompute margin, entropy and chosen log-prob one position at a time with plain Python floats."""
    text = backend.render(prompt)
    ids = backend.tokenizer(text, add_special_tokens=False)["input_ids"]
    full = torch.tensor([ids + list(token_ids)])
    with torch.no_grad():
        logits = backend.model(full).logits[0].double().numpy()
    out = []
    for t, tok in enumerate(token_ids):
        row = logits[len(ids) - 1 + t]
        z = math.log(sum(math.exp(x - row.max()) for x in row)) + row.max()
        probs = sorted((math.exp(x - z) for x in row), reverse=True)
        entropy = -sum(p * math.log(p) for p in probs if p > 0)
        out.append((probs[0] - probs[1], entropy, row[tok] - z))
    return out


def reference_scores(per_token):
    m = [x[0] for x in per_token]
    h = [x[1] for x in per_token]
    lp = [x[2] for x in per_token]
    return {
        "margin_first": 1 - m[0], "margin_mean": 1 - sum(m) / len(m), "margin_min": 1 - min(m),
        "entropy_first": h[0], "entropy_mean": sum(h) / len(h), "entropy_max": max(h),
        "logprob_mean": -sum(lp) / len(lp),
    }


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_measures_match_reference_and_padding(temperature):
    backend = make_backend(3)
    params = GenerationParams(max_tokens=6, temperature=temperature, seed=11)
    batch = asyncio.run(backend.generate(PROMPTS, params))
    for prompt, gen in zip(PROMPTS, batch):
        ref_tokens = reference_per_token(backend, prompt, gen.token_ids)
        assert len(gen.token_stats.margin) == len(gen.token_ids) == gen.completion_tokens
        np.testing.assert_allclose(gen.token_stats.margin, [x[0] for x in ref_tokens], atol=1e-4)
        np.testing.assert_allclose(gen.token_stats.entropy, [x[1] for x in ref_tokens], atol=1e-4)
        np.testing.assert_allclose(gen.token_stats.logprob, [x[2] for x in ref_tokens], atol=1e-4)
        ref = reference_scores(ref_tokens)
        assert set(gen.scores) == set(MEASURES)
        for name in MEASURES:
            assert gen.scores[name] == pytest.approx(ref[name], abs=1e-4), name
    if temperature == 0.0:  # greedy: a padded batch gives what one-by-one runs give
        for prompt, gen in zip(PROMPTS, batch):
            alone = asyncio.run(backend.generate([prompt], params))[0]
            assert alone.token_ids == gen.token_ids
            for name in MEASURES:
                assert alone.scores[name] == pytest.approx(gen.scores[name], abs=1e-4)


def test_post_eos_steps_are_masked():
    backend = make_backend(5)
    eos = backend.tokenizer.eos_token_id
    # Force EOS as the 2nd token of the first prompt by biasing the lm_head: the other row runs on.
    gens = asyncio.run(backend.generate(PROMPTS[:2], GenerationParams(max_tokens=8)))
    for g in gens:
        if g.finish_reason == "stop":
            assert g.token_ids[-1] == eos
            assert len(g.token_stats.margin) == len(g.token_ids)
    # A model whose every step predicts EOS stops after one token, and scores come from that token only.
    with torch.no_grad():
        backend.model.lm_head.bias = torch.nn.Parameter(torch.zeros(backend.model.config.vocab_size))
        backend.model.lm_head.bias[eos] = 50.0
    gens = asyncio.run(backend.generate(PROMPTS, GenerationParams(max_tokens=8)))
    for g in gens:
        assert g.finish_reason == "stop" and g.token_ids == (eos,) and g.text == ""
        assert g.scores["margin_min"] == pytest.approx(g.scores["margin_first"], abs=1e-6)
        assert g.scores["entropy_max"] == pytest.approx(g.scores["entropy_first"], abs=1e-6)


def test_reduce_step_matches_numpy():
    logits = torch.randn(5, 300, generator=torch.Generator().manual_seed(0)) * 4
    margin, entropy, probs = reduce_step(logits.to(torch.bfloat16))
    x = logits.to(torch.bfloat16).float().double().numpy()
    p = np.exp(x - x.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    ps = np.sort(p, 1)[:, ::-1]
    np.testing.assert_allclose(margin.numpy(), ps[:, 0] - ps[:, 1], atol=1e-5)
    np.testing.assert_allclose(entropy.numpy(), -(p * np.log(p)).sum(1), atol=1e-4)
    assert margin.dtype == torch.float32
    np.testing.assert_allclose(probs.numpy(), p, atol=1e-6)
    assert probs.shape == (5, 300)


def test_reduce_step_handles_minus_inf_logits():
    logits = torch.tensor([[0.0, 0.0, -float("inf"), -float("inf")]])
    margin, entropy, _ = reduce_step(logits)
    assert margin.item() == pytest.approx(0.0)
    assert entropy.item() == pytest.approx(math.log(2))


def test_topk_stats_entropy_is_an_upper_bound_that_ranks_with_the_exact_entropy():
    gen = torch.Generator().manual_seed(1)
    # 200 next-token distributions over 500 tokens, from peaked to flat (logit scales 0.2 to 8)
    scales = torch.linspace(0.2, 8.0, 200).reshape(200, 1, 1)
    full = torch.log_softmax(torch.randn(200, 1, 500, generator=gen) * scales, -1)
    top = torch.topk(full, 5, dim=-1).values
    margin, entropy = topk_stats(top, vocab_size=500)
    p = full.exp()
    ps = torch.sort(p, -1, descending=True).values
    torch.testing.assert_close(margin, ps[..., 0] - ps[..., 1])
    true_h = -(p * full).sum(-1)
    assert torch.all(entropy >= true_h - 1e-4)  # the rest spread evenly is the most entropy it can carry

    def ranks(x: torch.Tensor) -> torch.Tensor:
        return x.flatten().argsort().argsort().float()

    spearman = torch.corrcoef(torch.stack([ranks(entropy), ranks(true_h)]))[0, 1]
    assert spearman > 0.9
    # with every token listed the estimate is exact
    _, exact = topk_stats(full, vocab_size=500)
    torch.testing.assert_close(exact, true_h, atol=1e-4, rtol=1e-4)


def test_aggregate_masks_padding():
    margin = torch.tensor([[0.9, 0.1, 0.5], [0.2, 0.99, 0.0]])
    entropy = torch.tensor([[0.1, 2.0, 5.0], [1.0, 0.5, 9.0]])
    logprob = torch.tensor([[-0.1, -2.0, -7.0], [-1.0, -0.5, -9.0]])
    mask = torch.tensor([[True, True, False], [True, True, True]])
    s = aggregate(margin, entropy, logprob, mask)
    assert s["margin_first"].tolist() == pytest.approx([0.1, 0.8])
    assert s["margin_mean"].tolist() == pytest.approx([0.5, 1 - 1.19 / 3])
    assert s["margin_min"].tolist() == pytest.approx([0.9, 1.0])
    assert s["entropy_max"].tolist() == pytest.approx([2.0, 9.0])
    assert s["entropy_mean"].tolist() == pytest.approx([1.05, 10.5 / 3])
    assert s["logprob_mean"].tolist() == pytest.approx([1.05, 10.5 / 3])


def test_unknown_measure_is_typed_error():
    from cascade.errors import InvalidRequestError

    with pytest.raises(InvalidRequestError):
        check_measure("margin_median")
    with pytest.raises(InvalidRequestError):
        EarlyExit("margin_mean", (0.5,))
