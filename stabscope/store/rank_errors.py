"""How the ranks of a multi-rank run failed, where only rank 0 writes ``meta.json``.

When one rank raises, the others usually fail a moment later on their next collective
("Connection closed by peer") or are ended by torchrun's SIGTERM. Rank 0's own error is then
only the knock-on, and the cause would be lost: it was on another rank's console. So a rank
other than 0 that ends with an error writes ``error-rankR.json`` into the run directory
(atomically, before its process exits, so before the peers see it go), and whoever reads the
run's meta merges those files: ``rank_errors`` lists every rank's error in the order they
happened, and where another rank's failure came before rank 0's own error (or rank 0 had
none) it becomes the run's ``error`` and the run is ``failed``. A run rank 0 itself ended
first (Ctrl-C on every rank, the peers' knock-on errors after it) keeps rank 0's status.
The order is by each host's clock: ranks on different machines are ordered only as well as
their clocks agree. Rank 0 merges at its close too, so meta.json itself says
it; readers merge again, for a rank that failed after rank 0 had closed.

A fault of stabscope's own on another rank (record/tool_faults.py) stopped that rank's
recording while its training went on: the rank writes ``fault-rankR.json``, and where rank 0
kept none of its own, the earliest (by step) becomes the run's ``tool_error``, with its
``rank``, so the gate reads the run as incomplete. It does not make the run failed.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from .atomic import write_text_atomically
from .layout import RANK_ERROR_PREFIX, RANK_FAULT_PREFIX, rank_error_name, rank_fault_name

#: Statuses a failure on another rank turns into ``failed``: rank 0 ended, or was ended,
#: without a verdict of its own (a ``stopped`` run names the finding that stopped it).
_BECOMES_FAILED = frozenset({"complete", "interrupted", "failed"})


def write_rank_error(run_dir: Path, rank: int, status: str, error: dict[str, Any]) -> None:
    """Record how rank ``rank`` (> 0) ended: its status and its ``error`` entry (``type``,
    ``message``, ``traceback``, ``time``)."""
    _write(Path(run_dir) / rank_error_name(rank), {**error, "rank": rank, "status": status})


def write_rank_fault(run_dir: Path, rank: int, fault: dict[str, Any]) -> None:
    """Record that stabscope's own error stopped rank ``rank``'s (> 0) recording: the
    ``tool_error`` entry (``where``, ``step``, ``type``, ``message``, ``traceback``)."""
    _write(Path(run_dir) / rank_fault_name(rank), {**fault, "rank": rank})


def _write(path: Path, document: dict[str, Any]) -> None:
    text = json.dumps(document, indent=1, allow_nan=False, default=str)
    write_text_atomically(path, text + "\n")


def read_rank_errors(run_dir: Path, prefix: str = RANK_ERROR_PREFIX) -> list[dict[str, Any]]:
    """The errors (or, with ``RANK_FAULT_PREFIX``, the tool faults) other ranks wrote,
    unreadable files skipped (a rank killed mid-write leaves only a dot-file, which is not
    read)."""
    found = []
    for path in sorted(Path(run_dir).glob(f"{prefix}*.json")):
        try:
            entry = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(entry, dict) and isinstance(entry.get("rank"), int):
            found.append(entry)
    return found


def merge_rank_errors(meta: dict[str, Any], run_dir: Path) -> dict[str, Any]:
    """``meta`` with the other ranks' errors and tool faults merged in (a new dict), or
    ``meta`` itself when no other rank wrote one."""
    meta = _merge_rank_faults(meta, run_dir)
    others = read_rank_errors(run_dir)
    if not others:
        return meta
    own = meta.get("error")
    errors = [e for e in (meta.get("rank_errors") or []) if isinstance(e, dict)]
    known = {(e.get("rank"), e.get("time")) for e in errors}
    if isinstance(own, dict) and not errors:
        errors.append({**own, "rank": own.get("rank", meta.get("rank", 0))})
    errors += [e for e in others if (e.get("rank"), e.get("time")) not in known]
    errors.sort(key=_time)
    merged = {**meta, "rank_errors": errors}
    first = errors[0]
    if first.get("rank") != meta.get("rank", 0):  # another rank's failure came first
        merged["error"] = first
        if merged.get("status") in _BECOMES_FAILED:
            merged["status"] = "failed"
    return merged


def _merge_rank_faults(meta: dict[str, Any], run_dir: Path) -> dict[str, Any]:
    """``meta`` with the earliest other rank's tool fault as its ``tool_error`` where rank 0
    kept none; ``meta`` itself otherwise."""
    if meta.get("tool_error") is not None:
        return meta
    faults = [f for f in read_rank_errors(run_dir, RANK_FAULT_PREFIX) if "step" in f]
    if not faults:
        return meta
    first = min(faults, key=lambda f: (_number(f.get("step")), f["rank"]))
    return {**meta, "tool_error": first}


def _number(value: Any) -> float:
    """``value`` as a float to order by; one that is missing or no finite number goes last."""
    return float(value) if isinstance(value, int | float) and math.isfinite(value) else math.inf


def _time(entry: dict[str, Any]) -> float:
    """When the error happened (seconds since the epoch); an entry without one goes last."""
    return _number(entry.get("time"))
