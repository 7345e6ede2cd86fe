"""Reducing a run's long table to small grids with pyarrow and numpy, in bounded memory.

Two streaming passes over the parts, never the whole table at once:

- ``take_census`` reads ``step, metric, module, index`` and notes which steps, modules and
  indices each metric has (boolean marks, no sorting), so bins can be planned;
- ``feed`` reads only the metrics asked for (filtered inside pyarrow) and hands each batch,
  grouped by metric, to accumulators that keep per-cell min, max, sum and count. A spike in
  one step of a bin therefore survives any downsampling as the bin's max.

Only training rows of rank 0 and the first call of each module are read: the report draws
the training dynamics of one process.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds

from ..store import SCHEMA

BATCH_ROWS = 1 << 20  # ~20 MB of columns per batch
MAX_INDEX = 1 << 15  # index is int16


class Names:
    """Integer ids for the strings of a dictionary column, stable across parts whose
    dictionaries differ. The lookup table of the last dictionary is kept, because every
    batch of one part carries the same dictionary."""

    def __init__(self) -> None:
        self.ids: dict[str, int] = {}
        self.names: list[str] = []
        self._dictionary: pa.Array | None = None
        self._lut = np.zeros(0, np.int32)

    def id(self, name: str) -> int:
        code = self.ids.get(name)
        if code is None:
            code = self.ids[name] = len(self.names)
            self.names.append(name)
        return code

    def codes(self, column: pa.Array) -> np.ndarray:
        if not pa.types.is_dictionary(column.type):
            column = column.dictionary_encode()
        dictionary = column.dictionary
        if self._dictionary is None or not (
            dictionary is self._dictionary or dictionary.equals(self._dictionary)
        ):
            self._lut = np.array([self.id(n) for n in dictionary.to_pylist()], np.int32)
            self._dictionary = dictionary
        return self._lut[column.indices.to_numpy(zero_copy_only=False)]


def batches(
    files: Sequence[Path], columns: list[str], metrics: Sequence[str] | None = None
) -> Iterator[pa.RecordBatch]:
    """Training rows of rank 0, first call, optionally of some metrics only."""
    if not files:
        return
    dataset = ds.dataset([str(f) for f in files], schema=SCHEMA, format="parquet")
    expr = (ds.field("phase") == "train") & (ds.field("rank") == 0) & (ds.field("call") == 0)
    if metrics is not None:
        expr = expr & ds.field("metric").isin(pa.array(sorted(metrics), pa.string()))
    yield from dataset.to_batches(columns=columns, filter=expr, batch_size=BATCH_ROWS)


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
        self._index = np.zeros((8, MAX_INDEX + 1), bool)  # column 0 is index -1

    def add(self, metric: np.ndarray, module: np.ndarray, step: np.ndarray, index: np.ndarray):
        if not len(metric):
            return
        rows = int(metric.max()) + 1
        self._steps = _grown(self._steps, rows, int(step.max()) + 1)
        self._modules = _grown(self._modules, rows, int(module.max()) + 1)
        self._index = _grown(self._index, rows, MAX_INDEX + 1)
        self._steps[metric, step] = True
        self._modules[metric, module] = True
        self._index[metric, index.astype(np.int32) + 1] = True

    def has(self, metric: str) -> bool:
        return metric in self.metrics.ids

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
        code = self.metrics.ids.get(metric)
        if code is None:
            return 0
        seen = np.flatnonzero(self._index[code])
        return max(1, int(seen.max())) if len(seen) else 0


def take_census(files: Sequence[Path]) -> Census:
    census = Census()
    for batch in batches(files, ["step", "metric", "module", "index"]):
        census.add(
            census.metrics.codes(batch.column("metric")),
            census.modules.codes(batch.column("module")),
            batch.column("step").to_numpy(),
            batch.column("index").to_numpy(),
        )
    return census


class Accumulator(Protocol):
    metric: str

    def add(self, step: np.ndarray, module: np.ndarray, index: np.ndarray, value: np.ndarray):
        """Rows of this accumulator's metric: step, module id, index, value."""


def feed(files: Sequence[Path], census: Census, accumulators: Sequence[Accumulator]) -> None:
    """One pass over the rows of the accumulators' metrics, each row given to every
    accumulator of its metric."""
    wanted = {a.metric for a in accumulators if census.has(a.metric)}
    if not wanted:
        return
    by_code: dict[int, list[Accumulator]] = {}
    for acc in accumulators:
        if acc.metric in wanted:
            by_code.setdefault(census.metrics.ids[acc.metric], []).append(acc)
    codes = np.array(sorted(by_code), np.int64)
    cols = ["step", "metric", "module", "index", "value"]
    for batch in batches(files, cols, sorted(wanted)):
        metric = census.metrics.codes(batch.column("metric"))
        # Group the batch by metric with one stable sort (radix sort on small ints).
        order = np.argsort(metric.astype(np.int16), kind="stable")
        bounds = np.searchsorted(metric[order], np.r_[codes, codes + 1])
        step = batch.column("step").to_numpy()[order]
        module = census.modules.codes(batch.column("module"))[order]
        index = batch.column("index").to_numpy()[order]
        value = batch.column("value").to_numpy()[order]
        for i, code in enumerate(codes):
            lo, hi = bounds[i], bounds[i + len(codes)]
            if hi > lo:
                for acc in by_code[int(code)]:
                    acc.add(step[lo:hi], module[lo:hi], index[lo:hi], value[lo:hi])


def lookup(size: int, keys: Sequence[int] | np.ndarray, values: Sequence[int] | np.ndarray):
    """An array ``a`` of length ``size`` with ``a[keys] = values`` and -1 elsewhere."""
    out = np.full(max(size, 1), -1, np.int64)
    out[np.asarray(keys, np.int64)] = np.asarray(values, np.int64)
    return out


def at(table: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """``table[keys]`` with -1 for keys past its end."""
    out = np.full(len(keys), -1, np.int64)
    inside = keys < len(table)
    out[inside] = table[keys[inside]]
    return out


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
