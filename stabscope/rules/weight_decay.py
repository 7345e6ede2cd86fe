"""Rule ``weight-decay-dominance``: weight decay that shrinks the weights faster than the
updates can hold them, so the model unlearns what it learns.

Decoupled weight decay multiplies every decayed weight by ``1 - lr·wd`` at each step, apart
from the gradient's update (Loshchilov & Hutter 2019, "Decoupled Weight Decay
Regularization"; SGD's coupled decay does the same, and its momentum buffer repeats it
``1/(1 - momentum)`` times at steady state). The weights settle where the updates' growth
balances that shrinking, an equilibrium reached in about ``1/(lr·wd)`` steps whose norm falls
as the decay rises (Kosson et al. 2024). Usual recipes keep ``lr·wd`` near 1e-5-1e-4 per
step: GPT-3 trained with lr 6e-4 and wd 0.1 (Brown et al. 2020), BERT with lr 1e-4 and wd
0.01 (Devlin et al. 2019). From ``min_decay`` = 0.01 per step (a half-life of 69 steps, two
orders above those recipes), the decay alone removes a weight's scale within a short run.

The finding needs both the setting and its effect: a decay rate at or above ``min_decay`` in
a group with parameters (the group's largest recorded lr times its ``weight_decay``), and the
model's weight norm (all recorded trainable parameters, in quadrature) at or below
``max_norm_ratio`` of its first recorded value. It is a warning, and an error from
``error_decay`` = 0.1 per step: a weight then keeps e^-1 of what it learned 1/(lr·wd) = 10
steps before, so nothing learned lasts unless it is learned again every few steps. It is an
error from ``fast_decay`` = 0.014 too (a memory of 70 steps) where the norm has fallen to
``fast_norm_ratio`` = 0.5 of its start or less: the decay then holds the weights well below
the scale they started at. Weights that grow despite the decay give no finding: their
trouble, if any, is the other rules'.

Measured, with truth from each script's own loss, on eleven families with healthy twins
(AdamW, Adam with decoupled decay, SGD with momentum). The six runs at lr·wd 0.1 whose norm
fell had all failed; two more at 0.0999 (wd 33.3), one failed and one over 10x its twin's
loss, get the warning. No healthy twin (up to AdamW wd 1 and SGD wd 5e-3) had a finding.
Between 0.01 and 0.1 the same shrinking norm came with runs that failed (an HF GPT-2 and
LLaMA at 0.03 gave back what they had learned) and with runs that learned, worse than their
twins (an LSTM at 0.015, 1.9x its twin's loss; an MLP at 0.03, 1.3x): a warning there.
Missed: a run whose norm grew under lr·wd 0.1 (an OPT after a 50-step warm-up), and a BERT
at 0.05 whose weights the decay held at their initial scale.

The error below 0.1 came from a sweep of six families (an HF GPT-2, a ViT-style
classifier, a tabular MLP without norms, an LSTM LM, a 1-D CNN with batch norm, an HF BERT
MLM; AdamW on every parameter at lr·wd 0.0025-0.08 per step, 250 steps, truth from the
loss against a wd 0.01 twin): at 0.02 and 0.04, 10 of 12 runs failed and each had its
norm at 0.38 of its start or below; the two that learned (the MLP, 1.2x and 1.5x its twin's
loss) kept 0.53-0.59. At 0.01, runs that learned had fallen to 0.29-0.36 (the CNN, the
BERT) as runs that failed had: there a norm tells nothing, and the finding stays a warning.
``fast_decay`` sits at the geometric midpoint of the two levels, sqrt(0.01 · 0.02).

Only decays applied to the weights themselves, at lr·wd, count: AdamW's, Lion's, Adam's
with ``decoupled_weight_decay``, SGD's; not Adafactor's (HF's scales it by the weights'
rms). Adam, RMSprop and Adagrad add ``wd·w`` to the gradient, and their normalisation by the
gradient's own scale changes what it does.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..store.findings import Finding
from .base import Rule, RunView, finding
from .view import Request

DECOUPLED_WEIGHT_DECAY = "Loshchilov & Hutter 2019, Decoupled Weight Decay Regularization"

#: Optimizers whose decay multiplies the weights by (1 - lr·wd): lowercase name fragments.
#: Not Adafactor: HF's multiplies its decay by the weights' rms (``scale_parameter``), torch's
#: does not, and both have the one class name.
DIRECT_DECAY = ("adamw", "lion", "sgd")


@dataclass(frozen=True)
class Decay:
    """One param group's decay per step: ``rate`` = lr · wd · ``factor`` (SGD's momentum)."""

    rate: float
    optimizer: str
    group: int
    lr: float
    weight_decay: float
    factor: float = 1.0

    @property
    def formula(self) -> str:
        """How the rate was made, for a message: ``lr·wd = 0.003·10 = 0.03``."""
        product = f"{self.lr:.3g}·{self.weight_decay:g}"
        if self.factor != 1.0:
            momentum = "(1 - dampening)/(1 - momentum)"
            return f"lr·wd·{momentum} = {product}·{self.factor:.3g} = {self.rate:.3g}"
        return f"lr·wd = {product} = {self.rate:.3g}"


def at_least(rate: float, threshold: float) -> bool:
    """``rate >= threshold``, allowing for the lr rows' float32 (0.01 reads 0.0099999998)."""
    return rate >= threshold * (1 - 1e-6)


def decays_directly(name: str, group: dict[str, Any]) -> bool:
    """Whether the group's ``weight_decay`` multiplies the weights by (1 - lr·wd)."""
    return bool(group.get("decoupled_weight_decay")) or any(k in name.lower() for k in DIRECT_DECAY)


def momentum_factor(name: str, group: dict[str, Any]) -> float:
    """SGD's momentum buffer sums the decay term ``(1 - dampening)/(1 - momentum)`` times at
    steady state; 1 for the others, whose decay bypasses the buffer."""
    if "sgd" not in name.lower():
        return 1.0
    momentum = float(group.get("momentum") or 0.0)
    dampening = float(group.get("dampening") or 0.0)
    return (1.0 - dampening) / (1.0 - momentum) if 0.0 <= momentum < 1.0 else 1.0


def decay_rates(view: RunView) -> list[Decay]:
    """Each directly decaying group's largest decay per step, at the largest lr it trained
    with (the ``lr`` rows, numbered across the optimizers' groups in order; the lr of
    meta.json's ``optimizers`` where none was recorded)."""
    peak: dict[int, float] = {}
    if view.has("lr"):
        rows = view.metrics("lr")
        rows = rows[np.isfinite(rows.value.to_numpy(float))]
        peak = {int(k): float(v) for k, v in rows.groupby("index").value.max().items()}
    found, index = [], 0
    for optimizer in view.meta.optimizers:
        name = str(optimizer.get("class"))
        for i, group in enumerate(optimizer.get("groups") or []):
            k, index = index, index + 1
            wd, lr = group.get("weight_decay") or 0.0, peak.get(k, group.get("lr") or 0.0)
            if wd <= 0 or lr <= 0 or not group.get("params") or not decays_directly(name, group):
                continue
            factor = momentum_factor(name, group)
            label = name  # the optimizer as the message names it
            if group.get("decoupled_weight_decay") and "adamw" not in name.lower():
                label = f"{name} (decoupled_weight_decay)"
            found.append(Decay(lr * wd * factor, label, i, lr, wd, factor))
    return found


def weight_norm_ratio(view: RunView) -> tuple[float, int, int] | None:
    """(the weights' norm at the latest recorded step over the first, first step, latest
    step): the trainable parameters recorded at both steps, summed in quadrature."""
    rows = view.metrics("param_norm")
    rows = rows[rows.module.isin(view.meta.trainable)]
    if rows.empty:
        return None
    first, last = int(rows.step.min()), int(rows.step.max())
    if first == last:
        return None
    ends = rows[rows.step.isin((first, last))]
    wide = ends.pivot_table(
        index="module", columns="step", values="value", aggfunc="first", dropna=False
    )
    # Both steps' columns, also where one holds only NaN (a run that diverged: pivot_table
    # would drop that column), then the parameters recorded at both steps.
    wide = wide.reindex(columns=[first, last]).dropna()
    squares = (wide.to_numpy(float) ** 2).sum(axis=0)  # (2,): first step, latest step
    if wide.empty or not np.isfinite(squares).all() or squares[0] <= 0:
        return None
    return math.sqrt(squares[1] / squares[0]), first, last


def _weight_decay_dominance(view: RunView, p: dict[str, float]) -> Iterator[Finding]:
    decays = [d for d in decay_rates(view) if at_least(d.rate, p["min_decay"])]
    if not decays:
        return
    shrunk = weight_norm_ratio(view)
    if shrunk is None or not shrunk[0] <= p["max_norm_ratio"]:
        return
    ratio, first, last = shrunk
    worst = max(decays, key=lambda d: d.rate)
    half_life = math.log(2) / -math.log1p(-worst.rate) if worst.rate < 1 else 0.0
    said = (
        f"{worst.optimizer} param group {worst.group} decays its weights by {worst.formula} "
        f"per step (half-life {half_life:.0f} steps), and the weights' norm fell to "
        f"{ratio:.2f} of its step-{first} value by step {last}: the decay outpaces the updates"
    )
    at_error_rate = at_least(worst.rate, p["error_decay"])
    halved = at_least(worst.rate, p["fast_decay"]) and ratio <= p["fast_norm_ratio"]
    # The norm bound the finding was judged at: halved, for an error below error_decay.
    bound = p["max_norm_ratio"] if at_error_rate or not halved else p["fast_norm_ratio"]
    if at_error_rate or halved:
        severity = "error"
        said += (
            f", and a weight keeps e^-1 of what it learned {1 / worst.rate:.0f} steps before: "
            "the model cannot hold what it learns"
        )
    else:
        severity = "warning"
        said += "; a smaller weight decay may let the model learn more"
    yield finding(
        WEIGHT_DECAY_DOMINANCE,
        severity,
        said,
        module="__run__",
        step=last,
        value=ratio,
        threshold=bound,
        metric="param_norm",
        remedy=f"lower weight_decay (a decay rate near 1e-5-1e-4 per step is usual: wd "
        f"{1e-4 / (worst.lr * worst.factor):.2g} or less at lr {worst.lr:.3g}), and leave norm "
        "gains, biases and embeddings out of the decayed group",
    )


WEIGHT_DECAY_DOMINANCE = Rule(
    "weight-decay-dominance",
    "Weight decay shrinks the weights faster than the updates hold them",
    DECOUPLED_WEIGHT_DECAY,
    ("param_norm",),
    {
        "min_decay": 0.01,
        "error_decay": 0.1,
        "max_norm_ratio": 0.75,
        "fast_decay": 0.014,
        "fast_norm_ratio": 0.5,
    },
    _weight_decay_dominance,
    "error",
    (Request(("param_norm", "lr")),),
)

RULES = [WEIGHT_DECAY_DOMINANCE]
