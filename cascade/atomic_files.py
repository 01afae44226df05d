"""Atomic file writes: a temporary file (or folder) beside the target, then one ``os.replace``.

A reader sees the old file or the new one, never a partial write; a failed write leaves no temporary file
behind and the old target untouched. Used by every writer of the package that others may read while it is
written: artifacts, fitted routers, reports, plots, the model cache.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["replacing", "write_text_atomic"]


@contextmanager
def replacing(target: str | os.PathLike[str], *, suffix: str = ".tmp", folder: bool = False) -> Iterator[Path]:
    """Yield a fresh temporary path beside ``target``; on a normal exit move it onto ``target`` atomically.

    Args:
        target: the file (or, with ``folder``, the folder) to write.
        suffix: the temporary file's suffix (some writers pick the format from it, e.g. ``.png``).
        folder: yield an empty temporary folder instead of a file.

    Raises:
        OSError: the temporary path cannot be made or the final rename fails (the target is then unchanged).
    """
    dest = Path(target)
    parent = dest.parent if str(dest.parent) else Path(".")
    if folder:
        tmp = Path(tempfile.mkdtemp(dir=parent, prefix=f".{dest.name}."))
    else:
        fd, name = tempfile.mkstemp(dir=parent, prefix=f".{dest.name}.", suffix=suffix)
        os.close(fd)
        tmp = Path(name)
    try:
        yield tmp
        os.replace(tmp, dest)
    finally:
        if folder:
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)


def write_text_atomic(target: str | os.PathLike[str], text: str, *, fsync: bool = False) -> Path:
    """Write ``text`` (UTF-8) to ``target`` atomically; with ``fsync`` the data is on disk before the rename.

    Raises:
        OSError: the file cannot be written (the target is then unchanged).
    """
    with replacing(target) as tmp, tmp.open("w", encoding="utf-8") as f:
        f.write(text)
        if fsync:
            f.flush()
            os.fsync(f.fileno())
    return Path(target)
