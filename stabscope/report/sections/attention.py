"""Section 6: attention: entropy per layer and head, over time, and max logits."""

from __future__ import annotations

import numpy as np

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


def _heads(ctx: Context, section: Section) -> None:
    panels, have = [], []
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
        section.body.append(
            figures.lines(curves, "largest attention logit (all layers and heads)", True, div_id)
        )
    if not section.body:
        section.notes.append("no attention metrics (attn_entropy, attn_logit_max) in these runs")
    return section
