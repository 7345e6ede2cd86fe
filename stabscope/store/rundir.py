"""A run directory's life as writers and readers see it.

Writers: ``prepare_run_dir`` creates the directory and takes its lock (``lock.py``) before
anything is built or trained, refuses a directory that holds a run (unless ``force``) or
that a live writer holds (always), and refuses a directory inside another run.

Readers: ``run_state`` turns meta.json's ``status`` and the lock into what is known about
the run: ``complete``, ``failed``, ``interrupted``, ``stopped`` (a finding stopped it while
it trained), ``running`` (its writer is alive),
``killed`` (status ``running`` and no live writer) or ``unfinished`` (status ``running``,
written on another host, no lock to tell). ``refuse_output_in_run`` keeps outputs (a report,
JUnit XML, a prediction) from landing inside a run directory. No torch import here.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import NestedRunError, RunExistsError, RunLockedError, UsageError
from ..wording import counted
from . import lock as locks
from .findings import shown_module
from .layout import (
    FINDINGS_FILE,
    META_FILE,
    PART_PREFIX,
    PART_SUFFIX,
    PARTS_DIR,
    PREDICTION_FILE,
    RANK_ERROR_PREFIX,
    RANK_FAULT_PREFIX,
    RESERVE_FILE,
)
from .run_meta import RunMeta

PathLike = str | os.PathLike[str]


def is_run_dir(path: Path) -> bool:
    """Whether ``path`` is a stabscope run: a meta.json of the run format, or parts."""
    meta = path / META_FILE
    if meta.is_file():
        with contextlib.suppress(OSError, ValueError):
            doc = json.loads(meta.read_text(encoding="utf-8"))
            if isinstance(doc, dict) and "schema_version" in doc:
                return True
    parts = path / PARTS_DIR
    return parts.is_dir() and next(parts.glob(f"{PART_PREFIX}*{PART_SUFFIX}"), None) is not None


def enclosing_run(path: PathLike, include_self: bool = True) -> Path | None:
    """The run directory that ``path`` is (with ``include_self``) or lies inside, if any."""
    resolved = Path(os.path.realpath(path))
    candidates = [resolved, *resolved.parents] if include_self else list(resolved.parents)
    return next((p for p in candidates if p.is_dir() and is_run_dir(p)), None)


def refuse_output_in_run(path: PathLike, option: str, own: str | None = None) -> None:
    """``UsageError`` when the output ``path`` would land inside a run directory; ``own`` is
    the one file of a run's top level that this output is (``predict --out RUN/prediction.json``
    gives a recorded run the prediction its rule compares against)."""
    run = enclosing_run(path)
    resolved = Path(os.path.realpath(path))
    if run is not None and own is not None and resolved == run / own:
        return
    if run is not None:
        raise UsageError(
            f"{option} {path} is inside the run directory {run}; writing there could destroy "
            "the run",
            hint=f"write {option} outside the run, e.g. {option} {run.name}-{Path(path).name}",
        )


def _who(run_dir: Path) -> str:
    with contextlib.suppress(OSError, ValueError):
        meta = json.loads((run_dir / META_FILE).read_text(encoding="utf-8"))
        return f" (pid {meta.get('pid')} on {meta.get('host')})"
    return ""


def lock_run_dir(out: PathLike) -> locks.RunLock | None:
    """Lock the existing directory ``out`` for this process without touching what it holds;
    ``RunLockedError`` while a live writer holds it. None where there are no locks."""
    path = Path(out)
    try:
        return locks.claim(path)
    except locks.LockHeld:
        raise RunLockedError(f"{path} is being written by another run{_who(path)}") from None


def prepare_run_dir(out: PathLike, force: bool) -> Path:
    """Create ``out`` for a new run and lock it for this process; refuse to overwrite an
    existing run unless ``force``, and a run a live writer holds in any case. Nothing of an
    existing run is touched when it is refused. The lock is released by the Recorder that
    adopts it, or by ``release_run_dir``."""
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise UsageError(f"{path} is a file, not a directory", hint="give the run a directory path")
    outer = enclosing_run(path, include_self=False)
    if outer is not None:
        raise NestedRunError(f"{path} is inside the run directory {outer}")
    path.mkdir(parents=True, exist_ok=True)
    lock = lock_run_dir(path)
    try:
        if (path / META_FILE).exists() or (path / PARTS_DIR).exists():
            if not force:
                raise RunExistsError(f"{path} already holds a run")
            replace_run(path)
        if not os.access(path, os.W_OK):
            raise PermissionError(f"{path} is not writable")
    except BaseException:
        if lock is not None:
            locks.release(path)
        raise
    return path


def _is_run_file(name: str) -> bool:
    """A part, or a part's temporary name while it is written (``.part-NNNNNN.parquet.tmp``,
    left behind by a killed writer)."""
    stem = name[1:].removesuffix(".tmp") if name.startswith(".") else name
    return stem.startswith(PART_PREFIX) and stem.endswith(PART_SUFFIX)


def replace_run(path: Path) -> None:
    """Remove the run in ``path`` for ``force``: its meta.json, parts and the files that spoke
    of it (findings, prediction). A parts/ folder that holds anything the writer does not make
    is someone else's folder: refused whole, before anything is removed."""
    parts = path / PARTS_DIR
    if parts.is_dir():
        foreign = sorted(p.name for p in parts.iterdir() if not _is_run_file(p.name))
        if foreign:
            raise RunExistsError(
                f"{parts} holds files stabscope did not write ({', '.join(foreign[:3])})",
                hint="force replaces only a run; move those files, or choose another output",
            )
    elif parts.exists():  # a file named parts
        raise RunExistsError(
            f"{parts} is not a folder of parts",
            hint="force replaces only a run; move it, or choose another output",
        )
    for name in (META_FILE, RESERVE_FILE, FINDINGS_FILE, PREDICTION_FILE):
        (path / name).unlink(missing_ok=True)  # RESERVE_FILE: left by a killed run
    for prefix in (RANK_ERROR_PREFIX, RANK_FAULT_PREFIX):  # the old run's ranks' errors
        for stale in path.glob(f"{prefix}*.json"):
            stale.unlink(missing_ok=True)
    shutil.rmtree(parts, ignore_errors=True)


def drop_empty_parts(run_dir: Path) -> None:
    """A model script refused before its first step (--include matching nothing) leaves the
    empty parts/ the recorder made; without meta.json it would still count as a run that
    needs --force. Only an empty parts/ in a run without meta.json is removed."""
    parts = run_dir / PARTS_DIR
    if not (run_dir / META_FILE).exists() and parts.is_dir() and not any(parts.iterdir()):
        parts.rmdir()


def run_dir_error(error: OSError, run_dir: PathLike) -> UsageError:
    """The one-line error for the CLI when ``prepare_run_dir`` refused ``run_dir``."""
    if isinstance(error, RunLockedError):
        return UsageError(
            f"{error.message}; --force never replaces a run that is being written",
            hint="wait for it to end, or choose another --out",
        )
    if isinstance(error, RunExistsError) and error.hint:  # worded where it was raised
        return UsageError(error.message, hint=error.hint)
    if isinstance(error, RunExistsError):
        return UsageError(
            f"{run_dir} already holds a run",
            hint="pass --force to overwrite it, or choose another --out",
        )
    if isinstance(error, NestedRunError):
        return UsageError(str(error), hint="choose an --out outside every run directory")
    return UsageError(
        f"cannot write to {run_dir}: {error.strerror or error}",
        hint="choose a writable --out directory",
    )


def keyword_hint(error: RunExistsError) -> RunExistsError:
    """``prepare_run_dir``'s refusal as the Recorder (and the Lightning and HF callbacks over
    it) raise it: the same type, one line, with the hint in the words of its keywords."""
    if error.hint:  # worded already
        return error
    if isinstance(error, RunLockedError):
        hint = "force=True never replaces a run that is being written: wait for it to end, "
        return RunLockedError(error.message, hint=hint + "or choose another out directory")
    hint = "pass force=True to overwrite it, or choose another out directory"
    return RunExistsError(error.message, hint=hint)


def release_run_dir(out: PathLike) -> None:
    """Let go of this process's claim on ``out`` if no Recorder adopted it (a command that
    prepared a directory and ended before, or without, recording)."""
    locks.release(Path(out))


@dataclass(frozen=True)
class RunState:
    """What is known about how a run ended, or whether it is still being written."""

    # complete, failed, interrupted, stopped, running, killed, unfinished (or meta's own)
    status: str
    detail: str  # one line for people

    @property
    def incomplete(self) -> bool:
        """Ended before its training did, or never closed."""
        return self.status in ("interrupted", "killed", "unfinished")


def stopped_detail(meta: RunMeta) -> str:
    """One line on a stopped run: where, and the finding that stopped it."""
    by = meta.stopped_by or {}
    shown = shown_module(by.get("module"))
    where = f" ({shown})" if shown else ""
    return (
        f"stopped after step {meta.steps - 1} by rule {by.get('rule', '?')}{where}: "
        f"{by.get('message', 'no finding saved')}"
    )


def run_state(run_dir: PathLike, meta: Mapping[str, Any], reread: bool = True) -> RunState:
    """``meta``'s status, with a ``running`` run told apart: ``running`` while a process
    holds its lock (or, without a lock file, while its pid lives on this host), ``killed``
    when none does on this host, ``unfinished`` when that cannot be seen from here."""
    run_dir = Path(run_dir)
    meta = RunMeta.of(meta)
    status = meta.status
    if status == "interrupted":
        by = meta.interrupted_by or "a signal"
        # Steps taken, as the script's own log counts them; the schedule's full probes read
        # only some of them (every step has the every-step tier's rows).
        return RunState(
            status,
            f"interrupted by {by} after {counted(meta.steps_taken, 'step')} "
            f"({meta.recorded_steps} of them with the full probes)",
        )
    if status == "stopped":
        return RunState(status, stopped_detail(meta))
    if status != "running":
        return RunState(status, status)
    pid, host = meta.pid, meta.host
    alive = locks.writer_alive(run_dir)
    here = host == platform.node()
    if alive is None and here:
        alive = locks.pid_alive(pid)
    if alive:
        return RunState("running", f"still running (pid {pid} on {host})")
    if reread:  # it may have closed while we looked
        with contextlib.suppress(OSError, ValueError):
            fresh = json.loads((run_dir / META_FILE).read_text(encoding="utf-8"))
            if isinstance(fresh, dict) and fresh.get("status") != "running":
                return run_state(run_dir, fresh, reread=False)
    if here and alive is False:
        return RunState(
            "killed",
            f"killed: status running, but its writer (pid {pid} on this host) is gone",
        )
    return RunState(
        "unfinished",
        f"not finished: status running, written on {host} (pid {pid}), and no live writer "
        "can be seen from here",
    )


__all__ = [
    "NestedRunError",
    "RunExistsError",
    "RunLockedError",
    "RunState",
    "drop_empty_parts",
    "enclosing_run",
    "is_run_dir",
    "keyword_hint",
    "lock_run_dir",
    "prepare_run_dir",
    "refuse_output_in_run",
    "release_run_dir",
    "run_dir_error",
    "run_state",
]
