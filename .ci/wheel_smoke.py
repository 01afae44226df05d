"""Smoke test of the built wheel, installed non-editable (tox env ``wheel``; CI runs it).

Run outside the checkout: ``python wheel_smoke.py CHECKOUT``. It fails when the installed package misses a
file the package reads at run time, which an editable install hides (``cascade/data/default_artifact.json``
once was). It checks, each independently, then reports every failure:

1. ``cascade`` and ``calibration`` are imported from the installation, not from CHECKOUT;
2. every file of the source packages that is not Python source is installed, byte for byte;
3. the console scripts ``cascade --help`` and ``cascade-calibrate --help`` run;
4. ``cascade demo`` reads the bundled demo data and the shipped default artifact (no thresholds in the
   config), on two simulated OpenAI-compatible loopback servers named like the embedded default models;
5. ``cascade run`` answers the demo data with the same config, one result line per input line;
6. ``cascade-calibrate`` fits a budget target on the demo data and writes an artifact the cascade loads.

No model is downloaded or run: the tiers are ``cascade.simulate`` servers of the installed package.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
import tempfile
import traceback
from collections.abc import Callable
from importlib import resources
from pathlib import Path

PACKAGES = ("cascade", "calibration")
SMALL, LARGE = "qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b"  # the models of the shipped default artifact


def _script(name: str) -> str:
    """A console script of this environment (next to its python)."""
    path = Path(sys.executable).with_name(name)
    assert path.is_file(), f"console script {name!r} is not installed next to {sys.executable}"
    return str(path)


def _call(*args: str, cwd: Path) -> str:
    """Run a command outside the checkout; fail with its output when it exits non-zero."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, f"{' '.join(args)} exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def _source_data(checkout: Path) -> list[Path]:
    """The files of the source packages that are not Python source (tracked by git when there is a repo)."""
    listed = subprocess.run(["git", "-C", str(checkout), "ls-files", *PACKAGES], capture_output=True, text=True,
                            check=False)
    if listed.returncode == 0 and listed.stdout.strip():
        files = [Path(line) for line in listed.stdout.splitlines()]
    else:
        files = [p.relative_to(checkout) for pkg in PACKAGES for p in (checkout / pkg).rglob("*") if p.is_file()]
    return sorted(p for p in files if p.suffix not in (".py", ".pyc") and "__pycache__" not in p.parts)


def check_installed(checkout: Path) -> None:
    """The packages come from this environment's site-packages, not from the checkout's source folders."""
    import calibration
    import cascade

    site = Path(sysconfig.get_paths()["purelib"]).resolve()
    for pkg in (cascade, calibration):
        where = Path(str(pkg.__file__)).resolve()
        assert where.parent == site / pkg.__name__, f"{pkg.__name__} imported from {where}, not from {site}"
        assert not (checkout / pkg.__name__ / "__init__.py").samefile(where), f"{pkg.__name__} from the checkout"
        print(f"  {pkg.__name__} from {where.parent}")


def check_data_files(checkout: Path) -> None:
    """Every non-Python file of the source packages is installed with the same bytes."""
    data = _source_data(checkout)
    assert data, "found no data files in the source packages"
    missing = []
    for rel in data:
        installed = resources.files(rel.parts[0]).joinpath(*rel.parts[1:])
        if not installed.is_file():
            missing.append(f"{rel} (not installed)")
        elif installed.read_bytes() != (checkout / rel).read_bytes():
            missing.append(f"{rel} (installed with other content)")
    assert not missing, "package files missing from the wheel: " + ", ".join(missing)
    print(f"  {len(data)} package data files installed: {', '.join(map(str, data))}")


def check_help(work: Path) -> None:
    """The console scripts run."""
    for name in ("cascade", "cascade-calibrate"):
        out = _call(_script(name), "--help", cwd=work)
        assert "usage:" in out, f"{name} --help printed no usage:\n{out}"


def _config(work: Path, small_url: str, large_url: str) -> Path:
    """A cascade config on two simulated servers, without thresholds: the shipped default artifact applies."""
    tiers = [{"name": name, "backend": {"kind": "openai", "model": model, "base_url": url, "timeout_s": 30}}
             for name, model, url in (("small", SMALL, small_url), ("large", LARGE, large_url))]
    path = work / "sim.yaml"
    path.write_text(json.dumps({"tiers": tiers, "max_tokens": 4}), encoding="utf-8")  # JSON is YAML
    return path


def check_demo(work: Path, config: Path) -> None:
    """``cascade demo`` on the bundled demo data with the shipped default thresholds."""
    from cascade.config import DEFAULT_ARTIFACT

    out = _call(_script("cascade"), "demo", "--config", str(config), "--limit", "6", "--no-compare", cwd=work)
    threshold = json.loads(DEFAULT_ARTIFACT.read_text(encoding="utf-8"))["thresholds"][0]
    assert "cascade on these 6 requests: accuracy" in out, f"cascade demo printed no summary:\n{out}"
    assert f"{threshold:>7.4f}" in out, f"cascade demo did not use the shipped threshold {threshold}:\n{out}"


def check_run(work: Path, config: Path) -> None:
    """``cascade run`` answers every line of the bundled demo data."""
    demo = resources.files("cascade").joinpath("data/demo_sst2.jsonl").read_text(encoding="utf-8")
    prompts, results = work / "demo.jsonl", work / "results.jsonl"
    prompts.write_text(demo, encoding="utf-8")
    _call(_script("cascade"), "run", "--config", str(config), "--input", str(prompts), "--output", str(results),
          cwd=work)
    lines = [json.loads(line) for line in results.read_text(encoding="utf-8").splitlines()]
    want = [json.loads(line)["id"] for line in demo.splitlines() if line.strip()]
    assert [r["id"] for r in lines] == want and all("error" not in r for r in lines), lines[:3]


def check_calibrate(work: Path, config: Path) -> None:
    """``cascade-calibrate`` writes an artifact that a cascade of the same models loads."""
    from cascade.policy import Policy

    demo = resources.files("cascade").joinpath("data/demo_sst2.jsonl").read_text(encoding="utf-8")
    data, out = work / "heldout.jsonl", work / "thresholds.json"
    data.write_text(demo, encoding="utf-8")
    _call(_script("cascade-calibrate"), "--config", str(config), "--data", str(data), "--out", str(out),
          "--max-large-share", "0.5", "--cache-dir", str(work / "cache"), "--no-progress", cwd=work)
    policy = Policy.from_artifact(out, models=[SMALL, LARGE], measure="choice_margin")  # the demo data has choices
    assert len(policy) == 1, policy


def main(argv: list[str]) -> int:
    """Run every check; exit 1 when any failed."""
    checkout = Path(argv[1] if len(argv) > 1 else ".").resolve()
    from cascade.simulate import SimConfig, SimServer

    failures = []
    with tempfile.TemporaryDirectory() as tmp, SimServer(SimConfig(model=SMALL)) as small, \
            SimServer(SimConfig(model=LARGE)) as large:
        work = Path(tmp)
        config = _config(work, small.base_url, large.base_url)
        checks: list[tuple[str, Callable[[], None]]] = [
            ("imported from the installation", lambda: check_installed(checkout)),
            ("package data files installed", lambda: check_data_files(checkout)),
            ("console scripts --help", lambda: check_help(work)),
            ("cascade demo (demo data, default artifact)", lambda: check_demo(work, config)),
            ("cascade run (demo data, default artifact)", lambda: check_run(work, config)),
            ("cascade-calibrate (demo data)", lambda: check_calibrate(work, config)),
        ]
        for name, check in checks:
            try:
                check()
                print(f"ok    {name}")
            except Exception:
                failures.append(name)
                print(f"FAIL  {name}\n{traceback.format_exc()}")
    print(f"wheel smoke test: {len(checks) - len(failures)} passed, {len(failures)} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
