"""Constrained answers from an OpenAI-compatible server: guided choice, or choices scored by prompt logprobs.

Two ways, used as the server allows (``OpenAIBackend(choices=...)``):

* ``guided``: one request with the server's guided choice (vLLM/SGLang: ``guided_choice`` in older releases,
  ``structured_outputs: {"choice": [...]}`` in newer ones; both are sent) and ``logprobs``. The answer is the
  choice the server decoded; the choice distribution is read from the first token's ``top_logprobs`` (each
  choice gets the most likely listed token its text starts with; a choice with none gets the least likely
  listed probability, an upper bound), so ``choice_margin`` and ``choice_entropy`` are approximations.
* ``echo``: one ``/completions`` request per prompt with every ``prompt + choice`` text, ``echo: true`` and
  ``logprobs``: each choice's log-likelihood is the sum of its tokens' prompt logprobs (the exact
  computation of :mod:`cascade.backends.hf_choices`, on the server's tokens). A chat prompt is rendered as
  ``role: content`` lines and ``assistant:``, then one space, then the choice.

``auto`` tries the way that fits the backend's ``api`` first (guided for chat, whose template the server
applies; echo for completions), then the other, and remembers what worked. A server that rejects both, or
answers a guided request with text that is none of the choices (it ignored the field), gets
:class:`~cascade.errors.ChoicesUnsupportedError` naming what each attempt got: a constrained request is
never answered freely.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from cascade.errors import BackendError, BatchError, ChoicesUnsupportedError, InvalidRequestError
from cascade.types import Generation, Prompt, TokenStats, validate_choices, validate_prompt

__all__ = ["CHOICE_METHODS", "choice_logliks_from_top", "choose_remote", "echo_logliks", "echo_texts"]

#: Values of ``OpenAIBackend(choices=...)``.
CHOICE_METHODS = ("auto", "guided", "echo", "none")
_REJECTED = {400, 404, 405, 422, 501}  # the server refused the request's form (not a transient failure)


class RemoteChooser(Protocol):
    """What this module needs of ``cascade.backends.openai_compat.OpenAIBackend`` (which imports this module)."""

    name: str
    api: str
    top_logprobs: int
    choices: str
    choice_methods: dict[str, str]

    @property
    def where(self) -> str: ...

    async def post_json(self, route: str, body: Mapping[str, Any], extra: Mapping[str, Any] | None = None
                        ) -> dict[str, Any]: ...

    def completion_prompt(self, prompt: Prompt) -> str: ...

    def token_scores(self, logprobs: Sequence[float], top: Sequence[Sequence[float]]
                     ) -> tuple[TokenStats, dict[str, float]]: ...


class _Unsupported(Exception):
    """This method does not work on this server (the reason is kept for the final error)."""


def _order(backend: RemoteChooser) -> list[str]:
    if backend.choices == "none":
        return []
    if backend.choices != "auto":
        return [backend.choices]
    ways = ["guided", "echo"] if backend.api == "chat" else ["echo", "guided"]
    return [w for w in ways if backend.choice_methods.get(w, "") == ""]


async def choose_remote(backend: RemoteChooser, prompts: Sequence[Prompt], choices: Sequence[Sequence[str]], *,
                        scores: bool = True, length_normalize: bool = False) -> list[Generation]:
    """:meth:`OpenAIBackend.choose`: every prompt's best choice, by the first method the server supports."""
    import asyncio

    if len(choices) != len(prompts):
        raise InvalidRequestError(f"{len(prompts)} prompts need {len(prompts)} choice lists, got {len(choices)}")
    lists = [validate_choices(c) for c in choices]
    for p in prompts:
        validate_prompt(p)
    if not prompts:
        return []
    outcomes = await asyncio.gather(*(_one(backend, p, c, scores, length_normalize) for p, c in zip(prompts, lists)),
                                    return_exceptions=True)
    if all(isinstance(o, BaseException) for o in outcomes):
        raise next(o for o in outcomes if isinstance(o, BaseException))
    if any(isinstance(o, BaseException) for o in outcomes):
        raise BatchError(list(outcomes))
    return [o for o in outcomes if isinstance(o, Generation)]


async def _one(backend: RemoteChooser, prompt: Prompt, choices: tuple[str, ...], scores: bool,
               length_normalize: bool) -> Generation:
    tried: list[str] = []
    for way in _order(backend):
        try:
            if way == "guided":
                gen = await _guided(backend, prompt, choices, scores)
            else:
                gen = await _echo(backend, prompt, choices, scores, length_normalize)
        except _Unsupported as exc:
            backend.choice_methods[way] = str(exc)
            tried.append(f"{way}: {exc}")
            continue
        backend.choice_methods[way] = ""
        return gen
    found = "; ".join(tried) or "choices='none' in its configuration"
    raise ChoicesUnsupportedError(
        f"{backend.name}: the server at {backend.where} cannot answer with choices: it supports neither guided "
        f"choice ('guided_choice' / 'structured_outputs.choice' with logprobs) nor prompt logprobs ('echo' with "
        f"'logprobs' on /completions) ({found})", reason="the server supports neither guided choice nor prompt "
        "logprobs")


async def _post(backend: RemoteChooser, route: str, body: dict[str, Any], extra: Mapping[str, Any],
                what: str) -> dict[str, Any]:
    try:
        return await backend.post_json(route, body, extra)
    except BackendError as exc:
        status = getattr(exc.__cause__, "status_code", None)
        if status in _REJECTED:
            raise _Unsupported(f"{what} refused with HTTP {status}") from exc
        raise


def _usage(data: Mapping[str, Any]) -> tuple[int, int]:
    usage = data.get("usage") or {}
    return int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0)


async def _guided(backend: RemoteChooser, prompt: Prompt, choices: tuple[str, ...], scores: bool) -> Generation:
    started = time.perf_counter()
    route = backend.api
    body: dict[str, Any] = {"model": backend.name, "temperature": 0.0,
                            "max_tokens": max(len(c) for c in choices) + 8}  # >= 1 token per character, and EOS
    if route == "chat":
        body["messages"] = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
        body.update(logprobs=True, top_logprobs=backend.top_logprobs)
    else:
        body["prompt"] = backend.completion_prompt(prompt)
        body["logprobs"] = backend.top_logprobs
    extra = {"guided_choice": list(choices), "structured_outputs": {"choice": list(choices)}}
    data = await _post(backend, route, body, extra, "guided choice")
    choice = data["choices"][0]
    if route == "chat":
        text = str((choice.get("message") or {}).get("content") or "")
        entries = ((choice.get("logprobs") or {}).get("content")) or []
        top = [{str(t["token"]): float(t["logprob"]) for t in e.get("top_logprobs") or ()} for e in entries]
        chosen = [float(e["logprob"]) for e in entries]
    else:
        text = str(choice.get("text") or "")
        lp = choice.get("logprobs") or {}
        top = [{str(k): float(v) for k, v in (t or {}).items()} for t in lp.get("top_logprobs") or ()]
        chosen = [float(v) for v in lp.get("token_logprobs") or ()]
    answer = text.strip()
    if answer not in choices:
        raise _Unsupported(f"guided choice ignored: the answer {text[:40]!r} is none of the choices")
    if scores and not top:
        raise _Unsupported("guided choice answered without logprobs")
    prompt_tokens, completion_tokens = _usage(data)
    logliks = choice_logliks_from_top(top[0], choices) if top else [0.0] * len(choices)
    return _generation(backend, answer, logliks, chosen, top, scores, prompt_tokens,
                       completion_tokens or len(chosen), time.perf_counter() - started)


def choice_logliks_from_top(top: Mapping[str, float], choices: Sequence[str]) -> list[float]:
    """Approximate choice log-likelihoods from one step's top logprobs ``{token text: logprob}``.

    A choice gets the logprob of the longest listed token its text starts with (leading whitespace ignored);
    a choice with no such token gets the smallest listed logprob (its probability is at most that).
    """
    floor = min(top.values()) if top else 0.0
    out = []
    for c in choices:
        best: tuple[int, float] | None = None
        for token, lp in top.items():
            t = token.lstrip()
            if t and c.startswith(t) and (best is None or len(t) > best[0]):
                best = (len(t), lp)
        out.append(best[1] if best is not None else floor)
    return out


def echo_texts(backend: RemoteChooser, prompt: Prompt, choices: Sequence[str]) -> tuple[str, list[str]]:
    """The completions prompt and each ``prompt + choice`` text scored by the echo method."""
    if isinstance(prompt, str) and backend.api == "completions":
        return prompt, [prompt + c for c in choices]
    head = backend.completion_prompt([{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt)
    return head, [head + ("" if c[:1].isspace() else " ") + c for c in choices]


def echo_logliks(start: int, end: int, logprobs: Mapping[str, Any]) -> tuple[list[float], bool]:
    """The logprobs of the echoed tokens that overlap characters ``[start, end)`` (the choice), and whether
    every one of them was given (a token that straddles the prompt's end counts as the choice's)."""
    tokens = logprobs.get("tokens") or []
    values = logprobs.get("token_logprobs") or []
    offsets = logprobs.get("text_offset") or []
    out, complete = [], bool(tokens) and len(offsets) == len(tokens) == len(values)
    for tok, lp, off in zip(tokens, values, offsets):
        if off < end and off + len(str(tok)) > start:
            if lp is None:
                complete = False
                continue
            out.append(float(lp))
    return out, complete and bool(out)


async def _echo(backend: RemoteChooser, prompt: Prompt, choices: tuple[str, ...], scores: bool,
                length_normalize: bool) -> Generation:
    started = time.perf_counter()
    _, texts = echo_texts(backend, prompt, choices)
    body = {"model": backend.name, "prompt": texts, "max_tokens": 1, "temperature": 0.0, "echo": True,
            "logprobs": 1}
    data = await _post(backend, "completions", body, {}, "echo with logprobs on /completions")
    rows = sorted(data.get("choices") or [], key=lambda c: int(c.get("index", 0)))
    if len(rows) != len(texts):
        raise _Unsupported(f"echo answered {len(rows)} of {len(texts)} prompts")
    per_choice: list[list[float]] = []
    for c, text, row in zip(choices, texts, rows):
        values, complete = echo_logliks(len(text) - len(c), len(text), row.get("logprobs") or {})
        if not complete:
            raise _Unsupported("echo answered without the prompt tokens' logprobs")
        per_choice.append(values)
    logliks = [sum(v) / len(v) if length_normalize else sum(v) for v in per_choice]
    best = max(range(len(choices)), key=lambda k: logliks[k])
    prompt_tokens, completion_tokens = _usage(data)
    return _generation(backend, choices[best], logliks, per_choice[best], [], scores, prompt_tokens,
                       completion_tokens, time.perf_counter() - started)


def _generation(backend: RemoteChooser, text: str, logliks: Sequence[float], chosen: Sequence[float],
                top: Sequence[Mapping[str, float]], scores: bool, prompt_tokens: int, completion_tokens: int,
                latency: float) -> Generation:
    """The answer with ``choice_*`` measures (and, from the guided path's tokens, the token measures)."""
    import torch

    from cascade.uncertainty import choice_measures

    measures: dict[str, float] = {}
    stats = None
    if scores:
        measures = {k: float(v[0]) for k, v in choice_measures(torch.tensor([list(logliks)])).items()}
        if top:  # the guided answer's own tokens, as generate scores them
            stats, token_measures = backend.token_scores(chosen, [list(t.values()) for t in top])
            measures.update(token_measures)
        else:
            stats = TokenStats((), (), tuple(chosen), entropy_exact=False)
    return Generation(text=text, model=backend.name, prompt_tokens=prompt_tokens,
                      completion_tokens=completion_tokens, finish_reason="stop", scores=measures, token_stats=stats,
                      latency_s=latency, choice_logprobs=tuple(float(x) for x in logliks))

