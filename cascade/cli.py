"""The ``cascade`` command: ``demo``, ``run`` (offline batch jobs) and ``serve`` (OpenAI-compatible HTTP)."""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import logging
import math
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, TextIO

from cascade.errors import BatchError, CascadeError, InvalidRequestError, public_reason
from cascade.run_lines import LineError, RunLine, finite_json, parse_line, read_lines
from cascade.types import CascadeResult

__all__ = ["main", "result_record"]


def result_record(result: CascadeResult, request_id: Any = None) -> dict[str, Any]:
    """A JSON-ready record of a result (the ``cascade run`` output line)."""
    rec: dict[str, Any] = {"id": request_id, **asdict(result)}
    rec["calls"] = [asdict(c) for c in result.calls]
    rec["prompt_tokens"] = result.prompt_tokens
    rec["completion_tokens"] = result.completion_tokens
    return rec


def _config(args: argparse.Namespace) -> Any:
    from cascade.config import default_config, load_config, with_overrides

    cfg = load_config(args.config) if getattr(args, "config", None) else default_config()
    return with_overrides(cfg, measure=getattr(args, "measure", None), thresholds=getattr(args, "threshold", None),
                          artifact=getattr(args, "artifact", None), max_tokens=getattr(args, "max_tokens", None))


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


#: Characters that some line readers (Python's ``str.splitlines``, JavaScript) take for line ends: escaped in
#: the output so that each record stays on one line for every reader (they only occur inside JSON strings).
_LINE_BREAKS = {c: f"\\u{c:04x}" for c in (0x0B, 0x0C, 0x1C, 0x1D, 0x1E, 0x85, 0x2028, 0x2029)}


def _dump(rec: dict[str, Any]) -> str:
    """One output line: strict JSON (a non-finite threshold is null), UTF-8 safe, one line for any reader."""
    rec = finite_json(rec)
    text = json.dumps(rec, ensure_ascii=False, allow_nan=False)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate (e.g. in an id): escape it rather than fail the file
        text = json.dumps(rec, allow_nan=False)
    return text.translate(_LINE_BREAKS) + "\n"


def _error_record(line: RunLine, exc: BaseException) -> dict[str, Any]:
    return {"id": line.rid, "line": line.lineno, "error": public_reason(exc), "error_type": type(exc).__name__}


async def _answer_group(cascade: Any, members: list[RunLine]) -> list[dict[str, Any]]:
    """One batched call for lines asking the same parameters and target; each line keeps its own outcome."""
    first = members[0]
    params = cascade.resolve_params(dict(first.overrides))
    choices = [m.choices for m in members]
    try:
        outcomes: list[Any] = list(await cascade.run_batch(
            [m.prompt for m in members], params=params, target=first.target,
            choices=choices if any(c is not None for c in choices) else None))
    except BatchError as exc:  # answers and failures mixed: keep the answers, nothing is asked twice
        outcomes = exc.outcomes
    except InvalidRequestError:  # a check only the engine can make (e.g. a tier's prompt limit): one by one
        outcomes = []
        for m in members:
            try:
                outcomes.append(await cascade.run(m.prompt, params=params, target=m.target, choices=m.choices))
            except CascadeError as one:
                outcomes.append(one)
    except CascadeError as exc:
        outcomes = [exc] * len(members)
    return [_error_record(m, o) if isinstance(o, BaseException) else {**result_record(o, m.rid), "line": m.lineno}
            for m, o in zip(members, outcomes)]


async def _run_async(cascade: Any, lines: list[tuple[int, bytes]], out: TextIO, batch: int) -> tuple[int, int]:
    """Answer the lines in chunks of ``batch``; one output record per input line, in input order."""
    ok = failed = 0
    bar = _progress(len(lines), "cascade run")
    async with cascade:
        for start in range(0, len(lines), batch):
            chunk = lines[start : start + batch]
            records: list[dict[str, Any] | None] = [None] * len(chunk)
            groups: dict[str, list[tuple[int, RunLine]]] = {}
            for j, (lineno, raw) in enumerate(chunk):
                try:
                    line = parse_line(raw, lineno, max_prompt_chars=cascade.max_prompt_chars)
                except LineError as exc:
                    records[j] = exc.record()
                    continue
                if line is None:
                    records[j] = {"id": None, "line": lineno, "blank": True}
                else:
                    groups.setdefault(line.group_key(), []).append((j, line))
            for members in groups.values():
                answers = await _answer_group(cascade, [m for _, m in members])
                for (j, _), answer in zip(members, answers):
                    records[j] = answer
            for rec in records:
                assert rec is not None
                ok, failed = (ok, failed + 1) if "error" in rec else (ok + 1, failed)
                out.write(_dump(rec))
            out.flush()
            bar.update(len(records))
    bar.close()
    return ok, failed


def _run(args: argparse.Namespace) -> int:
    from cascade.config import build_cascade

    lines = read_lines(args.input)
    cascade = build_cascade(_config(args))
    out_path = Path(args.output)
    tmp = out_path.with_name(out_path.name + ".part")
    try:
        with tmp.open("w", encoding="utf-8") as out:
            ok, failed = asyncio.run(_run_async(cascade, lines, out, args.batch_size))
    except KeyboardInterrupt:
        print(f"interrupted: the lines answered so far are in {tmp} (rerun to answer them all)", file=sys.stderr)
        return 130
    tmp.replace(out_path)
    print(f"{ok} answered, {failed} failed -> {out_path}", file=sys.stderr)
    return 0 if failed == 0 else 1


# ---------------------------------------------------------------- fit-router


def _fit_router(args: argparse.Namespace) -> int:
    from cascade.router import MINILM_ID, fit_router, make_embedder

    parsed = [parse_line(raw, n) for n, raw in read_lines(args.prompts)]  # a bad line stops it: a corpus, not jobs
    prompts = [line.prompt for line in parsed if line is not None]
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


def _log_to_stderr() -> None:
    """Send the ``cascade`` loggers (tier failures, shutdown) to stderr, next to uvicorn's own lines."""
    logger = logging.getLogger("cascade")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(levelname)-9s %(name)s: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)


def _serve(args: argparse.Namespace) -> int:
    """Run ``cascade serve``: build the cascade (or router) from the config, then serve it with uvicorn; with
    ``--workers N`` (N > 1) in N processes sharing one socket (:mod:`cascade.server.workers`).

    Args:
        args: ``config``, ``measure``, ``threshold``, ``artifact``, ``max_tokens``, ``host``, ``port``,
            ``workers``.

    Returns:
        The process exit code (0 after a clean shutdown; 1 when a worker exited by itself).
    """
    workers = getattr(args, "workers", 1) or 1
    if workers == 1:
        return _serve_process(args)
    from cascade.server import ServerConfig
    from cascade.server.app import ANSWER_GRACE_S
    from cascade.server.workers import reserve, supervise

    cfg = _config(args)  # a bad config fails here, before any worker starts
    _log_to_stderr()
    extra = cfg.extra if isinstance(cfg.extra, Mapping) else {}
    server_cfg = ServerConfig.from_mapping(extra.get("server"))
    server_cfg.api_key()
    sock, listener = reserve(getattr(args, "host", None) or "127.0.0.1", 8000 if args.port is None else int(args.port))
    with sock:
        print(f"cascade serve: {workers} workers on http://{args.host}:{sock.getsockname()[1]}/v1", file=sys.stderr)
        # By its importable name (not __main__'s copy under `python -m cascade.cli`): spawn pickles a reference.
        from cascade.cli import _serve_worker

        return supervise(functools.partial(_serve_worker, args, os.getpid()), workers, listener,
                         stop_timeout_s=math.ceil(server_cfg.drain_timeout_s + ANSWER_GRACE_S) + 10)


def _serve_worker(args: argparse.Namespace, supervisor: int, listener: Any) -> None:
    """One worker of ``cascade serve --workers N``: the whole server on the supervisor's port."""
    from cascade.server.workers import detach, worker_socket

    detach(supervisor)
    _serve_process(args, worker_socket(listener))


def _serve_process(args: argparse.Namespace, sock: Any = None) -> int:
    """The server in this process, on ``args.host``/``args.port`` or on an already bound ``sock``."""
    import uvicorn

    from cascade.config import DEFAULT_ARTIFACT, build_cascade, check_backends
    from cascade.server import ServerConfig, create_app
    from cascade.server.admin import Reloader
    from cascade.server.app import ANSWER_GRACE_S
    from cascade.server.config import guard_binding, is_loopback
    from cascade.server.flow import fast_http, fast_loop, uvicorn_server

    cfg = _config(args)
    _log_to_stderr()
    extra = cfg.extra if isinstance(cfg.extra, Mapping) else {}
    server_cfg = ServerConfig.from_mapping(extra.get("server"))
    server_cfg.api_key()  # fail before loading models when the key is missing
    host = getattr(args, "host", None) or "127.0.0.1"
    port = 8000 if getattr(args, "port", None) is None else int(args.port)  # 0: any free port
    server_cfg = guard_binding(server_cfg, host)
    print(f"loading tiers: {', '.join(f'{t.name}={t.backend.model}' for t in cfg.tiers)}", file=sys.stderr)
    if cfg.router:
        from cascade.router.pool import build_router

        engine = build_router(cfg)
    else:
        engine = build_cascade(cfg)
    artifact = cfg.artifact or (str(DEFAULT_ARTIFACT) if cfg.thresholds is None else None)
    reloader = Reloader(engine, None if cfg.router else artifact, loopback=is_loopback(host),
                        check=(lambda art: check_backends(cfg, art)) if cfg.artifact else None)
    app = create_app(engine, server_cfg, reloader)
    uv = uvicorn.Config(app, host=host, port=port, lifespan="on", log_level="info", access_log=False,
                        timeout_graceful_shutdown=math.ceil(server_cfg.drain_timeout_s + ANSWER_GRACE_S),
                        timeout_keep_alive=math.ceil(server_cfg.keep_alive_s), loop=fast_loop(), http=fast_http(),
                        proxy_headers=False)  # the app reads no client address or scheme: X-Forwarded-* change nothing
    print(f"serving model {server_cfg.model_name!r} on http://{host}:{port}/v1 "
          f"(auth {'on' if server_cfg.api_key_env else 'off'}; loop {uv.loop}, http {uv.http}"
          f"{f'; worker {os.getpid()}' if sock is not None else ''})", file=sys.stderr)
    # On SIGTERM/SIGINT uvicorn stops accepting, lets requests in flight finish, runs the app's shutdown
    # (drain, close the engine), then re-raises the signal: the exit status is the signal's, as usual.
    uvicorn_server()(uv, app.state.service).run(sockets=None if sock is None else [sock])
    return 0


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _parser() -> argparse.ArgumentParser:
    from cascade.combined import COMBINED
    from cascade.types import MEASURES

    p = argparse.ArgumentParser(prog="cascade", description="Small LLM first; escalate on calibrated uncertainty.")
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--config", help="YAML or TOML config (default: the embedded model pair)")
        sp.add_argument("--measure", choices=(*MEASURES, COMBINED), help="uncertainty measure ('combined' needs an "
                        "artifact written by cascade-calibrate --measure combined)")
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

    r = sub.add_parser("run", help="answer a JSONL file of prompts",
                       epilog="exit status: 0 every line answered; 1 some lines failed (each has an error record, "
                              "the others are answered); 2 bad arguments or config; 130 interrupted (the lines "
                              "answered so far are in OUTPUT.part)")
    common(r)
    r.add_argument("--input", required=True, help='JSONL: {"id": ..., "prompt": ...} or "messages" per line')
    r.add_argument("--output", required=True,
                   help="JSONL results, one record per input line (result, error or blank), same order")
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
    s.add_argument("--workers", type=_positive, default=1,
                   help="server processes sharing the port, each with its own tiers (default 1); /metrics sums them")
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
