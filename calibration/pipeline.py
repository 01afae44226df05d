"""The steps of ``cascade-calibrate`` between the command line and the report.

Reading and checking JSONL, labelled or (for label-free calibration) not (every error names its line), the
seeded held-out split, running every
tier of a config through the generation cache (models are loaded only when something is not cached yet),
comparing every tier's answers with the last tier's (label-free), fitting with one of the three methods,
per-cluster fits for expert-router mode, and moving fitted thresholds
off the data values they come from.
"""

from __future__ import annotations

import gc
import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from cascade.errors import InvalidRequestError
from cascade.scorers import Same, Scorer, get_scorer

if TYPE_CHECKING:
    from calibration.certify import Claim
    from calibration.fit import FitResult
    from cascade.config import BackendConfig, CascadeConfig
    from cascade.curve import Curve
    from cascade.types import Generation, GenerationParams

__all__ = [
    "Example",
    "agreement_matrix",
    "answering_tiers",
    "check_scorer",
    "cluster_ids",
    "fit_clusters",
    "fit_thresholds",
    "generate_all",
    "load_examples",
    "predicted_identity",
    "split_examples",
    "widen_curve",
    "widen_thresholds",
]


@dataclass(frozen=True)
class Example:
    """One example and where it came from.

    Attributes:
        data: the parsed line (``id``, ``prompt`` or ``messages``, ``answer`` (absent on an unlabeled line of
            label-free data), optional ``choices``).
        line: 1-based line number in ``source``.
        source: the file it was read from.
    """

    data: dict[str, Any]
    line: int
    source: str

    @property
    def labelled(self) -> bool:
        """Whether the line has an answer."""
        return "answer" in self.data


def _parse(obj: Any, at: str, labelled: bool) -> dict[str, Any]:
    from cascade.types import validate_prompt

    if not isinstance(obj, dict):
        raise InvalidRequestError(f"{at}: expected a JSON object, got {type(obj).__name__}")
    if ("prompt" in obj) == ("messages" in obj):
        raise InvalidRequestError(f"{at}: give exactly one of 'prompt' or 'messages'")
    try:
        validate_prompt(obj.get("prompt", obj.get("messages")))
    except InvalidRequestError as exc:
        raise InvalidRequestError(f"{at}: {exc}") from None
    answer = obj.get("answer")
    if answer is None and not labelled:
        obj.pop("answer", None)
    elif answer is None:
        raise InvalidRequestError(f"{at}: missing 'answer' (a string or number); to calibrate on prompts without "
                                  "answers, use --label-free (it certifies how often the cascade's answer differs "
                                  "from the last tier's)")
    elif isinstance(answer, (dict, list, bool)) or str(answer).strip() == "":
        raise InvalidRequestError(f"{at}: empty or malformed 'answer' (a string or number)")
    choices = obj.get("choices")
    if choices is not None:
        if not isinstance(choices, list) or not choices or not all(isinstance(c, (str, int, float)) for c in choices):
            raise InvalidRequestError(f"{at}: 'choices' must be a non-empty list of strings")
        if answer is not None and str(answer) not in [str(c) for c in choices]:
            raise InvalidRequestError(f"{at}: answer {answer!r} is not among its choices {choices!r}")
    return obj


def load_examples(path: str | Path, *, labelled: bool = True) -> list[Example]:
    """Read JSONL examples; blank lines are skipped.

    Args:
        path: the file.
        labelled: every line needs an ``answer`` (False: label-free data, where an answer is optional and
            checked when present).

    Raises:
        InvalidRequestError: unreadable file, no examples, or a bad line (named ``file:line``): invalid
            JSON, not an object, neither or both of prompt/messages, a malformed prompt, a missing answer
            (labelled data; the message points to ``--label-free``), an empty answer, an answer not among
            its choices, or a duplicate id.
    """
    from cascade.run_lines import LineError, decode_line, read_lines

    p = Path(path)
    try:
        lines = read_lines(p)  # bytes, split on newlines only (U+2028 may be in a string), BOM dropped
    except OSError as exc:
        raise InvalidRequestError(f"cannot read {p}: {exc}") from None
    out: list[Example] = []
    seen: dict[str, int] = {}
    for lineno, raw in lines:
        if not raw.strip():
            continue
        try:
            value = decode_line(raw, lineno)  # not UTF-8, bad JSON, a huge number, deep nesting: named
        except LineError as exc:
            raise InvalidRequestError(f"{p}:{lineno}: {str(exc).removeprefix(f'line {lineno}: ')}") from None
        obj = _parse(value, f"{p}:{lineno}", labelled)
        uid = str(obj.setdefault("id", f"line-{lineno}"))
        if uid in seen:
            raise InvalidRequestError(f"{p}:{lineno}: duplicate id {uid!r} (also on line {seen[uid]})")
        seen[uid] = lineno
        out.append(Example(obj, lineno, str(p)))
    if not out:
        raise InvalidRequestError(f"{p}: no examples (the file is empty)")
    return out


def check_scorer(name: str, examples: Sequence[Example]) -> tuple[str, Scorer]:
    """Resolve ``name`` (``auto``: ``choice`` when every example has choices, else ``exact``) and check the data.

    Raises:
        InvalidRequestError: unknown scorer, or ``choice`` with an example without choices (line named).
    """
    if name == "auto":
        name = "choice" if all("choices" in e.data for e in examples) else "exact"
    scorer = get_scorer(name)
    if name == "choice":
        for e in examples:
            if "choices" not in e.data:
                raise InvalidRequestError(f"{e.source}:{e.line}: the choice scorer needs 'choices'")
    return name, scorer


def split_examples(examples: Sequence[Example], test_share: float, seed: int) -> tuple[list[Example], list[Example]]:
    """A seeded random split: ``round(test_share * n)`` held out (at least one on each side when n >= 2)."""
    n = len(examples)
    k = min(max(round(test_share * n), 1), n - 1) if n >= 2 else 0
    order = np.random.default_rng(seed).permutation(n)
    test = set(order[:k].tolist())
    return [e for i, e in enumerate(examples) if i not in test], [e for i, e in enumerate(examples) if i in test]


def predicted_identity(cfg: BackendConfig) -> str | None:
    """The cache identity :func:`calibration.generation_cache.model_identity` will give, when known without loading."""
    if cfg.kind != "hf":
        return cfg.model
    if cfg.dtype is not None:
        return f"{cfg.model}@{cfg.dtype}"
    return f"{cfg.model}@float32" if cfg.device == "cpu" and cfg.device_map is None else None


async def generate_all(cfg: CascadeConfig, examples: Sequence[Mapping[str, Any]], params: GenerationParams,
                       cache_dir: Path, *, batch_size: int = 16, progress: bool = True,
                       choices: bool = True) -> list[list[Generation]]:
    """Every tier's answers to every example (tier-major), from the cache where possible.

    With ``choices`` (the default), examples that carry ``choices`` are answered with the most likely of
    them, scored by each tier (``choose``), as the cascade answers such requests; the others are generated.
    A tier whose answers are all cached is not loaded at all. The last tier is run without scores; answers
    cached with scores (the same model as a lower tier of another config) are reused for it. Each model is
    loaded, run and released before the next one.
    """
    from calibration.generation_cache import cached_generations, generate_cached, model_identity
    from cascade.config import build_backend

    out: list[list[Generation]] = []
    last = len(cfg.tiers) - 1
    for j, tier in enumerate(cfg.tiers):
        scores = j < last
        ident = predicted_identity(tier.backend)
        if ident is not None:
            hits: list[Generation] | None = None
            for flag in (scores, True):
                got = cached_generations(ident, examples, params, cache_dir, scores=flag, choices=choices)
                if all(g is not None for g in got):
                    hits = [g for g in got if g is not None]
                    break
            if hits is not None:
                out.append(hits)
                continue
        backend = build_backend(tier.backend)
        try:
            out.append(await generate_cached(backend, examples, params, cache_dir, scores=scores,
                                             batch_size=batch_size, identity=model_identity(backend), choices=choices,
                                             progress=progress, desc=f"{tier.name} ({tier.backend.model})"))
        finally:
            await backend.aclose()
            del backend
            gc.collect()
    return out


def fit_thresholds(method: str, scores: npt.ArrayLike, correct: npt.ArrayLike, costs: npt.ArrayLike,
                   claim: Claim = "accuracy", **target: Any) -> FitResult:
    """Run one fitting method: ``budget`` (max_large_share), ``quality`` (max_quality_loss, delta, optional
    family and seed: :func:`calibration.fit.fit_quality`; ``claim``: ``accuracy``, or ``disagreement`` with
    ``correct`` the agreement matrix) or ``min_cost`` (value_per_correct)."""
    from calibration.fit import fit_budget, fit_min_cost, fit_quality

    if method == "budget":
        return fit_budget(scores, correct, costs, max_large_share=target["max_large_share"])
    if method == "quality":
        return fit_quality(scores, correct, costs, max_quality_loss=target["max_quality_loss"],
                           delta=target["delta"], claim=claim, family=target.get("family", "auto"),
                           seed=target.get("seed", 0))
    if method == "min_cost":
        return fit_min_cost(scores, correct, costs, value_per_correct=target["value_per_correct"])
    raise InvalidRequestError(f"unknown fitting method {method!r}")


def agreement_matrix(examples: Sequence[Example], generations: Sequence[Sequence[Generation]],
                     same: Same) -> npt.NDArray[np.bool_]:
    """Whether each tier's answer is the same as the last tier's: ``(n, N)`` bool, the last column all True.

    Args:
        examples: n examples (``same`` may read their ``choices``).
        generations: N lists (cheapest tier first) of n generations each.
        same: ``(answer_a, answer_b, example) -> bool`` (:func:`cascade.scorers.get_same`).

    Raises:
        InvalidRequestError: ``same`` failed on an example (its line is named).
    """
    last = generations[-1]
    out = np.ones((len(examples), len(generations)), dtype=np.bool_)
    for j, gens in enumerate(generations[:-1]):
        for i, (e, g) in enumerate(zip(examples, gens)):
            try:
                out[i, j] = bool(same(g.text, last[i].text, e.data))
            except Exception as exc:
                raise InvalidRequestError(f"{e.source}:{e.line}: comparing answers failed: "
                                          f"{type(exc).__name__}: {exc}") from exc
    return out


def widen_thresholds(thresholds: Sequence[float], scores: npt.ArrayLike) -> tuple[float, ...]:
    """Move each finite threshold to the midpoint between it and the next larger score of its stage.

    A fitted threshold is a score of the data, so a recomputed score that differs in the last float bits
    (another batch, other padding) would flip that example's decision. Every threshold in
    ``[t, next score)`` makes the same decisions on the fit data, so the midpoint keeps every measured number
    (and the certified bound) while leaving a margin on both sides.

    Args:
        thresholds: N-1 thresholds.
        scores: ``(n, N-1)`` or ``(n,)`` fit scores.
    """
    s = np.asarray(scores, dtype=np.float64).reshape(len(np.asarray(scores)), -1)
    out = []
    for j, t in enumerate(thresholds):
        above = s[:, j][s[:, j] > t] if math.isfinite(t) else np.empty(0)
        out.append(float((t + above.min()) / 2.0) if above.size else float(t))
    return tuple(out)


def widen_curve(curve: Curve, scores: npt.ArrayLike) -> Curve:
    """The curve with every point's thresholds moved as in :func:`widen_thresholds`."""
    from dataclasses import replace

    return replace(curve, thresholds=tuple(widen_thresholds(t, scores) for t in curve.thresholds))


def answering_tiers(thresholds: npt.ArrayLike, scores: npt.ArrayLike) -> npt.NDArray[np.int64]:
    """Answering tier per example with per-example thresholds: ``(n, N-1)`` and ``(n, N-1)`` -> ``(n,)``."""
    s = np.asarray(scores, dtype=np.float64)
    accept = s <= np.asarray(thresholds, dtype=np.float64)
    tier: npt.NDArray[np.int64] = np.argmax(np.c_[accept, np.ones(len(s), dtype=np.bool_)], axis=1).astype(np.int64)
    return tier


async def cluster_ids(router_path: str, cfg: CascadeConfig, examples: Sequence[Mapping[str, Any]],
                      cache_dir: Path) -> tuple[list[int], str]:
    """The router cluster of each example (embeddings cached in ``cache_dir/embeddings``), and the embedder id.

    Raises:
        ArtifactError, ConfigError: unreadable router file or unknown embedder.
    """
    from calibration.generation_cache import example_prompt
    from cascade.config import build_backend
    from cascade.router.embed import aembed, make_embedder, prompt_text
    from cascade.router.pool import FittedRouter

    fitted = FittedRouter.load(router_path)
    texts = [prompt_text(example_prompt(e)) for e in examples]
    key = hashlib.sha256(json.dumps([fitted.embedder, texts], ensure_ascii=False).encode()).hexdigest()[:24]
    path = cache_dir / "embeddings" / f"{key}.npy"
    if path.is_file():
        x = np.load(path)
    else:
        want = fitted.embedder.split(":", 1)[1] if fitted.embedder.startswith("hidden-states:") else None
        backends = [build_backend(t.backend) for t in cfg.tiers if want is not None and t.backend.model == want][:1]
        try:
            x = await aembed(make_embedder(fitted.embedder, backends=backends), texts)
        finally:
            for b in backends:
                await b.aclose()
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".part.npy")
        np.save(tmp, x)
        tmp.replace(path)
    return fitted.assign(x), fitted.embedder


def fit_clusters(ids: Sequence[int], method: str, target: Mapping[str, Any], scores: npt.ArrayLike,
                 correct: npt.ArrayLike, costs: npt.ArrayLike,
                 claim: Claim = "accuracy") -> tuple[dict[int, tuple[float, ...]], dict[str, Any]]:
    """One fit per router cluster present in the fit data (the same method and target on its examples).

    A quality target is tested at ``delta / K`` in each of the K clusters (Bonferroni), so that every cluster
    meets it at once, and so the whole traffic does, with probability >= 1 - delta.

    Returns:
        ``(cluster_thresholds, report)``; clusters absent from the data get no entry (the global thresholds
        apply to them).
    """
    s = np.asarray(scores, dtype=np.float64).reshape(len(ids), -1)
    c, k = np.asarray(correct), np.asarray(costs)
    cid = np.asarray(ids)
    thresholds: dict[int, tuple[float, ...]] = {}
    fits: dict[str, Any] = {}
    present = sorted(set(cid.tolist()))
    per = dict(target)
    if method == "quality":
        per["delta"] = target["delta"] / len(present)
    for cl in present:
        m = cid == cl
        fit = fit_thresholds(method, s[m], c[m], k[m], claim, **per)
        thresholds[cl] = widen_thresholds(fit.thresholds, s[m])
        fits[str(cl)] = {"n": int(m.sum()), "thresholds": list(thresholds[cl]), "feasible": fit.feasible,
                         "accuracy": fit.stats.accuracy, "large_share": fit.stats.large_share,
                         "mean_cost": fit.stats.mean_cost, "message": fit.message}
    return thresholds, {"fits": fits, "delta_per_cluster": per.get("delta")}
