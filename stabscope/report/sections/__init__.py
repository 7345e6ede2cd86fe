"""The report's sections. Each builds from the collected run data and says, in a note,
what it left out and why (a metric not recorded, a run without it)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import plotly.graph_objects as go

from ...store.findings import Finding
from .. import figures
from ..data import HEATMAPS, RunData, heat_sources


@dataclass
class Section:
    id: str
    title: str
    intro: str = ""  # HTML
    body: list[str] = field(default_factory=list)  # HTML blocks: figures, tables
    notes: list[str] = field(default_factory=list)  # plain text

    @property
    def plots(self) -> int:
        return sum(block.count('class="plotly-graph-div"') for block in self.body)


@dataclass
class Context:
    data: list[RunData]
    findings: dict[str, list[Finding] | None]  # run name -> worst-first findings
    #: run name -> where its findings came from, when not its findings.json
    findings_sources: dict[str, str] = field(default_factory=dict)
    figures: dict[str, str] = field(default_factory=dict)  # metric -> id of the plot showing it

    @property
    def names(self) -> list[str]:
        return [d.run.name for d in self.data]

    def register(self, div_id: str, *metrics: str) -> str:
        for metric in metrics:
            self.figures.setdefault(metric, div_id)
        return div_id


def missing_note(ctx: Context, what: str, have: list[str]) -> str | None:
    """``res_ratio: not recorded in run-b`` when some runs have something and others not."""
    missing = [n for n in ctx.names if n not in have]
    if have and missing:
        return f"{what}: not recorded in {', '.join(missing)}"
    return None


def heat_figure(ctx: Context, key: str, notes: list[str]) -> go.Figure | None:
    """The layer x step heatmap of ``key`` for every run that has it, side by side."""
    heat = HEATMAPS[key]
    have = [(d.run.name, d.heat[key]) for d in ctx.data if key in d.heat and not d.heat[key].empty]
    if not have:
        return None
    note = missing_note(ctx, key, [n for n, _ in have])
    if note:
        notes.append(note)
    return figures.heatmap_figure(have, f"{key}: {heat.title}", heat.log, heat.worst)


def heat_block(ctx: Context, key: str, notes: list[str]) -> str | None:
    """``heat_figure`` on the page; findings about ``key`` link to it."""
    fig = heat_figure(ctx, key, notes)
    if fig is None:
        return None
    div_id = ctx.register(f"fig-{key}", key, *heat_sources(HEATMAPS[key]))
    return figures.to_div(fig, div_id)


def add_heat_blocks(ctx: Context, section: Section, keys: Iterable[str]) -> list[str]:
    """Append the heatmap of each key that some run has; return the keys no run has."""
    absent = []
    for key in keys:
        block = heat_block(ctx, key, section.notes)
        if block is None:
            absent.append(key)
        else:
            section.body.append(block)
    return absent


def series_block(
    ctx: Context, metric: str, title: str, log: bool, notes: list[str], y_title: str = ""
) -> str | None:
    """``series_figure`` on the page; findings about ``metric`` link to it."""
    fig = series_figure(ctx, metric, title, log, notes, y_title)
    if fig is None:
        return None
    return figures.to_div(fig, ctx.register(f"fig-{metric}", metric))


def series_figure(
    ctx: Context, metric: str, title: str, log: bool, notes: list[str], y_title: str = ""
) -> go.Figure | None:
    """Line plot of a run-level series, every row (param group) of every run."""
    curves = [
        (d.run.name if len(grid.rows) == 1 else f"{d.run.name} · group {r}", i, grid, r)
        for i, d in enumerate(ctx.data)
        if (grid := d.series.get(metric)) is not None and not grid.empty
        for r in range(len(grid.rows))
    ]
    if not curves:
        return None
    note = missing_note(ctx, metric, [d.run.name for d in ctx.data if metric in d.series])
    if note:
        notes.append(note)
    return figures.lines_figure(curves, title, log, y_title)
