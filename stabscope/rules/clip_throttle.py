"""Rule ``clip-throttles``: a gradient clip so tight that SGD barely moves.

SGD's step is the learning rate times the gradient it receives, so a clip that scales the
gradient by f at every step trains the run at f times its learning rate; adaptive optimizers
(Adam, RMSprop, Adagrad) divide by the gradient's own scale and hardly notice a uniform
factor, so only runs whose every optimizer is SGD are judged. Clipping is meant to cut the
rare outsized step: with the usual max_norm (1.0 in the HF Trainer, 0.25 for the
AWD-LSTM's SGD at lr 30) most steps pass unclipped or lose a small factor. A max_norm set
orders of magnitude below the gradient norm (1e-4 for a norm near 1) instead shrinks every
step a thousandfold and the loss stands still.

An error when the clip's factor (``grad_norm_clipped`` / ``grad_norm``, every step) is at most
``max_factor`` (1/100) at ``share`` (90%) of at least ``min_steps`` steps, and the step that
is left is small: lr x the clipped norm x SGD's momentum gain (1 - dampening)/(1 - momentum),
over the weights' norm at the first recorded step, at most ``max_step`` (1e-4) at the median
step: ten times below the update-to-weight ratio of about 1e-3 per step that healthy training
shows (Karpathy, CS231n notes, "Neural Networks Part 3"). A clip that acts at every step
with an lr tuned for it (a summed loss, normalised gradient descent) takes steps of a useful
size and is not reported.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from ..store import RUN_MODULE
from ..store.findings import Finding
from .base import Rule, RunView, finding
from .lr_plan_check import largest_lr
from .view import Request
from .weight_decay import momentum_factor


def _all_sgd(view: RunView) -> bool:
    """Every owned optimizer is SGD (a class name with "SGD", not the sign of the gradient's
    SignSGD, which a uniform factor does not change)."""
    classes = [str(o.get("class", "")).lower() for o in view.meta.optimizers]
    return bool(classes) and all("sgd" in c and "sign" not in c for c in classes)


def momentum_gain(view: RunView) -> float:
    """The largest (1 - dampening)/(1 - momentum) over the SGD groups: how far momentum
    lengthens a step at steady state (1 without momentum)."""
    return max(
        [1.0]
        + [
            momentum_factor(str(optimizer.get("class")), group)
            for optimizer in view.meta.optimizers
            for group in optimizer.get("groups") or []
        ]
    )


def _weight_norm(view: RunView) -> float | None:
    """The trained parameters' norm at the first step that recorded them (in quadrature)."""
    rows = view.metrics("param_norm")
    rows = rows[rows.module.isin(view.meta.trainable)]
    if rows.empty:
        return None
    first = rows[rows.step == rows.step.min()].value.to_numpy(float)
    total = float(np.sqrt(np.sum(first**2)))
    return total if np.isfinite(total) and total > 0 else None


def _relative_step(view: RunView, steps: np.ndarray, after: np.ndarray) -> float | None:
    """The median over ``steps`` of lr x the clipped norm x the momentum gain / ||θ||."""
    norm = _weight_norm(view)
    if norm is None or not view.has("lr"):
        return None
    at = largest_lr(view).reindex(steps).to_numpy(float)  # (steps,) NaN: no finite lr row
    size = at * after * momentum_gain(view) / norm
    size = size[np.isfinite(size)]
    return float(np.median(size)) if len(size) else None


def _clip_throttles(view: RunView, p: dict[str, float]) -> Iterator[Finding]:
    if not _all_sgd(view) or not view.has("grad_norm_clipped"):
        return
    rows = view.metrics("grad_norm", "grad_norm_clipped")
    rows = rows[rows.module == RUN_MODULE]
    wide = rows.pivot_table(index="step", columns="metric", values="value", aggfunc="first")
    wide = wide.dropna()
    # pivot_table drops a metric whose every value is NaN (a diverged run's grad_norm).
    if len(wide) < p["min_steps"] or not {"grad_norm", "grad_norm_clipped"} <= set(wide):
        return
    before, after = wide.grad_norm.to_numpy(float), wide.grad_norm_clipped.to_numpy(float)
    usable = np.isfinite(before) & np.isfinite(after) & (before > 0)
    if usable.sum() < p["min_steps"]:
        return
    factor = after[usable] / before[usable]  # (steps,) what the clip kept of each gradient
    high = float(np.quantile(factor, p["share"]))
    if not high <= p["max_factor"]:
        return
    steps = wide.index.to_numpy(np.int64)[usable]
    size = _relative_step(view, steps, after[usable])
    if size is None or not size <= p["max_step"]:
        return
    yield finding(
        CLIP_THROTTLES,
        "error",
        f"the gradient clip keeps at most {high:.2g} of SGD's gradient at {p['share']:.0%} of "
        f"{len(factor)} steps (median {float(np.median(factor)):.2g}; the norm before the "
        f"clip {float(np.median(before[usable])):.3g}, after {float(np.median(after[usable])):.3g}"
        f"): SGD steps by lr x the clipped gradient, so the run trains at about "
        f"{float(np.median(factor)):.2g} of its learning rate, each step moving the weights "
        f"by {size:.2g} of their norm",
        module=RUN_MODULE,
        step=int(steps[-1]),
        value=high,
        threshold=p["max_factor"],
        metric="grad_norm_clipped",
        remedy="set max_norm near the typical gradient norm (grad_norm), so that only the "
        "rare outsized step is clipped",
    )


CLIP_THROTTLES = Rule(
    "clip-throttles",
    "A gradient clip far below the gradient norm throttles SGD",
    "",
    ("grad_norm_clipped",),
    {"max_factor": 0.01, "share": 0.9, "min_steps": 10, "max_step": 1e-4},
    _clip_throttles,
    "error",
    (Request(("grad_norm", "grad_norm_clipped", "lr")), Request(("param_norm",))),
)

RULES = [CLIP_THROTTLES]
