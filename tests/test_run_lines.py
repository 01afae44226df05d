"""``cascade run`` input lines: every line gets exactly one strict-JSON record, whatever it holds.

Lines are checked one by one before batching (:mod:`cascade.run_lines`), with the server's field checks
(:mod:`cascade.request_fields`); the engine runs tiny random-weight models.
"""

from __future__ import annotations

import asyncio
import io
import json
import math
from pathlib import Path
from typing import Any

import pytest
from conftest import make_backend
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cascade import Cascade, Price, Tier
from cascade.cli import _run_async, main
from cascade.run_lines import LineError, parse_line, read_lines
from cascade.types import GenerationParams

HOSTILE = {
    "huge int": b'{"prompt": "hi", "max_tokens": 1' + b"0" * 5000 + b"}",
    "not utf-8": b'{"prompt": "caf\xe9"}',
    "deep nesting": b"[" * 100_000,
    "messages as a string": b'{"messages": "hi"}',
    "stop as a number": b'{"prompt": "hi", "stop": 5}',
    "max_tokens over the server cap": b'{"prompt": "hi", "max_tokens": 1000000}',
    "prompt as a list": b'{"prompt": ["a", "b"]}',
    "empty choices": b'{"prompt": "hi", "choices": []}',
    "choices that disagree": b'{"prompt": "hi", "choices": ["a", "b"], "guided_choice": ["a", "c"]}',
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_a_hostile_line_is_an_error_naming_its_line(name: str) -> None:
    with pytest.raises(LineError) as err:
        parse_line(HOSTILE[name], 7)
    assert str(err.value).startswith("line 7: ") and err.value.record()["line"] == 7


def test_a_valid_line_keeps_its_fields() -> None:
    raw = json.dumps({"id": "x", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "stop": "\n",
                      "guided_choice": ["yes", "no"], "answer": "ignored"}).encode()
    line = parse_line(raw, 2)
    assert line is not None and line.rid == "x" and line.choices == ("yes", "no")
    assert dict(line.overrides) == {"max_tokens": 3, "stop": ("\n",)}
    assert parse_line(b"  \t", 3) is None


def test_read_lines_numbers_physical_lines_as_bytes(tmp_path: Path) -> None:
    path = tmp_path / "in.jsonl"
    path.write_bytes(b"\xef\xbb\xbf{}\r\n\n\xff\n")
    assert read_lines(path) == [(1, b"{}"), (2, b""), (3, b"\xff")]


def make_tiers() -> list[Tier]:
    return [Tier("small", make_backend(0), Price(1.0, 1.0)), Tier("large", make_backend(1), Price(5.0, 5.0))]


@pytest.fixture
def tiers() -> list[Tier]:
    return make_tiers()


def run_lines(tiers: list[Tier], lines: list[bytes], threshold: float = 0.5, batch: int = 16) -> list[dict[str, Any]]:
    """Answer the lines as ``cascade run`` does (the run closes the tiers' backends at its end)."""
    cascade = Cascade(tiers, threshold=threshold, params=GenerationParams(max_tokens=2))
    out = io.StringIO()
    asyncio.run(_run_async(cascade, list(enumerate(lines, 1)), out, batch))
    return [json.loads(x, parse_constant=_refuse) for x in out.getvalue().splitlines()]


def _refuse(name: str) -> None:
    raise AssertionError(f"not strict JSON: {name}")


def test_hostile_lines_mixed_with_good_ones_leave_the_good_answers_and_one_call_per_tier(tiers: list[Tier]) -> None:
    calls = {"n": 0}
    small = tiers[0].backend
    original = small.generate

    async def counted(*args: Any, **kwargs: Any) -> Any:
        calls["n"] += 1
        return await original(*args, **kwargs)

    good = [json.dumps({"id": i, "prompt": f"the movie {i}"}).encode() for i in range(6)]
    lines = [good[0], *HOSTILE.values(), *good[1:], b"", b'{"prompt": "pick", "choices": ["yes", "no"]}']
    small.generate = counted  # type: ignore[method-assign]
    try:
        records = run_lines(tiers, lines, batch=64)
    finally:
        small.generate = original  # type: ignore[method-assign]
    assert [r["line"] for r in records] == list(range(1, len(lines) + 1))
    assert calls["n"] == 1  # the bad lines never entered the batch, so it ran once and nothing was rerun
    answered = [r for r in records if "tier" in r]
    assert [r["id"] for r in answered] == [0, 1, 2, 3, 4, 5, len(lines)]
    assert answered[-1]["text"] in ("yes", "no")
    assert sum("error" in r for r in records) == len(HOSTILE) and records[-2] == {"id": None, "line": len(lines) - 1,
                                                                                  "blank": True}


def test_infinite_thresholds_are_written_as_strict_json(tiers: list[Tier]) -> None:
    for threshold in (math.inf, -math.inf):
        (rec,) = run_lines(make_tiers(), [b'{"prompt": "a movie"}'], threshold=threshold)
        assert rec["threshold"] is None and rec["escalated"] == (threshold < 0)


def test_cli_run_with_hostile_lines_and_threshold_inf(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from conftest import make_model, make_tokenizer

    for seed in (0, 1):
        make_model(seed).save_pretrained(tmp_path / f"tiny{seed}")
        make_tokenizer().save_pretrained(tmp_path / f"tiny{seed}")
    config = tmp_path / "c.yaml"
    config.write_text("max_tokens: 2\nthresholds: [0.5]\ntiers:\n"
                      f"  - {{name: small, backend: {{model: '{tmp_path / 'tiny0'}'}}}}\n"
                      f"  - {{name: large, backend: {{model: '{tmp_path / 'tiny1'}'}}}}\n")
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_bytes(b"\n".join([b'{"id": "ok", "prompt": "a movie"}', *HOSTILE.values()]) + b"\n")
    code = main(["run", "--config", str(config), "--threshold", "inf", "--input", str(inp), "--output", str(out)])
    assert code == 1 and "1 answered, 9 failed" in capsys.readouterr().err
    records = [json.loads(x, parse_constant=_refuse) for x in out.read_text(encoding="utf-8").splitlines()]
    assert len(records) == 1 + len(HOSTILE) and records[0]["tier"] == "small" and records[0]["threshold"] is None


def test_an_interrupted_run_says_where_its_partial_output_is(tmp_path: Path, tiers: list[Tier],
                                                            capsys: pytest.CaptureFixture[str],
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    import cascade.cli as cli

    async def interrupted(cascade: Any, lines: Any, out: Any, batch: int) -> tuple[int, int]:
        out.write('{"id": 1}\n')
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_run_async", interrupted)  # the signal itself; everything else is real
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text('{"prompt": "a"}\n')
    config = tmp_path / "c.yaml"
    config.write_text("thresholds: [0.5]\ntiers:\n  - {name: s, backend: {kind: openai, model: m, base_url: "
                      "'http://127.0.0.1:9/v1'}}\n  - {name: l, backend: {kind: openai, model: m, base_url: "
                      "'http://127.0.0.1:9/v1'}}\n")
    assert main(["run", "--config", str(config), "--input", str(inp), "--output", str(out)]) == 130
    assert f"{out}.part" in capsys.readouterr().err and not out.exists()
    assert Path(f"{out}.part").read_text() == '{"id": 1}\n'


_JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
                     lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner,
                                                                                 max_size=3), max_leaves=6)
_KEYS = st.sampled_from(["id", "prompt", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p",
                         "stop", "seed", "target", "choices", "guided_choice", "structured_outputs", "answer"])
_FIELDS = st.dictionaries(_KEYS, _JSON | st.just("a review") | st.just(["yes", "no"])
                          | st.just([{"role": "user", "content": "hi"}]), max_size=5)
_LINE = st.one_of(
    st.binary(max_size=60),
    _JSON.map(lambda v: json.dumps(v).encode()),
    _FIELDS.map(lambda d: json.dumps(d).encode()),
    st.fixed_dictionaries({"prompt": st.text(min_size=1, max_size=20)}, optional={"choices": st.just(["a", "b"])})
    .map(lambda d: json.dumps(d).encode()),
).map(lambda b: b.replace(b"\n", b" "))


@settings(max_examples=100, deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck))
@given(lines=st.lists(_LINE, min_size=50, max_size=50))
def test_fuzzed_lines_get_exactly_one_strict_json_record_each(lines: list[bytes]) -> None:
    """100 seeded examples x 50 lines = 5,000 lines: no crash, one record per line, in order; every line the
    checks accept is answered (no engine failure)."""
    records = run_lines(make_tiers(), lines, batch=64)
    assert [r["line"] for r in records] == list(range(1, len(lines) + 1))
    for raw, r in zip(lines, records):
        assert sum(k in r for k in ("error", "blank", "tier")) == 1, r
        accepted = _accepts(raw, r["line"])
        assert ("tier" in r) == accepted, (raw, r)


def _accepts(raw: bytes, lineno: int) -> bool:
    try:
        return parse_line(raw, lineno) is not None
    except LineError:
        return False


@pytest.mark.parametrize("name", ["huge int", "not utf-8", "deep nesting"])
def test_calibration_data_with_a_hostile_line_is_refused_naming_it(tmp_path: Path, name: str,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    from calibration.cli import main as calibrate

    data = tmp_path / "d.jsonl"
    data.write_bytes(b'{"prompt": "hi", "answer": "a"}\n' + HOSTILE[name] + b"\n")
    code = calibrate(["--data", str(data), "--out", str(tmp_path / "a.json"), "--max-large-share", "0.5"])
    err = capsys.readouterr().err
    assert code == 2 and f"{data}:2: " in err and "Traceback" not in err
