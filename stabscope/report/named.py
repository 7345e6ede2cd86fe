"""The report's figures by name, as plotly Figures: what a notebook's ``Run.figure(name)``
shows, built by the same functions as the page. A name is the figure's div on the page
without ``fig-``: the layer x step heatmaps (``act_rms``, ...), the run-level lines (``loss``,
``lr``, ...), and each section's own pictures (``propagation``, ``attn_heads``,
``attn_logit_max_over_time``, ``res_beta``, ``nonfinite``, ``ranks-loss``, ...)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import plotly.graph_objects as go

from .data import HEATMAPS, RunData
from .sections import Context, heat_figure, series_figure, training, updates
from .sections.attention import heads_figure, logit_max_figure
from .sections.nonfinite import nonfinite_figure
from .sections.propagation import propagation_figure
from .sections.ranks import ranks_figures
from .sections.residual import beta_figure

#: metric -> (title, log scale) of every run-level line on the page.
SERIES = {metric: (title, log) for metric, title, log in (*training.PLOTS, *updates.PLOTS)}

#: The sections' own figures, in page order (the per-rank ones follow: see ``_ranks``).
SECTION_FIGURES: dict[str, Callable[[Context], go.Figure | None]] = {
    "propagation": propagation_figure,
    "res_beta": beta_figure,
    "attn_heads": heads_figure,
    "attn_logit_max_over_time": logit_max_figure,
    "nonfinite": nonfinite_figure,
}


def _ranks(ctx: Context) -> dict[str, go.Figure]:
    built = ranks_figures(ctx)
    return {} if built is None else built[0]


def figure_names(data: Sequence[RunData]) -> list[str]:
    """The names some run has data for: heatmaps in the page's catalogue order, then lines,
    then the sections' own figures."""
    heat = [k for k in HEATMAPS if any(k in d.heat and not d.heat[k].empty for d in data)]
    lines = [m for m in SERIES if any(m in d.series and not d.series[m].empty for d in data)]
    ctx = Context(list(data), {})
    own = [name for name, build in SECTION_FIGURES.items() if build(ctx) is not None]
    return heat + lines + own + list(_ranks(ctx))


def named_figure(data: Sequence[RunData], name: str) -> go.Figure | None:
    """The figure the report draws for ``name`` (its div is ``fig-NAME``), or None."""
    ctx = Context(list(data), {})
    notes: list[str] = []
    if name in HEATMAPS:
        return heat_figure(ctx, name, notes)
    if name in SERIES:
        title, log = SERIES[name]
        return series_figure(ctx, name, title, log, notes)
    if name in SECTION_FIGURES:
        return SECTION_FIGURES[name](ctx)
    if name.startswith("ranks-"):
        return _ranks(ctx).get(name)
    return None
