"""Streaming writer for the long table: buffers rows in numpy chunks, rolls Parquet parts.

Memory is bounded by ``part_rows``: once the buffer holds that many rows, or the flush
interval has passed since the last part, the buffer becomes one part file on disk. The
interval starts at one second and doubles after each part up to ``flush_seconds``, so the
first rows of a run are on disk within seconds and a long run still writes few parts. A
killed process therefore loses at most the rows that were not yet in a part.

A part that cannot be written (a full disk) leaves no file behind, its rows stay buffered
and counted nowhere, and the error goes on to the caller; ``parts_written`` and
``rows_written`` count only parts that are on disk. A writer that keeps going
(``keep_going``, the Recorder's: a full disk must not end the user's training) keeps the
error in ``write_error`` instead, tells ``on_write_error`` once, and tries again at each
later flush; while it cannot write, it buffers up to ``part_rows`` rows and lets go of the
rest (``rows_dropped``), so its memory stays bounded.

``unwritten()`` hands the rows not yet in a part to a reader in memory (``store.memory``:
the online rules read them without waiting for a part).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from ..errors import RunWriteError
from .atomic import write_atomically
from .interrupts import deferred
from .layout import PARTS_DIR, part_name
from .memory import PART_BLOCK, Chunk, Unwritten, part_number, rows_table
from .schema import PARQUET_OPTIONS

#: The flush interval of a new writer; it doubles after each part up to ``flush_seconds``.
FIRST_FLUSH_SECONDS = 1.0


class Interner:
    """Maps strings to stable small integer codes (the dictionary of a string column)."""

    def __init__(self) -> None:
        self.codes: dict[str, int] = {}
        self.names: list[str] = []

    def __call__(self, name: str) -> int:
        code = self.codes.get(name)
        if code is None:
            code = self.codes[name] = len(self.names)
            self.names.append(name)
        return code


class PartWriter:
    """Appends rows and writes them as crash-safe Parquet parts under ``run_dir/parts``."""

    def __init__(
        self,
        run_dir: Path,
        rank: int = 0,
        part_rows: int = 1_000_000,
        flush_seconds: float = 30.0,
        keep_going: bool = False,
    ) -> None:
        self.parts_dir = Path(run_dir) / PARTS_DIR
        self.parts_dir.mkdir(parents=True, exist_ok=True)
        self.rank = rank
        self.part_rows = part_rows
        self.flush_seconds = flush_seconds
        self.phases = Interner()
        self.modules = Interner()
        self.metrics = Interner()
        self.parts_written = 0
        self.rows_written = 0
        self.rows_appended = 0  # rows handed to the writer, on disk or buffered
        self.keep_going = keep_going
        self.write_error: RunWriteError | None = None  # the first part that could not be written
        self.on_write_error: Callable[[RunWriteError], None] | None = None
        self.rows_dropped = 0  # rows let go while no part could be written (keep_going)
        self.last_step_written = -1
        self._chunks: list[Chunk] = []
        self._buffered = 0
        self._last_flush = time.monotonic()
        self._interval = min(FIRST_FLUSH_SECONDS, flush_seconds)
        self._next_part = self._first_free_part_number()

    def _first_free_part_number(self) -> int:
        # Each rank numbers its parts in its own block so that ranks never write the same file.
        base = self.rank * PART_BLOCK
        numbers = (part_number(p) for p in self.parts_dir.glob("part-*.parquet"))
        taken = [n for n in numbers if n is not None and base <= n < base + PART_BLOCK]
        return max(taken, default=base - 1) + 1

    def append(
        self,
        step: np.ndarray,
        phase: np.ndarray,
        module: np.ndarray,
        call: np.ndarray,
        metric: np.ndarray,
        index: np.ndarray,
        value: np.ndarray,
    ) -> None:
        """Buffer rows given as equal-length arrays; string columns as interned codes."""
        n = len(value)
        if n == 0:
            return
        if self.write_error is not None and self._buffered >= self.part_rows:
            self.rows_dropped += n  # the disk has had no room: memory stays bounded
            return
        self._chunks.append(
            (
                np.asarray(step, np.int32),
                np.asarray(phase, np.int32),
                np.asarray(module, np.int32),
                np.asarray(call, np.int16),
                np.asarray(metric, np.int32),
                np.asarray(index, np.int16),
                np.asarray(value, np.float32),
            )
        )
        self._buffered += n
        self.rows_appended += n
        if (
            self._buffered >= self.part_rows
            or time.monotonic() - self._last_flush >= self._interval
        ):
            self.flush()

    @property
    def buffered_rows(self) -> int:
        return self._buffered

    @property
    def names(self) -> tuple[Interner, Interner, Interner]:
        """The phase, module and metric names of the codes."""
        return self.phases, self.modules, self.metrics

    def unwritten(self, more: tuple[Chunk, ...] = ()) -> Unwritten:
        """The buffered rows and ``more`` (chunks of the same codes), as a reader in memory
        sees them, and which of this writer's parts hold none of them (those written so
        far). O(chunks): nothing is copied (a chunk is never changed once appended)."""
        block = self.rank * PART_BLOCK
        return Unwritten((*self._chunks, *more), self.rank, self.names, self._next_part, block)

    def flush(self) -> Path | None:
        """Write the buffered rows as one part; returns its path, or None when empty."""
        self._last_flush = time.monotonic()
        self._interval = min(2 * self._interval, self.flush_seconds)
        if not self._buffered:
            return None
        with deferred():  # a signal waits until the part is written and counted
            try:
                return self._write_part()
            except RunWriteError as err:
                if not self.keep_going:
                    raise
                if self.write_error is None:
                    self.write_error = err
                    if self.on_write_error is not None:
                        self.on_write_error(err)
                return None  # the rows stay buffered: the next flush tries again

    @property
    def lost_rows(self) -> int:
        """Rows handed to this writer that are not on disk: buffered ones and dropped ones."""
        return self._buffered + self.rows_dropped

    def _write_part(self) -> Path:
        cols = [np.concatenate(c) for c in zip(*self._chunks)]
        step, value = cols[0], cols[-1]
        n = len(value)
        table = rows_table(cols, self.rank, self.names)
        target = self.parts_dir / part_name(self._next_part)
        write_atomically(target, lambda tmp: pq.write_table(table, tmp, **PARQUET_OPTIONS))
        self._next_part += 1
        self.parts_written += 1
        self.rows_written += n
        self.last_step_written = max(self.last_step_written, int(step.max()))
        self._chunks.clear()
        self._buffered = 0
        return target
