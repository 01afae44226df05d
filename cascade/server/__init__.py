"""``cascade serve``: the OpenAI-compatible HTTP server in front of a :class:`~cascade.engine.Cascade` or an
:class:`~cascade.router.ExpertRouter`.

- :mod:`cascade.server.app`: the ASGI app and the per-app service (admission, drain, the request path);
- :mod:`cascade.server.asgi`: the hot endpoints' raw ASGI path (past Starlette's middleware and router);
- :mod:`cascade.server.wire`: the OpenAI wire format (request parsing, response bodies, SSE, error mapping);
- :mod:`cascade.server.flow`: flow control (admission slots, disconnect watching, streaming responses);
- :mod:`cascade.server.metrics`: the Prometheus counters (prometheus-client, summed over workers);
- :mod:`cascade.server.workers`: ``--workers N``, N processes on one socket;
- :mod:`cascade.server.config`: the ``server`` section of a config;
- :mod:`cascade.server.protocol`: the :class:`~cascade.server.protocol.Engine` the app serves.

``cascade.cli`` runs it with uvicorn (``cascade serve``).
"""

from __future__ import annotations

from cascade.server.app import create_app
from cascade.server.config import ServerConfig
from cascade.server.protocol import Engine

__all__ = ["Engine", "ServerConfig", "create_app"]
