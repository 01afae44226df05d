"""Scorers: decide whether an answer is right. Each is ``(answer_text, example) -> bool``.

Built in: ``exact``, ``choice`` (first label among the example's choices found in the answer), ``numeric``
(last number in the answer, GSM8K style), ``contains``; or a user callable given as ``module:function``.

Each built-in scorer also decides when two answers are *the same* (:func:`get_same`,
``(answer_a, answer_b, example) -> bool``): answers it calls the same are scored alike under every gold
answer, which is what label-free calibration needs (:mod:`calibration.certify`). ``choice``: the same choice
found first (or none in either); ``exact`` and ``contains``: the same text after normalisation (case,
punctuation, spacing); ``numeric``: the same last number (or none in either). A user function of two answers
is given as ``module:function``.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from cascade.errors import InvalidRequestError

__all__ = ["Same", "Scorer", "extract_choice", "get_same", "get_scorer", "last_number"]

Scorer = Callable[[str, Mapping[str, Any]], bool]
Same = Callable[[str, str, Mapping[str, Any]], bool]

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")


def _norm(text: str) -> str:
    return " ".join(re.sub(r"[^\w\s.-]", " ", text.lower()).split()).strip(" .")


def extract_choice(answer: str, choices: Sequence[str]) -> str | None:
    """The choice mentioned first in ``answer`` (whole words, case-insensitive), or None."""
    text = answer.lower()
    best: tuple[int, str] | None = None
    for choice in choices:
        m = re.search(r"(?<![\w])" + re.escape(str(choice).lower()) + r"(?![\w])", text)
        if m and (best is None or m.start() < best[0]):
            best = (m.start(), str(choice))
    return best[1] if best else None


def last_number(text: str) -> float | None:
    """The last number written in ``text`` (commas as thousands separators), or None."""
    found = _NUMBER.findall(text)
    if not found:
        return None
    try:
        return float(found[-1].replace(",", ""))
    except ValueError:
        return None


def _exact(answer: str, example: Mapping[str, Any]) -> bool:
    return _norm(answer) == _norm(str(example["answer"]))


def _contains(answer: str, example: Mapping[str, Any]) -> bool:
    """The gold answer appears in the answer as whole words ("no" is not in "cannot", "4" not in "42")."""
    gold = _norm(str(example["answer"]))
    return bool(gold) and re.search(r"(?<!\w)" + re.escape(gold) + r"(?!\w)", _norm(answer)) is not None


def _choice(answer: str, example: Mapping[str, Any]) -> bool:
    choices = example.get("choices")
    if not choices:
        raise InvalidRequestError("the choice scorer needs a 'choices' list in every example")
    return extract_choice(answer, choices) == str(example["answer"])


def _numeric(answer: str, example: Mapping[str, Any]) -> bool:
    got = last_number(answer)
    gold = last_number(str(example["answer"]).split("####")[-1])
    return got is not None and gold is not None and abs(got - gold) < 1e-6 * max(1.0, abs(gold))


_BUILTIN: dict[str, Scorer] = {"exact": _exact, "choice": _choice, "numeric": _numeric, "contains": _contains}


def _same_text(a: str, b: str, example: Mapping[str, Any]) -> bool:
    return _norm(a) == _norm(b)


def _same_choice(a: str, b: str, example: Mapping[str, Any]) -> bool:
    choices = example.get("choices")
    if not choices:
        raise InvalidRequestError("the choice scorer needs a 'choices' list in every example")
    return extract_choice(a, choices) == extract_choice(b, choices)


def _same_number(a: str, b: str, example: Mapping[str, Any]) -> bool:
    return last_number(a) == last_number(b)  # exact: a tolerance could put one answer on each side of the gold


_SAME: dict[str, Same] = {"exact": _same_text, "choice": _same_choice, "numeric": _same_number,
                          "contains": _same_text}


def get_scorer(name: str) -> Scorer:
    """A built-in scorer by name, or ``module:function`` imported from the Python path.

    Raises:
        InvalidRequestError: unknown name, or a ``module:function`` that cannot be imported or called.
    """
    if name in _BUILTIN:
        return _BUILTIN[name]
    return _import(name, "scorer")  # type: ignore[no-any-return]


def get_same(name: str) -> Same:
    """When two answers are the same for scorer ``name`` (a built-in), or a ``module:function`` of
    ``(answer_a, answer_b, example) -> bool``.

    Raises:
        InvalidRequestError: unknown name, or a ``module:function`` that cannot be imported or called.
    """
    if name in _SAME:
        return _SAME[name]
    return _import(name, "same-answer function")  # type: ignore[no-any-return]


def _import(name: str, what: str) -> Any:
    if ":" not in name:
        raise InvalidRequestError(f"unknown {what} {name!r}; use one of {sorted(_BUILTIN)} or module:function")
    module, _, func = name.partition(":")
    try:
        fn = getattr(importlib.import_module(module), func)
    except Exception as exc:  # missing, empty name, a syntax error or an error raised while importing
        raise InvalidRequestError(f"cannot import {what} {name!r}: {type(exc).__name__}: {exc}") from exc
    if not callable(fn):
        raise InvalidRequestError(f"{what} {name!r} is not callable")
    return fn
