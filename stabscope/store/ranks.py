"""Merging the rows of several ranks into one statistic per step, module and metric.

A multi-rank run (torch.distributed) has one row per rank for every number. How each metric's
rows merge is written in the metric catalogue (``stabscope.metrics``, ``Metric.ranks`` and
``Metric.shards``); in short:

- **replicated**: under DDP every rank holds the same weights, the same all-reduced
  gradients, the same optimizer state and learning rate (parameter metrics ``param_*``,
  ``update_*``, ``adam_*``, and ``lr``, ``model_update*``). Rank 0 stands for all of them.
- **per rank**: what depends on the rank's own batch (loss, module activations and their
  gradients, the transformer probes). Merged as the mean over ranks; extremes and flags
  (``*_absmax``, ``*_max``, ``*_nonfinite``, ``first_nonfinite_*``) as the max, ``*_min``
  as the min, so a NaN or a spike on one rank survives the merge.
- **not catalogued** (rows of a newer version, a user's own): per rank, by the same name
  pattern (``metrics.UNKNOWN_MERGE``); never rank 0 alone, so no rank's value is dropped.

A **sharded** run (FSDP: parameters are DTensors) records parameter metrics of each rank's
local shard. Norms are recorded so that squares add up: ``param_norm`` is the shard's norm, and
``param_rms`` (likewise Adam's sqrt(v)/eps) is taken over the *full* parameter's element count,
so the root-sum-square over ranks is the full parameter's value exactly. The ``full`` preset's
``param_mean`` is the shard's sum over the full element count, so the ranks' values add up
(sum). The update ratio of a sharded parameter is recomputed from the merged update and
weight norms when both were read (``load_merged`` reads them); otherwise it is the largest
shard ratio (max).

NaN and Inf propagate through every merge: a non-finite value on one rank stays visible.
Pure functions of frames and meta: the reader reads (``load_run(..., merge_ranks=True)``).
No torch import here.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import pandas as pd

from ..metrics import reduction as catalogued_reduction

#: What a sharded run's update ratios are recomputed from: ratio -> (||Δθ||, ||θ||).
RATIOS = {
    "update_ratio": ("update_norm", "param_norm"),
    "block_update_ratio": ("block_update_norm", "block_param_norm"),
}
#: Row identity apart from the rank.
KEYS = ["step", "phase", "module", "call", "metric", "index"]


def is_replicated(metric: str) -> bool:
    """Whether a DDP replica's value of ``metric`` equals every other replica's."""
    return reduction(metric) == "rank0"


def is_sharded(meta: Mapping[str, Any]) -> bool:
    """Whether the run's parameters were sharded across ranks (FSDP)."""
    return bool((meta.get("distributed") or {}).get("sharded"))


def reduction(metric: str, sharded: bool = False) -> str:
    """How the ranks' rows of ``metric`` merge: ``rank0``, ``mean``, ``max``, ``min``,
    ``sum`` or ``rss`` (root-sum-square), as the metric catalogue says."""
    return catalogued_reduction(metric, sharded)


def rank0_only(meta: Mapping[str, Any]) -> Callable[[str], bool]:
    """For a run: whether a metric is read from rank 0 only (its replicated metrics)."""
    sharded = is_sharded(meta)
    return lambda metric: reduction(metric, sharded) == "rank0"


def ratio_inputs(metrics: list[str] | None, meta: Mapping[str, Any]) -> list[str]:
    """Metrics a merged read of ``metrics`` also needs, and drops again (``merged``): the
    update and weight norms that a sharded parameter's update ratio is recomputed from."""
    if metrics is None or not is_sharded(meta):
        return []
    needed = [m for ratio, inputs in RATIOS.items() if ratio in metrics for m in inputs]
    return [m for m in dict.fromkeys(needed) if m not in metrics]


def merged(frame: pd.DataFrame, meta: Mapping[str, Any], extra: list[str]) -> pd.DataFrame:
    """``frame`` (rows of the metrics asked for and of ``extra``) with ranks merged, without
    the ``extra`` rows."""
    frame = merge_ranks(frame, meta)
    if extra:
        frame = frame[~frame["metric"].isin(extra)].reset_index(drop=True)
    return frame


def merge_ranks(frame: pd.DataFrame, meta: Mapping[str, Any]) -> pd.DataFrame:
    """One row per (step, phase, module, call, metric, index), ranks merged as described in
    the module docstring. Frames of one rank come back unchanged, without the rank column."""
    if frame.empty or "rank" not in frame or frame["rank"].nunique() <= 1:
        return frame.drop(columns="rank", errors="ignore")
    sharded = is_sharded(meta)
    metric = frame["metric"]
    how = metric.map({m: reduction(str(m), sharded) for m in metric.unique()}).to_numpy()
    keys = [k for k in KEYS if k in frame]
    pieces = [frame[(how == "rank0") & (frame["rank"].to_numpy() == 0)]]
    for name in ("mean", "sum", "max", "min", "rss"):
        part = frame[how == name]
        if not part.empty:
            pieces.append(_reduce(part, keys, name))
    merged = pd.concat(pieces, ignore_index=True).drop(columns="rank")
    if sharded:
        for ratio, inputs in RATIOS.items():
            merged = _exact_ratio(merged, keys, ratio, inputs)
    return merged.sort_values(["step", "metric", "module"], kind="stable", ignore_index=True)


def _exact_ratio(
    merged: pd.DataFrame, keys: list[str], ratio: str, inputs: tuple[str, str]
) -> pd.DataFrame:
    """A sharded run's ``ratio`` rows from its merged update and weight norms (``inputs``)."""
    metric = merged["metric"].astype(str)
    if not {ratio, *inputs} <= set(metric.unique()):
        return merged
    where = [k for k in keys if k != "metric"]
    norms = [merged[metric == m].set_index(where)["value"].astype(np.float64) for m in inputs]
    ratios = merged[metric == ratio]
    index = pd.MultiIndex.from_frame(ratios[where])
    with np.errstate(invalid="ignore", divide="ignore"):
        exact = norms[0].reindex(index) / norms[1].reindex(index)
    merged.loc[ratios.index, "value"] = exact.to_numpy(np.float32)
    return merged


def _reduce(part: pd.DataFrame, keys: list[str], how: str) -> pd.DataFrame:
    """``part``'s rows grouped by ``keys``; NaN/Inf propagate (numpy, not pandas' skipna)."""
    group = part.groupby(keys, observed=True, sort=False).ngroup().to_numpy()
    n = int(group.max()) + 1
    value = part["value"].to_numpy(np.float64)
    if how in ("mean", "sum", "rss"):
        x = value * value if how == "rss" else value
        out: np.ndarray = np.bincount(group, weights=x, minlength=n)  # float64 with weights
        if how == "mean":
            out /= np.bincount(group, minlength=n)
        elif how == "rss":
            out = np.sqrt(out)
    else:
        out = np.full(n, -np.inf if how == "max" else np.inf)
        with np.errstate(invalid="ignore"):  # NaN compares invalid, and is kept
            (np.maximum if how == "max" else np.minimum).at(out, group, value)
    _, first = np.unique(group, return_index=True)
    rows = part.iloc[first].copy()
    rows["value"] = out[group[first]].astype(np.float32)
    return rows


__all__ = [
    "is_replicated",
    "is_sharded",
    "merge_ranks",
    "merged",
    "rank0_only",
    "ratio_inputs",
    "reduction",
]
