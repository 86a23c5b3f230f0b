"""Atomic file writes: a reader sees the old or the new content of a file, never a mix or a cut-off file.

The content is written to a temporary file in the same folder (``.<name>.tmp-<random>``, so that the rename stays on
one file system), flushed to disk (``fsync``) and renamed over the target with ``os.replace``; on failure the
temporary file is removed and the target is left as it was.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable
from pathlib import Path

TMP_INFIX = ".tmp-"  # temporary files are ".<name>.tmp-<hex>"


def temp_path(path: str | os.PathLike[str]) -> Path:
    """A fresh temporary path next to ``path`` (``.<name>.tmp-<hex>``)."""
    path = Path(path)
    return path.with_name(f".{path.name}{TMP_INFIX}{uuid.uuid4().hex}")


def fsync_path(path: str | os.PathLike[str]) -> None:
    """Flush a file or a folder (its entries) to disk, so a rename never exposes data still in memory only."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike[str], write: Callable[[Path], object], mode: int | None = None) -> Path:
    """Write ``path`` atomically: ``write(tmp)`` writes the content to a temporary path next to it, which is then
    flushed and renamed over ``path``.

    Args:
        path: The target file; its folder is created when missing.
        write: Writes the whole content to the path it is given.
        mode: Permission bits for the new file (e.g. ``0o600``), given to the temporary file when it is created.

    Returns:
        ``path``. On any failure the temporary file is removed and the exception passes on.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    try:
        if mode is not None:  # created with its final permissions: never readable by others, not even briefly
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode))
        write(tmp)
        fsync_path(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def atomic_write_text(path: str | os.PathLike[str], text: str, mode: int | None = None) -> Path:
    """:func:`atomic_write` of a text (UTF-8)."""
    return atomic_write(path, lambda p: p.write_text(text, encoding="utf-8"), mode)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes, mode: int | None = None) -> Path:
    """:func:`atomic_write` of bytes."""
    return atomic_write(path, lambda p: p.write_bytes(data), mode)
