"""Section 7: updates: per-layer update ratios, Adam's √v against ε, and ‖ΔF‖."""

from __future__ import annotations

from ...metrics import heatmap_keys
from . import Context, Section, add_heat_blocks, series_block

INTRO = (
    "How far each step moves each layer: ‖Δθ‖/‖θ‖ over the layer's parameters (≈ lr for "
    "Adam when healthy; much larger early on is the warm-up failure), Adam's √v/ε where it "
    "was recorded (near 1, ε dominates and updates shrink: Wortsman et al. 2023), and the "
    "model update ‖ΔF‖ = ‖F(x, θ_t) − F(x, θ_0)‖ on a probe batch (Wang et al. 2022)."
)


#: The run-level line of this section: (metric, title, log scale).
PLOTS = (("model_update", "model update ‖ΔF‖", True),)


def updates_section(ctx: Context) -> Section:
    section = Section("updates", "Updates", intro=INTRO)
    add_heat_blocks(ctx, section, heatmap_keys("updates"))
    block = series_block(ctx, *PLOTS[0], section.notes)
    if block is not None:
        section.body.append(block)
    else:
        section.notes.append("model_update (‖ΔF‖): not recorded in any run")
    if not section.body:
        section.notes.append("no update metrics (update_norm with param_norm) in these runs")
    return section
