"""The public surface: `__all__` is honest, and importing the package does no heavy work."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest

MODULES = ["cascade", "cascade.types", "cascade.errors", "cascade.engine", "cascade.policy", "cascade.uncertainty",
           "cascade.config", "cascade.backends.base", "cascade.backends.hf_local", "cascade.scorers",
           "cascade.artifact", "cascade.curve",
           "calibration.fit", "calibration.metrics", "calibration.artifact", "calibration.cli", "calibration.pipeline",
           "calibration.report"]


@pytest.mark.parametrize("name", MODULES)
def test_all_is_honest(name):
    module = importlib.import_module(name)
    exported = getattr(module, "__all__", None)
    assert exported is not None, f"{name} has no __all__"
    assert len(exported) == len(set(exported))
    for symbol in exported:
        assert hasattr(module, symbol), f"{name}.__all__ names missing {symbol}"


def test_import_is_light():
    code = "import sys, cascade, cascade.cli, cascade.config; print(sorted(m for m in ('torch', 'transformers', " \
           "'openai', 'matplotlib', 'starlette') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_errors_form_one_hierarchy():
    import cascade

    for name in ("ArtifactError", "BackendError", "BackendTimeoutError", "ConfigError", "InvalidRequestError",
                 "ModelNotInstalledError", "OverloadedError"):
        assert issubclass(getattr(cascade, name), cascade.CascadeError)
    assert issubclass(cascade.InvalidRequestError, ValueError)
