"""meta.json as the recorder writes it (its first version, the counts it refreshes, the
first non-finite values, errors); ``MetaWriting`` is a mixin of ``Recorder``.

Only rank 0 writes meta.json. While the run is open, a reserve on disk keeps room for its last
version, so a disk that fills up still gets the run's final status.
"""

from __future__ import annotations

import time
import traceback
from typing import Any

from torch import nn

from ..errors import HintedError, RunWriteError, warn
from ..probes.kernels import host_kernels
from ..store import new_meta, save_meta
from ..store.layout import META_FILE
from .config import RecorderConfig
from .distributed import distributed_info
from .distributed import world_size as _world_size
from .module_table import module_table, parameter_table


def error_entry(error: BaseException) -> dict[str, Any]:
    """The ``error`` entry of meta.json for a run that ended with ``error``; an error that
    carries a hint (``HintedError``) keeps it apart, as ``hint``, for the rule that quotes
    the error to give as its remedy."""
    hint = getattr(error, "hint", "") if isinstance(error, HintedError) else ""
    entry = {
        "type": type(error).__name__,
        "message": error.message if hint else str(error),
        "traceback": traceback_lines(error),
        "time": round(time.time(), 6),  # which rank failed first (store/rank_errors.py)
    }
    return {**entry, "hint": hint} if hint else entry


#: The frames of the traceback meta.json keeps: the innermost ones, where the error was made.
TRACEBACK_FRAMES = 12


def traceback_lines(error: BaseException) -> list[str]:
    """The last TRACEBACK_FRAMES frames of the exception that began it all (the end of its
    ``__cause__`` chain: the user's own error, where stabscope wrapped it in one of its own),
    then the line that names ``error`` when that is another exception."""
    root = error
    while root.__cause__ is not None and root.__cause__ is not root:
        root = root.__cause__
    lines = traceback.format_exception(type(root), root, root.__traceback__, chain=False)
    if len(lines) > 2:  # header, frames, line; one never raised is its line alone
        lines = lines[:1] + lines[1:-1][-TRACEBACK_FRAMES:] + lines[-1:]
    if root is not error:
        lines += traceback.format_exception_only(type(error), error)
    return lines


def initial_meta(
    model: nn.Module,
    cfg: RecorderConfig,
    run_info: dict[str, Any] | None,
    rank: int,
    modules: list[tuple[str, nn.Module]],
    params: list[tuple[str, nn.Parameter]],
) -> dict[str, Any]:
    """meta.json before the first step: the config, the model's tables, zero counts."""
    return new_meta(
        config=cfg.to_dict(),
        run=run_info or {},
        rank=rank,
        world_size=_world_size(),
        distributed=distributed_info(model, list(model.parameters())),
        model_type=type(model).__name__,
        modules=module_table(modules),
        parameters=parameter_table(params),
        parts=0,
        rows=0,
        steps=0,
        recorded_steps=0,
        first_nonfinite={},
        hooks_never_fired={},
        structure=None,
        notes=[],
        error=None,
    )


#: How the flight recorder named a forward non-finite without seeing the leaf make it.
_BLOCK_ONLY = ("parameters", "block")


def _block_of(noted: dict[str, Any]) -> str:
    """The watched module where the flight recorder saw a non-finite value first."""
    return str(noted.get("block", noted["module"]))


def _sharper(direction: str, noted: dict[str, Any], entry: dict[str, Any]) -> bool:
    """Whether ``entry``, from a recorded step's probes, names the first forward non-finite
    more exactly than ``noted``, the flight recorder's answer for the same step: a leaf
    inside the block that the recorder could only name by its parameters or as a whole."""
    block = _block_of(noted)
    return (
        direction == "forward"
        and noted.get("found_by") in _BLOCK_ONLY
        and noted["step"] == entry["step"]
        and "found_by" not in entry
        and str(entry["module"]).startswith(block + ".")
    )


class MetaWriting:
    """Refreshing and saving the recorder's meta.json."""

    def _note_nonfinite(
        self,
        direction: str,
        code: int,
        call: int,
        step: int | None = None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        """The first module with a NaN/Inf in ``direction``: from a recorded step's sync (the
        step being written), or from the flight recorder (its own ``step``, and ``extra``:
        the watched module where it showed and how the leaf was found)."""
        entry = {
            "step": self.rows.step if step is None else step,
            "module": self.writer.modules.names[code],
            "call": call,
            **(extra or {}),
        }
        noted = self.first_nonfinite.get(direction)
        if noted is None:
            self.first_nonfinite[direction] = entry
            self.meta["first_nonfinite"] = self.first_nonfinite
            self._save_meta()
            self._trigger_verdicts()
        elif _sharper(direction, noted, entry):
            # A recorded step saw every module's output: where the flight recorder could only
            # name the block (a NaN its replay did not make again), this names the leaf.
            self.first_nonfinite[direction] = {
                **entry,
                "block": _block_of(noted),
                "found_by": "recorded step",
            }
            self._save_meta()

    def _on_write_error(self, err: RunWriteError) -> None:
        """A part or meta.json could not be written while the run trains: say so once. The
        error never reaches the training loop (a full disk must not end the user's run);
        ``close`` marks the run ``failed`` if rows were lost, ``complete`` otherwise."""
        if self._write_warned:
            return
        self._write_warned = True
        warn(
            f"writing the run {self.run_dir} failed at step {self.step_index} "
            f"({err.strerror or err}: {err.filename}); training goes on, stabscope keeps up "
            f"to {self.writer.part_rows:,} rows in memory and tries again at each flush; if "
            "rows are lost the run will read `failed`",
            stacklevel=4,
        )

    def _save_meta(self) -> None:
        never = self.hooks.never_fired(self.writer.modules.names) if self._recorded_steps else {}
        # A fault in the boundary after a step's rows were flushed leaves step_index behind
        # that step: it trained, and its rows are on disk, so it counts as trained.
        self.meta["steps"] = max(self.meta.get("steps") or 0, self._recorded_through)
        self.meta.update(
            parts=self.writer.parts_written,
            rows=self.writer.rows_written,
            recorded_steps=self._recorded_steps,
            hooks_never_fired=never,
            sync_seconds=round(self._sync_seconds, 4),
            host_syncs=self.host_syncs,
            cpu_moments=host_kernels.status(),
        )
        errors = self.structure_probes.errors() if self.structure_probes is not None else []
        if errors:
            self.meta["probe_errors"] = errors
        for code, entry in zip(self._module_codes, self.meta["modules"]):
            entry["forward_order"] = self._forward_order.get(code)
            entry["output_dtype"] = self._output_dtypes.get(code)
            entry.update(self.hooks.counts(code))
        if self.rank == 0:
            try:
                save_meta(self.run_dir, self.meta)
            except RunWriteError as err:
                if self._closed:
                    raise
                # The disk is full while the run trains: training goes on, and meta.json is
                # written again at the next change (the reserve keeps room for the last one).
                self._on_write_error(err)
                return
        if self._reserve is not None and not self._closed:
            # Twice meta.json: its temporary copy and the old file coexist for a moment.
            self._reserve.ensure(2 * (self.run_dir / META_FILE).stat().st_size + 65536)
