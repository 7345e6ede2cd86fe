"""Section 5: residual branches: Admin's ω, branch/stream ratio, dependency, and β at init."""

from __future__ import annotations

import numpy as np

from .. import figures
from . import Context, Section, add_heat_blocks, missing_note

KEYS = ("res_omega", "res_ratio", "res_dependency", "res_corr")
INTRO = (
    "Per residual branch over training: Admin's ω (Liu et al. 2020), the rms of the branch "
    "output over the rms of the stream it is added to, the branch's share of the variance "
    "of the sum (Var f / (α² Var x + Var f), in [0, 1]) and its correlation with the stream "
    "(near −1 the branch cancels the stream). Then β at the first recorded step: the stream "
    "after each branch (rows) as a mix of unit-variance components, the stream entering the "
    "first branch and each branch output (columns)."
)


def _beta(ctx: Context, section: Section) -> None:
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
        section.notes.append("res_beta (β at init): not recorded in any run")
        return
    note = missing_note(ctx, "res_beta", have)
    if note:
        section.notes.append(note)
    values = np.concatenate([z.ravel() for row in panels for _, _, z in row])
    finite = values[np.isfinite(values)]
    div_id = ctx.register("fig-res_beta", "res_beta")
    zrange = (float(min(0.0, finite.min())), float(max(1.0, finite.max())))
    section.body.append(figures.matrices(panels, "component", zrange, div_id))


def residual_section(ctx: Context) -> Section:
    section = Section("residual", "Residual dependency", intro=INTRO)
    absent = add_heat_blocks(ctx, section, KEYS)
    if absent:
        section.notes.append(
            f"not recorded in any run: {', '.join(absent)} (needs detected residual branches)"
        )
    _beta(ctx, section)
    return section
