"""rank-desync: the ranks of a data-parallel run disagree.

Two kinds of disagreement, from the per-rank rows (``RunView.per_rank``):

- **Replicas diverged** (error). Under DDP every rank holds the same weights and the same
  all-reduced gradients, bit for bit. A relative difference above ``replica_tol`` in
  ``param_norm`` or ``param_grad_norm`` means some gradient was not synchronised (a
  parameter used outside the DDP wrapper, a rank-dependent code path, ``no_sync`` left on).
  Not checked on sharded (FSDP) runs, where each rank holds a different shard.
- **A rank trains on something else** (warning). Each rank's loss and its gradients
  w.r.t. module outputs (``grad_rms``) come from its own batch. At every recorded step
  the spread is max/min across ranks; the finding is raised when its median over the
  recorded steps exceeds ``factor``: a rank fed differently scaled, corrupted or
  mis-sharded data. The median keeps one unlucky batch from raising it.

The rank named is the one farthest from the median of the ranks in log scale (with two
ranks, the one with the larger value).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pandas as pd

from ..store import RUN_MODULE
from ..store.findings import Finding
from ..store.ranks import is_sharded
from .base import Rule, RunView, finding
from .view import Request

PER_RANK = ("loss", "grad_rms")
REPLICATED = ("param_norm", "param_grad_norm")


def _by_rank(frame: pd.DataFrame, metric: str) -> dict[str, pd.DataFrame]:
    """Per module with a finite value: a steps x ranks table of ``metric`` (first call, no
    index; NaN where a rank's value was NaN or Inf, which is the nonfinite rule's error)."""
    rows = frame[(frame.metric == metric) & (frame.call == 0) & (frame["index"] == -1)]
    rows = rows[np.isfinite(rows.value.to_numpy(float))]
    return {
        str(module): group.pivot_table(index="step", columns="rank", values="value")
        for module, group in rows.groupby("module", observed=True)
    }


def rank_spread(table: pd.DataFrame) -> tuple[float, int, float, int]:
    """Of a steps x ranks table: the median over steps of max/min across ranks, the rank
    farthest from the others, its median ratio to the ranks' median, and how many steps
    (with a positive finite value on every rank) went in."""
    values = table.to_numpy(np.float64)
    ok = np.isfinite(values).all(axis=1) & (values > 0).all(axis=1)
    logs = np.log(values[ok])
    if len(logs) == 0 or logs.shape[1] < 2:
        return 1.0, int(table.columns[0]), 1.0, 0
    spread = float(np.exp(np.median(logs.max(axis=1) - logs.min(axis=1))))
    offset = np.median(logs - np.median(logs, axis=1, keepdims=True), axis=0)  # per rank
    # Farthest first; on a tie (always, with two ranks) the larger value.
    worst = max(range(len(offset)), key=lambda r: (round(abs(offset[r]), 9), offset[r]))
    return spread, int(table.columns[worst]), float(np.exp(offset[worst])), len(logs)


def _describe(what: str, table: pd.DataFrame, rank: int, ratio: float, spread: float) -> str:
    ranks = [int(r) for r in table.columns]
    if len(ranks) == 2:
        other = ranks[1 - ranks.index(rank)]
        return f"rank {rank}'s {what} is {spread:.3g}x rank {other}'s"
    return (
        f"rank {rank}'s {what} is {ratio:.3g}x the median of the {len(ranks)} ranks "
        f"(max/min across ranks {spread:.3g}x)"
    )


def _per_rank_findings(frame: pd.DataFrame, p: dict[str, float]) -> Iterator[Finding]:
    for metric in PER_RANK:
        tables = _by_rank(frame, metric)
        spreads = {module: rank_spread(table) for module, table in tables.items()}
        over = {m: s for m, s in spreads.items() if s[0] > p["factor"] and s[3]}
        if not over:
            continue
        module = max(over, key=lambda m: over[m][0])
        spread, rank, ratio, steps = over[module]
        table = tables[module]
        what = "loss" if module == RUN_MODULE else f"{metric} at {module}"
        more = f"; {len(over)} modules beyond {p['factor']:g}x" if len(over) > 1 else ""
        yield finding(
            RANK_DESYNC,
            "warning",
            f"{_describe(what, table, rank, ratio, spread)} (median over {steps} recorded "
            f"steps){more}: that rank trains on something else",
            module=module,
            step=int(table.index[0]),
            value=spread,
            threshold=p["factor"],
            metric=metric,
            remedy="check that rank's data: the sampler's seed and sharding, its "
            "preprocessing and scaling, and padding-only batches",
        )


def _replica_findings(frame: pd.DataFrame, p: dict[str, float]) -> Iterator[Finding]:
    for metric in REPLICATED:
        worst: tuple[float, int, str] | None = None  # (relative difference, step, parameter)
        for name, table in _by_rank(frame, metric).items():
            values = table.to_numpy(np.float64)
            scale = np.nanmax(np.abs(values), axis=1)
            with np.errstate(invalid="ignore", divide="ignore"):
                rel = (np.nanmax(values, axis=1) - np.nanmin(values, axis=1)) / scale
            bad = np.flatnonzero(rel > p["replica_tol"])
            if len(bad):
                hit = (float(rel[bad[0]]), int(table.index[bad[0]]), name)
                if worst is None or (hit[1], -hit[0]) < (worst[1], -worst[0]):
                    worst = hit
        if worst is None:
            continue
        rel, step, name = worst
        yield finding(
            RANK_DESYNC,
            "error",
            f"{metric} of {name} differs across ranks by {rel:.3g} (relative) from step "
            f"{step}: the replicas are no longer the same model",
            module=name,
            step=step,
            value=rel,
            threshold=p["replica_tol"],
            metric=metric,
            remedy="run every parameter's forward through the DDP wrapper, keep code "
            "paths the same on every rank, and leave no_sync() only for accumulation steps",
        )


def _rank_desync(view: RunView, p: dict[str, float]) -> Iterator[Finding]:
    if view.ranks < 2:
        return
    frame = view.per_rank(*PER_RANK, *REPLICATED)
    if frame.empty or frame["rank"].nunique() < 2:
        return
    if not is_sharded(view.meta):
        yield from _replica_findings(frame, p)
    yield from _per_rank_findings(frame, p)


RANK_DESYNC = Rule(
    "rank-desync",
    "Ranks out of step",
    "",
    ("loss", "grad_rms", "param_norm", "param_grad_norm"),
    {"factor": 2.0, "replica_tol": 1e-5},
    _rank_desync,
    reads=(Request((*PER_RANK, *REPLICATED), per_rank=True),),
)

RULES = [RANK_DESYNC]
