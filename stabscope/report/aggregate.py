"""Reducing a run's long table to small grids with pyarrow and numpy, in bounded memory.

Two streaming passes over the parts, never the whole table at once:

- ``take_census`` reads ``step, metric, module, index`` and notes which steps, modules and
  indices each metric has (boolean marks, no sorting), so bins can be planned;
- ``feed`` reads only the metrics asked for (filtered inside pyarrow) and hands each batch,
  grouped by metric, to accumulators that keep per-cell min, max, sum and count. A spike in
  one step of a bin therefore survives any downsampling as the bin's max.

Only training rows and the first call of each module are read. Ranks are merged
(``stabscope.store.ranks``): quantities every replica holds (``rank0_only``) are read from
rank 0, the others from every rank, so a cell's mean is over ranks and steps and its
min/max envelope spans the ranks.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..analysis.columns import BATCH_ROWS, Names, dictionary_column

#: Whether only rank 0's rows of a metric are read (None: every metric's).
Rank0Only = Callable[[str], bool] | None


def batches(
    files: Sequence[Path], columns: list[str], rank0_only: Rank0Only = None
) -> Iterator[pa.RecordBatch]:
    """Training rows of the first call, part by part and row group by row group (a
    dataset scanner reads ahead whole parts: ~1 GB at 200M rows), of rank 0 for the metrics
    ``rank0_only`` names and of every rank for the others. The filter is a numpy mask,
    applied only to the rare batches that need it. ``columns`` must include ``metric``."""
    for path in files:
        with pq.ParquetFile(path) as part:
            for batch in part.iter_batches(
                batch_size=BATCH_ROWS, columns=[*columns, "phase", "rank", "call"]
            ):
                phase = dictionary_column(batch, "phase")
                names = phase.dictionary.to_pylist()
                train = names.index("train") if "train" in names else -1
                keep = phase.indices.to_numpy() == train
                other = batch.column("rank").to_numpy() != 0
                if other.any():
                    keep &= ~(other & _rank0_rows(batch, rank0_only))
                keep &= batch.column("call").to_numpy() == 0
                if keep.all():
                    yield batch
                elif keep.any():
                    yield batch.filter(pa.array(keep))


def _rank0_rows(batch: pa.RecordBatch, rank0_only: Rank0Only) -> np.ndarray | bool:
    """Rows whose metric is read from rank 0 only."""
    if rank0_only is None:
        return True
    metric = dictionary_column(batch, "metric")
    wanted = np.array([rank0_only(m) for m in metric.dictionary.to_pylist()], bool)
    return wanted[metric.indices.to_numpy()]


def _grown(marks: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """``marks`` enlarged (never shrunk) to at least rows x cols, doubling to amortise."""
    r, c = marks.shape
    if rows <= r and cols <= c:
        return marks
    out = np.zeros((max(rows, 2 * r if rows > r else r), max(cols, 2 * c if cols > c else c)), bool)
    out[:r, :c] = marks
    return out


class Census:
    """Which steps, modules and indices each metric has in a run (pass 0)."""

    def __init__(self) -> None:
        self.metrics = Names()
        self.modules = Names()
        self._steps = np.zeros((8, 1024), bool)
        self._modules = np.zeros((8, 256), bool)
        self._width = np.zeros(8, np.int64)  # largest index + 1, 0 when only -1

    def add(self, batch: pa.RecordBatch) -> None:
        metric, module = dictionary_column(batch, "metric"), dictionary_column(batch, "module")
        metric_ids = self.metrics.lut(metric.dictionary)
        module_ids = self.modules.lut(module.dictionary)
        local_metric = metric.indices.to_numpy().astype(np.int64)
        step = batch.column("step").to_numpy()
        index = batch.column("index").to_numpy()
        n_metrics, n_modules, n_steps = len(metric_ids), len(module_ids), int(step.max()) + 1
        self._steps = _grown(self._steps, len(self.metrics.names), n_steps)
        self._modules = _grown(self._modules, len(self.metrics.names), len(self.modules.names))
        if len(self._width) < len(self.metrics.names):
            self._width = np.r_[self._width, np.zeros(len(self.metrics.names), np.int64)]
        # Marks are counted in the batch's own codes (small tables), then ORed into the
        # run-wide ones through the lookup tables.
        seen = np.bincount(local_metric * n_steps + step, minlength=n_metrics * n_steps)
        self._steps[metric_ids, :n_steps] |= seen.reshape(n_metrics, n_steps) > 0
        local_module = module.indices.to_numpy()
        seen = np.bincount(local_metric * n_modules + local_module, minlength=n_metrics * n_modules)
        self._modules[np.ix_(metric_ids, module_ids)] |= seen.reshape(n_metrics, n_modules) > 0
        indexed = index >= 0
        if indexed.any():
            np.maximum.at(self._width, metric_ids[local_metric[indexed]], index[indexed] + 1)

    def has(self, metric: str) -> bool:
        return metric in self.metrics.ids and bool(self._steps[self.metrics.ids[metric]].any())

    def steps(self, metric: str) -> np.ndarray:
        code = self.metrics.ids.get(metric)
        return np.zeros(0, np.int64) if code is None else np.flatnonzero(self._steps[code])

    def modules_of(self, metric: str) -> list[str]:
        code = self.metrics.ids.get(metric)
        if code is None:
            return []
        return [self.modules.names[i] for i in np.flatnonzero(self._modules[code])]

    def width(self, metric: str) -> int:
        """Number of index values (heads, components, param groups); 1 when only -1."""
        if not self.has(metric):
            return 0
        return max(1, int(self._width[self.metrics.ids[metric]]))


def take_census(files: Sequence[Path], rank0_only: Rank0Only = None) -> Census:
    census = Census()
    for batch in batches(files, ["step", "metric", "module", "index"], rank0_only):
        census.add(batch)
    return census


class Accumulator(Protocol):
    metric: str

    def add(self, step: np.ndarray, module: np.ndarray, index: np.ndarray, value: np.ndarray):
        """Rows of this accumulator's metric: step, module id, index, value."""


def feed(
    files: Sequence[Path],
    census: Census,
    accumulators: Sequence[Accumulator],
    rank0_only: Rank0Only = None,
) -> None:
    """One pass over the run, each row of a metric given to that metric's accumulators."""
    by_id: dict[int, list[Accumulator]] = {}
    for acc in accumulators:
        if census.has(acc.metric):
            by_id.setdefault(census.metrics.ids[acc.metric], []).append(acc)
    if not by_id:
        return
    for batch in batches(files, ["step", "metric", "module", "index", "value"], rank0_only):
        metric, module = dictionary_column(batch, "metric"), dictionary_column(batch, "module")
        metric_ids = census.metrics.lut(metric.dictionary, grow=False)
        module_ids = census.modules.lut(module.dictionary, grow=False)
        local_metric = metric.indices.to_numpy()
        if len(metric_ids) < 256:  # one-byte compares below: 4x less memory traffic
            local_metric = local_metric.astype(np.uint8)
        local_module = module.indices.to_numpy()
        step = batch.column("step").to_numpy()
        index = batch.column("index").to_numpy()
        value = batch.column("value").to_numpy()
        for local, code in enumerate(metric_ids.tolist()):
            if code not in by_id:
                continue
            rows = np.flatnonzero(local_metric == local)
            if not len(rows):
                continue
            args = (step[rows], module_ids[local_module[rows]], index[rows], value[rows])
            for acc in by_id[code]:
                acc.add(*args)


def lookup(size: int, keys: Sequence[int] | np.ndarray, values: Sequence[int] | np.ndarray):
    """A table ``t`` with ``t[key] = value`` for keys below ``size`` and -1 elsewhere; it
    ends with one extra -1 that ``at`` uses for every key past the end."""
    out = np.full(size + 1, -1, np.int64)
    out[np.asarray(keys, np.int64)] = np.asarray(values, np.int64)
    return out


def at(table: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """``table[keys]`` for non-negative keys; keys past the end give the table's last -1."""
    return table[np.minimum(keys, len(table) - 1)]


@dataclass
class StepBins:
    """Consecutive recorded steps grouped into bins of (nearly) equal counts."""

    first: np.ndarray  # first step of each bin
    last: np.ndarray  # last step of each bin
    of_step: np.ndarray  # step -> bin, -1 for steps in no bin
    starts: np.ndarray  # position of each bin's first step among the recorded steps

    def __len__(self) -> int:
        return len(self.first)


def step_bins(steps: np.ndarray, max_bins: int) -> StepBins:
    """Bins of equal numbers of recorded steps, so a dense start and a sparse tail are both
    kept in proportion to how much was recorded in them."""
    steps = np.asarray(steps, np.int64)
    n = len(steps)
    k = min(n, max(1, max_bins))
    starts = (np.arange(k + 1) * n) // max(k, 1)
    of_rank = np.repeat(np.arange(k), np.diff(starts))
    of_step = lookup(int(steps.max()) + 1 if n else 0, steps, of_rank)
    return StepBins(steps[starts[:-1]], steps[starts[1:] - 1], of_step, starts[:-1])
