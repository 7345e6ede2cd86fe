"""Rows on the host that no part holds yet, read in memory.

The online rules (``rules.online``) judge a run while it trains. Between two parts the rows
that matter (the losses of every step, the last recorded step's statistics) wait in the
writer's buffer; a check reads them from here instead of waiting for a part, or writing one
per check, which would leave thousands of tiny parts. ``Unwritten`` is taken on the training
thread at a step boundary in O(chunks), without copying a row; its table is built by the
reader, off the training thread, with ``rows_table``, from which a part is written too.

A part that the writer writes after the snapshot holds rows that the snapshot holds too, so
a reader of both leaves those parts out (``hides``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import pyarrow as pa

from .layout import PART_PREFIX, PART_SUFFIX
from .schema import SCHEMA

#: Each rank numbers its parts in its own block, so that ranks never write the same file.
PART_BLOCK = 10_000_000

#: Rows as column arrays of equal length: step, phase, module, call, metric, index, value,
#: the string columns as codes of the writer's ``Interner``s.
Chunk = tuple[np.ndarray, ...]


class Named(Protocol):
    """The strings of a column's codes, in code order (``store.writer.Interner``); it only
    grows, so a later copy names every code of an earlier chunk."""

    names: list[str]


def rows_table(cols: list[np.ndarray], rank: int, names: tuple[Named, Named, Named]) -> pa.Table:
    """The run table of ``cols`` (a ``Chunk``'s columns) written by ``rank``; ``names``: the
    phase, module and metric names of their codes."""
    step, phase, module, call, metric, index, value = cols
    n = len(value)

    def dict_column(codes: np.ndarray, of: Named) -> pa.DictionaryArray:
        # A copy of the names first: the training thread may intern a new one meanwhile.
        return pa.DictionaryArray.from_arrays(pa.array(codes, pa.int32()), pa.array(list(of.names)))

    return pa.Table.from_arrays(
        [
            pa.array(step, pa.int32()),
            pa.array(np.full(n, rank, np.int16)),
            dict_column(phase, names[0]),
            dict_column(module, names[1]),
            pa.array(call, pa.int16()),
            dict_column(metric, names[2]),
            pa.array(index, pa.int16()),
            pa.array(value, pa.float32()),
        ],
        schema=SCHEMA,
    )


def part_number(path: Path) -> int | None:
    """The number of a part file (``part-000042.parquet``: 42), None for another name."""
    name = path.name
    digits = name[len(PART_PREFIX) : -len(PART_SUFFIX)]
    ok = name.startswith(PART_PREFIX) and name.endswith(PART_SUFFIX) and digits.isdigit()
    return int(digits) if ok else None


@dataclass(frozen=True)
class Unwritten:
    """Rows of one writer that no part held when it was taken (module docstring).

    ``next_part``: the number of the writer's next part then; its parts from that number to
    the end of its block (``block + PART_BLOCK``) came later and hold rows of ``chunks``.
    ``with_parts`` False: a reader reads these rows alone and no part at all (the online
    rules' loss check, ``rules.online``)."""

    chunks: tuple[Chunk, ...]
    rank: int
    names: tuple[Named, Named, Named]
    next_part: int = 0
    block: int = 0
    with_parts: bool = True

    @property
    def rows(self) -> int:
        return sum(len(c[-1]) for c in self.chunks)

    def table(self) -> pa.Table:
        """The rows as the run table (built by the reader, not the writer's thread)."""
        if not self.chunks:
            return SCHEMA.empty_table()
        cols = [np.concatenate(c) for c in zip(*self.chunks)]
        return rows_table(cols, self.rank, self.names)

    def hides(self, path: Path) -> bool:
        """Whether a reader of these rows leaves the part at ``path`` out."""
        if not self.with_parts:
            return True
        number = part_number(path)
        return number is not None and self.next_part <= number < self.block + PART_BLOCK


__all__ = ["PART_BLOCK", "Chunk", "Named", "Unwritten", "part_number", "rows_table"]
