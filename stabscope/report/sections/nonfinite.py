"""Section 9: the non-finite timeline: when NaN or Inf appeared, and where first."""

from __future__ import annotations

import numpy as np
import plotly.graph_objects as go

from ..figures import TEMPLATE, colour, esc, to_div
from . import Context, Section

KINDS = {
    "loss": ("non-finite loss", "x"),
    "act_nonfinite": ("module outputs", "circle"),
    "grad_nonfinite": ("output gradients", "triangle-down"),
    "param_nonfinite": ("weights", "square"),
    "param_grad_nonfinite": ("weight gradients", "diamond"),
}
FIRST = {"first_nonfinite_forward": "forward", "first_nonfinite_backward": "backward"}
MARKER_ROWS = 12


def _markers_table(ctx: Context) -> str:
    rows = []
    for d in ctx.data:
        for metric, direction in FIRST.items():
            for step, module in d.markers.get(metric, [])[:MARKER_ROWS]:
                rows.append((d.run.name, step, direction, module))
    if not rows:
        return ""
    rows.sort(key=lambda r: (r[0], r[1], r[2]))
    body = "".join(
        f"<tr><td>{esc(r)}</td><td>{s}</td><td>{esc(dr)}</td><td><code>{esc(m)}</code></td></tr>"
        for r, s, dr, m in rows
    )
    head = "<tr><th>run</th><th>step</th><th>order</th><th>first module with NaN/Inf</th></tr>"
    return f'<table class="data">{head}{body}</table>'


def nonfinite_figure(ctx: Context) -> go.Figure | None:
    """``fig-nonfinite``: tensors with NaN/Inf per step, by kind; None when no run has any."""
    return _timeline(ctx)[0]


def _timeline(ctx: Context) -> tuple[go.Figure | None, list[str]]:
    """The figure, and the runs without a non-finite value."""
    fig = go.Figure()
    clean = []
    for i, d in enumerate(ctx.data):
        found = False
        for metric, (label, symbol) in KINDS.items():
            steps, counts = d.nonfinite.get(metric, (np.zeros(0), np.zeros(0)))
            if not len(steps):
                continue
            found = True
            name = f"{esc(d.run.name)} · {label}"
            fig.add_trace(
                go.Scatter(
                    x=steps.astype(np.int32),
                    y=counts.astype(np.float32),
                    mode="markers",
                    name=name,
                    marker={"color": colour(i), "symbol": symbol, "size": 7},
                    hovertemplate=f"step %{{x}}: %{{y}}<extra>{name}</extra>",
                )
            )
        if not found:
            clean.append(d.run.name)
    if not fig.data:
        return None, clean
    fig.update_layout(
        title={"text": "tensors with NaN/Inf per step", "x": 0.01}, height=320, template=TEMPLATE
    )
    fig.update_xaxes(title_text="step")
    fig.update_yaxes(title_text="count", rangemode="tozero")
    return fig, clean


def nonfinite_section(ctx: Context) -> Section:
    section = Section(
        "nonfinite",
        "Non-finite timeline",
        intro="How many tensors held a NaN or Inf at each recorded step, by kind, and the "
        "first module where one appeared in forward and in backward order.",
    )
    fig, clean = _timeline(ctx)
    if fig is not None:
        div_id = ctx.register("fig-nonfinite", *KINDS, *FIRST)
        section.body.append(to_div(fig, div_id))
    if clean:
        section.notes.append(f"no non-finite values recorded in {', '.join(clean)}")
    table = _markers_table(ctx)
    if table:
        section.body.append(table)
    return section
