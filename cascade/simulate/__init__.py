"""A simulated OpenAI-compatible LLM server, for tests and load tests.

It speaks the OpenAI HTTP API (``/v1/chat/completions``, ``/v1/completions``, ``/v1/models``, ``/health``),
streams with server-sent events exactly as the OpenAI API does (``data: {...}`` lines, ``data: [DONE]``),
and returns ``logprobs``/``top_logprobs`` in each endpoint's format. Answers cost no compute: every answer
is a pure function of ``(config.seed, prompt)``, made of words from a fixed list, with a prompt-dependent
"confidence" in [0, 1] that sets how peaked each step's next-token distribution is, so uncertainty varies
by prompt reproducibly. Writing ``[[sim:confidence=0.9]]`` anywhere in a prompt fixes the confidence.
Decoding is greedy whatever ``temperature``/``top_p``/``seed`` say (they are validated, then ignored).
Latency, HTTP 500 errors and hangs are simulated with ``asyncio.sleep`` and a seeded RNG;
:class:`SimStats` counts requests, requests in flight (and the maximum), and streams cut short.

Use it in-process::

    with SimServer(SimConfig(latency_per_token_s=0.01)) as server:
        client = openai.OpenAI(base_url=server.base_url, api_key="x")

or standalone: ``python -m cascade.simulate --port 8000 --latency-per-token 0.01``. It binds loopback only.
"""


from cascade.simulate.app import SimStats, create_app
from cascade.simulate.model import SimAnswer, SimConfig, simulate_answer
from cascade.simulate.server import LOOPBACK_HOSTS, SimServer, main

__all__ = ["LOOPBACK_HOSTS", "SimAnswer", "SimConfig", "SimServer", "SimStats", "create_app", "main",
           "simulate_answer"]
