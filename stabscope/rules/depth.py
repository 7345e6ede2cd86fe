"""Gradient growth across depth at init (Xiong et al. 2020).

The per-layer parameter-gradient norm at the first recorded step, fitted against the layer
index: Post-LN's gradients are large near the output and shrink toward the input, Pre-LN's
decay gently with depth (~1/sqrt(l)), which is expected and not flagged. The rule fires when
the last layer's norm exceeds the first layer's by ``warning`` (10x) or ``error`` (100x).
"""

from __future__ import annotations

from collections.abc import Iterator

from ..report.findings import Finding
from ..summary import layer_param_grad_trend
from .base import Rule, RunView, finding, graded

XIONG = "Xiong et al. 2020, On Layer Normalization in the Transformer Architecture"


def _grad_growth(view: RunView, p: dict[str, float]) -> Iterator[Finding]:
    trend = layer_param_grad_trend(view.run_dir, view.meta)
    grade = None if trend is None else graded(trend.first_to_last, p)
    if grade is None:
        return
    severity, threshold = grade
    yield finding(
        GRAD_GROWTH,
        severity,
        f"at step {trend.step} the gradient norm of layer {trend.layers[-1]} is "
        f"{trend.first_to_last:.3g}x that of layer {trend.layers[0]} "
        f"(x{trend.factor_per_layer:.3g} per layer over {len(trend.layers)} layers): "
        "gradients grow toward the output and vanish toward the input",
        module=None,
        step=trend.step,
        value=trend.first_to_last,
        threshold=threshold,
        metric="param_grad_norm",
        remedy="use Pre-LN, or add learning-rate warm-up; for a plain deep stack, "
        "residual connections or normalisation",
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
