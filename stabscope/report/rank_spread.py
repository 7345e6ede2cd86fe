"""How far the ranks of a multi-rank run are apart: the data of the report's Ranks section.

One more pass over the parts of a run with two or more ranks, reading only the metrics
below (filtered inside pyarrow), from every rank:

- per rank and recorded step, the loss and the gradient norm over all parameters,
  sqrt(Σ param_grad_norm²) (equal on every DDP replica unless they diverged; on a sharded
  run, the norm of the rank's shard);
- per layer and recorded step, max/min across ranks of ``act_rms`` and ``grad_rms``:
  1 when the ranks agree, ~1.1 for ranks on different batches of the same data, and the
  data's scale factor for a rank fed differently scaled data.

Memory: ranks x steps per curve, 2 x layers x recorded steps per ratio.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pyarrow.parquet as pq

from ..store import RUN_MODULE
from .aggregate import Census
from .runs import Run

CURVES = ("loss", "param_grad_norm")
RATIOS = ("act_rms", "grad_rms")
_COLUMNS = ["step", "rank", "module", "metric", "value"]


@dataclass
class RankCurves:
    """One value per rank and recorded step."""

    metric: str
    ranks: list[int]
    steps: np.ndarray
    values: np.ndarray  # (ranks, steps), NaN where a rank has no value


@dataclass
class RankRatio:
    """max/min across ranks per layer and recorded step."""

    metric: str
    layers: list[str]
    steps: np.ndarray
    ratio: np.ndarray  # (layers, steps), NaN where not every rank has a positive value


@dataclass
class RankSpread:
    ranks: list[int]
    curves: dict[str, RankCurves] = field(default_factory=dict)
    ratios: dict[str, RankRatio] = field(default_factory=dict)


def ranks_of(run: Run) -> list[int]:
    """The ranks that wrote rows: each part is one rank's, so its first row says whose."""
    seen: set[int] = set()
    for part in run.files:
        with pq.ParquetFile(part) as f:
            first = next(f.iter_batches(batch_size=1, columns=["rank"]), None)
        if first is not None and first.num_rows:
            seen.add(int(first.column(0)[0].as_py()))
    return sorted(seen)


def collect_rank_spread(run: Run, census: Census) -> RankSpread | None:
    """The spread of a run with two or more ranks; None for a single-process run."""
    if run.meta.world_size < 2:
        return None
    ranks = ranks_of(run)
    if len(ranks) < 2:
        return None
    rank_pos = {r: i for i, r in enumerate(ranks)}
    layers = [n for n in run.layers if n in census.modules.ids]
    layer_pos = {n: i for i, n in enumerate(layers)}
    spread = RankSpread(ranks)
    steps = {m: census.steps(m) for m in (*CURVES, *RATIOS) if census.has(m)}
    sums = {m: np.zeros((len(ranks), len(steps[m]))) for m in CURVES if m in steps}
    counts = {m: np.zeros(s.shape, np.int64) for m, s in sums.items()}
    shape = {m: (len(layers), len(steps[m])) for m in RATIOS if m in steps}
    hi = {m: np.full(s, -np.inf) for m, s in shape.items()}
    lo = {m: np.full(s, np.inf) for m, s in shape.items()}
    seen = {m: np.zeros(s, np.int64) for m, s in shape.items()}
    for part in run.files:
        table = pq.read_table(
            part,
            columns=_COLUMNS,
            filters=[("metric", "in", list(steps)), ("phase", "=", "train"), ("call", "=", 0)],
        )
        frame = table.to_pandas()
        for metric, rows in frame.groupby("metric", observed=True):
            metric = str(metric)
            col = np.searchsorted(steps[metric], rows.step.to_numpy())
            value = rows.value.to_numpy(np.float64)
            if metric in sums:
                if metric == "loss":
                    keep = (rows.module == RUN_MODULE).to_numpy()
                    x = value
                else:  # a norm over all parameters from the per-parameter norms
                    keep = np.ones(len(rows), bool)
                    x = value * value
                at = (rows["rank"].map(rank_pos).to_numpy()[keep], col[keep])
                np.add.at(sums[metric], at, x[keep])
                np.add.at(counts[metric], at, 1)
            else:
                row = rows.module.astype(str).map(layer_pos).to_numpy(np.float64)
                keep = ~np.isnan(row)
                at = (row[keep].astype(np.int64), col[keep])
                np.maximum.at(hi[metric], at, value[keep])
                np.minimum.at(lo[metric], at, value[keep])
                np.add.at(seen[metric], at, 1)
    for metric, total in sums.items():
        values = np.where(counts[metric] > 0, total, np.nan)
        if metric != "loss":
            values = np.sqrt(values)
        spread.curves[metric] = RankCurves(metric, ranks, steps[metric], values)
    for metric in hi:
        with np.errstate(invalid="ignore", divide="ignore"):
            ratio = hi[metric] / lo[metric]
        every_rank = (seen[metric] >= len(ranks)) & (lo[metric] > 0)
        spread.ratios[metric] = RankRatio(
            metric, layers, steps[metric], np.where(every_rank, ratio, np.nan)
        )
    return spread
