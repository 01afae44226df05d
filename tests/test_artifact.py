"""The calibration artifact: strict JSON round trip, atomic save, and clear errors on bad or mismatched files."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from calibration.artifact import artifact_from_fit, data_fingerprint
from calibration.fit import fit_budget, fit_quality, measured_curve
from cascade.artifact import Artifact, load
from cascade.curve import Curve
from cascade.errors import ArtifactError

MODELS = ("small-135m", "large-1.7b")


def _data(n: int = 300, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    s = rng.uniform(size=n)
    return s, rng.uniform(size=(n, 2)) < np.column_stack([0.95 - 0.6 * s, np.full(n, 0.85)])


def _artifact(**changes: Any) -> Artifact:
    s, c = _data()
    fit = fit_budget(s, c, max_large_share=0.3)
    art = artifact_from_fit(fit, models=MODELS, measure="margin_first", data_fingerprint=data_fingerprint(s, c),
                            curve=measured_curve(s, c), cluster_thresholds={0: [0.2], 3: [float("inf")]})
    if not changes:
        return art
    fields = {**art.__dict__, **changes}
    return Artifact(**fields)


def _no_constants(name: str) -> None:
    raise AssertionError(f"non-standard JSON constant {name}")


def test_round_trip_with_infinite_thresholds(tmp_path: Path) -> None:
    art = _artifact(thresholds=(float("-inf"),))
    path = art.save(tmp_path / "cal.json")
    text = path.read_text()
    raw = json.loads(text, parse_constant=_no_constants)  # strict JSON: no Infinity/NaN tokens
    assert raw["thresholds"] == ["-inf"] and raw["cluster_thresholds"] == {"0": [0.2], "3": ["inf"]}
    assert raw["schema_version"] == 2 and raw["levels"] is None and raw["curve"]["thresholds"][-1] == ["-inf"]
    back = load(path, expect_models=list(MODELS), expect_measure="margin_first")
    assert back == art
    assert back.thresholds == (float("-inf"),) and back.cluster_thresholds == {0: (0.2,), 3: (float("inf"),)}
    assert back.thresholds_for(3) == (float("inf"),) and back.thresholds_for(9) == back.thresholds
    assert Artifact.from_json(art.to_json()) == art


def test_from_fit_keeps_the_fit_result() -> None:
    s, c = _data()
    fit = fit_quality(s, c, max_quality_loss=0.05, delta=0.1)
    art = artifact_from_fit(fit, models=MODELS, measure="entropy_mean", data_fingerprint=data_fingerprint(s, c))
    assert (art.thresholds, art.method, art.feasible, art.message, art.n) == (
        fit.thresholds, "quality", fit.feasible, fit.message, 300)
    assert art.params["delta"] == 0.1 and art.params["bound"] == "discordant"
    assert Artifact.from_json(art.to_json()) == art


def test_data_fingerprint_is_deterministic_and_sensitive() -> None:
    s, c = _data()
    fp = data_fingerprint(s, c)
    assert fp == data_fingerprint(s.copy(), c.copy()) and len(fp) == 64
    s2 = s.copy()
    s2[7] = np.nextafter(s2[7], 1.0)
    assert data_fingerprint(s2, c) != fp
    assert data_fingerprint(s.astype(np.float32), c) != fp  # dtype is part of the identity
    assert data_fingerprint(c, s) != fp
    assert data_fingerprint(b"abc") == data_fingerprint("abc") != data_fingerprint("abd")


def test_atomic_save_failure_leaves_no_partial_file(tmp_path: Path) -> None:
    art = _artifact()
    target = tmp_path / "as_dir"
    target.mkdir()
    with pytest.raises(ArtifactError, match="cannot write"):
        art.save(target)  # os.replace onto a directory fails after the temp file was written
    assert sorted(p.name for p in tmp_path.iterdir()) == ["as_dir"]
    with pytest.raises(ArtifactError):
        art.save(tmp_path / "missing" / "cal.json")


def test_write_failing_midway_keeps_the_old_artifact(tmp_path: Path) -> None:
    """A real short write: the child process may not write files over 4 KiB (RLIMIT_FSIZE)."""
    old = _artifact(message="old")
    path = old.save(tmp_path / "cal.json")
    before = path.read_bytes()
    script = textwrap.dedent(f"""
        import resource, signal, sys
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from test_artifact import _artifact
        from cascade.errors import ArtifactError
        art = _artifact(message="x" * 100_000)
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, resource.RLIM_INFINITY))
        try:
            art.save({str(path)!r})
        except ArtifactError as e:
            print("ArtifactError", e)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert "ArtifactError" in out.stdout and "cannot write" in out.stdout, out.stderr
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cal.json"]


def test_mismatched_models_and_measure_name_the_difference(tmp_path: Path) -> None:
    path = _artifact().save(tmp_path / "cal.json")
    with pytest.raises(ArtifactError, match=r"tier 1: artifact 'large-1.7b' vs cascade 'large-7b'"):
        load(path, expect_models=["small-135m", "large-7b"])
    with pytest.raises(ArtifactError, match="cascade has 3"):
        load(path, expect_models=[*MODELS, "huge"])
    with pytest.raises(ArtifactError, match=r"'margin_first'.*'entropy_mean'"):
        Artifact.load(path, expect_measure="entropy_mean")


def _write(tmp_path: Path, edit: Any) -> Path:
    raw = json.loads(_artifact().to_json())
    edit(raw)
    path = tmp_path / "edited.json"
    path.write_text(json.dumps(raw))
    return path


@pytest.mark.parametrize(("edit", "match"), [
    (lambda d: d.update(schema_version=3), "unknown artifact schema_version 3"),
    (lambda d: d.pop("levels"), r"schema_version 2\) is missing field\(s\) \[.levels.\]"),
    (lambda d: d.update(levels={"items": []}), "levels is missing"),
    (lambda d: d.pop("measure"), r"missing field\(s\) \['measure'\]"),
    (lambda d: d.update(extra=1), "unknown field"),
    (lambda d: d.update(thresholds=[0.1, 0.2]), "thresholds must have 1 values"),
    (lambda d: d.update(thresholds=["NaN"]), "thresholds must be a number"),
    (lambda d: d.update(measure="vibes"), "unknown measure"),
    (lambda d: d.update(models=["only-one"]), "at least two"),
    (lambda d: d.update(data_fingerprint="abc"), "sha256"),
    (lambda d: d.update(n=0), "positive integer"),
    (lambda d: d.update(created="yesterday"), "ISO-8601"),
    (lambda d: d.update(feasible="yes"), "boolean"),
    (lambda d: d["curve"].pop("accuracy"), "curve is missing"),
    (lambda d: d["curve"].update(kind="spline"), "curve kind"),
    (lambda d: d.update(cluster_thresholds={"a": [0.1]}), "cluster id"),
])
def test_malformed_artifacts_raise(tmp_path: Path, edit: Any, match: str) -> None:
    with pytest.raises(ArtifactError, match=match):
        load(_write(tmp_path, edit))


def test_bad_json_and_missing_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text('{"schema_version": 1, ')
    with pytest.raises(ArtifactError, match="not valid JSON"):
        load(bad)
    bad.write_text('{"thresholds": [Infinity]}')
    with pytest.raises(ArtifactError, match="Infinity"):
        load(bad)
    bad.write_text("[1, 2]")
    with pytest.raises(ArtifactError, match="object"):
        load(bad)
    with pytest.raises(ArtifactError, match="cannot read"):
        load(tmp_path / "nope.json")


def test_constructor_validates() -> None:
    with pytest.raises(ArtifactError, match="finite JSON"):
        _artifact(params={"x": float("inf")})
    with pytest.raises(ArtifactError, match="threshold"):
        _artifact(thresholds=(float("nan"),))
    curve3 = Curve("pareto", ((0.1, 0.2),), (0.0,), (0.5,), (1.0,), 0.6)
    with pytest.raises(ArtifactError, match="curve"):
        _artifact(curve=curve3)


def test_policy_loads_the_artifact_and_answers_targets(tmp_path: Path) -> None:
    from cascade.policy import Policy, Target

    path = _artifact().save(tmp_path / "cal.json")
    policy = Policy.from_artifact(path, models=MODELS, measure="margin_first")
    assert policy.thresholds == _artifact().thresholds
    s, c = _data()
    want = fit_budget(s, c, max_large_share=0.2).thresholds
    assert policy.thresholds_for(target=Target(max_large_share=0.2)) == want
    with pytest.raises(ArtifactError):
        Policy.from_artifact(path, models=MODELS, measure="entropy_first")


def test_a_cascade_takes_the_measure_from_its_artifact(tmp_path: Path) -> None:
    from conftest import make_backend

    from cascade import Cascade

    small, large = make_backend(0), make_backend(1)
    models = [small.name, large.name]
    path = _artifact(models=tuple(models), measure="entropy_mean").save(tmp_path / "cal.json")
    cascade = Cascade(small=small, large=large, artifact=str(path))  # no measure given: the artifact's
    assert cascade.measure == "entropy_mean" and cascade.policy.thresholds == _artifact().thresholds
    with pytest.raises(ArtifactError, match="measure"):
        Cascade(small=small, large=large, artifact=str(path), measure="margin_first")


def test_choice_priors_round_trip_and_are_checked(tmp_path: Path) -> None:
    key = json.dumps(["negative", "positive"])
    art = _artifact(choice_priors={"0": {key: [0.5, -0.5]}, 1: {key: (0.1, -0.1)}})
    assert art.choice_priors == {0: {key: (0.5, -0.5)}, 1: {key: (0.1, -0.1)}}
    path = art.save(tmp_path / "a.json")
    assert load(path) == art and json.loads(path.read_text())["choice_priors"]["0"][key] == [0.5, -0.5]
    assert "choice_priors" not in _artifact().to_dict()  # no priors: no field (older readers keep working)
    for bad in ({"2": {key: [0.0, 0.0]}}, {"0": {key: [0.0]}}, {"0": {"not json": [0.0]}}, {"x": {}},
                {"0": {key: [0.0, float("nan")]}}, {"0": {key: [True, 0.0]}}, [1]):
        with pytest.raises(ArtifactError):
            _artifact(choice_priors=bad)
