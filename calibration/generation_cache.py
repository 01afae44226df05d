"""Cached generation: run one backend over labeled examples once, and read every later run from disk.

Each (model identity, decoding parameters, scoring flag) key gets one JSONL file under ``cache_dir``. Every
line is one generation (text, token ids, token counts, finish reason, every uncertainty score and the
per-token statistics), keyed by the sha256 of the prompt as the model sees it (the rendered chat template
when the backend can render). Batches are appended and flushed as they finish, so an interrupted run resumes
where it stopped; a truncated last line (a kill mid-write) is ignored and cut off before the next append.

:func:`tier_arrays` turns examples plus one list of generations per tier into the arrays calibration and
evaluation work on: ``scores (n, N-1)``, ``correct (n, N)`` and ``costs (n, N)``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cascade.backends.base import Backend
from cascade.errors import InvalidRequestError
from cascade.types import MEASURES, Generation, GenerationParams, Prompt, TokenStats, validate_prompt

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt

    from cascade.engine import Price
    from cascade.scorers import Scorer

__all__ = [
    "CACHE_SCHEMA",
    "GenerationCache",
    "TierArrays",
    "cache_key",
    "cached_generations",
    "example_prompt",
    "generate_cached",
    "model_identity",
    "prompt_key",
    "raw_key",
    "tier_arrays",
    "uses_choices",
]

log = logging.getLogger(__name__)

#: Version of the cache line format; a change starts new cache files.
#: Version 2: the end-of-turn token is no longer a step of the local backend's measures (older lines scored it).
CACHE_SCHEMA = 2


def example_prompt(example: Mapping[str, Any]) -> Prompt:
    """The prompt of one example: its ``messages`` list, else its ``prompt`` string (validated).

    Raises:
        InvalidRequestError: the example has neither, or the prompt is malformed.
    """
    if not isinstance(example, Mapping):
        raise InvalidRequestError(f"an example must be an object, got {type(example).__name__}")
    prompt = example.get("messages", example.get("prompt"))
    if prompt is None:
        raise InvalidRequestError(f"example {example.get('id', '?')!r} has neither 'prompt' nor 'messages'")
    return validate_prompt(prompt)


def model_identity(backend: Backend) -> str:
    """The backend's name plus, for local models, the weights' dtype (bf16 and fp32 answer differently)."""
    dtype = getattr(getattr(backend, "model", None), "dtype", None)
    return f"{backend.name}@{str(dtype).removeprefix('torch.')}" if dtype is not None else backend.name


def cache_key(identity: str, params: GenerationParams, scores: bool, *, choices: bool = False) -> str:
    """A file-name-safe key for one (model identity, decoding parameters, scoring flag, answer mode) combination.

    Constrained answers (``choices``) get keys of their own, so they never collide with free generations of
    the same prompts.
    """
    spec_d: dict[str, Any] = {"schema": CACHE_SCHEMA, "model": identity, "params": asdict(params), "scores": scores}
    if choices:
        spec_d["choices"] = True
    spec = json.dumps(spec_d, sort_keys=True)
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", identity)[:60]
    return f"{slug}-{hashlib.sha256(spec.encode()).hexdigest()[:16]}"


def _with_choices(text: str, choices: Sequence[str] | None) -> str:
    return text if choices is None else text + "\x00choices:" + json.dumps(list(choices), ensure_ascii=False)


def prompt_key(backend: Backend, prompt: Prompt, choices: Sequence[str] | None = None) -> str:
    """sha256 of the prompt as the model sees it (rendered by the backend when it can render), and its choices."""
    render = getattr(backend, "render", None)
    text = render(prompt) if callable(render) else json.dumps(prompt, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(_with_choices(str(text), choices).encode("utf-8")).hexdigest()


def raw_key(prompt: Prompt, choices: Sequence[str] | None = None) -> str:
    """sha256 of the prompt itself (before any chat template) and its choices, for lookups without the model."""
    text = json.dumps(prompt, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(_with_choices(text, choices).encode("utf-8")).hexdigest()


def _to_record(key: str, g: Generation, raw: str | None = None) -> dict[str, Any]:
    stats = None
    if g.token_stats is not None:
        stats = {"margin": list(g.token_stats.margin), "entropy": list(g.token_stats.entropy),
                 "logprob": list(g.token_stats.logprob), "entropy_exact": g.token_stats.entropy_exact}
    return {"key": key, "raw": raw, "text": g.text, "model": g.model, "token_ids": list(g.token_ids),
            "prompt_tokens": g.prompt_tokens, "completion_tokens": g.completion_tokens,
            "finish_reason": g.finish_reason, "scores": dict(g.scores), "token_stats": stats,
            "latency_s": g.latency_s, **({"choice_logprobs": list(g.choice_logprobs)} if g.choice_logprobs else {})}


def _from_record(rec: Mapping[str, Any]) -> Generation:
    st = rec.get("token_stats")
    stats = None
    if st is not None:
        stats = TokenStats(tuple(st["margin"]), tuple(st["entropy"]), tuple(st["logprob"]),
                           bool(st.get("entropy_exact", True)))
    return Generation(
        text=str(rec["text"]), model=str(rec["model"]), token_ids=tuple(int(i) for i in rec["token_ids"]),
        prompt_tokens=int(rec["prompt_tokens"]), completion_tokens=int(rec["completion_tokens"]),
        finish_reason=rec["finish_reason"], scores={k: float(v) for k, v in rec["scores"].items()},
        token_stats=stats, latency_s=float(rec.get("latency_s", 0.0)),
        choice_logprobs=tuple(float(x) for x in rec.get("choice_logprobs", ())),
    )


class GenerationCache:
    """One JSONL file of generations for one cache key.

    The first line is a header (``{"_meta": {...}}``) describing the key; every other line is one
    generation. Lines that do not parse are skipped with a warning (they are generated again).

    Args:
        path: the JSONL file (created with its parent folders on the first append).
        meta: the header written to a new file.
    """

    def __init__(self, path: str | os.PathLike[str], meta: Mapping[str, Any] | None = None) -> None:
        self.path = Path(path)
        self.meta = dict(meta or {})

    def load(self, by: str = "key") -> dict[str, Generation]:
        """Every cached generation by prompt key (``by="key"``) or raw prompt key (``"raw"``); later lines win."""
        out: dict[str, Generation] = {}
        if not self.path.is_file():
            return out
        with self.path.open("rb") as f:
            data = f.read()
        lines = data.split(b"\n")
        for i, line in enumerate(lines):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                if "_meta" in rec:
                    continue
                if rec.get(by) is not None:
                    out[str(rec[by])] = _from_record(rec)
            except (ValueError, KeyError, TypeError) as exc:
                where = "truncated last line" if i == len(lines) - 1 else f"line {i + 1}"
                log.warning("%s: skipping unreadable %s (%s)", self.path, where, exc)
        return out

    def _repair_tail(self) -> None:
        """Cut a partial last line (left by a kill mid-write) so appended lines start clean."""
        if not self.path.is_file() or self.path.stat().st_size == 0:
            return
        with self.path.open("rb+") as f:
            f.seek(-1, os.SEEK_END)
            if f.read(1) == b"\n":
                return
            f.seek(0)
            data = f.read()
            f.truncate(data.rfind(b"\n") + 1)

    def append(self, items: Sequence[tuple[str, Generation]], raw: Sequence[str] | None = None) -> None:
        """Append generations ``(key, generation)`` (with their raw prompt keys) and flush them to disk.

        The file is locked (``flock``, where available) while writing, so two processes filling the same
        cache do not interleave their lines.
        """
        self.path.parent.mkdir(parents=True, exist_ok=True)
        lines = [json.dumps(_to_record(key, g, raw[i] if raw is not None else None), ensure_ascii=False) + "\n"
                 for i, (key, g) in enumerate(items)]
        with self.path.open("a", encoding="utf-8") as f, _locked(f):
            self._repair_tail()
            if self.path.stat().st_size == 0:
                f.write(json.dumps({"_meta": self.meta}, sort_keys=True) + "\n")
            f.write("".join(lines))
            f.flush()
            os.fsync(f.fileno())


@contextlib.contextmanager
def _locked(f: Any) -> Iterator[None]:
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock
        yield
        return
    fcntl.flock(f.fileno(), fcntl.LOCK_EX)
    try:
        yield
    finally:
        fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _choice_list(example: Mapping[str, Any]) -> tuple[str, ...]:
    from cascade.types import validate_choices

    try:
        return validate_choices([str(c) for c in example["choices"]])
    except InvalidRequestError as exc:
        raise InvalidRequestError(f"example {example.get('id', '?')!r}: {exc}") from None


def uses_choices(example: Mapping[str, Any], choices: bool) -> bool:
    """True when the example is answered by scoring its ``choices`` (``choices`` on and the example has some)."""
    return choices and example.get("choices") is not None


async def generate_cached(
    backend: Backend,
    examples: Sequence[Mapping[str, Any]],
    params: GenerationParams,
    cache_dir: str | os.PathLike[str],
    *,
    scores: bool = True,
    batch_size: int = 16,
    identity: str | None = None,
    progress: bool = True,
    desc: str | None = None,
    choices: bool = False,
) -> list[Generation]:
    """Generate an answer to every example, reading cached answers and caching new ones.

    Uncached prompts are deduplicated, sorted by rendered length (less padding per batch) and sent in
    batches of ``batch_size``; each finished batch is appended to the cache before the next starts.

    Args:
        backend: the model.
        examples: n examples, each with ``prompt`` (str) or ``messages`` (chat list).
        params: decoding parameters (part of the cache key).
        cache_dir: folder of the cache files.
        scores: ask the backend for uncertainty scores (part of the cache key).
        batch_size: prompts per backend call.
        identity: model identity for the cache key (default :func:`model_identity`).
        progress: show a tqdm progress bar.
        desc: label of the progress bar (default: the identity).
        choices: answer the examples that have ``choices`` with the backend's ``choose`` (the most likely
            allowed answer, no free generation; cached under their own key); the others are generated.

    Returns:
        n generations, the i-th answering the i-th example.

    Raises:
        InvalidRequestError: a malformed example or ``batch_size < 1``.
        ChoicesUnsupportedError: choices asked of a backend that cannot score them.
        BackendError: the backend failed (answers of earlier batches stay cached).
    """
    if batch_size < 1:
        raise InvalidRequestError("batch_size must be >= 1")
    prompts = [example_prompt(ex) for ex in examples]
    lists = [_choice_list(ex) if uses_choices(ex, choices) else None for ex in examples]
    ident = identity or model_identity(backend)
    out: list[Generation | None] = [None] * len(examples)
    for mode in (False, True):
        idx = [i for i, c in enumerate(lists) if (c is not None) == mode]
        if not idx:
            continue
        if mode and not callable(getattr(backend, "choose", None)):
            from cascade.errors import ChoicesUnsupportedError

            raise ChoicesUnsupportedError(f"{backend.name} cannot score choices (it has no 'choose' method)")
        gens = await _generate_group(backend, [prompts[i] for i in idx], [lists[i] for i in idx], params,
                                     Path(cache_dir), scores, batch_size, ident, desc if progress else None)
        for i, g in zip(idx, gens):
            out[i] = g
    return [g for g in out if g is not None]


async def _generate_group(backend: Backend, prompts: Sequence[Prompt], lists: Sequence[tuple[str, ...] | None],
                          params: GenerationParams, cache_dir: Path, scores: bool, batch_size: int, ident: str,
                          desc: str | None) -> list[Generation]:
    """:func:`generate_cached` for prompts that are all free-form or all constrained (``lists`` all set)."""
    choices = lists[0] is not None
    key = cache_key(ident, params, scores, choices=choices)
    meta = {"schema": CACHE_SCHEMA, "model": ident, "params": asdict(params), "scores": scores,
            **({"choices": True} if choices else {})}
    cache = GenerationCache(cache_dir / f"{key}.jsonl", meta)
    keys = [prompt_key(backend, p, c) for p, c in zip(prompts, lists)]
    found = cache.load()
    todo: dict[str, tuple[Prompt, tuple[str, ...] | None]] = {}
    for k, p, c in zip(keys, prompts, lists):
        if k not in found and k not in todo:
            todo[k] = (p, c)
    if todo:
        render = getattr(backend, "render", None)
        order = sorted(todo, key=lambda k: len(str(render(todo[k][0]) if callable(render) else todo[k][0])))
        bar = _progress(len(order), desc or ident, desc is not None)
        try:
            for start in range(0, len(order), batch_size):
                chunk = order[start:start + batch_size]
                batch = [todo[k][0] for k in chunk]
                if choices:
                    gens = await backend.choose(batch, [todo[k][1] for k in chunk], scores=scores)  # type: ignore[attr-defined]
                else:
                    gens = await backend.generate(batch, params, scores=scores)
                if len(gens) != len(chunk):
                    from cascade.errors import BackendError

                    raise BackendError(f"{backend.name} returned {len(gens)} answers for {len(chunk)} prompts")
                cache.append(list(zip(chunk, gens)), [raw_key(*todo[k]) for k in chunk])
                found.update(zip(chunk, gens))
                if bar is not None:
                    bar.update(len(chunk))
        finally:
            if bar is not None:
                bar.close()
    return [found[k] for k in keys]


def cached_generations(
    identity: str,
    examples: Sequence[Mapping[str, Any]],
    params: GenerationParams,
    cache_dir: str | os.PathLike[str],
    *,
    scores: bool = True,
    choices: bool = False,
) -> list[Generation | None]:
    """The cached answers to ``examples`` without loading the model (None where nothing is cached).

    Looks prompts up by :func:`raw_key`, so it finds what :func:`generate_cached` wrote for the same
    model identity (see :func:`model_identity`), parameters, scoring flag and ``choices`` flag.
    """
    lists = [_choice_list(ex) if uses_choices(ex, choices) else None for ex in examples]
    found: dict[bool, dict[str, Generation]] = {}
    for mode in {c is not None for c in lists}:
        path = Path(cache_dir) / f"{cache_key(identity, params, scores, choices=mode)}.jsonl"
        found[mode] = GenerationCache(path).load(by="raw")
    return [found[c is not None].get(raw_key(example_prompt(ex), c)) for ex, c in zip(examples, lists)]


def _progress(total: int, desc: str, enabled: bool) -> Any:
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="ex", dynamic_ncols=True)


@dataclass(frozen=True)
class TierArrays:
    """Per-example arrays for an N-tier chain (tier 0 = cheapest).

    Attributes:
        scores: ``(n, N-1)`` uncertainty of tiers 0..N-2 under ``measure`` (higher = escalate).
        correct: ``(n, N)`` bool, tier j's answer to example i is right.
        costs: ``(n, N)`` cost of tier j's call for example i (0 without prices).
        measure: the uncertainty measure of ``scores``.
    """

    scores: npt.NDArray[np.float64]
    correct: npt.NDArray[np.bool_]
    costs: npt.NDArray[np.float64]
    measure: str


def tier_arrays(
    examples: Sequence[Mapping[str, Any]],
    generations: Sequence[Sequence[Generation]],
    scorer: Scorer,
    measure: str = "margin_first",
    prices: Sequence[Price] | None = None,
) -> TierArrays:
    """Score every tier's answers and stack scores, correctness and costs.

    Args:
        examples: n examples (the scorer reads ``answer`` and, for ``choice``, ``choices``).
        generations: N lists (cheapest tier first) of n generations each.
        scorer: ``(answer_text, example) -> bool``.
        measure: the uncertainty measure taken from tiers 0..N-2 (a missing score is NaN).
        prices: N tier prices (default: all costs 0).

    Raises:
        InvalidRequestError: fewer than two tiers, mismatched lengths, or an unknown measure.
    """
    import numpy as np

    if measure not in MEASURES:
        raise InvalidRequestError(f"unknown uncertainty measure {measure!r}; choose one of {list(MEASURES)}")
    n_tiers, n = len(generations), len(examples)
    if n_tiers < 2:
        raise InvalidRequestError("tier_arrays needs the generations of at least two tiers")
    if any(len(g) != n for g in generations):
        raise InvalidRequestError(f"every tier needs {n} generations, got {[len(g) for g in generations]}")
    if prices is not None and len(prices) != n_tiers:
        raise InvalidRequestError(f"{n_tiers} tiers need {n_tiers} prices, got {len(prices)}")
    scores = np.full((n, n_tiers - 1), math.nan)
    correct = np.zeros((n, n_tiers), dtype=bool)
    costs = np.zeros((n, n_tiers))
    for j, gens in enumerate(generations):
        for i, (ex, g) in enumerate(zip(examples, gens)):
            correct[i, j] = bool(scorer(g.text, ex))
            if j < n_tiers - 1:
                scores[i, j] = float(g.scores.get(measure, math.nan))
            if prices is not None:
                costs[i, j] = prices[j].cost(g.prompt_tokens, g.completion_tokens)
    return TierArrays(scores, correct, costs, measure)
