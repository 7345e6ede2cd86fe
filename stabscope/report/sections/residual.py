"""Section 5: residual branches: Admin's ω, branch/stream ratio, dependency, and β at init."""

from __future__ import annotations

import numpy as np
import plotly.graph_objects as go

from ...metrics import heatmap_keys
from .. import figures
from ..data import RunData
from . import Context, Section, add_heat_blocks, missing_note

OMEGA = "res_omega"  # Post-LN and DeepNorm branches only
KEYS = tuple(k for k in heatmap_keys("residual") if k != OMEGA)  # ω is drawn on its own
INTRO = (
    "Per residual branch over training: Admin's ω (Liu et al. 2020), the rms of the branch "
    "output over the rms of the stream it is added to, the branch's share of the variance "
    "of the sum (Var f / (α² Var x + Var f), in [0, 1]) and its correlation with the stream "
    "(near −1 the branch cancels the stream). Then β at the first recorded step: the stream "
    "after each branch (rows) as a mix of unit-variance components, the stream entering the "
    "first branch and each branch output (columns)."
)


def _beta_panels(
    ctx: Context,
) -> tuple[list[list[tuple[str, list[str], np.ndarray]]], list[str], tuple[float, float]]:
    """β at the first recorded step, one panel per run that has it, and its colour range."""
    panels = []
    have = []
    for d in ctx.data:
        beta = d.beta
        if beta is None or not np.isfinite(beta.values).any():
            continue
        have.append(d.run.name)
        panels.append(
            [(f"{d.run.name} · step {beta.steps[0]}", beta.modules, beta.values[:, :, 0])]
        )
    if not panels:
        return panels, have, (0.0, 1.0)
    values = np.concatenate([z.ravel() for row in panels for _, _, z in row])
    finite = values[np.isfinite(values)]
    return panels, have, (float(min(0.0, finite.min())), float(max(1.0, finite.max())))


def beta_figure(ctx: Context) -> go.Figure | None:
    """``fig-res_beta``: β at the first recorded step."""
    panels, _, zrange = _beta_panels(ctx)
    return figures.matrices_figure(panels, "component", zrange) if panels else None


def _beta(ctx: Context, section: Section) -> None:
    panels, have, zrange = _beta_panels(ctx)
    if not panels:
        section.notes.append("res_beta (β at init): not recorded in any run")
        return
    note = missing_note(ctx, "res_beta", have)
    if note:
        section.notes.append(note)
    div_id = ctx.register("fig-res_beta", "res_beta")
    section.body.append(figures.matrices(panels, "component", zrange, div_id))


def _measured_placements(d: RunData) -> set[str]:
    """Norm placements of the run's residual branches the probe can measure (those with a
    norm to read the stream from)."""
    structure = d.run.structure or {}
    return {
        str(br.get("placement"))
        for block in structure.get("blocks", [])
        for br in block.get("branches", [])
        if br.get("norm")
    }


def _why_absent(data: list[RunData]) -> str:
    if any(_measured_placements(d) for d in data):
        return (
            "residual branches were detected; the residual probe is off in the cheap preset "
            "and with structure_probes = false"
        )
    return "needs detected residual branches"


def _omega(ctx: Context, section: Section) -> list[RunData] | None:
    """Admin's ω heatmap for the runs not all of whose branches are Pre-LN; those that are
    get a note that ω is not defined for them, not that it is missing. Returns the runs ω
    was expected from when none of them has it, else None."""
    pre_only = [d.run.name for d in ctx.data if _measured_placements(d) == {"pre"}]
    others = Context([d for d in ctx.data if d.run.name not in pre_only], ctx.findings, ctx.figures)
    if pre_only:
        where = "" if len(ctx.data) == 1 else f" ({', '.join(pre_only)})"
        section.notes.append(
            f"res_omega: not defined for Pre-LN branches{where}: Admin's ω sets the residual "
            "weight of Post-LN and DeepNorm layers, where a norm follows the add; a Pre-LN "
            "stream already carries every earlier branch"
        )
    if others.data and add_heat_blocks(others, section, [OMEGA]):
        return others.data
    return None


def residual_section(ctx: Context) -> Section:
    section = Section("residual", "Residual dependency", intro=INTRO)
    absent: dict[str, list[str]] = {}  # why -> metrics no run has
    omega_from = _omega(ctx, section)
    if omega_from is not None:
        absent.setdefault(_why_absent(omega_from), []).append(OMEGA)
    missing = add_heat_blocks(ctx, section, KEYS)
    if missing:
        absent.setdefault(_why_absent(ctx.data), []).extend(missing)
    for why, keys in absent.items():
        section.notes.append(f"not recorded in any run: {', '.join(keys)} ({why})")
    _beta(ctx, section)
    return section
