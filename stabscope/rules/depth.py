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
from .base import Rule, RunView, finding

XIONG = "Xiong et al. 2020, On Layer Normalization in the Transformer Architecture"


def _grad_growth(view: RunView, p: dict[str, float]) -> Iterator[Finding]:
    trend = layer_param_grad_trend(view.run_dir, view.meta)
    if trend is None or not trend.first_to_last > p["warning"]:
        return
    severity = "error" if trend.first_to_last > p["error"] else "warning"
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
        threshold=p["error"] if severity == "error" else p["warning"],
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
