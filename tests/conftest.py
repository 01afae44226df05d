"""Shared fixtures: tiny random-weight transformers models built from a config (no files, no hub), the data
folder of the loader tests, and waiting for a condition instead of sleeping for a guessed time."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

WORDS = [
    "the", "a", "movie", "was", "good", "bad", "great", "awful", "is", "it", "positive", "negative",
    "what", "capital", "of", "france", "paris", "answer", "yes", "no", "one", "two", "three", "four",
]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }} {{ m['content'] }} <|im_end|> {% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant {% endif %}"
)


def make_tokenizer() -> Any:
    """A word-level fast tokenizer over a small fixed vocabulary, with ChatML-like special tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<unk>", "<|im_start|>", "<|im_end|>"]
    vocab = {tok: i for i, tok in enumerate(specials + WORDS + ["user", "assistant", "system"])}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core, eos_token="<|im_end|>", pad_token="<pad>", unk_token="<unk>",
        additional_special_tokens=["<|im_start|>"],
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


def make_model(seed: int = 0, vocab_size: int = 64) -> Any:
    """A 2-layer Llama with random weights (seeded), small enough to run in milliseconds."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        eos_token_id=3, pad_token_id=0, bos_token_id=2,
    )
    model = LlamaForCausalLM(config)
    # Sharpen the random logits so some answers are confident and some are not.
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)
    return model.eval()


def make_backend(seed: int = 0, **kwargs: Any) -> Any:
    """An HFLocalBackend over a tiny random model."""
    from cascade.backends.hf_local import HFLocalBackend

    return HFLocalBackend(make_model(seed), make_tokenizer(), name=f"tiny-llama-{seed}", **kwargs)


@pytest.fixture
def tiny_backend() -> Any:
    return make_backend(0)


#: Excerpts of the shared data files (same formats and encodings), so the loader tests always run.
BUNDLED_DATA = Path(__file__).parent / "data" / "eval_data"


def eval_data() -> tuple[Path, bool]:
    """The data folder for loader tests and whether it is the real one: ``CASCADE_EVAL_DATA``, else
    ``../shared/data`` next to the checkout when it exists, else the bundled excerpts."""
    given = os.environ.get("CASCADE_EVAL_DATA")
    real = Path(given) if given else Path(__file__).resolve().parents[1].parent / "shared" / "data"
    return (real, True) if real.is_dir() else (BUNDLED_DATA, False)


#: How long a test waits for something that must happen before calling it a failure. Only a broken feature
#: waits this long: the assertion is the condition, not the time it took.
PATIENCE_S = 120.0


async def until(condition: Callable[[], bool], what: str) -> None:
    """Yield to the event loop until ``condition()`` holds (also for state another thread changes).

    Raises:
        AssertionError: naming ``what``, when it still does not hold after :data:`PATIENCE_S`.
    """
    give_up = time.monotonic() + PATIENCE_S
    while not condition():
        if time.monotonic() > give_up:
            raise AssertionError(f"never happened: {what}")
        await asyncio.sleep(0.002)


def wait_until(condition: Callable[[], bool], what: str) -> None:
    """:func:`until` for synchronous tests (the condition is usually another process's state)."""
    give_up = time.monotonic() + PATIENCE_S
    while not condition():
        if time.monotonic() > give_up:
            raise AssertionError(f"never happened: {what}")
        time.sleep(0.02)
