"""Config files: YAML and TOML, strict keys, typed errors, building a cascade."""

from __future__ import annotations

import pytest

from cascade.config import BackendConfig, CascadeConfig, TierConfig, build_cascade, default_config, load_config
from cascade.errors import ConfigError

YAML = """
measure: entropy_mean
thresholds: [1.5]
on_error: raise
max_tokens: 12
batching: {max_batch_size: 4, max_wait_ms: 2}
tiers:
  - name: small
    backend: {kind: hf, model: smollm2-135m}
    price_input_per_mtok: 0.1
  - name: large
    backend: {kind: openai, model: big, base_url: "http://127.0.0.1:9/v1", timeout_s: 3}
    price_output_per_mtok: 2.0
"""

TOML = """
measure = "margin_first"
thresholds = [0.3, 0.6]
[[tiers]]
name = "a"
[[tiers]]
name = "b"
backend = {model = "qwen2.5-coder-0.5b", dtype = "bfloat16"}
[[tiers]]
name = "c"
backend = {model = "qwen2.5-coder-1.5b"}
"""


def test_yaml_and_toml_load(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text(YAML)
    cfg = load_config(y)
    assert cfg.measure == "entropy_mean" and cfg.thresholds == (1.5,) and cfg.max_tokens == 12
    assert cfg.tiers[1].backend == BackendConfig(kind="openai", model="big", base_url="http://127.0.0.1:9/v1",
                                                 timeout_s=3)
    assert cfg.batching.max_batch_size == 4 and cfg.tiers[0].price_input_per_mtok == 0.1
    t = tmp_path / "c.toml"
    t.write_text(TOML)
    cfg = load_config(t)
    assert [x.name for x in cfg.tiers] == ["a", "b", "c"] and cfg.thresholds == (0.3, 0.6)
    assert cfg.tiers[1].backend.dtype == "bfloat16"


@pytest.mark.parametrize(
    "text, match",
    [
        ("measure: nope\n", "measure"),
        ("tiers: [{name: a}]\n", "two tiers"),
        ("colour: blue\n", "unknown key"),
        ("tiers: [{name: a, backend: {kind: grpc, model: x}}, {name: b}]\n", "kind"),
        ("tiers: [{name: a, backend: {kind: openai, model: x}}, {name: b}]\n", "base_url"),
        ("thresholds: [0.1, 0.2]\n", "thresholds"),
        ("thresholds: [0.1]\nartifact: a.json\n", "not both"),
        ("max_tokens: [\n", "parse"),
        ("tiers: [{name: a, backend: {model: x, top_logprobs: 50}}, {name: b}]\n", "top_logprobs"),
    ],
)
def test_bad_config_is_typed_error(tmp_path, text, match):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    with pytest.raises(ConfigError, match=match):
        load_config(p)


def test_missing_and_unknown_format(tmp_path):
    with pytest.raises(ConfigError):
        load_config(tmp_path / "missing.yaml")
    p = tmp_path / "c.ini"
    p.write_text("x=1")
    with pytest.raises(ConfigError, match="yaml"):
        load_config(p)


def test_default_is_embedded_pair():
    cfg = default_config()
    assert [t.backend.model for t in cfg.tiers] == ["qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b"]
    assert cfg.thresholds is None  # the shipped artifact applies


def test_build_cascade_reuses_given_backends():
    from conftest import make_backend

    cfg = CascadeConfig(tiers=(TierConfig("small", price_input_per_mtok=2.0), TierConfig("large")),
                        thresholds=(0.5,), max_tokens=3)
    small, large = make_backend(0), make_backend(1)
    cascade = build_cascade(cfg, backends={"small": small, "large": large})
    assert getattr(cascade.tiers[0].backend, "backend", None) is small and cascade.tiers[0].price.input_per_mtok == 2.0
    r = cascade.run_sync("a movie")
    assert r.calls[0].completion_tokens <= 3


def test_file_paths_are_relative_to_the_config_file(tmp_path, monkeypatch):
    folder = tmp_path / "deploy"
    folder.mkdir()
    (folder / "c.yaml").write_text("artifact: cal/thresholds.json\nrouter: router.json\n"
                                   "extra: {experts: {'0': {config: experts/code.yaml}, '1': {thresholds: [0.2]}}}\n")
    monkeypatch.chdir(tmp_path)
    cfg = load_config("deploy/c.yaml")
    assert cfg.artifact == str(folder / "cal" / "thresholds.json") and cfg.router == str(folder / "router.json")
    assert cfg.extra["experts"]["0"]["config"] == str(folder / "experts" / "code.yaml")
    assert cfg.extra["experts"]["1"] == {"thresholds": [0.2]}
    assert cfg.tiers[0].backend.model == "qwen2.5-coder-0.5b"  # model names are not paths
    (folder / "abs.yaml").write_text(f"artifact: {tmp_path / 'x.json'}\n")
    assert load_config(folder / "abs.yaml").artifact == str(tmp_path / "x.json")


def test_command_line_overrides_are_a_function_of_plain_values():
    from cascade.config import with_overrides

    cfg = CascadeConfig(tiers=(TierConfig("small"), TierConfig("large")), artifact="a.json")
    assert with_overrides(cfg) is cfg
    hand = with_overrides(cfg, thresholds=[0.3], measure="entropy_first", max_tokens=5)
    assert (hand.thresholds, hand.artifact, hand.measure, hand.max_tokens) == ((0.3,), None, "entropy_first", 5)
    back = with_overrides(hand, artifact="b.json")
    assert (back.thresholds, back.artifact) == (None, "b.json")
    with pytest.raises(ConfigError):
        with_overrides(cfg, thresholds=[0.1, 0.2])  # two tiers take one threshold
