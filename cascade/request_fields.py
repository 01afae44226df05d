"""The fields of one request, declared once as pydantic models for ``cascade serve``, ``cascade run`` lines and
the simulated servers.

:class:`DecodingFields` (``max_tokens`` / ``max_completion_tokens``, ``temperature``, ``top_p``, ``seed``,
``stop``) and :class:`ChoiceFields` (vLLM's ``guided_choice`` / ``structured_outputs.choice``) are what a
``cascade run`` line may set; :class:`RequestFields` adds the HTTP-only ``n``, ``stream`` and ``stream_options``
and is the common part of a request to the server (:class:`ServerFields`, with the ``cascade`` extension and the
OpenAI fields it accepts only at their neutral value) and to the simulated server (its own subclasses add
``logprobs`` / ``top_logprobs``). Validation is strict: a bool is not a number, ``"9"`` is not an integer, NaN
and infinities are refused, and other keys are left to the caller (each front end has its own set).

Shared limits, the same on every side because a request the server accepts is forwarded to a simulated backend
unchanged and must be accepted there too: ``temperature`` in [0, 2]; ``top_p`` in (0, 1]; ``seed`` a signed
64-bit integer; ``n`` only 1; ``stop`` a non-empty string or a list of at most 8 non-empty strings of at most
256 characters; choices a list of 1 to 64 distinct non-empty strings (:func:`~cascade.types.validate_choices`);
``stream_options`` only ``{"include_usage": bool}`` and only with ``stream: true``. One limit truly differs and
is passed as validation context (``{"max_tokens_limit": N}``): the largest ``max_tokens`` (and
``max_completion_tokens``), which the server takes from its config (:data:`MAX_TOKENS_LIMIT` by default) and a
simulated server sets as high as a real model's context.

A bad value raises :class:`FieldError`, which names the field (``"stop"``, ``"structured_outputs.choice"``); the
server answers it as an HTTP 400 with that ``param``, and ``cascade run`` writes it as the error record of its
line.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any, TypeVar

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    ValidationInfo,
    field_validator,
)
from pydantic_core import PydanticCustomError

from cascade.errors import CascadeError, InvalidRequestError
from cascade.types import validate_choices

__all__ = ["MAX_TOKENS_LIMIT", "ChoiceFields", "DecodingFields", "FieldError", "RequestFields", "RunLineFields",
           "ServerFields", "validated"]

#: The largest ``max_tokens`` a request may ask for, unless the server config sets another limit.
MAX_TOKENS_LIMIT = 4096
_MAX_STOPS, _MAX_STOP_CHARS = 8, 256
_STRICT = ConfigDict(strict=True, allow_inf_nan=False, extra="ignore", frozen=True)
_CLOSED = ConfigDict(strict=True, allow_inf_nan=False, extra="forbid", frozen=True)  # no keys but the declared


class FieldError(InvalidRequestError):
    """A request field with a bad value; ``param`` names it (``"stop"``, ``"messages[2].role"``, ...)."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(f"{param}: {message}")
        self.param, self.message = param, message


def _choices(value: list[str]) -> tuple[str, ...]:
    try:
        return validate_choices(value)
    except CascadeError as exc:
        raise PydanticCustomError("choices", str(exc)) from None


def _listed(value: object) -> object:
    return [value] if isinstance(value, str) else value


#: 1 to 64 distinct non-empty strings, as a tuple.
Choices = Annotated[list[str], AfterValidator(_choices)]
_Stop = Annotated[list[Annotated[str, StringConstraints(min_length=1, max_length=_MAX_STOP_CHARS)]],
                  Field(max_length=_MAX_STOPS), BeforeValidator(_listed)]


class DecodingFields(BaseModel):
    """The decoding parameters a request may set; None where it sets none."""

    model_config = _STRICT

    max_tokens: int | None = Field(None, ge=1)  # at most the context's max_tokens_limit
    max_completion_tokens: int | None = Field(None, ge=1)  # the newer OpenAI name; wins over max_tokens
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    seed: int | None = Field(None, ge=-(2**63), le=2**63 - 1)
    stop: _Stop | None = None  # a string is a list of one

    @field_validator("max_tokens", "max_completion_tokens")
    @classmethod
    def _within_limit(cls, value: int | None, info: ValidationInfo) -> int | None:
        limit = (info.context or {}).get("max_tokens_limit", MAX_TOKENS_LIMIT)
        if value is not None and value > limit:
            raise PydanticCustomError("max_tokens_limit", "must be an integer in [1, {limit}]", {"limit": limit})
        return value

    def overrides(self) -> dict[str, Any]:
        """The parameters the request set, as :class:`~cascade.types.GenerationParams` fields."""
        values = {"max_tokens": self.max_completion_tokens or self.max_tokens, "temperature": self.temperature,
                  "top_p": self.top_p, "seed": self.seed, "stop": None if self.stop is None else tuple(self.stop)}
        return {k: v for k, v in values.items() if v is not None}


class StructuredOutputs(BaseModel):
    """vLLM's ``structured_outputs``; only its ``choice`` form is supported."""

    model_config = _CLOSED

    choice: Choices


class ChoiceFields(BaseModel):
    """vLLM's ways of naming the answers a request allows."""

    model_config = _STRICT

    guided_choice: Choices | None = None
    structured_outputs: StructuredOutputs | None = None

    def found(self) -> dict[str, tuple[str, ...]]:
        """The allowed answers by the field that gave them (subclasses put their own field first)."""
        given = {"guided_choice": self.guided_choice,
                 "structured_outputs.choice": self.structured_outputs.choice if self.structured_outputs else None}
        return {k: tuple(v) for k, v in given.items() if v is not None}

    def choices(self) -> tuple[str, ...] | None:
        """The answers the request allows, or None for a free answer.

        Raises:
            FieldError: two fields allowing different answers (named by the first of them).
        """
        found = self.found()
        if len(set(found.values())) > 1:
            raise FieldError(next(iter(found)), f"{' and '.join(found)} allow different answers; give one of them")
        return next(iter(found.values()), None)


class StreamOptions(BaseModel):
    """OpenAI's ``stream_options``."""

    model_config = _CLOSED

    include_usage: bool = False


class RequestFields(DecodingFields, ChoiceFields):
    """The fields an HTTP request to the server or to a simulated server shares."""

    n: int | None = Field(None, ge=1, le=1)
    stream: bool | None = None
    stream_options: StreamOptions | None = None

    def include_usage(self) -> bool:
        """Whether a stream ends with a usage chunk.

        Raises:
            FieldError: ``stream_options`` without ``stream: true``.
        """
        if self.stream_options is not None and not self.stream:
            raise FieldError("stream_options", "needs \"stream\": true")
        return self.stream_options is not None and self.stream_options.include_usage


class CascadeExtension(BaseModel):
    """The server's ``cascade`` request field."""

    model_config = _CLOSED

    target: Any = None  # checked by cascade.policy.Target.parse
    choices: Choices | None = None


class ServerFields(RequestFields):
    """A request to ``cascade serve``: the shared fields, the ``cascade`` extension, and OpenAI fields it only
    accepts at their neutral value."""

    cascade: CascadeExtension | None = None
    best_of: int | None = Field(None, ge=1, le=1)
    presence_penalty: float | None = Field(None, ge=0.0, le=0.0)
    frequency_penalty: float | None = Field(None, ge=0.0, le=0.0)
    user: str | None = None

    def found(self) -> dict[str, tuple[str, ...]]:
        """The allowed answers by field, ``cascade.choices`` first."""
        own = self.cascade.choices if self.cascade else None
        return {**({"cascade.choices": tuple(own)} if own is not None else {}), **super().found()}


class RunLineFields(DecodingFields, ChoiceFields):
    """The fields of a ``cascade run`` line (``choices`` is its own name for the allowed answers)."""

    choices_: Choices | None = Field(None, alias="choices")

    def found(self) -> dict[str, tuple[str, ...]]:
        """The allowed answers by field, ``choices`` first."""
        return {**({"choices": tuple(self.choices_)} if self.choices_ is not None else {}), **super().found()}


_Model = TypeVar("_Model", bound=BaseModel)


def _param(error: Mapping[str, Any]) -> str:
    names = []
    for part in error["loc"]:
        if not isinstance(part, str):
            break
        names.append(part)
    if error["type"] in ("extra_forbidden", "missing") and len(names) > 1:
        names.pop()  # an object with a key too many or too few: the object is what is wrong
    return ".".join(names)


def validated(model: type[_Model], body: Mapping[str, Any], max_tokens_limit: int | None = None) -> _Model:
    """``body`` checked against ``model``; ``max_tokens_limit`` defaults to :data:`MAX_TOKENS_LIMIT`.

    Raises:
        FieldError: the first bad field, named by its path (``"structured_outputs.choice"``).
    """
    limit = MAX_TOKENS_LIMIT if max_tokens_limit is None else max_tokens_limit
    try:
        return model.model_validate(body, context={"max_tokens_limit": limit})
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        raise FieldError(_param(first), first["msg"]) from None
