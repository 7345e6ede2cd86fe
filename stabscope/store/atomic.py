"""Crash-safe file replacement: write to a dot-file, fsync, rename, fsync the directory.

A reader never sees a half-written file: either the old content or the new one. A write
that fails (a full disk) removes its temporary file before the error goes on, and dot-files
are ignored by every reader of the run format in any case.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from pathlib import Path

from ..errors import RunWriteError
from .layout import RESERVE_FILE as RESERVE_FILE  # named in layout.py, used here


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


def write_atomically(target: Path, write: Callable[[Path], object]) -> None:
    """Call ``write(tmp_path)``, fsync the result and rename it onto ``target``."""
    tmp = target.with_name(f".{target.name}.tmp")
    try:
        write(tmp)
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    except BaseException as err:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if isinstance(err, OSError) and not isinstance(err, RunWriteError):
            raise RunWriteError(err.errno, err.strerror or str(err), str(target)) from err
        raise
    fsync_dir(target.parent)


def write_text_atomically(target: Path, text: str) -> None:
    """Atomic replacement of a small text file such as ``meta.json``."""
    write_atomically(target, lambda tmp: tmp.write_text(text, encoding="utf-8"))


class SpaceReserve:
    """Disk space a run sets aside while it is open (the dot-file ``RUN/.reserve``), given
    back just before its last meta.json: on a disk that filled up, the run can still say
    that it failed, and why. Best effort: a reserve that cannot grow stays as it is."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.size = 0

    def ensure(self, size: int) -> None:
        """Hold at least ``size`` bytes."""
        if size <= self.size:
            return
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT, 0o644)
        except OSError:
            return
        try:
            # Real blocks, not a sparse file: fallocate, else random bytes (zeros could be
            # compressed away by the filesystem).
            if hasattr(os, "posix_fallocate"):
                with contextlib.suppress(OSError):
                    os.posix_fallocate(fd, 0, size)
                    self.size = size
                    return
            os.pwrite(fd, os.urandom(size - self.size), self.size)
            self.size = size
        except OSError:
            pass
        finally:
            os.close(fd)

    def release(self) -> None:
        with contextlib.suppress(OSError):
            self.path.unlink()
        self.size = 0
