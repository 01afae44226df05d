"""Atomic writes: the target is replaced whole or left untouched, and no temporary file is left behind."""

from __future__ import annotations

from pathlib import Path

import pytest

from cascade.atomic_files import replacing, write_text_atomic


def test_write_replaces_the_whole_file_and_leaves_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "a.json"
    target.write_text("old and longer", encoding="utf-8")
    assert write_text_atomic(target, "new", fsync=True) == target
    assert target.read_text(encoding="utf-8") == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json"]


def test_a_failed_write_keeps_the_old_target(tmp_path: Path) -> None:
    target = tmp_path / "a.bin"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError), replacing(target) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("disk full")
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.bin"]


def test_a_folder_is_moved_into_place_whole(tmp_path: Path) -> None:
    target = tmp_path / "model"
    with replacing(target, folder=True) as tmp:
        assert tmp.is_dir() and not any(tmp.iterdir())
        (tmp / "weights").write_text("w", encoding="utf-8")
    assert (target / "weights").read_text(encoding="utf-8") == "w"
    with pytest.raises(OSError), replacing(target, folder=True) as tmp:  # a non-empty target is not overwritten
        (tmp / "other").write_text("x", encoding="utf-8")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    assert sorted(p.name for p in target.iterdir()) == ["weights"]
