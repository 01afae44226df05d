"""Labeled tasks for the quality evaluation: fixed prompts, verbalizers and seeded, stratified splits.

Every loader reads the original files under the data folder (``../shared/data`` by default; see its
README), respects their encodings, and returns a calibration split and a test split that never share an
example. Files without an official split are sorted by label, so they are shuffled with a fixed seed and
split per label (stratified). Limits take a stratified, seeded subset, so a smaller run is a subset of
the same distribution.

Two prompt sets: ``tuned`` (the formats chosen by hand on a few dozen examples per task, see
:class:`Task`) and ``plain`` (one user message: one instruction sentence naming the labels, as a user would
write it, then the text; see :data:`PLAIN_INSTRUCTIONS`). An example is a dict: ``id``, ``messages`` (the
chat prompt), ``answer`` (the gold label word),
``choices`` (every label word), ``aliases`` (other words that mean a label), ``label`` (int) and ``text``
(the raw input, for the trained routers).
"""

from __future__ import annotations

import csv
import html
import json
import random
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cascade.errors import ConfigError
from cascade.scorers import extract_choice

__all__ = [
    "DEFAULT_DATA",
    "PLAIN_INSTRUCTIONS",
    "PROMPT_SETS",
    "TASKS",
    "Task",
    "TaskData",
    "answer_label",
    "load_pool",
    "load_task",
    "same_answer",
    "score_answer",
    "stratified_sample",
    "stratified_split",
]

#: Default data folder, relative to the checkout (``/work/main`` -> ``/work/shared/data``).
DEFAULT_DATA = "../shared/data"

Row = tuple[int, str]  # (label index, input text)


@dataclass(frozen=True)
class Task:
    """A classification task as generation: a fixed two-message prompt and one label word per class.

    The system message states the task and lists the labels. The user message is either the input and a
    cue to complete (``Review: "..."`` then ``Sentiment:``, when ``cue`` is set) or the input followed by
    the question. The formats were chosen on 60-80 examples per task (seed 5, disjoint from the splits'
    use in reports) for both SmolLM2-135M and Qwen-0.5B; see ``eval/RESULTS.md``.

    Attributes:
        name: task name on the command line.
        labels: the label word of each class index.
        role: first sentence of the system message (what is classified).
        question: asked after the input, naming the labels (question format).
        aliases: other answer words mapped to a label word (e.g. ``"technology" -> "science"``).
        max_tokens: new tokens to generate (default 8: enough for "This review is negative." from small models).
        subject: what the input is, e.g. ``"Review"`` (cue format).
        cue: the word the model completes after the input, e.g. ``"Sentiment"``; None = question format.
    """

    name: str
    labels: tuple[str, ...]
    role: str
    question: str
    aliases: Mapping[str, str] = field(default_factory=dict)
    max_tokens: int = 8
    subject: str = ""
    cue: str | None = None

    def messages(self, text: str, prompts: str = "tuned") -> list[dict[str, str]]:
        """The chat prompt for one input, in the ``tuned`` or the ``plain`` prompt set."""
        if prompts == "plain":
            return [{"role": "user", "content": f"{PLAIN_INSTRUCTIONS[self.name]}\n\n{text}"}]
        if prompts != "tuned":
            raise ConfigError(f"unknown prompt set {prompts!r}; choose from {list(PROMPT_SETS)}")
        system = f"{self.role} Answer with exactly one of these labels: {', '.join(self.labels)}."
        if self.cue is not None:
            user = f'{self.subject}: "{text}"\n{self.cue}:'
        else:
            user = f"{text}\n\n{self.question} Answer with one word."
        return [{"role": "system", "content": system}, {"role": "user", "content": user}]

    def example(self, uid: str, label: int, text: str, prompts: str = "tuned") -> dict[str, Any]:
        """One example dict for ``text`` with gold class ``label`` (prompt set ``prompts``)."""
        return {"id": uid, "messages": self.messages(text, prompts), "answer": self.labels[label],
                "choices": list(self.labels), "aliases": dict(self.aliases), "label": label, "text": text}


_POLARITY = "Is this review negative or positive?"
_MOVIE = "You classify the sentiment of a movie review."
TASKS: dict[str, Task] = {
    # Sentiment: the cue format (SmolLM2-135M on 80 SST-2 examples: 0.76 against 0.48 with the question
    # format; Qwen-0.5B 0.84 against 0.80).
    "sst2": Task("sst2", ("negative", "positive"), _MOVIE, _POLARITY, subject="Review", cue="Sentiment"),
    "rotten_tomatoes": Task("rotten_tomatoes", ("negative", "positive"), _MOVIE, _POLARITY,
                            subject="Review", cue="Sentiment"),
    "cr": Task("cr", ("negative", "positive"), "You classify the sentiment of a product review.", _POLARITY,
               subject="Review", cue="Sentiment"),
    # Topic and question type: the question format (the cue format was worse for both models).
    "trec": Task("trec", ("description", "entity", "abbreviation", "human", "location", "number"),
                 "You classify what kind of answer a question asks for.",
                 "Does this question ask for a description, entity, abbreviation, human, location or number?",
                 {"person": "human", "numeric": "number", "place": "location", "definition": "description"}),
    "ag_news": Task("ag_news", ("world", "sports", "business", "science"),
                    "You classify the topic of a news article.",
                    "Is this article about world, sports, business or science?",
                    {"technology": "science", "tech": "science", "sport": "sports", "politics": "world"}),
    "isear": Task("isear", ("joy", "fear", "anger", "sadness", "disgust", "shame", "guilt"),
                  "You classify the emotion a person felt in the situation they describe.",
                  "Which emotion was it: joy, fear, anger, sadness, disgust, shame or guilt?",
                  {"happiness": "joy", "sad": "sadness", "angry": "anger", "afraid": "fear", "guilty": "guilt",
                   "ashamed": "shame", "disgusted": "disgust"}),
}

#: The plain prompt set: one instruction sentence naming the labels, then the text, in one user message, the
#: way the issue describes a user writing it ("<question about the text>? Answer with one word: <labels>.").
#: Written once, before any model answered them, and never changed after looking at results.
PLAIN_INSTRUCTIONS: dict[str, str] = {
    "sst2": "Is this movie review negative or positive? Answer with one word: negative or positive.",
    "rotten_tomatoes": "Is this movie review negative or positive? Answer with one word: negative or positive.",
    "cr": "Is this product review negative or positive? Answer with one word: negative or positive.",
    "trec": "What kind of answer does this question ask for? Answer with one word: description, entity, "
            "abbreviation, human, location or number.",
    "ag_news": "What is the topic of this news article? Answer with one word: world, sports, business or science.",
    "isear": "Which emotion did the person feel in this situation? Answer with one word: joy, fear, anger, "
             "sadness, disgust, shame or guilt.",
}
#: The prompt sets of :func:`load_task`.
PROMPT_SETS = ("tuned", "plain")


@dataclass(frozen=True)
class TaskData:
    """The two disjoint splits of one task.

    Attributes:
        task: the task definition.
        cal: calibration examples (thresholds, best-measure choice and router training use only these).
        test: test examples (every reported number).
        source: where each split came from (files and split rule), for the report.
    """

    task: Task
    cal: list[dict[str, Any]]
    test: list[dict[str, Any]]
    source: str


def answer_label(answer: str, example: Mapping[str, Any]) -> str | None:
    """The label word (an alias mapped to its label) mentioned first in ``answer``, or None."""
    aliases: Mapping[str, str] = example.get("aliases") or {}
    words = list(example["choices"]) + [a for a in aliases if a not in example["choices"]]
    found = extract_choice(answer, words)
    return None if found is None else aliases.get(found, found)


def score_answer(answer: str, example: Mapping[str, Any]) -> bool:
    """True when the label word (or an alias of it) mentioned first in ``answer`` is the gold label."""
    found = answer_label(answer, example)
    return found is not None and found == str(example["answer"])


def same_answer(a: str, b: str, example: Mapping[str, Any]) -> bool:
    """Whether two answers name the same label (or neither names one): :func:`score_answer` scores them alike
    under every gold label, as label-free calibration needs."""
    return answer_label(a, example) == answer_label(b, example)


def stratified_split(labels: Sequence[int], n_first: int, seed: int) -> tuple[list[int], list[int]]:
    """Split indices into a first part of ``n_first`` and the rest, keeping label shares in both.

    Indices are shuffled per label with ``random.Random(seed)``; each label gives the first part its
    proportional share (largest remainders fill up to ``n_first`` exactly).

    Raises:
        ConfigError: ``n_first`` is negative or larger than the data.
    """
    if not 0 <= n_first <= len(labels):
        raise ConfigError(f"cannot take {n_first} of {len(labels)} examples")
    rng = random.Random(seed)
    by_label: dict[int, list[int]] = {}
    for i, y in enumerate(labels):
        by_label.setdefault(y, []).append(i)
    for idx in by_label.values():
        rng.shuffle(idx)
    total = len(labels)
    exact = {y: n_first * len(idx) / total for y, idx in sorted(by_label.items())}
    take = {y: int(v) for y, v in exact.items()}
    for y in sorted(exact, key=lambda y: (take[y] - exact[y], y))[: n_first - sum(take.values())]:
        take[y] += 1
    first = [i for y, idx in sorted(by_label.items()) for i in idx[: take[y]]]
    rest = [i for y, idx in sorted(by_label.items()) for i in idx[take[y]:]]
    rng.shuffle(first)
    rng.shuffle(rest)
    return first, rest


def stratified_sample(rows: Sequence[Row], n: int | None, seed: int) -> list[Row]:
    """A seeded, stratified subset of ``n`` rows (all rows, shuffled, when ``n`` is None or too large)."""
    k = len(rows) if n is None else min(n, len(rows))
    first, _ = stratified_split([y for y, _ in rows], k, seed)
    return [rows[i] for i in first]


def _lines(path: Path, encoding: str) -> list[Row]:
    rows = []
    with path.open(encoding=encoding) as f:
        for line in f:
            if line.strip():
                label, text = line.rstrip("\n").split(" ", 1)
                rows.append((int(label), text.strip()))
    return rows


def _ag_text(raw: str) -> str:
    text = re.sub(r"(?<!&)(#\d+;|quot;|amp;|lt;|gt;)", r"&\1", raw.replace("\\", " "))
    return " ".join(html.unescape(text).split())


def _ag_news(folder: Path) -> list[Row]:
    with (folder / "test.csv").open(encoding="utf-8", newline="") as f:
        return [(int(c) - 1, _ag_text(f"{title}. {desc}")) for c, title, desc in csv.reader(f)]


def _isear(folder: Path) -> list[Row]:
    names = TASKS["isear"].labels
    rows = []
    with (folder / "isear.csv").open(encoding="utf-8") as f:
        next(f)
        for line in f:
            parts = line.rstrip("\n").split("|")
            if len(parts) < 43:
                continue
            text = "|".join(parts[40:-2]).replace("á", " ").replace('\\"', '"').replace("\\", '"')
            text = " ".join(text.split())
            if parts[36] in names and text:
                rows.append((names.index(parts[36]), text))
    return rows


def _dedupe(rows: list[Row], exclude: Sequence[Row] = ()) -> list[Row]:
    """Rows with a text seen before (or in ``exclude``) removed, so no text is in both splits."""
    seen = {t for _, t in exclude}
    out = []
    for y, t in rows:
        if t not in seen:
            seen.add(t)
            out.append((y, t))
    return out


def _pool(rows: list[Row], n_cal_pool: int, seed: int) -> tuple[list[Row], list[Row]]:
    """Split one unsplit, label-sorted file into disjoint calibration and test pools (stratified)."""
    rows = _dedupe(rows)
    cal, test = stratified_split([y for y, _ in rows], n_cal_pool, seed)
    return [rows[i] for i in cal], [rows[i] for i in test]


def _read(name: str, folder: Path, seed: int) -> tuple[list[Row], list[Row], str]:
    if name == "sst2":
        return (_lines(folder / "stsa.binary.dev", "utf-8"), _lines(folder / "stsa.binary.test", "utf-8"),
                "cal = stsa.binary.dev, test = stsa.binary.test (official splits)")
    if name == "trec":
        test = _lines(folder / "TREC.test.all", "utf-8")
        return (_dedupe(_lines(folder / "TREC.train.all", "latin-1"), exclude=test), test,
                "cal = subset of TREC.train.all (questions also in the test file removed), test = TREC.test.all")
    readers: dict[str, Callable[[], list[Row]]] = {
        "rotten_tomatoes": lambda: _lines(folder / "rt-polarity.all", "latin-1"),
        "cr": lambda: _lines(folder / "custrev.all", "utf-8"),
        "ag_news": lambda: _ag_news(folder),
        "isear": lambda: _isear(folder),
    }
    rows = readers[name]()
    n_cal_pool = min(1000, len(rows) // 3)
    cal, test = _pool(rows, n_cal_pool, seed)
    return cal, test, f"no official split: exact duplicates removed, seeded stratified split (seed {seed}), " \
                      f"{len(cal)} cal pool / {len(test)} test pool"


def load_task(name: str, data_dir: str | Path = DEFAULT_DATA, *, n_cal: int | None = None,
              n_test: int | None = None, seed: int = 0, prompts: str = "tuned") -> TaskData:
    """Load one task's calibration and test splits.

    Args:
        name: a key of :data:`TASKS`.
        data_dir: the data folder (with one sub-folder per dataset, as in its README).
        n_cal: calibration examples (a stratified seeded subset; None = the whole calibration pool).
        n_test: test examples (likewise).
        seed: seed of every shuffle and split.
        prompts: the prompt set, ``tuned`` or ``plain`` (the same examples and splits either way).

    Raises:
        ConfigError: unknown task or prompt set, or its files are missing or unreadable.
    """
    if name not in TASKS:
        raise ConfigError(f"unknown task {name!r}; choose from {sorted(TASKS)}")
    if prompts not in PROMPT_SETS:
        raise ConfigError(f"unknown prompt set {prompts!r}; choose from {list(PROMPT_SETS)}")
    task = TASKS[name]
    folder = Path(data_dir) / name
    try:
        cal_rows, test_rows, source = _read(name, folder, seed)
    except (OSError, ValueError, UnicodeDecodeError, StopIteration, csv.Error) as exc:
        raise ConfigError(f"cannot read task {name!r} from {folder}: {exc}") from exc
    cal = [task.example(f"{name}/cal/{i}", y, t, prompts)
           for i, (y, t) in enumerate(stratified_sample(cal_rows, n_cal, seed))]
    test = [task.example(f"{name}/test/{i}", y, t, prompts)
            for i, (y, t) in enumerate(stratified_sample(test_rows, n_test, seed + 1))]
    return TaskData(task, cal, test, source)


def load_pool(name: str, data_dir: str | Path = DEFAULT_DATA, *, n: int | None = None, n_cal: int | None = None,
              n_test: int | None = None, seed: int = 0, prompts: str = "tuned") -> list[dict[str, Any]]:
    """The task's examples that :func:`load_task` with the same arguments leaves unused: unlabeled traffic.

    Both pools' rows outside the calibration and test splits, without a text that is in either split or seen
    before, in a seeded random order (``random.Random(seed + 2)``), so the first ``n`` of a larger pool are the
    pool of ``n``. Their labels are kept (``answer``, ``label``) for checks; a label-free fit must not read them.

    Args:
        name, data_dir, n_cal, n_test, seed, prompts: as for :func:`load_task`.
        n: examples to return (None or more than there are: all of them).

    Raises:
        ConfigError: as :func:`load_task`.
    """
    task = TASKS.get(name)
    if task is None:
        raise ConfigError(f"unknown task {name!r}; choose from {sorted(TASKS)}")
    if prompts not in PROMPT_SETS:
        raise ConfigError(f"unknown prompt set {prompts!r}; choose from {list(PROMPT_SETS)}")
    folder = Path(data_dir) / name
    try:
        cal_rows, test_rows, _ = _read(name, folder, seed)
    except (OSError, ValueError, UnicodeDecodeError, StopIteration, csv.Error) as exc:
        raise ConfigError(f"cannot read task {name!r} from {folder}: {exc}") from exc
    unused, used = [], []
    for rows, k, sd in ((cal_rows, n_cal, seed), (test_rows, n_test, seed + 1)):
        first, rest = stratified_split([y for y, _ in rows], len(rows) if k is None else min(k, len(rows)), sd)
        used += [rows[i] for i in first]
        unused += [rows[i] for i in sorted(rest)]
    pool = _dedupe(unused, exclude=used)
    random.Random(seed + 2).shuffle(pool)
    return [task.example(f"{name}/pool/{i}", y, t, prompts) for i, (y, t) in enumerate(pool[:n])]


def dump_examples(examples: Sequence[Mapping[str, Any]], path: str | Path) -> None:
    """Write examples as JSONL (for inspection and for ``cascade-calibrate``)."""
    with Path(path).open("w", encoding="utf-8") as f:
        for ex in examples:
            f.write(json.dumps(ex, ensure_ascii=False) + "\n")
