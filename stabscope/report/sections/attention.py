"""Section 6: attention: entropy per layer and head, over time, and max logits."""

from __future__ import annotations

import numpy as np
import plotly.graph_objects as go

from ...metrics import heatmap_keys
from .. import figures
from ..grids import Grid
from . import Context, Section, add_heat_blocks, missing_note

INTRO = (
    "Attention entropy (normalised: 1 is uniform attention, 0 attends to one token) for each "
    "layer and head at a few steps, then over training for the lowest head of each layer: "
    "entropy collapse (Zhai et al. 2023) shows as a dark-to-bright turn toward 0. Then the "
    "largest attention logit, whose growth precedes instability (Wortsman et al. 2023)."
)


Matrices = list[list[tuple[str, list[str], np.ndarray]]]
LOGIT_TITLE = "largest attention logit (all layers and heads)"


def _head_panels(ctx: Context) -> tuple[Matrices, list[str]]:
    """Entropy as layers x heads at a few steps, one row of panels per run that has it."""
    panels: Matrices = []
    have: list[str] = []
    for d in ctx.data:
        at = d.heads
        if at is None or not np.isfinite(at.values).any():
            continue
        have.append(d.run.name)
        panels.append(
            [
                (f"{d.run.name} · step {s}", at.modules, at.values[:, :, j])
                for j, s in enumerate(at.steps)
            ]
        )
    return panels, have


def heads_figure(ctx: Context) -> go.Figure | None:
    """``fig-attn_heads``: entropy per layer and head at a few steps."""
    panels, _ = _head_panels(ctx)
    return figures.matrices_figure(panels, "head", (0.0, 1.0), reverse=True) if panels else None


def logit_max_figure(ctx: Context) -> go.Figure | None:
    """``fig-attn_logit_max_over_time``: the largest attention logit over all heads."""
    curves = _max_logit(ctx)
    return figures.lines_figure(curves, LOGIT_TITLE, True) if curves else None


def _heads(ctx: Context, section: Section) -> None:
    panels, have = _head_panels(ctx)
    if not panels:
        return
    note = missing_note(ctx, "attn_entropy", have)
    if note:
        section.notes.append(note)
    div_id = "fig-attn_heads"  # findings link to the heatmap over time, which shows when
    section.body.append(figures.matrices(panels, "head", (0.0, 1.0), div_id, reverse=True))


def _max_logit(ctx: Context) -> list[tuple[str, int, Grid, int]]:
    """The largest attention logit over all layers and heads, per step bin."""
    curves = []
    for i, d in enumerate(ctx.data):
        grid = d.heat.get("attn_logit_max")
        if grid is None or grid.empty:
            continue
        with np.errstate(all="ignore"):
            top = np.nanmax(np.where(np.isfinite(grid.hi), grid.hi, -np.inf), axis=0)
        top = np.where(np.isfinite(top), top, np.nan)[None, :]
        curves.append(
            (
                d.run.name,
                i,
                Grid("attn_logit_max", ["max"], grid.first, grid.last, top, top, top),
                0,
            )
        )
    return curves


def attention_section(ctx: Context) -> Section:
    section = Section("attention", "Attention", intro=INTRO)
    _heads(ctx, section)
    add_heat_blocks(ctx, section, heatmap_keys("attention"))
    curves = _max_logit(ctx)
    if curves:
        div_id = "fig-attn_logit_max_over_time"
        section.body.append(figures.lines(curves, LOGIT_TITLE, True, div_id))
    if not section.body:
        section.notes.append("no attention metrics (attn_entropy, attn_logit_max) in these runs")
    return section
