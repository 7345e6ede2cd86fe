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
``max_factor`` (1/100) at ``share`` (90%) of at least ``min_steps`` steps.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from ..store import RUN_MODULE
from ..store.findings import Finding
from .base import Rule, RunView, finding
from .view import Request


def _all_sgd(view: RunView) -> bool:
    classes = [str(o.get("class", "")) for o in view.meta.optimizers]
    return bool(classes) and all("sgd" in c.lower() for c in classes)


def _clip_throttles(view: RunView, p: dict[str, float]) -> Iterator[Finding]:
    if not _all_sgd(view) or not view.has("grad_norm_clipped"):
        return
    rows = view.metrics("grad_norm", "grad_norm_clipped")
    rows = rows[rows.module == RUN_MODULE]
    wide = rows.pivot_table(index="step", columns="metric", values="value", aggfunc="first")
    wide = wide.dropna()
    if len(wide) < p["min_steps"] or "grad_norm_clipped" not in wide:
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
    yield finding(
        CLIP_THROTTLES,
        "error",
        f"the gradient clip keeps at most {high:.2g} of SGD's gradient at {p['share']:.0%} of "
        f"{len(factor)} steps (median {float(np.median(factor)):.2g}; the norm before the "
        f"clip {float(np.median(before[usable])):.3g}, after {float(np.median(after[usable])):.3g}"
        f"): SGD steps by lr x the clipped gradient, so the run trains at about "
        f"{float(np.median(factor)):.2g} of its learning rate",
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
    {"max_factor": 0.01, "share": 0.9, "min_steps": 10},
    _clip_throttles,
    "error",
    (Request(("grad_norm", "grad_norm_clipped")),),
)

RULES = [CLIP_THROTTLES]
