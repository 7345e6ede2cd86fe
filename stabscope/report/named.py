"""The report's layer x step heatmaps and run-level lines by name, as plotly Figures: what
a notebook's ``Run.figure(name)`` shows, built by the same functions as the page."""

from __future__ import annotations

from collections.abc import Sequence

import plotly.graph_objects as go

from .data import HEATMAPS, RunData
from .sections import Context, heat_figure, series_figure, training, updates

#: metric -> (title, log scale) of every run-level line on the page.
SERIES = {metric: (title, log) for metric, title, log in (*training.PLOTS, *updates.PLOTS)}


def figure_names(data: Sequence[RunData]) -> list[str]:
    """The names some run has data for: heatmaps in the page's catalogue order, then lines."""
    heat = [k for k in HEATMAPS if any(k in d.heat and not d.heat[k].empty for d in data)]
    lines = [m for m in SERIES if any(m in d.series and not d.series[m].empty for d in data)]
    return heat + lines


def named_figure(data: Sequence[RunData], name: str) -> go.Figure | None:
    """The figure the report draws for ``name`` (its div is ``fig-NAME``), or None."""
    ctx = Context(list(data), {})
    notes: list[str] = []
    if name in HEATMAPS:
        return heat_figure(ctx, name, notes)
    if name in SERIES:
        title, log = SERIES[name]
        return series_figure(ctx, name, title, log, notes)
    return None
