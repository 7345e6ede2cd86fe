"""Section: per-rank spread of multi-rank (torch.distributed) runs, where a desynchronised
rank shows. Absent from the page when every run has one rank."""

from __future__ import annotations

import numpy as np
import plotly.graph_objects as go

from .. import figures
from ..aggregate import step_bins
from ..data import Budget
from ..grids import Grid, reduce_exact
from ..rank_spread import RankSpread, collect_rank_spread
from ..rowbins import row_bins
from . import Context, Section

INTRO = (
    "The other sections merge the ranks: rank 0 for what every replica holds (weights, "
    "all-reduced gradients, optimizer state, learning rate), the mean over ranks for what "
    "each rank computes on its own batch (loss, activations and their gradients), the max "
    "for extremes and non-finite flags. Here the ranks are apart: each rank's loss and "
    "gradient norm, and per layer the max/min across ranks of the output rms and of its "
    "gradient's rms (1 when the ranks agree; ranks on different batches of the same data "
    "stay near 1). A rank fed other data stands out as a row far above 1."
)
CURVE_TITLES = {
    "loss": ("loss per rank", True),
    "param_grad_norm": ("gradient norm over all parameters, per rank", True),
}
RATIO_TITLES = {
    "act_rms": "max/min across ranks of each layer's output rms",
    "grad_rms": "max/min across ranks of the gradient rms w.r.t. each layer's output",
}


def ranks_figures(ctx: Context) -> tuple[dict[str, go.Figure], list[str]] | None:
    """The section's figures by name (``ranks-loss``, ``ranks-act_rms``, ...) in page order,
    and its notes; None when every run has one rank."""
    spreads = [(d.run.name, collect_rank_spread(d.run, d.census)) for d in ctx.data]
    have = [(name, s) for name, s in spreads if s is not None]
    if not have:
        return None
    notes = []
    single = [name for name, s in spreads if s is None]
    if single:
        notes.append(f"one rank only: {', '.join(single)}")
    budget = Budget()
    figs: dict[str, go.Figure] = {}
    for metric, (title, log) in CURVE_TITLES.items():
        curves = []
        for name, spread in have:
            grid = _curve_grid(spread, metric, budget)
            for row, rank in enumerate(spread.ranks if grid is not None else []):
                label = f"{name} · rank {rank}" if len(have) > 1 else f"rank {rank}"
                curves.append((label, len(curves), grid, row))
        if curves:
            figs[f"ranks-{metric}"] = figures.lines_figure(curves, title, log)
    for metric, title in RATIO_TITLES.items():
        grids = [
            (name, grid)
            for name, spread in have
            if (grid := _ratio_grid(spread, metric, budget)) is not None
        ]
        if grids:
            figs[f"ranks-{metric}"] = figures.heatmap_figure(grids, title, True, "hi")
        else:
            notes.append(f"{metric}: not recorded on every rank")
    return figs, notes


def ranks_section(ctx: Context) -> Section | None:
    built = ranks_figures(ctx)
    if built is None:
        return None
    figs, notes = built
    section = Section("ranks", "Ranks", intro=INTRO, notes=notes)
    for name, fig in figs.items():
        section.body.append(figures.to_div(fig, ctx.register(f"fig-{name}")))
    return section


def _curve_grid(spread: RankSpread, metric: str, budget: Budget) -> Grid | None:
    curve = spread.curves.get(metric)
    if curve is None or not np.isfinite(curve.values).any():
        return None
    rows = row_bins([[f"rank {r}"] for r in curve.ranks], len(curve.ranks))
    bins = step_bins(curve.steps, budget.points)
    return reduce_exact(metric, curve.values, rows, bins, curve.steps)


def _ratio_grid(spread: RankSpread, metric: str, budget: Budget) -> Grid | None:
    ratio = spread.ratios.get(metric)
    if ratio is None or not np.isfinite(ratio.ratio).any():
        return None
    rows = row_bins([ratio.layers], budget.rows)
    bins = step_bins(ratio.steps, budget.columns(len(rows.labels), len(ratio.steps)))
    return reduce_exact(metric, ratio.ratio, rows, bins, ratio.steps)
