"""The fields of one request, checked the same way for ``cascade serve`` and ``cascade run`` lines.

Pure functions on decoded JSON values: the decoding parameters a request may set (``max_tokens``,
``temperature``, ``top_p``, ``stop``, ``seed``) with the server's limits, and the answers it allows
(``cascade.choices``, or vLLM's ``guided_choice`` / ``structured_outputs.choice``). A bad value raises
:class:`FieldError`, which names the field; the server answers it as an HTTP 400 with that ``param``, and
``cascade run`` writes it as the error record of its line.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from cascade.errors import CascadeError, InvalidRequestError
from cascade.types import validate_choices

__all__ = ["MAX_TOKENS_LIMIT", "FieldError", "check_int", "check_num", "choices_of", "decoding_overrides"]

#: The largest ``max_tokens`` a request may ask for, unless the server config sets another limit.
MAX_TOKENS_LIMIT = 4096
_MAX_STOPS, _MAX_STOP_CHARS = 8, 256


class FieldError(InvalidRequestError):
    """A request field with a bad value; ``param`` names it (``"stop"``, ``"messages[2].role"``, ...)."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(f"{param}: {message}")
        self.param, self.message = param, message


def _is_num(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def check_int(body: Mapping[str, Any], key: str, lo: int, hi: int) -> int | None:
    """``body[key]`` as an integer in ``[lo, hi]``, or None when absent or null."""
    v = body.get(key)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise FieldError(key, f"must be an integer in [{lo}, {hi}]")
    return v


def check_num(body: Mapping[str, Any], key: str, lo: float, hi: float, *, open_low: bool = False) -> float | None:
    """``body[key]`` as a finite number in ``[lo, hi]`` (``(lo, hi]`` with ``open_low``), or None."""
    v = body.get(key)
    if v is None:
        return None
    if not _is_num(v) or not (lo < v if open_low else lo <= v) or v > hi:
        raise FieldError(key, f"must be a number in {'(' if open_low else '['}{lo}, {hi}]")
    return float(v)


def decoding_overrides(body: Mapping[str, Any], max_tokens_limit: int = MAX_TOKENS_LIMIT) -> dict[str, Any]:
    """The decoding parameters a request sets itself, checked, as :class:`~cascade.types.GenerationParams` fields.

    ``max_completion_tokens`` (the newer OpenAI name) wins over ``max_tokens``; ``stop`` is a string or a list
    of at most 8 non-empty strings of at most 256 characters.

    Raises:
        FieldError: a value of the wrong type or out of range.
    """
    legacy = check_int(body, "max_tokens", 1, max_tokens_limit)
    max_tokens = check_int(body, "max_completion_tokens", 1, max_tokens_limit) or legacy
    values = (("max_tokens", max_tokens), ("temperature", check_num(body, "temperature", 0.0, 2.0)),
              ("top_p", check_num(body, "top_p", 0.0, 1.0, open_low=True)),
              ("seed", check_int(body, "seed", -(2**63), 2**63 - 1)))
    out: dict[str, Any] = {k: v for k, v in values if v is not None}
    stop = body.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    if stop is not None:
        if not isinstance(stop, list) or len(stop) > _MAX_STOPS or not all(
                isinstance(s, str) and 0 < len(s) <= _MAX_STOP_CHARS for s in stop):
            raise FieldError("stop", f"must be a string or a list of at most {_MAX_STOPS} non-empty strings of at "
                                     f"most {_MAX_STOP_CHARS} characters")
        out["stop"] = tuple(stop)
    return out


def choices_of(body: Mapping[str, Any], ext: Mapping[str, Any] | None = None, *,
               ext_param: str = "cascade.choices") -> tuple[str, ...] | None:
    """The answers a request allows, or None for a free answer.

    Read from ``ext["choices"]`` (the ``cascade`` extension object of a server request, named ``ext_param`` in
    errors; a ``cascade run`` line passes itself with ``ext_param="choices"``), vLLM's ``guided_choice`` and
    ``structured_outputs: {"choice"}``; several of them must allow the same answers.

    Raises:
        FieldError: not a list of 1 to 64 distinct non-empty strings, a ``structured_outputs`` other than
            ``choice``, or two fields allowing different answers.
    """
    found: dict[str, object] = {}
    if ext is not None and ext.get("choices") is not None:
        found[ext_param] = ext["choices"]
    if body.get("guided_choice") is not None:
        found["guided_choice"] = body["guided_choice"]
    structured = body.get("structured_outputs")
    if structured is not None:
        if not isinstance(structured, dict) or set(structured) != {"choice"}:
            raise FieldError("structured_outputs", "only {\"choice\": [...]} is supported")
        found["structured_outputs.choice"] = structured["choice"]
    checked: dict[str, tuple[str, ...]] = {}
    for param, raw in found.items():
        try:
            checked[param] = validate_choices(raw)
        except CascadeError as exc:
            raise FieldError(param, str(exc)) from None
    if len(set(checked.values())) > 1:
        raise FieldError(next(iter(checked)), f"{' and '.join(checked)} allow different answers; give one of them")
    return next(iter(checked.values()), None)
