"""Gradient growth across depth (Xiong et al. 2020), at init and over the first steps.

Per recorded step, the per-layer parameter-gradient norm, last layer over first layer.
Post-LN's gradients are large near the output and vanish toward the input; on the sample
GPT (24 layers) the ratio is ~1 at init and passes 100 by step 3 and 1e4 by step 25, while
Pre-LN's stays below 1 (its gentle decay with depth is expected and not flagged) and
DeepNorm's stays near 1. The finding names the first step where the ratio passes ``error``
(else ``warning``).
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import pandas as pd

from ..analysis.summary import layer_modules, layer_param_grad_trends, owner_module
from ..store.findings import Finding
from ..store.structure import Structure
from .base import Rule, RunView, finding, graded

XIONG = "Xiong et al. 2020, On Layer Normalization in the Transformer Architecture"


def _grad_growth(view: RunView, p: dict[str, float]) -> Iterator[Finding]:
    grads = view.metrics("param_grad_norm")
    trends = layer_param_grad_trends(grads, view.meta)
    layers = layer_modules(view.meta.doc)  # the modules that stand for the trends' layers
    if not view.block_names:
        # A plain stack: its gradient vanishes toward the input only where the parameters
        # that run before its first layer (a stem, an embedding) see it vanish too.
        reaching = input_side_norms(view, grads, layers)
        trends = [t for t in trends if not reaching.get(t.step, 0.0) >= t.values[-1]]
    graded_steps = [(t, graded(t.first_to_last, p)) for t in trends]
    hits = [(t, g) for t, g in graded_steps if g is not None]
    if not hits:
        return
    worst = "error" if any(g[0] == "error" for _, g in hits) else "warning"
    trend, (severity, threshold) = next((t, g) for t, g in hits if g[0] == worst)
    first, last = (_layer_named(layers, i) for i in (trend.layers[0], trend.layers[-1]))
    # How it began, where the step found is a later one.
    start = trends[0]
    init = "" if trend is start else f"{_ratio_words(start.first_to_last)} at step {start.step}"
    remedy = PLAIN_REMEDY if not view.block_names else BLOCKS_REMEDY
    if trend.first_to_last == math.inf:
        measured = (
            f"the gradient norm of the first of {len(trend.layers)} layers ({first}) is "
            f"exactly 0 and that of the last ({last}) is not{f' ({init})' if init else ''}"
        )
        # Where a gradient reached the first layer at an earlier step, its decay with depth
        # did not change: units between stopped passing one (ReLUs that died). From the
        # start, exactly 0 is a decay that float32 cannot hold (a 64-layer sigmoid stack)
        # or a cut.
        reached = next((t.step for t in trends if math.isfinite(t.first_to_last)), None)
        if reached is not None and reached < trend.step:
            measured += f": no gradient passes between them, where one did at step {reached}"
            remedy = DIED_REMEDY
        else:
            measured += ": the gradients vanish before they reach the input"
            remedy = f"{remedy}; or find what passes none: {CUT_REMEDY}"
    else:
        measured = (
            f"the gradient norm of the last of {len(trend.layers)} layers ({last}) is "
            f"{trend.first_to_last:.3g}x that of the first ({first}"
            f"{f'; {init}' if init else ''}): gradients grow toward the output and vanish "
            "toward the input"
        )
    yield finding(
        GRAD_GROWTH,
        severity,
        f"at step {trend.step} {measured}",
        module=None,
        step=trend.step,
        value=trend.first_to_last if math.isfinite(trend.first_to_last) else None,  # JSON
        threshold=threshold,
        metric="param_grad_norm",
        remedy=remedy,
    )


def _layer_named(layers: dict[str, int], index: int) -> str:
    """``layer i, NAME``: the layer's index and the module that stands for it among
    ``layers`` (``layer_modules``: a stage of a conv net, an encoder's or a decoder's
    layer), or ``layer i`` where no one module does."""
    names = [n for n, i in layers.items() if i == index]
    if len(names) != 1 or names[0] == str(index):  # a Sequential's "0" says no more
        return f"layer {index}"
    return f"layer {index}, {names[0]}"


def input_side_norms(
    view: RunView, grads: pd.DataFrame, layers: dict[str, int]
) -> dict[int, float]:
    """Per recorded step, the gradient norm of the parameters whose modules ran before the
    first of ``layers`` (``layer_modules``: the stack; a stem convolution, an embedding):
    outside every layer, and
    done before any module of the first layer was (meta.json's ``forward_order``). {} where
    no such parameter has a gradient.

    Why: in a stack without residual blocks found (a ConvNeXt whose branch is added in
    another layout, a ResNet's stages), the per-layer norm of a stage whose blocks are
    scaled down (LayerScale at 0.1) sits far under the next stage's, which opens with a
    downsampling layer outside any branch: 136x over two stages of a healthy ConvNeXt, while
    its stem, nearer the input than either, had the largest gradient of all (3.23 against
    0.88 and 0.0065). Gradients that vanish toward the input reach the stem smaller still."""
    if not layers:
        return {}
    first = min(layers, key=lambda name: layers[name])

    def inside(name: str, layer: str) -> bool:
        return name == layer or name.startswith(layer + ".")

    orders = [
        int(m["forward_order"])
        for m in view.meta.modules
        if inside(str(m["name"]), first) and m.get("forward_order") is not None
    ]
    if not orders:
        return {}
    stem = {
        str(m["name"])
        for m in view.meta.modules
        if m.get("forward_order") is not None
        and m["forward_order"] < min(orders)
        and not any(inside(str(m["name"]), layer) for layer in layers)
    }
    # Each distinct parameter's owner once, then every row by its code (a long run has
    # parameters x recorded steps rows).
    codes, names = pd.factorize(grads.module.astype(str))
    rows = grads[np.array([owner_module(n) in stem for n in names], bool)[codes]]
    if rows.empty:
        return {}
    squares = rows.value.astype(float) ** 2
    return {int(s): float(v) for s, v in np.sqrt(squares.groupby(rows.step).sum()).items()}


def _ratio_words(ratio: float) -> str:
    if math.isfinite(ratio):
        return f"x{ratio:.3g}"
    return "exactly 0 at the first layer" if ratio == math.inf else "not finite"


#: The first layer's gradient is exactly 0 where it was not at an earlier step: units that
#: passed a gradient no longer do (ReLUs pushed below 0 for every input by an oversized
#: update).
DIED_REMEDY = (
    "the units between stopped passing a gradient during training (ReLUs whose inputs went "
    "below 0 for every example after oversized updates): lower the learning rate or add "
    "warm-up; a leaky activation (LeakyReLU, GELU) keeps a gradient"
)
#: Exactly 0 from the first recorded step: besides a decay, something may pass none.
CUT_REMEDY = (
    "a .detach() or torch.no_grad() in the forward, or units dead from init (a large "
    "negative bias before a ReLU)"
)
#: Residual blocks were found: the norm placement is the lever (Xiong et al. 2020).
BLOCKS_REMEDY = "use Pre-LN or DeepNorm, or add learning-rate warm-up"
#: No residual blocks: a plain deep stack, where the init sets how each layer scales the
#: backward signal (He et al. 2015: gain sqrt(2) keeps it for ReLU; Glorot and Bengio 2010).
PLAIN_REMEDY = (
    "initialise each layer to keep the gradient's scale (Kaiming/He for ReLU, Glorot for "
    "tanh), or add residual connections or normalisation"
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
    # Finite steps only: after a divergence the output change is NaN, which is neither a
    # blow-up nor a stall (the nonfinite rule reports it); the stall is judged up to there.
    rel = rel[np.isfinite(rel.value.to_numpy(float))]
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
    online=False,  # "the rest of the run added less": needs the rest of the run
)

RULES.append(MODEL_UPDATE)


def _stream_norms(structure: Structure | None) -> set[str]:
    """Norms that sit on the residual stream (post or DeepNorm placement): every gradient to
    the layers below passes through each of them, so their Jacobians multiply."""
    return {
        branch.norm
        for branch in (structure.branches if structure else [])
        if branch.norm and branch.placement in ("post", "deepnorm")
    }


def _norm_input_growth(view: RunView, p: dict[str, float]) -> Iterator[Finding]:
    # rows: one norm_input_rms per norm module and recorded step; rms in units where sqrt(d)
    # is ||x|| = sqrt(d) * rms, so growth of the rms is growth beyond sqrt(d).
    norms = view.metrics("norm_input_rms")
    trends = layer_param_grad_trends(view.metrics("param_grad_norm"), view.meta)
    if norms.empty or len(trends) < 2:
        return
    # dropna=False keeps a first step whose every value is NaN: the growth is relative to the
    # first recorded step, not to the first finite one.
    rms = norms[norms.call == 0].pivot_table(
        index="step", columns="module", values="value", aggfunc="first", dropna=False
    )
    if rms.empty:
        return
    start = rms.iloc[0]
    start = start.where(np.isfinite(start) & (start > 0))  # NaN: no growth can be measured
    growth = rms / start  # (steps, norms): input rms relative to the first recorded step
    first = trends[0]
    for trend in trends[1:]:
        if trend.step not in growth.index or trend.layers != first.layers:
            continue
        ends = np.array([first.values[0], first.values[-1], trend.values[0], trend.values[-1]])
        if not (np.isfinite(ends).all() and (ends > 0).all()):
            continue  # a NaN, Inf or zero gradient norm: no collapse factor to speak of
        # How much more the bottom layer's gradient shrank than the top layer's.
        collapse = (first.values[0] / trend.values[0]) * (trend.values[-1] / first.values[-1])
        row = growth.loc[trend.step]
        row = row[np.isfinite(row)]
        if row.empty or not collapse >= p["grad_collapse"] or row.max() < p["input_growth"]:
            continue
        norm = str(row.idxmax())
        level = float(rms.loc[trend.step, norm])
        stream = sorted(_stream_norms(view.structure) & set(row.index))
        compounded = (
            f"; the {len(stream)} norms on the residual stream compound it to "
            f"x{float(row[stream].prod()):.3g} of gradient attenuation"
            if len(stream) > 1
            else ""
        )
        yield finding(
            NORM_INPUT_GROWTH,
            "warning",
            f"by step {trend.step} the input of {norm} grew x{row.max():.3g} to "
            f"||x|| = {level:.3g}·sqrt(d) while the gradient of layer {trend.layers[0]} "
            f"fell x{collapse:.3g} relative to layer {trend.layers[-1]}: a norm's Jacobian "
            f"scales like sqrt(d)/||x||{compounded}",
            module=norm,
            step=trend.step,
            value=float(collapse),
            threshold=p["grad_collapse"],
            metric="norm_input_rms",
            remedy="DeepNorm (α=(2N)^(1/4) up-weights the residual so each norm's input "
            "stays bounded), Pre-LN, or a lower peak learning rate with warm-up",
        )
        return


NORM_INPUT_GROWTH = Rule(
    "norm-input-growth",
    "Norm inputs growing while the gradients below them collapse",
    WANG,
    ("norm_input_rms", "param_grad_norm"),
    {"input_growth": 1.25, "grad_collapse": 100.0},
    _norm_input_growth,
    "warning",
)

RULES.append(NORM_INPUT_GROWTH)
