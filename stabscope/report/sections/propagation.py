"""Section 3: signal propagation, per-layer forward and gradient scale against depth."""

from __future__ import annotations

import numpy as np
import plotly.graph_objects as go

from ...theory.prediction import stored_prediction
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


def _predicted(ctx: Context, metric: str) -> list[Profile]:
    """The theory's curve at init on the measured curve's depth axis (docs/theory.md).

    Gradients are predicted relative to the last block, so they are scaled to the gradient
    measured there at the first recorded step.
    """
    curves = []
    for i, d in enumerate(ctx.data):
        at, prediction = d.profiles.get(metric), stored_prediction(d.run.path)
        if at is None or prediction is None or not at.steps:
            continue
        blocks = d.run.meta.blocks
        names = prediction.module_names(blocks)
        row = {name: k for k, name in enumerate(at.modules)}
        values = np.full(len(at.modules), np.nan)
        for name, layer in zip(names, prediction.layers):
            if name in row:
                values[row[name]] = layer.act_rms if metric == "act_rms" else layer.grad_rms_rel
        if metric == "grad_rms":
            last = row.get(names[-1])
            values *= at.values[last, 0, 0] if last is not None else np.nan
        if np.isfinite(values).any():
            name = f"{d.run.name} · predicted at init"
            curves.append(Profile(name, i, at.steps[0], 0, at.modules, values, predicted=True))
    return curves


Panels = list[tuple[str, list[Profile]]]


def _panels(ctx: Context) -> tuple[Panels, bool]:
    """The three panels against depth, and whether a theory curve is among them."""
    predicted = {m: _predicted(ctx, m) for m in ("act_rms", "grad_rms")}
    panels = [
        ("forward rms (act_rms)", _at_steps(ctx, "act_rms") + predicted["act_rms"]),
        ("gradient rms (grad_rms)", _at_steps(ctx, "grad_rms") + predicted["grad_rms"]),
        ("weight-gradient norm per layer", _layer_norms(ctx, "param_grad_norm")),
    ]
    return panels, bool(predicted["act_rms"] or predicted["grad_rms"])


def propagation_figure(ctx: Context) -> go.Figure | None:
    """The section's figure (``fig-propagation``); None without per-layer data."""
    panels, _ = _panels(ctx)
    return figures.profiles_figure(panels, log=True) if any(c for _, c in panels) else None


def propagation_section(ctx: Context) -> Section:
    section = Section("propagation", "Signal propagation", intro=INTRO)
    panels, predicted = _panels(ctx)
    if not any(curves for _, curves in panels):
        section.notes.append("no per-layer act_rms, grad_rms or param_grad_norm in these runs")
        return section
    for title, curves in panels:
        if not curves:
            section.notes.append(f"{title}: not recorded")
    # Findings link to the heatmaps first (they show when); this plot shows where.
    div_id = ctx.register("fig-propagation", "act_rms", "grad_rms", "param_grad_norm")
    section.body.append(figures.profiles(panels, div_id, log=True))
    if predicted:
        section.notes.append(
            "long dashes and crosses, “predicted at init”: the theory's profile for the model "
            "as built (DeepScaleLM moment propagation, Kedia et al. 2024; docs/theory.md); "
            "predicted gradients are relative, scaled to the last block's measured gradient"
        )
    else:
        section.notes.append("no theory prediction in these runs (no prediction.json)")
    return section
