"""A prompt prefix shared by a batch is computed once: answers and scores are those of each prompt alone."""

from __future__ import annotations

import asyncio

import pytest
import torch
from conftest import make_backend
from test_hf_choices import reference

from cascade.backends import hf_prefix
from cascade.types import GenerationParams

SYSTEM = {"role": "system", "content": "answer yes or no one two three four the movie was good or bad"}
PROMPTS = [[SYSTEM, {"role": "user", "content": text}]
           for text in ("is it good", "a movie", "the capital of france is paris is it", "two")]


def test_the_shared_prefix_is_found_and_laid_out_before_each_suffix():
    backend = make_backend(2)
    enc = backend.tokenizer([backend.render(p) for p in PROMPTS], return_tensors="pt", padding=True,
                            add_special_tokens=False)
    n = hf_prefix.shared_prefix(enc["input_ids"], enc["attention_mask"])
    assert n >= hf_prefix.MIN_PREFIX
    with torch.inference_mode():
        split = hf_prefix.split_prefix(backend.model, enc["input_ids"], enc["attention_mask"])
    assert split is not None and split.prefix == n
    for row, (ids, mask) in enumerate(zip(enc["input_ids"], enc["attention_mask"])):
        assert split.input_ids[row][split.attention_mask[row].bool()].tolist() == ids[mask.bool()].tolist()
    other = ["two", "paris"]
    enc2 = backend.tokenizer([backend.render(p) for p in other], return_tensors="pt", padding=True,
                             add_special_tokens=False)
    assert hf_prefix.split_prefix(backend.model, enc2["input_ids"], enc2["attention_mask"]) is None  # too short


def test_free_answers_with_a_shared_prefix_equal_each_prompt_alone():
    backend = make_backend(0)
    params = GenerationParams(max_tokens=6)
    together = asyncio.run(backend.generate(PROMPTS, params))
    for prompt, g in zip(PROMPTS, together, strict=True):
        alone = asyncio.run(backend.generate([prompt], params))[0]
        assert g.token_ids == alone.token_ids and g.prompt_tokens == alone.prompt_tokens
        assert g.scores == pytest.approx(alone.scores, abs=1e-4)


def test_choice_scores_with_a_shared_prefix_equal_an_independent_computation():
    backend = make_backend(2)
    choices = [["yes", "no"], ["good movie", "bad"], ["paris", "the capital of france"], ["one two three", "four"]]
    together = asyncio.run(backend.choose(PROMPTS, choices))
    for p, c, g in zip(PROMPTS, choices, together, strict=True):
        assert g.choice_logprobs == pytest.approx(reference(backend, p, c), abs=1e-4)
        alone = asyncio.run(backend.choose([p], [c]))[0]
        assert alone.text == g.text and alone.scores == pytest.approx(g.scores, abs=1e-4)
