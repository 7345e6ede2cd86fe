"""One pass over a run's parts that collects every read the rules declared, and only that.

A read is one metric's training rows (those before ``until``), optionally only those of some
modules, and optionally only those at the metric's first or last step among them: a rule
that looks at the step at init keeps one step's rows, not the run's. The pass reads the parts
one row group at a time (like the report, ``report.aggregate.batches``), never the table, and
keeps per read compact numpy columns of just the selected rows, with their position in the
run (``seq``) so that reads of several metrics can be put back in the run's row order.

It also takes a census of every metric (whether it has any selected row) and of the ranks,
so that a rule whose inputs were not recorded is skipped without reading them, and the
dictionaries of the string columns in the order ``pyarrow.Table.unify_dictionaries`` gives
them, so that frames built from the reads match ``load_run``'s exactly.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..analysis.columns import BATCH_ROWS, Names, dictionary_column

#: Numeric columns kept per row, with their dtypes in the run table.
NUMERIC: dict[str, type[np.number]] = {
    "step": np.int32,
    "rank": np.int16,
    "call": np.int16,
    "index": np.int16,
}
NUMERIC["value"] = np.float32
#: Every kept column's type: the numeric ones, run-wide module ids, the row's run position.
COLUMNS = {**NUMERIC, "module": np.int32, "seq": np.int64}
STEP_SCOPES = (None, "first", "last")


@dataclass(frozen=True)
class Read:
    """One metric's rows: of every module or of ``modules`` only; at every step, or at the
    ``first`` step that those rows have, or the ``last`` one with a finite value (its finite
    rows)."""

    metric: str
    step: str | None = None
    modules: frozenset[str] | None = None

    def __post_init__(self) -> None:
        if self.step not in STEP_SCOPES:
            raise ValueError(f"step must be one of {STEP_SCOPES}, not {self.step!r}")


def _batches(files: Sequence[Path], tables: Sequence[pa.Table]) -> Iterator[pa.RecordBatch]:
    """The record batches of ``files`` in order, then those of ``tables``."""
    for path in files:
        with pq.ParquetFile(path) as part:
            yield from part.iter_batches(batch_size=BATCH_ROWS)
    for table in tables:
        yield from table.to_batches(max_chunksize=BATCH_ROWS)


class Runs:
    """A column stored as runs of equal values (the step column: a batch holds a few steps)."""

    def __init__(self, column: np.ndarray, starts: np.ndarray) -> None:
        self.values = column[starts]
        self.lengths = np.diff(np.r_[starts, len(column)])

    def __len__(self) -> int:
        return int(self.lengths.sum())

    def unpack(self) -> np.ndarray:
        return np.repeat(self.values, self.lengths)


def pack(name: str, column: np.ndarray) -> np.ndarray | Runs:
    """A kept column in less memory: one value (rank, call, index, mostly) as a zero-stride
    view, steps as runs, module ids in two bytes."""
    if len(column) and (column == column[0]).all():
        return np.broadcast_to(column[:1].copy(), column.shape)
    if name == "step":
        starts = np.flatnonzero(np.r_[True, column[1:] != column[:-1]])
        if 4 * len(starts) < len(column):
            return Runs(column, starts)
    if name == "module" and column.max() < 1 << 16:
        return column.astype(np.uint16)
    return column


class Rows:
    """The kept rows of one read: chunks of packed columns, unpacked on demand."""

    def __init__(self, chunks: list[dict[str, np.ndarray | Runs]]) -> None:
        self.chunks = chunks

    def __len__(self) -> int:
        return sum(len(c["value"]) for c in self.chunks)

    def column(self, name: str) -> np.ndarray:
        """One column of every row, as a plain array (``module``: run-wide ids, ``seq``: the
        row's position in the run)."""
        if not self.chunks:
            return np.zeros(0, COLUMNS[name])
        parts = [c[name] for c in self.chunks]
        return np.concatenate([p.unpack() if isinstance(p, Runs) else p for p in parts])


class Kept:
    """The rows of one read while the pass runs. A scoped read keeps only the chunks at the
    best step so far (the lowest for ``first``, the highest for ``last``), so it never holds
    more than one step's rows."""

    def __init__(self, scope: str | None) -> None:
        self.scope = scope
        self.best: int | None = None
        self.chunks: list[dict[str, np.ndarray | Runs]] = []

    def add(self, batch: dict[str, np.ndarray], rows: np.ndarray) -> None:
        """``rows`` (positions in the batch) of ``batch``'s columns: views of one batch's
        numeric columns, ``module`` as run-wide ids per row and ``seq``, the run position of
        its first row (a 1-element array)."""
        if self.scope == "last":
            # The last state the run reached: after a divergence the last steps are NaN,
            # which say nothing of it, so ``last`` keeps finite values only.
            rows = rows[np.isfinite(batch["value"][rows])]
            if not len(rows):
                return
        if self.scope is not None:
            step = batch["step"][rows]
            here = int(step.min() if self.scope == "first" else step.max())
            first = self.scope == "first"
            better = self.best is None or (here < self.best if first else here > self.best)
            if not better and here != self.best:
                return
            rows = rows[step == here]
            if better:
                self.best, self.chunks = here, []
        chunk = {k: pack(k, batch[k][rows]) for k in (*NUMERIC, "module")}
        chunk["seq"] = rows.astype(batch["seq"].dtype) + batch["seq"][0]
        self.chunks.append(chunk)


@dataclass
class Scan:
    """What passes over one run collected; several passes add to the same ``Scan``."""

    phase: str = "train"
    until: int | None = None
    since: int | None = None  # only steps from this one on (the last training phase)
    modules: Names = field(default_factory=Names)
    metrics: Names = field(default_factory=Names)
    phases: Names = field(default_factory=Names)
    rows: dict[Read, Rows] = field(default_factory=dict)
    present: set[str] = field(default_factory=set)  # metrics with a selected row
    ranks: set[int] = field(default_factory=set)  # ranks with a selected row
    passes: int = 0

    def run(
        self,
        files: Sequence[Path],
        reads: Iterable[Read],
        rows: int = 0,
        tables: Sequence[pa.Table] = (),
    ) -> None:
        """One pass over ``files`` (of ``rows`` rows in all, from their footers), then over
        ``tables`` (rows in memory, after every part: ``store.memory``), that collects
        ``reads`` (those not collected yet)."""
        wanted = [r for r in dict.fromkeys(reads) if r not in self.rows]
        if self.passes and not wanted:
            return
        kept = {r: Kept(r.step) for r in wanted}
        metrics = list(dict.fromkeys(r.metric for r in wanted))
        rows += sum(t.num_rows for t in tables)
        seq = np.zeros(1, np.uint32 if rows < 1 << 32 else np.int64)
        for batch in _batches(files, tables):
            self._batch(batch, seq, metrics, kept, census=self.passes == 0)
            seq = seq + batch.num_rows
        for r, k in kept.items():
            self.rows[r] = Rows(k.chunks)
        self.passes += 1

    def _batch(
        self,
        batch: pa.RecordBatch,
        seq: np.ndarray,
        metrics: list[str],
        kept: dict[Read, Kept],
        census: bool,
    ) -> None:
        # Every batch's dictionaries go into the run-wide names, selected rows or not, in
        # part order: that is the order unify_dictionaries gives load_run's categoricals.
        phase = dictionary_column(batch, "phase")
        module = dictionary_column(batch, "module")
        metric = dictionary_column(batch, "metric")
        self.phases.lut(phase.dictionary)
        module_ids = self.modules.lut(module.dictionary)
        self.metrics.lut(metric.dictionary)
        phases = phase.dictionary.to_pylist()
        wanted_phase = phases.index(self.phase) if self.phase in phases else -1
        keep = phase.indices.to_numpy() == wanted_phase
        if self.until is not None:
            step = batch.column("step").to_numpy()
            keep &= (step >= 0) & (step < self.until)
        if self.since is not None:
            keep &= batch.column("step").to_numpy() >= self.since
        local_metric = metric.indices.to_numpy()
        names = metric.dictionary.to_pylist()
        if census:
            self._census(batch, local_metric[keep], names, keep)
        # Rows of the wanted metrics, grouped by metric (a stable sort keeps the run's order).
        slot_of = np.full(len(names), -1, np.int16)
        for code, name in enumerate(names):
            if name in metrics:
                slot_of[code] = metrics.index(name)
        slot = np.where(keep, slot_of[local_metric], -1)
        rows = np.flatnonzero(slot >= 0)
        if not len(rows):
            return
        rows = rows[np.argsort(slot[rows], kind="stable")]
        bounds = np.searchsorted(slot[rows], np.arange(len(metrics) + 1))
        local_module = module.indices.to_numpy()
        columns = {k: batch.column(k).to_numpy() for k in NUMERIC}
        columns["module"] = module_ids.astype(np.int32)[local_module]
        columns["seq"] = seq
        dictionary = module.dictionary.to_pylist()
        for r, k in kept.items():
            i = metrics.index(r.metric)
            mine = rows[bounds[i] : bounds[i + 1]]
            if r.modules is not None:
                wanted = np.array([n in r.modules for n in dictionary], bool)
                mine = mine[wanted[local_module[mine]]]
            if len(mine):
                k.add(columns, mine)

    def _census(
        self, batch: pa.RecordBatch, selected_metric: np.ndarray, names: list[str], keep: np.ndarray
    ) -> None:
        seen = np.bincount(selected_metric, minlength=len(names))
        self.present.update(names[i] for i in np.flatnonzero(seen))
        rank = batch.column("rank").to_numpy()[keep]
        if len(rank):
            low, high = int(rank.min()), int(rank.max())
            self.ranks.update([low] if low == high else np.unique(rank).tolist())
