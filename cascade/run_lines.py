"""The input lines of ``cascade run``: read as bytes, each checked on its own before anything is batched.

A line is one JSON object: ``prompt`` (a string) or ``messages`` (a list of ``{"role", "content"}``), an
optional ``id``, the decoding fields a server request may set (``max_tokens``, ``temperature``, ``top_p``,
``stop``, ``seed``; declared in :mod:`cascade.request_fields` with the server's limits), an optional
``target`` and optional ``choices`` (or vLLM's ``guided_choice`` / ``structured_outputs``). Other keys (an
``answer``, say) are ignored. Whatever a line holds (bytes that are not UTF-8, a number with thousands of
digits, 100,000 nested brackets), it becomes either a :class:`RunLine` or a :class:`LineError` naming the
line; a blank line is neither (None): ``cascade run`` writes ``{"id": null, "line": N, "blank": true}`` for it.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cascade.errors import CascadeError, InvalidRequestError
from cascade.policy import Target
from cascade.types import Prompt, validate_prompt

__all__ = ["LineError", "RunLine", "decode_line", "finite_json", "parse_line", "read_lines"]

_BOM = b"\xef\xbb\xbf"


@dataclass(frozen=True)
class RunLine:
    """One valid input line: its number and id, the prompt, and what it asks for."""

    lineno: int
    rid: Any
    prompt: Prompt
    overrides: Mapping[str, Any]
    target: Any
    choices: tuple[str, ...] | None

    def group_key(self) -> str:
        """Lines with the same key can share one batched call (choices are per request, so not part of it)."""
        return json.dumps({"params": self.overrides, "target": self.target}, sort_keys=True)


class LineError(InvalidRequestError):
    """An input line that cannot be answered; ``rid`` is its id when it had one, else its line number."""

    def __init__(self, lineno: int, message: str, rid: Any = None) -> None:
        super().__init__(f"line {lineno}: {message}")
        self.lineno = lineno
        self.rid = lineno if rid is None else rid

    def record(self) -> dict[str, Any]:
        """The output record of the line."""
        return {"id": self.rid, "line": self.lineno, "error": str(self), "error_type": "InvalidRequestError"}


def read_lines(path: str | Path) -> list[tuple[int, bytes]]:
    """The lines of a JSONL file as bytes, numbered from 1 (a UTF-8 byte-order mark and CRs are dropped).

    Lines are split on ``\\n`` only (U+2028 may sit inside a JSON string); the empty remainder after a final
    newline is not a line.
    """
    data = Path(path).read_bytes()
    if data.startswith(_BOM):
        data = data[len(_BOM):]
    parts = data.split(b"\n")
    if parts and parts[-1] == b"":
        parts.pop()
    return [(n, p[:-1] if p.endswith(b"\r") else p) for n, p in enumerate(parts, 1)]


def decode_line(raw: bytes, lineno: int) -> Any:
    """The JSON value of one line.

    Raises:
        LineError: not UTF-8, not JSON, a number too long to convert or nesting too deep.
    """
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise LineError(lineno, f"not UTF-8 ({exc.reason} at byte {exc.start})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise LineError(lineno, f"invalid JSON: {exc.msg} (column {exc.colno})") from None
    except (ValueError, RecursionError) as exc:  # a number too long to convert, nesting too deep
        raise LineError(lineno, f"invalid JSON: {str(exc)[:200] or type(exc).__name__}") from None


def parse_line(raw: bytes, lineno: int, *, max_tokens_limit: int | None = None,
               max_prompt_chars: int = 200_000) -> RunLine | None:
    """Check one input line; None for a blank line.

    ``max_tokens_limit`` is the server's default (:data:`cascade.request_fields.MAX_TOKENS_LIMIT`) when None.

    Raises:
        LineError: anything wrong with the line (its message starts with ``line N:``).
    """
    from cascade.request_fields import RunLineFields, validated  # pydantic: not at ``import cascade.cli``

    if not raw.strip():
        return None
    obj = decode_line(raw, lineno)
    if not isinstance(obj, dict):
        raise LineError(lineno, "expected a JSON object")
    rid = obj.get("id", lineno)
    try:
        if ("prompt" in obj) == ("messages" in obj):
            raise InvalidRequestError("give exactly one of 'prompt' or 'messages'")
        if "prompt" in obj and not isinstance(obj["prompt"], str):
            raise InvalidRequestError("prompt must be a string (use 'messages' for a chat)")
        if "messages" in obj and not isinstance(obj["messages"], list):
            raise InvalidRequestError("messages must be a list of {\"role\", \"content\"} objects")
        prompt = validate_prompt(obj.get("prompt", obj.get("messages")), max_prompt_chars)
        fields = validated(RunLineFields, obj, max_tokens_limit)
        overrides = fields.overrides()
        Target.parse(obj.get("target"))
        choices = fields.choices()
    except CascadeError as exc:
        raise LineError(lineno, str(exc), rid) from None
    return RunLine(lineno, rid, prompt, overrides, obj.get("target"), choices)


def finite_json(value: Any) -> Any:
    """``value`` with every non-finite float replaced by None, so that it dumps as strict JSON."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_json(v) for v in value]
    return value
