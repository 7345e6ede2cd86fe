"""Section 3: signal propagation, per-layer forward and gradient scale against depth."""

from __future__ import annotations

import numpy as np

from .. import figures
from ..data import pick_steps
from ..figures import Profile
from . import Context, Section

INTRO = (
    "Per-layer rms of each layer's output (forward) and of the loss gradient w.r.t. it "
    "(backward), and the norm of each layer's weight gradient, against depth: at the first "
    "recorded step and at three later ones. This is the picture of Xiong et al. (2020): at "
    "init the weight gradients of Post-LN stay large up to the last layer, while Pre-LN's "
    "shrink toward the output. Log scale."
)


def _at_steps(ctx: Context, metric: str) -> list[Profile]:
    curves = []
    for i, d in enumerate(ctx.data):
        at = d.profiles.get(metric)
        if at is None or not np.isfinite(at.values).any():
            continue
        for order, step in enumerate(at.steps):
            curves.append(Profile(d.run.name, i, step, order, at.modules, at.values[:, 0, order]))
    return curves


def _layer_norms(ctx: Context, key: str) -> list[Profile]:
    curves = []
    for i, d in enumerate(ctx.data):
        if key not in d.layer_exact:
            continue
        steps, values = d.layer_exact[key]
        layers = [n for n in d.run.layers if n in d.census.modules.ids]
        for order, step in enumerate(pick_steps(steps, 4)):
            column = values[:, int(np.searchsorted(steps, step))]
            if np.isfinite(column).any():
                curves.append(Profile(d.run.name, i, step, order, layers, column))
    return curves


def propagation_section(ctx: Context) -> Section:
    section = Section("propagation", "Signal propagation", intro=INTRO)
    panels = [
        ("forward rms (act_rms)", _at_steps(ctx, "act_rms")),
        ("gradient rms (grad_rms)", _at_steps(ctx, "grad_rms")),
        ("weight-gradient norm per layer", _layer_norms(ctx, "param_grad_norm")),
    ]
    if not any(curves for _, curves in panels):
        section.notes.append("no per-layer act_rms, grad_rms or param_grad_norm in these runs")
        return section
    for title, curves in panels:
        if not curves:
            section.notes.append(f"{title}: not recorded")
    # Findings link to the heatmaps first (they show when); this plot shows where.
    div_id = ctx.register("fig-propagation", "act_rms", "grad_rms", "param_grad_norm")
    section.body.append(figures.profiles(panels, div_id, log=True))
    section.notes.append("no theory prediction is overlaid: stabscope has none for these models")
    return section
