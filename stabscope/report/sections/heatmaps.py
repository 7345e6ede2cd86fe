"""Section 4: layer x step heatmaps of every per-layer metric, on log colour scales."""

from __future__ import annotations

from . import Context, Section, add_heat_blocks

KEYS = (
    "act_rms",
    "grad_rms",
    "act_absmax",
    "grad_absmax",
    "param_norm",
    "param_grad_norm",
    "norm_input_rms",
    "token_corr",
)
INTRO = (
    "Layers (rows, shallow at the top) against training steps. When steps or layers are "
    "merged to fit the page, a cell's colour is the largest value in it (the envelope keeps "
    "spikes); hover shows the cell's min and max. Runs side by side share axes and colours."
)


def heatmaps_section(ctx: Context) -> Section:
    section = Section("heatmaps", "Heatmaps", intro=INTRO)
    absent = add_heat_blocks(ctx, section, KEYS)
    if absent:
        section.notes.append(f"not recorded in any run: {', '.join(absent)}")
    return section
