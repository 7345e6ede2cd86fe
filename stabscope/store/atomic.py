"""Crash-safe file replacement: write to a dot-file, fsync, rename, fsync the directory.

A reader never sees a half-written file: either the old content or the new one. Dot-files
are ignored by every reader of the run format, so a leftover temporary file is harmless.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path


def fsync_dir(directory: Path) -> None:
    """Make a rename inside ``directory`` durable (no-op where directories cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomically(target: Path, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp_path)``, fsync the result and rename it onto ``target``."""
    tmp = target.with_name(f".{target.name}.tmp")
    write(tmp)
    with open(tmp, "rb+") as handle:
        os.fsync(handle.fileno())
    os.replace(tmp, target)
    fsync_dir(target.parent)


def write_text_atomically(target: Path, text: str) -> None:
    """Atomic replacement of a small text file such as ``meta.json``."""
    write_atomically(target, lambda tmp: tmp.write_text(text, encoding="utf-8"))
