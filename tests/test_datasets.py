"""Task loaders of the quality evaluation: disjoint, stratified, reproducible splits from the real data files."""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

import pytest
from conftest import BUNDLED_DATA, eval_data

from cascade.errors import ConfigError

# eval/ runs from the checkout (python -m eval.quality), not installed: make the checkout importable.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from eval.datasets import (
    TASKS,
    load_pool,
    load_task,
    same_answer,
    score_answer,
    stratified_sample,
    stratified_split,
)

DATA, REAL = eval_data()  # the real files next to the checkout, else the bundled excerpts of them
N_CAL, N_TEST = (300, 500) if REAL else (10, 20)
needs_real_data = pytest.mark.skipif(not REAL, reason="the real data folder is absent (set CASCADE_EVAL_DATA)")


def test_stratified_split_keeps_label_shares_and_is_seeded() -> None:
    labels = [0] * 640 + [1] * 360  # sorted by label, like the files
    first, rest = stratified_split(labels, 100, seed=3)
    assert len(first) == 100 and len(rest) == 900
    assert not set(first) & set(rest) and sorted(first + rest) == list(range(1000))
    assert Counter(labels[i] for i in first) == {0: 64, 1: 36}
    assert stratified_split(labels, 100, seed=3) == (first, rest)
    assert stratified_split(labels, 100, seed=4)[0] != first


def test_stratified_split_exact_size_with_remainders() -> None:
    labels = [0] * 7 + [1] * 5 + [2] * 1
    for n in range(14):
        first, rest = stratified_split(labels, n, seed=0)
        assert len(first) == n and len(rest) == 13 - n
    with pytest.raises(ConfigError):
        stratified_split(labels, 14, seed=0)


def test_smaller_samples_are_subsets_of_larger_ones() -> None:
    rows = [(i % 3, f"text {i}") for i in range(300)]
    small = set(stratified_sample(rows, 30, seed=1))
    large = set(stratified_sample(rows, 90, seed=1))
    assert small <= large


def test_score_answer_uses_choices_and_aliases() -> None:
    ex = TASKS["ag_news"].example("x", 3, "new chip")
    assert score_answer("Science", ex)
    assert score_answer("Technology.", ex)
    assert not score_answer("business", ex)
    assert not score_answer("I do not know", ex)
    sst = TASKS["sst2"].example("y", 0, "dull")
    assert score_answer("This review is negative.", sst)
    assert not score_answer("positive, not negative", sst)  # the first label mentioned counts


def test_same_answer_is_same_score_under_every_label() -> None:
    ex = TASKS["ag_news"].example("x", 3, "new chip")
    pairs = [("Science", "technology"), ("sports", "Sports!"), ("I do not know", "no idea"), ("world", "business")]
    assert [same_answer(a, b, ex) for a, b in pairs] == [True, True, True, False]
    for label in range(4):
        gold = TASKS["ag_news"].example("x", label, "new chip")
        for a, b in pairs:
            if same_answer(a, b, gold):
                assert score_answer(a, gold) == score_answer(b, gold)


@pytest.mark.parametrize("name", ["sst2", "trec", "cr"])
def test_the_pool_is_what_the_splits_leave_unused(name: str) -> None:
    td = load_task(name, DATA, n_cal=N_CAL, n_test=N_TEST, seed=0, prompts="plain")
    pool = load_pool(name, DATA, n_cal=N_CAL, n_test=N_TEST, seed=0, prompts="plain")
    used = {e["text"] for e in td.cal + td.test}
    assert pool and not {e["text"] for e in pool} & used
    assert len({e["text"] for e in pool}) == len(pool) and all(e["id"].startswith(f"{name}/pool/") for e in pool)
    head = load_pool(name, DATA, n=5, n_cal=N_CAL, n_test=N_TEST, seed=0, prompts="plain")
    assert [e["text"] for e in head] == [e["text"] for e in pool[:5]]  # a smaller pool is a prefix
    assert pool[0]["messages"] == td.task.messages(pool[0]["text"], "plain") and "answer" in pool[0]
    with pytest.raises(ConfigError):
        load_pool("nope", DATA)


@pytest.mark.parametrize("name", sorted(TASKS))
def test_plain_prompts_are_one_instruction_naming_the_labels_then_the_text(name: str) -> None:
    task = TASKS[name]
    [msg] = task.messages("some text here", "plain")
    instruction, text = msg["content"].split("\n\n")
    assert msg["role"] == "user" and text == "some text here"
    assert all(label in instruction for label in task.labels) and instruction.endswith(".")
    tuned = task.messages("some text here")
    assert tuned[0]["role"] == "system" and tuned != [msg]
    with pytest.raises(ConfigError):
        task.messages("x", "fancy")


def test_prompt_sets_share_the_examples() -> None:
    tuned = load_task("sst2", DATA, n_cal=20, n_test=20, seed=0)
    plain = load_task("sst2", DATA, n_cal=20, n_test=20, seed=0, prompts="plain")
    for a, b in zip(tuned.cal + tuned.test, plain.cal + plain.test, strict=True):
        assert (a["id"], a["text"], a["answer"]) == (b["id"], b["text"], b["answer"]) and a["messages"] != b["messages"]
    with pytest.raises(ConfigError):
        load_task("sst2", DATA, prompts="fancy")


def test_unknown_task_and_missing_folder_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        load_task("imdb", tmp_path)
    with pytest.raises(ConfigError):
        load_task("sst2", tmp_path)


@pytest.mark.parametrize("name", sorted(TASKS))
def test_splits_are_disjoint_stratified_and_reproducible(name: str) -> None:
    a = load_task(name, DATA, n_cal=N_CAL, n_test=N_TEST, seed=0)
    assert len(a.cal) == N_CAL and len(a.test) == N_TEST
    cal_texts, test_texts = {e["text"] for e in a.cal}, {e["text"] for e in a.test}
    assert len(cal_texts & test_texts) <= 2, "calibration and test share examples"  # a few exact duplicates exist
    assert len({e["id"] for e in a.cal + a.test}) == N_CAL + N_TEST
    for split in (a.cal, a.test):
        counts = Counter(e["label"] for e in split)
        assert len(counts) == len(TASKS[name].labels) or name == "trec"
        assert all(e["answer"] == e["choices"][e["label"]] for e in split)
    full = load_task(name, DATA, seed=0)
    full_share = Counter(e["label"] for e in full.test)
    got = Counter(e["label"] for e in a.test)
    for label, k in full_share.items():
        assert abs(got[label] / N_TEST - k / len(full.test)) <= 1 / N_TEST + 1e-9
    b = load_task(name, DATA, n_cal=N_CAL, n_test=N_TEST, seed=0)
    assert [e["messages"] for e in a.cal + a.test] == [e["messages"] for e in b.cal + b.test]
    c = load_task(name, DATA, n_cal=N_CAL, n_test=N_TEST, seed=1)
    assert [e["text"] for e in c.test] != [e["text"] for e in a.test]


def _rows(path: Path, encoding: str = "utf-8") -> list[str]:
    return [line for line in path.read_bytes().decode(encoding).split("\n") if line.strip()]


def test_every_line_is_read_and_decoded() -> None:
    sst = load_task("sst2", DATA)  # official splits: every line of each file
    assert len(sst.cal) == len(_rows(DATA / "sst2" / "stsa.binary.dev"))
    assert len(sst.test) == len(_rows(DATA / "sst2" / "stsa.binary.test"))
    trec = load_task("trec", DATA)
    test_q = {r.split(" ", 1)[1].strip() for r in _rows(DATA / "trec" / "TREC.test.all")}
    train_q = [r.split(" ", 1)[1].strip() for r in _rows(DATA / "trec" / "TREC.train.all", "latin-1")]
    assert len(trec.test) == len(test_q) and not {e["text"] for e in trec.cal} & test_q
    assert len(trec.cal) == len(set(train_q) - test_q)  # questions also in the test file are left out
    rt = load_task("rotten_tomatoes", DATA)  # latin-1: decoded, not replaced
    assert len(rt.cal) + len(rt.test) == len(set(_rows(DATA / "rotten_tomatoes" / "rt-polarity.all", "latin-1")))
    assert any("é" in e["text"] for e in rt.cal + rt.test)
    assert not any("\ufffd" in e["text"] for e in rt.cal + rt.test)
    ag = load_task("ag_news", DATA)
    assert not any("#39;" in e["text"] or "\\" in e["text"] for e in ag.cal + ag.test)
    assert any("'" in e["text"] for e in ag.cal + ag.test)  # &#39; became an apostrophe
    isear = load_task("isear", DATA)
    assert {e["label"] for e in isear.cal + isear.test} == set(range(7))


def test_the_bundled_excerpts_are_excerpts_of_the_real_files() -> None:
    if not REAL:
        pytest.skip("the real data folder is absent: nothing to compare the excerpts with")
    for path in BUNDLED_DATA.rglob("*"):
        if path.is_file() and path.suffix != ".md":
            real = (DATA / path.relative_to(BUNDLED_DATA)).read_bytes()
            for line in (x for x in path.read_bytes().split(b"\n") if x):
                assert line in real, f"{path}: {line[:60]!r} is not in the real file"


@needs_real_data
def test_official_splits_and_encodings() -> None:
    sst = load_task("sst2", DATA)
    assert (len(sst.cal), len(sst.test)) == (872, 1821)
    trec = load_task("trec", DATA)
    assert len(trec.test) == 500 and 5300 < len(trec.cal) < 5452  # minus questions also in the test file
    assert Counter(e["label"] for e in trec.test) == {0: 138, 1: 94, 2: 9, 3: 65, 4: 81, 5: 113}
    rt = load_task("rotten_tomatoes", DATA)  # latin-1: decoded, not replaced
    assert len(rt.cal) + len(rt.test) == 10662
    assert any("é" in e["text"] for e in rt.cal + rt.test)
    assert not any("\ufffd" in e["text"] for e in rt.cal + rt.test)
    ag = load_task("ag_news", DATA, n_cal=50, n_test=50)
    assert not any("#39;" in e["text"] or "\\" in e["text"] for e in ag.cal + ag.test)
    assert Counter(e["label"] for e in load_task("isear", DATA).test).most_common(1)[0][1] < 1000
