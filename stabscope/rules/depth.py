"""Gradient growth across depth (Xiong et al. 2020), at init and over the first steps.

Per recorded step, the per-layer parameter-gradient norm, last layer over first layer.
Post-LN's gradients are large near the output and vanish toward the input; on the sample
GPT (24 layers) the ratio is ~1 at init and passes 100 by step 3 and 1e4 by step 25, while
Pre-LN's stays below 1 (its gentle decay with depth is expected and not flagged) and
DeepNorm's stays near 1. The finding names the first step where the ratio passes ``error``
(else ``warning``).
"""

from __future__ import annotations

from collections.abc import Iterator

from ..report.findings import Finding
from ..summary import layer_param_grad_trends
from .base import Rule, RunView, finding, graded

XIONG = "Xiong et al. 2020, On Layer Normalization in the Transformer Architecture"


def _grad_growth(view: RunView, p: dict[str, float]) -> Iterator[Finding]:
    trends = layer_param_grad_trends(view.metrics("param_grad_norm"), view.meta)
    graded_steps = [(t, graded(t.first_to_last, p)) for t in trends]
    hits = [(t, g) for t, g in graded_steps if g is not None]
    if not hits:
        return
    worst = "error" if any(g[0] == "error" for _, g in hits) else "warning"
    trend, (severity, threshold) = next((t, g) for t, g in hits if g[0] == worst)
    at_init = trends[0].first_to_last
    yield finding(
        GRAD_GROWTH,
        severity,
        f"at step {trend.step} the gradient norm of layer {trend.layers[-1]} is "
        f"{trend.first_to_last:.3g}x that of layer {trend.layers[0]} "
        f"(x{at_init:.3g} at step {trends[0].step}, {len(trend.layers)} layers): "
        "gradients grow toward the output and vanish toward the input",
        module=None,
        step=trend.step,
        value=trend.first_to_last,
        threshold=threshold,
        metric="param_grad_norm",
        remedy="use Pre-LN or DeepNorm, or add learning-rate warm-up; for a plain "
        "deep stack, residual connections or normalisation",
    )


GRAD_GROWTH = Rule(
    "gradient-growth",
    "Gradient growth across depth at init",
    XIONG,
    ("param_grad_norm",),
    {"warning": 10.0, "error": 100.0},
    _grad_growth,
)

RULES = [GRAD_GROWTH]


WANG = "Wang et al. 2022, DeepNet: Scaling Transformers to 1,000 Layers"


def _model_update(view: RunView, p: dict[str, float]) -> Iterator[Finding]:
    rel = view.metrics("model_update_rel").sort_values("step")
    if len(rel) < 3:
        return
    first, last = float(rel.value.iloc[0]), float(rel.value.iloc[-1])
    later = last - first
    if first > p["first_step"] and later < p["stall"] * first:
        yield finding(
            MODEL_UPDATE,
            "warning",
            f"the first recorded step moved the output by {first:.3g}x its norm "
            f"(||F(x,θ_t) − F(x,θ_0)|| / ||F(x,θ_0)||), then only {later:+.3g} more "
            f"by step {int(rel.step.iloc[-1])}: a model-update blow-up followed by "
            "a stall",
            module=None,
            step=int(rel.step.iloc[0]),
            value=first,
            threshold=p["first_step"],
            metric="model_update_rel",
            remedy="DeepNorm (α=(2N)^(1/4), β-scaled init), Pre-LN, or warm-up with "
            "a lower peak learning rate",
        )


MODEL_UPDATE = Rule(
    "model-update",
    "Model-update blow-up",
    WANG,
    ("model_update_rel",),
    {"first_step": 1.0, "stall": 0.5},
    _model_update,
    "warning",
)

RULES.append(MODEL_UPDATE)
