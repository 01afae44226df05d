"""The cascade's own endpoints: live calibration status and hot reload of the thresholds.

* ``GET /v1/cascade/status``: each cascade's monitor estimates (:meth:`cascade.monitor.Monitor.status`): per
  stage its state (``ok``, ``drifting``, ``violated``), escalation rate against the calibrated one, the drift
  statistic and its p-value, and the shadow disagreement with its bound. ``{"enabled": false}`` without a
  ``monitor:`` section.
* ``POST /v1/cascade/artifact`` with an artifact's JSON as the body, or ``SIGHUP`` (the configured artifact
  file is read again): the new thresholds replace the old ones atomically (:meth:`Cascade.swap_policy`).
  Requests in flight finish on the old thresholds, requests that start afterwards use the new; a bad
  artifact (bad JSON or fields, other models, another measure or number of stages, fitted on other backends)
  is refused with a 400 naming why, and the old thresholds stay. The endpoint needs the bearer token; with
  auth off it is refused unless the server is bound to loopback (anyone who can reach an open server could
  otherwise change what it pays for). Expert-router mode serves several cascades with their own artifacts:
  reload is refused there (409).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from cascade.artifact import Artifact
from cascade.errors import ArtifactError
from cascade.monitor import worst_state
from cascade.policy import Policy
from cascade.server.protocol import Engine
from cascade.server.wire import HTTPError

__all__ = ["Reloader", "monitor_status"]

log = logging.getLogger("cascade.server")


def monitor_status(engine: Engine) -> dict[str, Any]:
    """The ``/v1/cascade/status`` body."""
    monitors = [c.monitor for c in engine.cascades() if c.monitor is not None]
    if not monitors:
        return {"enabled": False}
    states = [m.status() for m in monitors]
    return {"enabled": True, "state": worst_state(s["state"] for s in states), "cascades": states}


class Reloader:
    """Swaps a new artifact's thresholds into the served cascade.

    Args:
        engine: the served engine (reload needs exactly one cascade).
        path: the configured artifact file SIGHUP reads again, or None (no SIGHUP reload).
        check: extra checks of a new artifact against the config (e.g. :func:`cascade.config.check_backends`),
            raising ArtifactError.
        loopback: the server is bound to a loopback address (then the endpoint works with auth off).
    """

    def __init__(self, engine: Engine, path: str | None = None, check: Callable[[Artifact], None] | None = None,
                 loopback: bool = False) -> None:
        self.engine, self.path, self.check, self.loopback = engine, path, check, loopback
        self.reloads = 0

    def allowed(self, auth_on: bool) -> None:
        """Raise a 403 when reloading over HTTP is not allowed (auth off on a non-loopback bind)."""
        if not auth_on and not self.loopback:
            raise HTTPError(403, "artifact reload over HTTP needs auth (server.api_key_env) unless the server is "
                            "bound to loopback", code="reload_not_allowed")

    def swap(self, body: bytes | None) -> dict[str, Any]:
        """Load an artifact (``body``, or the configured file when None) and swap it in.

        Raises:
            HTTPError: 400 for a refused artifact, 409 in expert-router mode or without a file to read.
        """
        cascades = self.engine.cascades()
        if len(cascades) != 1:
            raise HTTPError(409, "artifact reload serves one cascade; the expert router's pools have their own "
                            "artifacts (restart to change them)", code="reload_not_supported")
        cascade = cascades[0]
        try:
            if body is None:
                if self.path is None:
                    raise HTTPError(409, "no artifact file is configured to read again", code="reload_not_supported")
                art = Artifact.load(self.path)
            else:
                art = Artifact.from_json(body)
            policy = Policy.from_artifact(art)
            if self.check is not None:
                self.check(art)
            cascade.swap_policy(policy)
        except ArtifactError as exc:
            log.warning("artifact reload refused, the old thresholds stay: %s", exc)
            raise HTTPError(400, f"artifact refused, the old thresholds stay: {exc}", code="artifact_refused") from None
        self.reloads += 1
        log.info("artifact reloaded (%s): thresholds %s, fitted %s", "file" if body is None else "HTTP",
                 list(policy.thresholds), art.created)
        return {"reloaded": True, "thresholds": list(policy.thresholds), "measure": policy.measure,
                "created": art.created, "reloads": self.reloads}

    def on_sighup(self) -> None:
        """The SIGHUP handler: reload the configured file; a refusal is logged and the old thresholds stay."""
        try:
            self.swap(None)
        except HTTPError as exc:
            log.warning("SIGHUP: %s", exc.message)
