"""One writer per run directory: an exclusive ``flock`` on ``RUN/.lock`` for the run's life.

The process that prepares a run directory takes the lock and keeps it until the run is
closed; a second writer on the same directory, or ``--force`` against it, is refused while
the lock is held. The kernel drops the lock when its holder dies, however it dies, so a
reader tells a live run from a killed one by whether anyone holds the lock (``writer_alive``).

- A lock file is never trusted by its name: the holder unlinks it when it lets go, so a
  process that locked a file which is no longer the one at ``RUN/.lock`` tries again.
- Within one process the lock is *claimed* by whoever prepares the directory (the CLI, before
  it builds the model) and *adopted* by the Recorder that writes the run; a second Recorder on
  a directory this process is already writing is refused like another process would be.
- Under torch.distributed rank 0 holds the lock for every rank (the others write their parts
  into the directory rank 0 prepared).
- Where ``fcntl`` or ``flock`` is missing (Windows, some network filesystems) a run is
  written without a lock, and readers fall back to the writer's pid on its own host.

No torch import here.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import platform
import time
from pathlib import Path
from typing import Any

from .layout import LOCK_FILE

try:
    import fcntl
except ImportError:  # pragma: no cover (Windows)
    fcntl = None  # type: ignore[assignment]


#: A reader's probe holds a shared lock for microseconds: a writer retries this long before
#: it concludes that another writer holds the directory.
_RETRY_SECONDS = 0.3


class RunLock:
    """This process's lock on one run directory."""

    def __init__(self, run_dir: Path, fd: int) -> None:
        self.run_dir = run_dir
        self.fd = fd
        self.writer: object | None = None  # the open Recorder writing the run, once adopted

    def release(self) -> None:
        """Unlink the lock file, then let go of the lock (in that order: see module doc)."""
        if self.fd < 0:
            return
        with contextlib.suppress(OSError):
            if os.stat(self.run_dir / LOCK_FILE).st_ino == os.fstat(self.fd).st_ino:
                os.unlink(self.run_dir / LOCK_FILE)
        with contextlib.suppress(OSError):
            fcntl.flock(self.fd, fcntl.LOCK_UN)  # also for forked children sharing the fd
        os.close(self.fd)
        self.fd = -1


class LockHeld(Exception):
    """Another process (or another open Recorder of this one) holds the lock."""


#: Locks this process holds, by resolved run directory.
_held: dict[Path, RunLock] = {}


def _key(run_dir: Path) -> Path:
    return Path(os.path.realpath(run_dir))


def _try_lock(run_dir: Path) -> RunLock | None:
    """The lock, or None where the filesystem has none; raises ``LockHeld``."""
    path = run_dir / LOCK_FILE
    deadline = time.monotonic() + _RETRY_SECONDS
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            if time.monotonic() > deadline:
                raise LockHeld(str(run_dir)) from None
            time.sleep(0.02)
            continue
        except OSError as err:  # ENOLCK, EOPNOTSUPP...: no locks on this filesystem
            os.close(fd)
            if err.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                return None
            raise
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if not same:  # its holder released it while we waited: take the new one
            os.close(fd)
            continue
        _describe(fd)
        return RunLock(run_dir, fd)


def _describe(fd: int) -> None:
    """Who holds the lock, for a person looking at the file (the lock itself is the flock)."""
    text = json.dumps({"pid": os.getpid(), "host": platform.node()}) + "\n"
    with contextlib.suppress(OSError):  # a full disk must not stop the run from starting
        os.ftruncate(fd, 0)
        os.write(fd, text.encode())


def claim(run_dir: Path) -> RunLock | None:
    """Lock ``run_dir`` (which exists) for this process, or return the claim it already has.

    Raises ``LockHeld`` while another process, or a Recorder of this one that is still open,
    holds it. Returns None where locks are not available."""
    key = _key(run_dir)
    lock = _held.get(key)
    if lock is not None:
        if lock.writer is not None:
            raise LockHeld(str(run_dir))
        return lock
    if fcntl is None:
        return None
    lock = _try_lock(run_dir)
    if lock is not None:
        _held[key] = lock
    return lock


def adopt(run_dir: Path, writer: object) -> RunLock | None:
    """Hand this process's claim on ``run_dir`` to ``writer`` (a Recorder), which releases it."""
    lock = _held.get(_key(run_dir))
    if lock is not None:
        lock.writer = writer
    return lock


def release(run_dir: Path, writer: object | None = None) -> None:
    """Let go of this process's lock on ``run_dir``: a claim nobody adopted, or the lock
    ``writer`` adopted. A lock another writer adopted is left alone."""
    key = _key(run_dir)
    lock = _held.get(key)
    if lock is not None and lock.writer is writer:
        del _held[key]
        lock.release()


def writer_alive(run_dir: Path) -> bool | None:
    """Whether a process holds ``run_dir``'s lock: True, False, or None when there is no lock
    file (a run closed normally, written without locks or copied without dot-files) or this
    filesystem has no locks. Probes with a shared lock, held for microseconds."""
    if fcntl is None:
        return None
    try:
        fd = os.open(Path(run_dir) / LOCK_FILE, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:
        return None
    finally:
        os.close(fd)  # also drops the shared lock
    return False


def pid_alive(pid: Any) -> bool | None:
    """Whether process ``pid`` exists on this host (None for a pid that is not one)."""
    if not isinstance(pid, int) or pid <= 0:
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError:
        return None
    return True


__all__ = ["LOCK_FILE", "LockHeld", "RunLock", "adopt", "claim", "pid_alive", "release"]
