"""Per-layer norms and minima of parameter rows at every recorded step (the parameter
heatmaps' exact values, before they are binned like any other grid)."""

from __future__ import annotations

import numpy as np

from .aggregate import Names, at, lookup
from .grids import add_at


class LayerGrid:
    """A per-layer aggregate of parameter rows at every recorded step: ``l2`` is
    sqrt(sum of squares) over the layer's parameters (a layer's norm from its tensors'
    norms), ``min`` the smallest value among them. With ``shards`` (an FSDP run: one row per
    rank's shard, whose squares add up to the parameter's), ``min`` first takes each
    parameter's root-sum-square over its shards; ``l2`` needs nothing more."""

    def __init__(
        self,
        metric: str,
        layer_of: dict[str, int],
        n_layers: int,
        names: Names,
        steps: np.ndarray,
        how: str,
        shards: bool = False,
    ) -> None:
        self.metric, self.how, self.n_layers = metric, how, n_layers
        known = {n: layer for n, layer in layer_of.items() if n in names.ids}
        self.row_of = lookup(len(names.names), [names.ids[n] for n in known], list(known.values()))
        self.shards = shards and how == "min"
        if self.shards:  # squares per (step, parameter), summed over the shards
            self.param_of = lookup(
                len(names.names), [names.ids[n] for n in known], range(len(known))
            )
            self.layer_of_param = np.array(list(known.values()), np.int64)
            self.squares = np.zeros(len(steps) * len(known))
            self.param_count = np.zeros(len(steps) * len(known), np.int64)
        self.steps = np.asarray(steps, np.int64)
        self.rank_of = lookup(
            int(self.steps.max()) + 1 if len(steps) else 0, steps, range(len(steps))
        )
        size = n_layers * len(self.steps)
        self.acc = np.zeros(size) if how == "l2" else np.full(size, np.inf)
        self.count = np.zeros(size, np.int64)

    def add(self, step: np.ndarray, module: np.ndarray, index: np.ndarray, value: np.ndarray):
        row, rank = at(self.row_of, module), at(self.rank_of, step)
        keep = (row >= 0) & (rank >= 0)
        cell = rank[keep] * self.n_layers + row[keep]  # step-major: see BinnedGrid.add
        if not len(cell):
            return
        v = value[keep].astype(np.float64)
        add_at(self.count, cell)
        if self.shards:
            param = rank[keep] * len(self.layer_of_param) + at(self.param_of, module)[keep]
            add_at(self.squares, param, v * v)
            add_at(self.param_count, param)
        elif self.how == "l2":  # NaN and Inf propagate: a non-finite tensor makes its layer so
            add_at(self.acc, cell, v * v)
        else:
            np.fmin.at(self.acc, cell, v)

    def exact(self) -> np.ndarray:
        """(layers, steps), NaN where a layer had no rows at a step."""
        if self.shards:
            values = np.where(self.param_count > 0, np.sqrt(self.squares), np.inf)
            n = len(self.layer_of_param)
            cells = np.arange(len(values)) // n * self.n_layers + np.tile(
                self.layer_of_param, len(self.steps)
            )
            np.fmin.at(self.acc, cells, values)
            self.shards = False  # folded into acc: exact() may be called again
        acc = np.sqrt(self.acc) if self.how == "l2" else self.acc.copy()
        acc[self.count == 0] = np.nan
        return acc.reshape(len(self.steps), self.n_layers).T
