"""Plotly figures of the report, one function per kind of picture.

Arrays go to plotly as float32 numpy arrays, so they are embedded as binary (base64) rather
than as JSON lists of decimals. Strings that come from user code (module names, run names)
are HTML-escaped before they reach plotly: plotly renders a few tags in labels, and a name
must show as the text it is.
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import plotly.graph_objects as go
import plotly.io as pio
from plotly.subplots import make_subplots

from .grids import Grid
from .scales import scale_for

RUN_COLOURS = ("#1f5fa8", "#c8321e", "#2a8c3c", "#7a4bb0", "#d98a00", "#1b9aa6", "#8c564b")
DASHES = ("solid", "dash", "dot", "dashdot")
F32 = np.float32

# "1e-4" rather than plotly's SI "100μ", which reads as a unit
AXIS = {
    "gridcolor": "#ececec",
    "linecolor": "#888",
    "ticks": "outside",
    "zeroline": False,
    "exponentformat": "e",
}
TEMPLATE = go.layout.Template(
    layout={
        "font": {"family": "system-ui, -apple-system, 'Segoe UI', sans-serif", "size": 12},
        "paper_bgcolor": "white",
        "plot_bgcolor": "white",
        "colorway": list(RUN_COLOURS),
        "margin": {"l": 70, "r": 20, "t": 40, "b": 45},
        "hoverlabel": {"font": {"size": 12}},
        "legend": {"orientation": "h", "y": -0.18, "x": 0},
        "xaxis": AXIS,
        "yaxis": AXIS,
    }
)


def esc(text: object) -> str:
    return html.escape(str(text), quote=True)


def colour(i: int) -> str:
    return RUN_COLOURS[i % len(RUN_COLOURS)]


def rgba(hex_colour: str, alpha: float) -> str:
    r, g, b = (int(hex_colour[i : i + 2], 16) for i in (1, 3, 5))
    return f"rgba({r},{g},{b},{alpha})"


def to_div(fig: go.Figure, div_id: str) -> str:
    """The figure as a div plus the script that draws it (plotly.js is on the page once)."""
    fig.update_layout(template=TEMPLATE)
    return pio.to_html(
        fig,
        include_plotlyjs=False,
        full_html=False,
        div_id=div_id,
        config={"displaylogo": False, "responsive": True},
        default_width="100%",
        default_height=f"{fig.layout.height or 420}px",
    )


def heatmap(
    runs: Sequence[tuple[str, Grid]], title: str, log: bool, worst: str, div_id: str
) -> str:
    """``heatmap_figure`` as a div of the page."""
    return to_div(heatmap_figure(runs, title, log, worst), div_id)


def heatmap_figure(
    runs: Sequence[tuple[str, Grid]], title: str, log: bool, worst: str
) -> go.Figure:
    """Layer x step heatmaps side by side, one per run, sharing axes and colour scale.
    The colour is the worst end of each cell's envelope; hover gives the envelope."""
    cells = [g.hi if worst == "hi" else g.lo for _, g in runs]
    scale = scale_for(cells, log)
    # Plotly cannot draw a heatmap on a shared category axis unless every trace has all of
    # its categories, so rows are shared only between runs with the same rows.
    same_rows = all(g.rows == runs[0][1].rows for _, g in runs)
    fig = make_subplots(
        rows=1,
        cols=len(runs),
        shared_yaxes=same_rows,
        shared_xaxes="all",
        horizontal_spacing=0.03,
        subplot_titles=[esc(name) for name, _ in runs] if len(runs) > 1 else None,
    )
    n_rows = max(len(g.rows) for _, g in runs)
    for i, ((name, grid), z) in enumerate(zip(runs, cells)):
        custom = np.stack(
            [grid.lo, grid.hi, np.broadcast_to(grid.last, grid.lo.shape)], axis=-1
        ).astype(F32)
        fig.add_trace(
            go.Heatmap(
                x=grid.first.astype(np.int32),
                y=[esc(r) for r in grid.rows],
                z=scale.map(z),
                customdata=custom,
                coloraxis="coloraxis",
                name=esc(name),
                hovertemplate=(
                    f"<b>%{{y}}</b><br>steps %{{x}}–%{{customdata[2]:.0f}}"
                    f"<br>max %{{customdata[1]:.4g}}<br>min %{{customdata[0]:.4g}}"
                    f"<extra>{esc(name)}</extra>"
                ),
            ),
            row=1,
            col=i + 1,
        )
        fig.update_xaxes(title_text="step", row=1, col=i + 1)
    fig.update_yaxes(autorange="reversed", type="category", automargin=True)
    fig.update_layout(
        title={"text": esc(title), "x": 0.01, "y": 0.98, "yanchor": "top"},
        margin={"t": 80 if len(runs) > 1 else 50},
        height=int(np.clip(160 + 4 * n_rows, 340, 780)),
        coloraxis={
            "colorscale": "Viridis",
            "reversescale": worst == "lo",
            "cmin": scale.lo,
            "cmax": scale.hi,
            "colorbar": {"title": {"text": "log₁₀" if scale.log else ""}, **scale.colorbar()},
        },
        template=TEMPLATE,
    )
    return fig


def lines(
    runs: Sequence[tuple[str, int, Grid, int]],
    title: str,
    log: bool,
    div_id: str,
    y_title: str = "",
) -> str:
    """``lines_figure`` as a div of the page."""
    return to_div(lines_figure(runs, title, log, y_title), div_id)


def lines_figure(
    runs: Sequence[tuple[str, int, Grid, int]], title: str, log: bool, y_title: str = ""
) -> go.Figure:
    """One line per (run, row) of a step-binned grid: the mean of each bin, with the
    bin's min-max band when bins hold more than one value, so spikes stay visible."""
    fig = go.Figure()
    for name, colour_index, grid, row in runs:
        x = grid.first.astype(np.int32)
        mean, lo, hi = (a[row].astype(F32) for a in (grid.mean, grid.lo, grid.hi))
        c = colour(colour_index)
        group = f"{esc(name)}"
        if np.nanmax(np.abs(hi - lo), initial=0) > 0:
            fig.add_trace(
                go.Scatter(
                    x=x,
                    y=hi,
                    mode="lines",
                    line={"width": 0},
                    hoverinfo="skip",
                    legendgroup=group,
                    showlegend=False,
                )
            )
            fig.add_trace(
                go.Scatter(
                    x=x,
                    y=lo,
                    mode="lines",
                    line={"width": 0},
                    fill="tonexty",
                    fillcolor=rgba(c, 0.2),
                    hoverinfo="skip",
                    legendgroup=group,
                    showlegend=False,
                )
            )
        fig.add_trace(
            go.Scatter(
                x=x,
                y=mean,
                mode="lines",
                name=esc(name),
                legendgroup=group,
                line={"color": c, "width": 1.8},
                hovertemplate=f"step %{{x}}: %{{y:.4g}}<extra>{esc(name)}</extra>",
            )
        )
    fig.update_layout(
        title={"text": esc(title), "x": 0.01}, height=340, showlegend=True, template=TEMPLATE
    )
    fig.update_xaxes(title_text="step")
    fig.update_yaxes(type="log" if log else "linear", title_text=esc(y_title))
    return fig


@dataclass
class Profile:
    """Values against depth for one run at one step."""

    run: str
    colour_index: int
    step: int
    step_order: int
    labels: list[str]
    values: np.ndarray
    predicted: bool = False  # a theory curve: long dashes and crosses, never a step's style


def profiles(panels: Sequence[tuple[str, Sequence[Profile]]], div_id: str, log: bool) -> str:
    """``profiles_figure`` as a div of the page."""
    return to_div(profiles_figure(panels, log), div_id)


def profiles_figure(panels: Sequence[tuple[str, Sequence[Profile]]], log: bool) -> go.Figure:
    """Panels of per-layer values against depth: colour by run, dash by step."""
    panels = [p for p in panels if p[1]]
    fig = make_subplots(
        rows=1, cols=len(panels), subplot_titles=[esc(t) for t, _ in panels], shared_xaxes=True
    )
    seen: set[str] = set()
    for col, (_, curves) in enumerate(panels, start=1):
        for p in curves:
            legend = esc(p.run) if p.predicted else f"{esc(p.run)} · step {p.step}"
            fig.add_trace(
                go.Scatter(
                    x=np.arange(len(p.values), dtype=np.int32),
                    y=p.values.astype(F32),
                    text=[esc(label) for label in p.labels],
                    mode="lines+markers" if len(p.values) <= 48 else "lines",
                    marker={"size": 6 if p.predicted else 4, "symbol": "x" if p.predicted else 0},
                    name=legend,
                    legendgroup=legend,
                    showlegend=legend not in seen,
                    line={
                        "color": colour(p.colour_index),
                        "dash": "longdash" if p.predicted else DASHES[p.step_order % 4],
                    },
                    hovertemplate=f"%{{text}}<br>%{{y:.4g}}<extra>{legend}</extra>",
                ),
                row=1,
                col=col,
            )
            seen.add(legend)
        fig.update_xaxes(title_text="layer (shallow → deep)", row=1, col=col)
    fig.update_yaxes(type="log" if log else "linear")
    fig.update_layout(height=420, legend={"y": -0.25}, template=TEMPLATE)
    return fig


def matrices(
    panels: Sequence[Sequence[tuple[str, list[str], np.ndarray]]],
    x_title: str,
    zrange: tuple[float, float],
    div_id: str,
    reverse: bool = False,
) -> str:
    """``matrices_figure`` as a div of the page."""
    return to_div(matrices_figure(panels, x_title, zrange, reverse), div_id)


def matrices_figure(
    panels: Sequence[Sequence[tuple[str, list[str], np.ndarray]]],
    x_title: str,
    zrange: tuple[float, float],
    reverse: bool = False,
) -> go.Figure:
    """A grid of small matrices (one row of panels per run) on one linear colour scale,
    e.g. attention entropy as layers x heads at a few steps. ``panels[r][c]`` is
    (subplot title, row labels, matrix)."""
    n_rows, n_cols = len(panels), max(len(p) for p in panels)
    titles = [esc(t) for row in panels for t in [p[0] for p in row] + [""] * (n_cols - len(row))]
    fig = make_subplots(
        rows=n_rows,
        cols=n_cols,
        shared_yaxes=True,
        horizontal_spacing=0.03,
        vertical_spacing=min(0.25, 0.3 / n_rows) if n_rows > 1 else 0.1,
        subplot_titles=titles,
    )
    height = 0
    for r, row in enumerate(panels, start=1):
        for c, (_, labels, z) in enumerate(row, start=1):
            fig.add_trace(
                go.Heatmap(
                    z=z.astype(F32),
                    x=np.arange(z.shape[1], dtype=np.int32),
                    y=[esc(label) for label in labels],
                    coloraxis="coloraxis",
                    hovertemplate=f"<b>%{{y}}</b><br>{x_title} %{{x}}: %{{z:.4g}}<extra></extra>",
                ),
                row=r,
                col=c,
            )
            fig.update_xaxes(
                title_text=x_title if r == n_rows else None,
                dtick=1 if z.shape[1] <= 16 else None,
                row=r,
                col=c,
            )
        height += int(np.clip(90 + 4 * max(len(lbl) for _, lbl, _ in row), 240, 540))
    fig.update_yaxes(autorange="reversed", type="category", automargin=True)
    fig.update_layout(
        height=height + 60,
        coloraxis={
            "colorscale": "Viridis",
            "reversescale": reverse,
            "cmin": zrange[0],
            "cmax": zrange[1],
        },
        template=TEMPLATE,
    )
    return fig
