"""Constrained answers on a local model: choice scores against an independent per-choice computation."""

from __future__ import annotations

import asyncio
import math

import pytest
import torch
from conftest import make_backend

from cascade.errors import InvalidRequestError
from cascade.types import CHOICE_MEASURES, FREE_MEASURES
from cascade.uncertainty import choice_measures

PROMPTS = ["the movie was good", "paris is", "what capital of france is it", "one two"]
ONE_TOKEN = [["positive", "negative"], ["yes", "no"], ["paris", "france", "two"], ["three", "four"]]
MULTI = [["the movie was good", "a movie"], ["the capital of france", "paris", "it is paris"],
         ["paris", "capital of france"], ["one two three", "four"]]


def reference(backend, prompt, choices, *, normalize=False):
    """Each choice's log-likelihood from its own unpadded forward pass over prompt + choice."""
    tok = backend.tokenizer
    pid = tok(backend.render(prompt), add_special_tokens=False)["input_ids"]
    out = []
    for c in choices:
        cid = tok(c, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logits = backend.model(torch.tensor([pid + cid])).logits[0].float()
        lp = torch.log_softmax(logits, dim=-1)
        total = sum(float(lp[len(pid) - 1 + j, t]) for j, t in enumerate(cid))
        out.append(total / len(cid) if normalize else total)
    return out


def choose(backend, prompts, choices, **kw):
    return asyncio.run(backend.choose(prompts, choices, **kw))


@pytest.mark.parametrize("choices", [ONE_TOKEN, MULTI], ids=["one-token", "multi-token"])
@pytest.mark.parametrize("normalize", [False, True])
def test_choice_scores_match_an_independent_computation(choices, normalize):
    backend = make_backend(0)
    gens = choose(backend, PROMPTS, choices, length_normalize=normalize)
    for prompt, cs, g in zip(PROMPTS, choices, gens, strict=True):
        ref = reference(backend, prompt, cs, normalize=normalize)
        assert g.choice_logprobs == pytest.approx(ref, abs=1e-4)
        best = max(range(len(cs)), key=lambda k: ref[k])
        assert g.text == cs[best]
        assert g.token_ids == tuple(backend.tokenizer(cs[best], add_special_tokens=False)["input_ids"])
        assert g.completion_tokens == len(g.token_ids) and g.finish_reason == "stop"
        assert set(g.scores) == set(FREE_MEASURES) | set(CHOICE_MEASURES)
        p = torch.softmax(torch.tensor(ref), dim=0).sort(descending=True).values.tolist()
        margin = p[0] - (p[1] if len(p) > 1 else 0.0)
        entropy = -sum(x * math.log(x) for x in p if x > 0) / math.log(len(p)) if len(p) > 1 else 0.0
        assert g.scores["choice_margin"] == pytest.approx(1.0 - margin, abs=1e-4)
        assert g.scores["choice_entropy"] == pytest.approx(entropy, abs=1e-4)
        # the token measures follow the chosen answer's tokens
        assert g.token_stats is not None and len(g.token_stats.logprob) == len(g.token_ids)
        assert sum(g.token_stats.logprob) == pytest.approx(ref[best] * (len(g.token_ids) if normalize else 1),
                                                           abs=1e-4)
        assert g.scores["logprob_mean"] == pytest.approx(-sum(g.token_stats.logprob) / len(g.token_ids), abs=1e-5)


def test_padding_and_batching_do_not_change_the_scores():
    backend = make_backend(1)
    together = choose(backend, PROMPTS, MULTI)
    alone = [choose(backend, [p], [c])[0] for p, c in zip(PROMPTS, MULTI, strict=True)]
    pairs = choose(make_backend(1, max_batch_size=2), PROMPTS, MULTI)
    for a, b, c in zip(together, alone, pairs, strict=True):
        assert a.text == b.text == c.text
        assert a.choice_logprobs == pytest.approx(b.choice_logprobs, abs=1e-4)
        assert a.choice_logprobs == pytest.approx(c.choice_logprobs, abs=1e-4)
        for name in a.scores:
            assert a.scores[name] == pytest.approx(b.scores[name], abs=1e-4), name


def test_choice_order_and_counts():
    backend = make_backend(0)
    g1, g2 = choose(backend, ["the movie was", "the movie was"], [["good", "bad"], ["bad", "good"]])
    assert g1.text == g2.text and g1.choice_logprobs == pytest.approx(g2.choice_logprobs[::-1], abs=1e-5)
    single = choose(backend, ["is it"], [["yes"]])[0]
    assert single.text == "yes" and single.scores["choice_margin"] == 0.0 and single.scores["choice_entropy"] == 0.0
    two = choose(backend, ["is it"], [["yes", "no one two"]])[0]
    assert two.prompt_tokens + two.completion_tokens == single.prompt_tokens + 1 + 3  # every choice token is read
    bare = choose(backend, ["is it"], [["yes", "no"]], scores=False)[0]
    assert bare.scores == {} and bare.token_stats is None and bare.choice_logprobs


def test_bad_choices_are_typed_errors():
    backend = make_backend(0)
    for bad in ([], ["yes", "yes"], ["yes", " "], "yes", [1, 2]):
        with pytest.raises(InvalidRequestError):
            choose(backend, ["is it"], [bad])
    with pytest.raises(InvalidRequestError):
        choose(backend, ["is it", "a"], [["yes", "no"]])
    with pytest.raises(InvalidRequestError):
        choose(backend, ["the " * 300], [["yes", "no"]])
    assert choose(backend, [], []) == []


def test_choice_measures_are_pure_functions_of_the_logliks():
    inf = -math.inf
    out = choice_measures(torch.tensor([[0.0, 0.0, inf], [math.log(0.9), math.log(0.1), inf], [-3.0, inf, inf],
                                        [0.0, 0.0, 0.0]]))
    assert out["choice_margin"].tolist() == pytest.approx([1.0, 0.2, 0.0, 1.0], abs=1e-6)
    h = -(0.9 * math.log(0.9) + 0.1 * math.log(0.1)) / math.log(2)
    assert out["choice_entropy"].tolist() == pytest.approx([1.0, h, 0.0, 1.0], abs=1e-6)
    one = choice_measures(torch.tensor([[-2.0], [-0.5]]))
    assert one["choice_margin"].tolist() == [0.0, 0.0] and one["choice_entropy"].tolist() == [0.0, 0.0]

