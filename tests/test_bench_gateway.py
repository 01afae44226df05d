"""eval.bench_gateway's CPU phases, run for real (short): cascade serve and two simulated tiers in child processes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from eval.bench_gateway import main, parse_args


def test_repeated_cpu_phases_report_their_median_round(tmp_path: Path) -> None:
    out = tmp_path / "gw.json"
    assert main(["--repeat", "3", "--cpu-rate", "20", "--duration", "0.3", "--no-sweep", "--max-tokens", "4",
                 "--report-json", str(out)]) == 0
    cpu = json.loads(out.read_text())["current"]["cpu"]
    assert sorted(cpu) == ["accepted_plain", "accepted_streamed", "escalated_plain", "escalated_streamed"]
    for key, row in cpu.items():
        rounds = row["gateway_cpu_ms_rounds"]
        assert len(rounds) == 3 and row["answered"] > 0 and row["failed"] == 0, key
        assert row["cpu_ms_per_request"]["gateway"] == sorted(rounds)[1], key  # the median round's own row
        assert row["escalated_share"] == (1.0 if key.startswith("escalated") else 0.0), key


def test_repeat_must_be_positive(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        parse_args(["--repeat", "0"])
    assert "--repeat must be >= 1" in capsys.readouterr().err
