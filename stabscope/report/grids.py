"""Accumulators that turn streamed rows into the grids the report draws.

A ``Grid`` is rows (modules, or runs of consecutive modules) x step bins, with the min, max,
mean and count of the finite values in each cell. Non-finite values are left out of grids:
the non-finite timeline counts them instead, and a log colour scale cannot show them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .aggregate import Names, StepBins, at, lookup
from .rowbins import RowBins


def add_at(target: np.ndarray, cell: np.ndarray, weights: np.ndarray | None = None) -> None:
    """``target[cell] += weights`` (or += 1), with repeated cells summed: one ``bincount``
    over the short stretch of ``target`` that the cells span, not over all of it."""
    base = int(cell.min())
    local = cell - base
    span = int(local.max()) + 1
    target[base : base + span] += np.bincount(local, weights=weights, minlength=span)


@dataclass
class Grid:
    """Rows x step bins; cells with no finite value are NaN."""

    metric: str
    rows: list[str]
    first: np.ndarray  # first step of each column
    last: np.ndarray  # last step of each column
    lo: np.ndarray
    hi: np.ndarray
    mean: np.ndarray

    @property
    def empty(self) -> bool:
        return not np.isfinite(self.hi).any()


class BinnedGrid:
    """min / max / sum / count per (row, step bin) of one metric. ``width`` > 1 keeps one
    row per index (learning rate per param group); otherwise indices (heads) share a row."""

    def __init__(
        self, metric: str, rows: RowBins, names: Names, bins: StepBins, width: int = 1
    ) -> None:
        self.metric, self.labels, self.bins, self.width = metric, rows.labels, bins, width
        row_of = {n: r for n, r in rows.row_of().items() if n in names.ids}
        self.row_of = lookup(
            len(names.names), [names.ids[n] for n in row_of], list(row_of.values())
        )
        self.n_rows = len(rows.labels) * width
        size = self.n_rows * len(bins)
        self.lo = np.full(size, np.inf)
        self.hi = np.full(size, -np.inf)
        self.sum = np.zeros(size)
        self.count = np.zeros(size, np.int64)

    def add(self, step: np.ndarray, module: np.ndarray, index: np.ndarray, value: np.ndarray):
        row = at(self.row_of, module)
        if self.width > 1:
            row = row * self.width + np.clip(index, 0, self.width - 1)
        col = at(self.bins.of_step, step)
        keep = (row >= 0) & (col >= 0) & np.isfinite(value)
        # Bin-major cells: a batch covers a few consecutive steps, so its cells fall in one
        # short stretch and bincount works on that stretch only.
        cell = col[keep] * self.n_rows + row[keep]
        if not len(cell):
            return
        v = value[keep].astype(np.float64)
        add_at(self.sum, cell, v)
        add_at(self.count, cell)
        np.minimum.at(self.lo, cell, v)
        np.maximum.at(self.hi, cell, v)

    def result(self) -> Grid:
        shape = (len(self.bins), self.n_rows)
        empty = self.count == 0
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = np.where(empty, np.nan, self.sum / self.count)
        lo, hi = np.where(empty, np.nan, self.lo), np.where(empty, np.nan, self.hi)
        labels = (
            self.labels
            if self.width == 1
            else [f"{label}[{i}]" for label in self.labels for i in range(self.width)]
        )
        return Grid(
            self.metric,
            labels,
            self.bins.first,
            self.bins.last,
            lo.reshape(shape).T,
            hi.reshape(shape).T,
            mean.reshape(shape).T,
        )


class AtSteps:
    """Exact values of one metric at a few steps: modules x index x steps. Several rows of
    one cell (one per rank) give their mean; a non-finite one makes the cell NaN."""

    def __init__(
        self, metric: str, modules: Sequence[str], names: Names, steps: Sequence[int], width: int
    ) -> None:
        self.metric, self.modules, self.steps, self.width = (
            metric,
            list(modules),
            list(steps),
            width,
        )
        known = [(names.ids[m], i) for i, m in enumerate(self.modules) if m in names.ids]
        self.row_of = lookup(len(names.names), [k for k, _ in known], [i for _, i in known])
        self.col_of = lookup(max(self.steps, default=0) + 1, self.steps, range(len(self.steps)))
        shape = (len(self.modules), width, len(self.steps))
        self.sum, self.count = np.zeros(shape), np.zeros(shape, np.int64)

    @property
    def values(self) -> np.ndarray:
        with np.errstate(invalid="ignore", divide="ignore"):
            return (self.sum / np.where(self.count, self.count, np.nan)).astype(np.float32)

    def add(self, step: np.ndarray, module: np.ndarray, index: np.ndarray, value: np.ndarray):
        row, col = at(self.row_of, module), at(self.col_of, step)
        keep = (row >= 0) & (col >= 0) & (index < self.width)
        v = value[keep].astype(np.float64)
        cell = (row[keep], np.maximum(index[keep], 0), col[keep])
        np.add.at(self.sum, cell, np.where(np.isfinite(v), v, np.nan))
        np.add.at(self.count, cell, 1)


def reduce_exact(
    metric: str, values: np.ndarray, rows: RowBins, bins: StepBins, steps: np.ndarray
) -> Grid:
    """Bin an exact (rows, steps) array, rows in ``rows.order`` order, into a Grid."""
    finite = np.isfinite(values)
    clean = np.where(finite, values, np.nan)
    if not clean.size or not len(rows.starts) or not len(bins):
        shape = (len(rows.labels), len(bins))
        nan = np.full(shape, np.nan)
        return Grid(metric, rows.labels, bins.first, bins.last, nan, nan, nan)

    def reduce(ufunc: np.ufunc, x: np.ndarray) -> np.ndarray:
        return ufunc.reduceat(ufunc.reduceat(x, rows.starts, axis=0), bins.starts, axis=1)

    lo, hi = reduce(np.fmin, clean), reduce(np.fmax, clean)
    total = reduce(np.add, np.where(finite, values, 0.0))
    count = reduce(np.add, finite.astype(np.int64))
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(count > 0, total / count, np.nan)
    return Grid(metric, rows.labels, bins.first, bins.last, lo, hi, mean)


class StepCount:
    """Per step, how many rows of a metric satisfy a test: non-zero flags, or non-finite
    values."""

    def __init__(self, metric: str, test: str = "nonzero") -> None:
        self.metric, self.test = metric, test
        self.counts = np.zeros(0, np.int64)

    def add(self, step: np.ndarray, module: np.ndarray, index: np.ndarray, value: np.ndarray):
        hit = (value != 0) if self.test == "nonzero" else ~np.isfinite(value)
        if not hit.any():
            return
        c = np.bincount(step[hit])
        if len(c) > len(self.counts):
            self.counts = np.r_[self.counts, np.zeros(len(c) - len(self.counts), np.int64)]
        self.counts[: len(c)] += c

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        steps = np.flatnonzero(self.counts)
        return steps, self.counts[steps]


class Markers:
    """The rows of a marker metric (first non-finite module per step), kept as names, each
    (step, module) once: a recorded step and the flight recorder may both mark one step."""

    LIMIT = 10_000

    def __init__(self, metric: str, names: Names) -> None:
        self.metric, self.names = metric, names
        self.rows: list[tuple[int, str]] = []
        self._seen: set[tuple[int, int]] = set()

    def add(self, step: np.ndarray, module: np.ndarray, index: np.ndarray, value: np.ndarray):
        known = len(self.names.names)
        for s, m in zip(step.tolist(), module.tolist()):
            if len(self.rows) >= self.LIMIT:
                break
            if m < known and (s, m) not in self._seen:
                self._seen.add((s, m))
                self.rows.append((int(s), self.names.names[m]))
