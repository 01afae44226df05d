"""The ``cascade`` command: ``demo``, ``run`` (offline batch jobs) and ``serve`` (OpenAI-compatible HTTP)."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, TextIO

from cascade.errors import CascadeError, InvalidRequestError
from cascade.policy import Target
from cascade.types import CascadeResult, GenerationParams

__all__ = ["main", "result_record"]


def result_record(result: CascadeResult, request_id: Any = None) -> dict[str, Any]:
    """A JSON-ready record of a result (the ``cascade run`` output line)."""
    rec: dict[str, Any] = {"id": request_id, **asdict(result)}
    rec["calls"] = [asdict(c) for c in result.calls]
    rec["prompt_tokens"] = result.prompt_tokens
    rec["completion_tokens"] = result.completion_tokens
    return rec


def _config(args: argparse.Namespace) -> Any:
    from cascade.config import default_config, load_config

    cfg = load_config(args.config) if getattr(args, "config", None) else default_config()
    changes: dict[str, Any] = {}
    if getattr(args, "measure", None):
        changes["measure"] = args.measure
    if getattr(args, "threshold", None) is not None:
        changes.update(thresholds=tuple(args.threshold), artifact=None)
    if getattr(args, "artifact", None):
        changes.update(artifact=args.artifact, thresholds=None)
    if getattr(args, "max_tokens", None) is not None:
        changes["max_tokens"] = args.max_tokens
    return replace(cfg, **changes) if changes else cfg


def _progress(total: int, desc: str) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="req", file=sys.stderr, disable=None)


# ---------------------------------------------------------------- demo


def _demo(args: argparse.Namespace) -> int:
    from cascade.config import build_cascade
    from cascade.demo import demo_examples, run_demo
    from cascade.scorers import get_scorer

    examples = demo_examples(args.limit)
    cfg = _config(args)
    if args.max_tokens is None:
        cfg = replace(cfg, max_tokens=8)
    print(f"Loading tiers: {', '.join(f'{t.name}={t.backend.model}' for t in cfg.tiers)} "
          "(first run assembles and converts the models: about a minute)", file=sys.stderr)
    cascade = build_cascade(cfg)
    bar = _progress(len(examples), "cascade")
    try:
        asyncio.run(run_demo(cascade, examples, get_scorer("choice"), compare=args.compare, progress=bar.update))
    finally:
        bar.close()
    return 0


# ---------------------------------------------------------------- run


_LINE_PARAMS = ("max_tokens", "temperature", "top_p", "stop", "seed")


def _parse_line(line: str, lineno: int) -> tuple[Any, Any, dict[str, Any]]:
    """Return (id, prompt, options) for one input line, or raise InvalidRequestError naming the line.

    Options are the line's own decoding parameters (``max_tokens``, ``temperature``, ``top_p``, ``stop``,
    ``seed``) and ``target``, all checked here; other keys (an ``answer``, say) are ignored.
    """
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as exc:
        raise InvalidRequestError(f"line {lineno}: invalid JSON: {exc.msg}") from exc
    if not isinstance(obj, dict):
        raise InvalidRequestError(f"line {lineno}: expected a JSON object")
    rid = obj.get("id", lineno)
    try:
        if ("prompt" in obj) == ("messages" in obj):
            raise InvalidRequestError("give exactly one of 'prompt' or 'messages'")
        opts = {k: obj[k] for k in (*_LINE_PARAMS, "target") if k in obj}
        replace(GenerationParams(), **_overrides(opts))  # raises on a bad value
        Target.parse(opts.get("target"))
    except (InvalidRequestError, TypeError) as exc:
        raise _LineError(rid, f"line {lineno}: {exc}") from exc
    return rid, obj.get("prompt", obj.get("messages")), opts


class _LineError(InvalidRequestError):
    """A line whose id is known but whose content is invalid."""

    def __init__(self, rid: Any, message: str) -> None:
        super().__init__(message)
        self.rid = rid


def _overrides(opts: dict[str, Any]) -> dict[str, Any]:
    """The decoding parameters a line sets (applied over the cascade's defaults)."""
    return {k: v for k, v in opts.items() if k in _LINE_PARAMS}


def _dump(rec: dict[str, Any]) -> str:
    text = json.dumps(rec, ensure_ascii=False)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate (e.g. in an id): escape it rather than fail the file
        text = json.dumps(rec)
    return text + "\n"


async def _run_async(cascade: Any, lines: list[tuple[int, str]], out: TextIO, batch: int) -> tuple[int, int]:
    ok = failed = 0
    bar = _progress(len(lines), "cascade run")
    async with cascade:
        for start in range(0, len(lines), batch):
            chunk = lines[start : start + batch]
            records: list[dict[str, Any] | None] = [None] * len(chunk)
            groups: dict[str, list[tuple[int, Any, Any]]] = {}
            for j, (lineno, line) in enumerate(chunk):
                try:
                    rid, prompt, opts = _parse_line(line, lineno)
                    groups.setdefault(json.dumps(opts, sort_keys=True), []).append((j, rid, prompt))
                except InvalidRequestError as exc:
                    records[j] = {"id": getattr(exc, "rid", lineno), "error": str(exc),
                                  "error_type": "InvalidRequestError"}
            for key, members in groups.items():
                opts = json.loads(key)
                params = cascade.resolve_params(_overrides(opts))
                try:
                    results = await cascade.run_batch([m[2] for m in members], params=params,
                                                      target=opts.get("target"))
                    for (j, rid, _), r in zip(members, results):
                        records[j] = result_record(r, rid)
                except CascadeError:
                    # one bad prompt must not sink its batch: retry the members one by one
                    for j, rid, prompt in members:
                        try:
                            r = await cascade.run(prompt, params=params, target=opts.get("target"))
                            records[j] = result_record(r, rid)
                        except (CascadeError, TypeError) as one:
                            records[j] = {"id": rid, "error": str(one), "error_type": type(one).__name__}
            for rec in records:
                assert rec is not None
                ok, failed = (ok, failed + 1) if "error" in rec else (ok + 1, failed)
                out.write(_dump(rec))
            out.flush()
            bar.update(len(records))
    bar.close()
    return ok, failed


def _jsonl_lines(path: str) -> list[tuple[int, str]]:
    """The non-blank lines of a JSONL file with their line numbers (split on newlines only: U+2028 may sit
    inside a string; a UTF-8 byte-order mark is dropped)."""
    text = Path(path).read_text(encoding="utf-8-sig")
    return [(n, line) for n, line in enumerate(text.split("\n"), 1) if line.strip()]


def _run(args: argparse.Namespace) -> int:
    from cascade.config import build_cascade

    lines = _jsonl_lines(args.input)
    cascade = build_cascade(_config(args))
    out_path = Path(args.output)
    tmp = out_path.with_name(out_path.name + ".part")
    with tmp.open("w", encoding="utf-8") as out:
        ok, failed = asyncio.run(_run_async(cascade, lines, out, args.batch_size))
    tmp.replace(out_path)
    print(f"{ok} answered, {failed} failed -> {out_path}", file=sys.stderr)
    return 0 if failed == 0 else 1


# ---------------------------------------------------------------- fit-router


def _fit_router(args: argparse.Namespace) -> int:
    from cascade.router import MINILM_ID, fit_router, make_embedder

    prompts = [_parse_line(line, n)[1] for n, line in _jsonl_lines(args.prompts)]
    if len(prompts) < args.k:
        raise InvalidRequestError(f"{len(prompts)} prompts cannot make {args.k} clusters")
    backends = []
    if args.embedder != MINILM_ID:
        from cascade.backends.hf_local import HFLocalBackend

        backends.append(HFLocalBackend.from_pretrained(args.embedder.removeprefix("hidden-states:")))
    embedder = make_embedder(args.embedder, backends=backends)
    fitted = fit_router(embedder, prompts, args.k, seed=args.seed)
    print(f"router with {fitted.k} clusters ({embedder.id}) -> {fitted.save(args.out)}; "
          f"prompts per cluster: {list(fitted.sizes)}")
    return 0


# ---------------------------------------------------------------- serve


def _serve(args: argparse.Namespace) -> int:
    from cascade.server import serve_main

    return int(serve_main(args))


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _parser() -> argparse.ArgumentParser:
    from cascade.types import MEASURES

    p = argparse.ArgumentParser(prog="cascade", description="Small LLM first; escalate on calibrated uncertainty.")
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--config", help="YAML or TOML config (default: the embedded model pair)")
        sp.add_argument("--measure", choices=MEASURES, help="uncertainty measure")
        g = sp.add_mutually_exclusive_group()
        g.add_argument("--threshold", type=float, nargs="+", help="threshold(s), one per stage")
        g.add_argument("--artifact", help="calibration artifact (from cascade-calibrate)")
        sp.add_argument("--max-tokens", type=_positive, help="new tokens per answer")

    d = sub.add_parser("demo", help="answer bundled SST-2 questions with the embedded models")
    common(d)
    d.add_argument("--limit", type=int, help="answer only the first N bundled questions")
    d.add_argument("--no-compare", dest="compare", action="store_false",
                   help="skip the small-alone and large-alone baselines")
    d.set_defaults(func=_demo)

    r = sub.add_parser("run", help="answer a JSONL file of prompts")
    common(r)
    r.add_argument("--input", required=True, help='JSONL: {"id": ..., "prompt": ...} or "messages" per line')
    r.add_argument("--output", required=True, help="JSONL results, one line per input line, same order")
    r.add_argument("--batch-size", type=_positive, default=16, help="prompts per batched call (default 16)")
    r.set_defaults(func=_run)

    f = sub.add_parser("fit-router", help="fit the expert router: k-means clusters of prompt embeddings")
    f.add_argument("--prompts", required=True, help='JSONL corpus of prompts ({"prompt": ...} or "messages")')
    f.add_argument("--k", type=int, required=True, help="number of clusters (experts)")
    f.add_argument("--out", required=True, help="router file to write (JSON, atomic)")
    f.add_argument("--embedder", default="all-MiniLM-L6-v2",
                   help="all-MiniLM-L6-v2 (PyPI package) or hidden-states:<local model> (default MiniLM)")
    f.add_argument("--seed", type=int, default=0, help="k-means seed (default 0)")
    f.set_defaults(func=_fit_router)

    s = sub.add_parser("serve", help="OpenAI-compatible HTTP server")
    common(s)
    s.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    s.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    s.set_defaults(func=_serve)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``cascade`` console script."""
    args = _parser().parse_args(argv)
    try:
        return int(args.func(args))
    except (CascadeError, OSError) as exc:
        print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
