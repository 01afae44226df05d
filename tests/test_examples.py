"""The example deployment configs in ``examples/`` load, validate and (remote tiers) build a cascade."""

from __future__ import annotations

from pathlib import Path

import pytest

from cascade.config import build_cascade, load_config
from cascade.server.config import ServerConfig

EXAMPLES = sorted((Path(__file__).parent.parent / "examples").glob("*.yaml"))


def test_there_are_examples_for_the_documented_servers() -> None:
    assert {p.stem for p in EXAMPLES} >= {"vllm", "llamacpp", "sglang-tgi"}


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_an_example_config_loads_and_its_remote_tiers_build(path: Path) -> None:
    cfg = load_config(path)
    assert len(cfg.tiers) >= 2 and cfg.thresholds is not None
    extra = cfg.extra if isinstance(cfg.extra, dict) else {}
    ServerConfig.from_mapping(extra.get("server"))  # the server section is valid too
    if all(t.backend.kind == "openai" for t in cfg.tiers):  # no model to load: build it (nothing connects yet)
        cascade = build_cascade(cfg)
        assert [t.name for t in cascade.tiers] == [t.name for t in cfg.tiers]
        assert (cascade.monitor is not None) == (cfg.monitor is not None)
    if cfg.monitor is not None and cfg.monitor.log_path is not None:
        assert Path(cfg.monitor.log_path).parent == path.parent.absolute()  # relative to the config file
