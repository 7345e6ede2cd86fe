"""The run of a script whose model was never found: a meta.json that says so, and no parts.

Not a Recorder of an empty module: its construction waits for every rank, and a rank that
found no model cannot count on the others getting here. So rank 0 alone writes the meta."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from ...record.config import RecorderConfig
from ...record.distributed import rank, world_size
from ...record.recorder import error_entry
from ...store import new_meta, save_meta
from ...store.interrupts import interrupting_signal, signal_name


def write_empty_run(
    out: Path,
    config: RecorderConfig,
    run_info: dict[str, Any],
    notes: list[str],
    status: str,
    error: BaseException | None,
    extra: dict[str, Any] | None = None,
) -> None:
    """Write ``out/meta.json`` for a run that recorded nothing (on rank 0 only); ``extra``:
    more meta.json entries (``tool_error``)."""
    if rank() != 0:
        return
    signum = interrupting_signal(error)
    interrupted = status == "interrupted" and signum is not None
    meta = new_meta(
        config=config.to_dict(),
        run=run_info,
        rank=0,
        world_size=world_size(),
        model_type=None,
        modules=[],
        parameters=[],
        parts=0,
        rows=0,
        steps=0,
        recorded_steps=0,
        notes=notes,
        status=status,
        finished=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        error=None if error is None else error_entry(error),
        **({"interrupted_by": signal_name(signum)} if interrupted else {}),
        **(extra or {}),
    )
    save_meta(out, meta)


__all__ = ["write_empty_run"]
