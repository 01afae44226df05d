"""The simulated server's answers as bytes: OpenAI JSON bodies and server-sent events. Pure functions.

A whole answer is one JSON body (compact, as Starlette's ``JSONResponse`` wrote it). A stream is made of
``data: {...}\\n\\n`` events whose fixed head (``id``, ``created``, ``model``, ``object``) is serialised once
per stream; each event then costs one ``json.dumps`` of its ``choices`` (the bytes are those of one
``json.dumps`` of the whole event, as before).
"""

from __future__ import annotations

import json
import re
import time
import uuid
from collections.abc import Iterator, Sequence
from json.encoder import encode_basestring_ascii as _quoted
from typing import Any

from cascade.simulate.choices import echo_logprobs, tokens
from cascade.simulate.model import AnswerSteps, SimAnswer, SimConfig
from cascade.simulate.request import SimRequest

__all__ = ["DONE", "StreamEvents", "TokenJson", "error_body", "full_body", "json_bytes"]

DONE = b"data: [DONE]\n\n"
Answer = SimAnswer | AnswerSteps  # a whole answer, or one computed as its stream goes
_WORD = re.compile(r"\w+|[^\w\s]")


def json_bytes(payload: Any) -> bytes:
    """``payload`` as compact UTF-8 JSON (Starlette's ``JSONResponse`` encoding)."""
    return json.dumps(payload, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode()


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> bytes:
    """An OpenAI-style error body."""
    kind = "server_error" if status >= 500 else "invalid_request_error"
    return json_bytes({"error": {"message": message, "type": kind, "param": param, "code": code}})


def _prompt_tokens(key: str) -> int:
    return max(1, len(_WORD.findall(key)))


def _usage(req: SimRequest, answers: Sequence[Answer]) -> dict[str, int]:
    prompt = sum(_prompt_tokens(k) for k in req.keys)
    completion = sum(len(a.tokens) for a in answers)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _chat_logprobs(a: Answer, steps: range, n: int) -> dict[str, Any]:
    def entry(token: str, lp: float) -> dict[str, Any]:
        return {"token": token, "logprob": lp, "bytes": list(token.encode())}

    return {"content": [{**entry(a.tokens[t], a.logprobs[t]),
                         "top_logprobs": [entry(*p) for p in a.top[t][:n]]} for t in steps]}


def _text_logprobs(a: Answer, steps: range, n: int, offset: int) -> dict[str, Any]:
    offsets = []
    for t in steps:
        offsets.append(offset)
        offset += len(a.tokens[t])
    return {"tokens": [a.tokens[t] for t in steps], "token_logprobs": [a.logprobs[t] for t in steps],
            "top_logprobs": [dict(a.top[t][: max(n, 1)]) for t in steps], "text_offset": offsets}


def _logprobs(req: SimRequest, a: Answer, steps: range, offset: int) -> dict[str, Any] | None:
    if req.top_n is None:
        return None
    if req.chat:
        return _chat_logprobs(a, steps, req.top_n)
    return _text_logprobs(a, steps, req.top_n, offset)


def _head(req: SimRequest, config: SimConfig, stream: bool) -> dict[str, Any]:
    kind = ("chat.completion.chunk" if stream else "chat.completion") if req.chat else "text_completion"
    return {"id": f"{'chatcmpl' if req.chat else 'cmpl'}-{uuid.uuid4().hex}", "created": int(time.time()),
            "model": config.model, "object": kind}


def full_body(req: SimRequest, answers: Sequence[SimAnswer], config: SimConfig) -> dict[str, Any]:
    """The body of a whole (not streamed) answer, one choice per answer."""
    choices = []
    for i, a in enumerate(answers):
        lp = _logprobs(req, a, range(len(a.tokens)), 0)
        body: dict[str, Any] = ({"message": {"role": "assistant", "content": a.text}} if req.chat
                                else {"text": a.text})
        choices.append({"index": i, **body, "logprobs": lp, "finish_reason": a.finish_reason,
                        **({"stop_reason": a.stop} if config.stop_reason else {})})
    body = {**_head(req, config, False), "choices": choices, "usage": _usage(req, answers)}
    return _with_echo(req, body, config) if req.echo else body


def _with_echo(req: SimRequest, body: dict[str, Any], config: SimConfig) -> dict[str, Any]:
    """Completions with ``echo``: each text starts with its prompt, and the prompt tokens' logprobs come first."""
    for choice, key in zip(body["choices"], req.keys):
        choice["text"] = key + choice["text"]
        if req.top_n is None:
            continue
        head = echo_logprobs(config, key, req.top_n)
        tail = choice["logprobs"] or {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        choice["logprobs"] = {name: list(head[name]) + list(tail[name])  # type: ignore[call-overload]
                              for name in ("tokens", "token_logprobs", "top_logprobs")}
        choice["logprobs"]["text_offset"] = list(head["text_offset"]) + [  # type: ignore[call-overload]
            len(key) + off for off in tail["text_offset"]]
    usage = body["usage"]
    usage["prompt_tokens"] = sum(len(tokens(k)) for k in req.keys)
    usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
    return body


class StreamEvents:
    """The events of one streamed answer, made when they are due (a stream cut short makes no more).

    Args:
        req: the checked request (``stream`` set).
        answers: one answer per choice (:class:`~cascade.simulate.model.AnswerSteps` are computed step by step).
        config: the server's behaviour (``model``, ``stop_reason``, ``stream_usage``).
    """

    def __init__(self, req: SimRequest, answers: Sequence[Answer], config: SimConfig,
                 token_json: TokenJson | None = None) -> None:
        self.req, self.answers, self.config = req, answers, config
        self._tokens = token_json if token_json is not None else TokenJson()
        self.steps = max((a.length if isinstance(a, AnswerSteps) else len(a.tokens) for a in answers), default=0)
        self._prefix = b"data: " + json.dumps(_head(req, config, True))[:-1].encode() + b', "choices": '
        self._offsets = [0] * len(answers)  # text offset of each answer's next token (completions logprobs)

    def _event(self, choices: list[dict[str, Any]], extra: bytes = b"") -> bytes:
        return self._prefix + json.dumps(choices).encode() + extra + b"}\n\n"

    def role(self) -> bytes:
        """The chat stream's first event (the assistant role, no content); empty for completions."""
        if not self.req.chat:
            return b""
        return self._event([{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                             "finish_reason": None}])

    def step(self, t: int) -> Iterator[bytes]:
        """The events of step ``t``: one per answer that has a token ``t``, in choice order."""
        req = self.req
        for a in self.answers:
            if isinstance(a, AnswerSteps):
                a.ensure(t)
        if req.chat and req.top_n is not None:
            yield from self._chat_step(t, req.top_n)
            return
        for i, a in enumerate(self.answers):
            if t < len(a.tokens):
                text = a.tokens[t]
                lp = _logprobs(req, a, range(t, t + 1), self._offsets[i])
                self._offsets[i] += len(text)
                body = {"delta": {"content": text}} if req.chat else {"text": text}
                yield self._event([{"index": i, **body, "logprobs": lp, "finish_reason": None}])

    def _chat_step(self, t: int, n: int) -> Iterator[bytes]:
        """:meth:`step` of a chat stream with logprobs, written by hand: the same bytes as ``json.dumps`` of the
        event (``repr`` of a float is its JSON), at a third of the cost (16 such events per answer)."""
        known = self._tokens
        for i, a in enumerate(self.answers):
            if t < len(a.tokens):
                text = a.tokens[t]
                head, tail = known[text]
                top = ", ".join([known[w][0] + repr(v) + known[w][1] + "}" for w, v in a.top[t][:n]])
                yield self._prefix + (f'[{{"index": {i}, "delta": {{"content": {_quoted(text)}}}, "logprobs": '
                                      f'{{"content": [{head}{a.logprobs[t]!r}{tail}, "top_logprobs": [{top}]}}]}}, '
                                      f'"finish_reason": null}}]}}\n\n').encode()

    def tail(self) -> bytes:
        """The finish reasons, the usage when asked for (and offered), then ``data: [DONE]``."""
        req, config = self.req, self.config
        out = self._event([{"index": i, **({"delta": {}} if req.chat else {"text": ""}), "logprobs": None,
                            "finish_reason": a.finish_reason, **({"stop_reason": a.stop} if config.stop_reason
                                                                 else {})} for i, a in enumerate(self.answers)])
        if req.include_usage and config.stream_usage:
            out += self._event([], b', "usage": ' + json.dumps(_usage(req, self.answers)).encode())
        return out + DONE


class TokenJson(dict[str, tuple[str, str]]):
    """The JSON around a chat logprob entry's value, per token: ``{"token": "...", "logprob": `` and
    ``, "bytes": [...]``. Made once per token a server sends (its vocabulary is small; cleared past 65,536)."""

    def __missing__(self, token: str) -> tuple[str, str]:
        if len(self) >= 65_536:
            self.clear()
        value = ('{"token": ' + _quoted(token) + ', "logprob": ',
                 ', "bytes": [' + ", ".join(map(str, token.encode())) + "]")
        self[token] = value
        return value
