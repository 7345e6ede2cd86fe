"""The curated series of a run for a dashboard: never the raw table (a 32-layer, 32-head
model writes ~11,000 numbers per recorded step), but

- every run-level metric of the catalogue (``kind="run"``: loss, lr per param group, the
  global gradient norm, the model update, the stability index), tag ``NAME`` (``lr/group_N``
  for a param group past the first);
- per block, ``BLOCK_SERIES``: output rms, gradient rms, weight-gradient norm, update ratio,
  lowest attention entropy and largest attention logit (each a heatmap of the report), tag
  ``NAME/BLOCK``;
- for each metric with a headline in the catalogue, its worst value over the model per step,
  tag ``worst/NAME``.

At most ``max_series`` series: the run-level and worst-of series first, then the blocks,
evenly spaced from the first to the last (the same blocks for every metric) when all do not
fit. Values are the training phase, ranks merged, the first call of each module.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from ..metrics import METRICS, headlines, worse_end
from ..report.runs import depth_axis, owner_layer
from ..store import RUN_MODULE, RunMeta, load_run

#: The default cap on exported series: a 32-layer model needs ~200 (documented in
#: docs/report.md); a dashboard stays usable at that.
MAX_SERIES = 256


@dataclass(frozen=True)
class BlockSeries:
    """One per-block series: ``sources`` in order of preference (at each step, the first the
    run has there), each ``(metric, how)``: ``own`` the block's own row, ``rss`` the root-sum-square
    over the block's parameters, ``ratio`` rss(update_norm) / rss(param_norm) over them,
    ``min``/``max`` over the block's modules and heads."""

    name: str
    sources: tuple[tuple[str, str], ...]


BLOCK_SERIES = (
    BlockSeries("act_rms", (("flight_act_rms", "own"), ("act_rms", "own"))),
    BlockSeries("grad_rms", (("flight_grad_rms", "own"), ("grad_rms", "own"))),
    BlockSeries("param_grad_norm", (("param_grad_norm", "rss"),)),
    BlockSeries("update_ratio", (("block_update_ratio", "own"), ("update_norm", "ratio"))),
    BlockSeries("attn_entropy_min", (("attn_entropy", "min"),)),
    BlockSeries("attn_logit_max", (("attn_logit_max", "max"),)),
)
RUN_METRICS = tuple(m.name for m in METRICS if m.kind == "run" and m.tier != "amplification")


@dataclass
class Series:
    tag: str
    steps: np.ndarray  # int64, ascending
    values: np.ndarray  # float64, NaN and Inf kept


@dataclass
class Selection:
    series: list[Series] = field(default_factory=list)
    blocks: list[str] = field(default_factory=list)  # exported
    left_out: list[str] = field(default_factory=list)  # blocks beyond the cap
    cap: int = MAX_SERIES

    @property
    def note(self) -> str:
        text = f"{len(self.series)} series (cap {self.cap}), {len(self.blocks)} blocks"
        if self.left_out:
            text += (
                f"; left out for the cap: {len(self.left_out)} blocks ({', '.join(self.left_out)})"
            )
        return text


def _series(tag: str, frame: pd.DataFrame) -> Series:
    """``frame``'s (step, value) rows as one series; a step seen twice keeps its last row."""
    frame = frame.drop_duplicates("step", keep="last").sort_values("step")
    return Series(tag, frame.step.to_numpy(np.int64), frame.value.to_numpy(np.float64))


def _table(run_dir: str, metrics: list[str]) -> pd.DataFrame:
    frame = load_run(run_dir, metrics=metrics, phase="train", merge_ranks=True)
    frame = frame[frame.call == 0]
    frame["module"] = frame.module.astype(str)
    frame["metric"] = frame.metric.astype(str)
    return frame


def _run_level(frame: pd.DataFrame) -> list[Series]:
    out = []
    for metric in RUN_METRICS:
        rows = frame[(frame.metric == metric) & (frame.module == RUN_MODULE)]
        for index in sorted(rows["index"].unique()):
            tag = metric if index <= 0 else f"{metric}/group_{index}"
            out.append(_series(tag, rows[rows["index"] == index]))
    return out


def _worst(frame: pd.DataFrame) -> list[Series]:
    out = []
    for metric in headlines():
        rows = frame[(frame.metric == metric) & (frame.module != RUN_MODULE)]
        if rows.empty or metric in RUN_METRICS:
            continue
        by_step = rows.groupby("step").value
        worst = by_step.min() if worse_end(metric) == "lower" else by_step.max()
        out.append(Series(f"worst/{metric}", worst.index.to_numpy(np.int64), worst.to_numpy()))
    return out


def _per_block(frame: pd.DataFrame, how: str, metric: str, blocks: list[str]) -> pd.DataFrame:
    """(block, step, value) rows of one source over the chosen ``blocks``."""
    if how == "own":
        rows = frame[(frame.metric == metric) & frame.module.isin(blocks)]
        return rows.rename(columns={"module": "block"})[["block", "step", "value"]]
    position = {b: i for i, b in enumerate(blocks)}
    names = pd.Series(frame.module.unique())
    owner = {n: owner_layer(n, position) for n in names}
    frame = frame.assign(block=frame.module.map(owner)).dropna(subset=["block"])
    frame["block"] = [blocks[int(i)] for i in frame.block]
    if how in ("min", "max"):
        rows = frame[frame.metric == metric].groupby(["block", "step"]).value
        return (rows.min() if how == "min" else rows.max()).reset_index()

    def rss(name: str) -> pd.Series:
        squares = frame[frame.metric == name].assign(value=lambda f: f.value**2)
        return np.sqrt(squares.groupby(["block", "step"]).value.sum(min_count=1))

    values = rss(metric) if how == "rss" else rss("update_norm") / rss("param_norm")
    return values.dropna(how="all").rename("value").reset_index()


def select(run_dir: str, meta: RunMeta, max_series: int = MAX_SERIES) -> Selection:
    """The series to export (module docstring), within ``max_series``."""
    wanted = {m for s in BLOCK_SERIES for m, _ in s.sources} | {"param_norm"}
    frame = _table(run_dir, [*RUN_METRICS, *headlines(), *sorted(wanted)])
    selection = Selection(cap=max_series)
    selection.series = _run_level(frame) + _worst(frame)
    have = set(frame.metric.unique())
    chosen = []
    for spec in BLOCK_SERIES:
        sources = [(m, how) for m, how in spec.sources if m in have]
        if sources:
            chosen.append((spec.name, sources))
    blocks, _ = depth_axis(meta)
    kept = blocks_within(blocks, len(selection.series), len(chosen), max_series)
    selection.blocks, selection.left_out = kept, [b for b in blocks if b not in kept]
    for name, sources in chosen:
        # The preferred source where it has the step, the next ones where it has not: the
        # flight recorder's rows start once the blocks are known (step 1 without a probe
        # forward), the recorded step 0 has the scheduled probes' of the same definition.
        parts = [_per_block(frame, how, metric, kept) for metric, how in sources]
        rows = pd.concat(parts).drop_duplicates(["block", "step"], keep="first")
        for block in kept:
            mine = rows[rows.block == block]
            if not mine.empty:
                selection.series.append(_series(f"{name}/{block}", mine))
    selection.series = selection.series[:max_series]
    return selection


def blocks_within(blocks: list[str], fixed: int, per_block: int, max_series: int) -> list[str]:
    """The blocks whose ``per_block`` series fit in ``max_series`` next to ``fixed`` others:
    evenly spaced from the first to the last when all do not fit (the export's and the live
    bridges' one choice)."""
    room = max(0, max_series - fixed) // max(1, per_block)
    return _spread(blocks, room)


def _spread(blocks: list[str], count: int) -> list[str]:
    """``count`` of ``blocks`` evenly spaced, the first and the last included."""
    if count >= len(blocks):
        return list(blocks)
    if count <= 0:
        return []
    picks = np.unique(np.round(np.linspace(0, len(blocks) - 1, count)).astype(int))
    return [blocks[i] for i in picks]
