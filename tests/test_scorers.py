"""Answer scorers of the calibration CLI: hand cases for every built-in, and user scorers that fail to import."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from cascade.errors import InvalidRequestError
from cascade.scorers import extract_choice, get_scorer, last_number


@pytest.mark.parametrize(("answer", "gold", "expected"), [
    ("The answer is no.", "no", True),
    ("I cannot say", "no", False),  # a word inside another word is not the answer
    ("I do not know", "no", False),
    ("42 apples", "4", False),
    ("it is 4.", "4", True),
    ("Paris, France", "paris", True),
    ("", "no", False),
])
def test_contains_matches_whole_words(answer: str, gold: str, expected: bool) -> None:
    assert get_scorer("contains")(answer, {"answer": gold}) is expected


def test_exact_choice_and_numeric_hand_cases() -> None:
    assert get_scorer("exact")("  Positive. ", {"answer": "positive"})
    assert not get_scorer("exact")("positive review", {"answer": "positive"})
    choices = ["negative", "positive"]
    assert extract_choice("The review is negative, not positive", choices) == "negative"
    assert extract_choice("nonnegative", choices) is None
    assert get_scorer("choice")("Positive!", {"answer": "positive", "choices": choices})
    assert last_number("3 apples, then 1,234.5 pears") == 1234.5 and last_number("none") is None
    assert get_scorer("numeric")("so the total is $18.", {"answer": "Janet sells ... #### 18"})
    assert not get_scorer("numeric")("so the total is 19", {"answer": "#### 18"})


def test_user_scorers_that_cannot_be_imported_are_typed_errors(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "raises_on_import.py").write_text("raise RuntimeError('boom')\n")
    (tmp_path / "bad_syntax.py").write_text("def f(:\n")
    (tmp_path / "fine.py").write_text("def f(answer, example):\n    return True\nnot_callable = 3\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    for name, message in [(":f", "cannot import"), ("raises_on_import:f", "RuntimeError: boom"),
                          ("bad_syntax:f", "SyntaxError"), ("fine:g", "AttributeError"),
                          ("no_such_module_xyz:f", "ModuleNotFoundError"), ("fine:not_callable", "not callable"),
                          ("nope", "unknown scorer")]:
        with pytest.raises(InvalidRequestError, match=message):
            get_scorer(name)
    assert get_scorer("fine:f")("x", {}) is True
    for mod in ("raises_on_import", "bad_syntax", "fine"):
        sys.modules.pop(mod, None)
