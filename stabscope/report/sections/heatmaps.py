"""Section 4: layer x step heatmaps of every per-layer metric, on log colour scales."""

from __future__ import annotations

from ...metrics import heatmap_keys
from . import Context, Section, add_heat_blocks

KEYS = heatmap_keys("heatmaps")  # the catalogue's order
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
