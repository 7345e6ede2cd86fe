"""Rule ``loss-far-above-chance``: a loss that never came within 3x of what knowing nothing
scores, after training at its full learning rate.

Chance is the loss of a prediction that ignores the inputs: ln V for a softmax cross-entropy
over V classes (the uniform prediction, ``loss-above-uniform``), and otherwise the run's
``loss_constant``, the loss of the best constant (the targets' mean under a mean squared
error, each label's base rate under a binary cross-entropy, the labels' frequencies under a
cross-entropy; ``loss-above-constant``, with its pooling over batches that are not random
draws). The two end-of-run rules read the loss against chance at the planned end at a bar
of 1.05; this one reads it while the run trains, at a bar a healthy run does not reach once
it has trained.

A cross-entropy of k·ln V gives the right class a geometric-mean probability of V^-k: at
k = 3 over 32 classes, one in 33,000. A model initialised as usual starts near chance (small
logits, outputs near the targets' scale); one whose init is too large starts far above it
and falls back within a few dozen steps when it can. What stays there is a model that cannot
undo its start: outputs so large that the optimizer, moving each weight by about the lr a
step, needs far longer than the run to bring them back (an output layer initialised x1000, a
multiplier on the logits, a temperature never learned).

Only a loss that began there: its first value (before any update) at ``min_ratio`` x chance
or more. A loss that began near chance and rose (an lr that throws the weights off at the
first steps) is ``loss-divergence``'s, and no init of the model's.

Judged once the run has trained ``min_steps`` recorded steps at its full learning rate (at
least half its peak: the peak of the trusted planned lr where there is one, else of the lr
used; none while the lr is still rising, so a large init under a long warm-up waits for its
lr), on the best level the loss reached since the start (the lowest median of consecutive
losses, as ``loss-divergence`` reads it; against the constant, the lowest ratio of sums over
as many steps): a loss that came down and then rose is ``loss-divergence``'s. Against the
constant only for a run of one optimizer, as ``loss-above-constant`` (a GAN's players each
sit above their own bar by design).

Measured on stored runs with a chance to read (the grid's 9 families and 7 blind trials,
``bench/warning_audit.py``'s runs; 203 with a constant, 208 whose loss reads as a mean
cross-entropy, about half of them healthy): after step 20 no healthy run's level passed
1.3x chance, and every run whose output layer was x1000-x10000 sat at 10.8-117x ln V at
step 20.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pandas as pd

from ..store import RUN_MODULE
from ..store.findings import Finding
from .above_constant import pooling
from .above_uniform import COVER_THOMAS, checked_ln_v
from .base import Rule, RunView, loss_finding
from .loss_divergence import MIN_WINDOW, finite_losses, loss_levels, window
from .lr_plan_check import checked_plan, largest_lr
from .output_features import LOGITS, first_logits
from .view import Request

#: Steps back over which a rising lr means a warm-up still under way.
RISE_STEPS = 20


def full_lr_steps(view: RunView, within: float = 1.1) -> int:
    """How many recorded steps trained at the full learning rate: at least half the peak (of
    the trusted planned lr where there is one, else of the lr used); 0 while the lr is still
    rising (the last lr above ``within`` x the lr ``RISE_STEPS`` steps before it: a
    hand-written warm-up has no plan to tell its peak) or where no lr was recorded."""
    used = largest_lr(view)  # (S,) the largest param group's lr, by step
    if used.empty:
        return 0
    lr = used.to_numpy(float)
    peak = float(lr.max())
    plan = checked_plan(view)
    if plan is not None:
        peak = max(peak, float(np.nanmax(plan[1])))
    before = lr[max(len(lr) - 1 - RISE_STEPS, 0)]
    if peak <= 0 or lr[-1] > within * before:
        return 0
    return int((lr >= 0.5 * peak).sum())


def _against_uniform(view: RunView, loss: pd.Series) -> tuple[float, float, int, str] | None:
    """(the first loss over ln V, the best level over ln V, its step, what ln V is) for a
    loss that reads as a mean cross-entropy of the output head; None otherwise."""
    classes = checked_ln_v(view)
    if classes is None:
        return None
    ln_v, source = classes
    best, step = loss_levels(loss, MIN_WINDOW)[1:3]
    z = first_logits(view).groupby("metric").value
    span = float(z.max()["logit_max"] - z.min()["logit_min"])
    said = (
        f"{source}, the loss of predicting every class with equal probability (the output "
        f"logits at the first step spanned {span:.3g})"
    )
    return float(loss.iloc[0]) / ln_v, best / ln_v, step, said


def _against_constant(view: RunView, loss: pd.Series) -> tuple[float, float, int, str] | None:
    """(the first loss over its bar; the lowest ratio of sums, loss over its constant bar,
    over ``window`` consecutive steps; the step it ends at; what the bar is) for a run of
    one optimizer with a bar; None otherwise."""
    if len(view.meta.doc.get("optimizers") or []) != 1 or not view.has("loss_constant"):
        return None
    bars = view.metrics("loss_constant")
    bars = bars[bars.module == RUN_MODULE].groupby("step").value.mean()
    pairs = pd.DataFrame({"loss": loss, "bar": bars.reindex(loss.index)})
    pairs = pairs[np.isfinite(pairs.to_numpy(float)).all(axis=1) & (pairs.bar > 0)]
    if len(pairs) < 2 * MIN_WINDOW:
        return None
    # One constant for all the steps, where batches are not random draws (above_constant).
    bar = pairs.bar * pooling(view, pairs.index, str(view.meta.doc.get("loss_function")))
    w = window(len(pairs))
    ratio = (pairs.loss.rolling(w).sum() / bar.rolling(w).sum()).dropna()  # (S - w + 1,)
    at = int(np.argmin(ratio.to_numpy(float)))
    said = (
        "chance, the loss of predicting the targets' mean (a regression) or their "
        "frequencies (a classifier) for every input"
    )
    first = float(pairs.loss.iloc[0] / bar.iloc[0])
    return first, float(ratio.iloc[at]), int(ratio.index[at]), said


def _loss_far_above_chance(view: RunView, p: dict[str, float]) -> Iterator[Finding]:
    loss = finite_losses(view)
    trained = full_lr_steps(view)
    if loss is None or trained < p["min_steps"]:
        return
    read = _against_uniform(view, loss) or _against_constant(view, loss)
    if read is None:
        return
    first, ratio, step, said = read
    if not (ratio >= p["min_ratio"] and first >= p["min_ratio"]):
        return  # came within it, or began within it (a blow-up after a sound start)
    yield loss_finding(
        LOSS_FAR_ABOVE_CHANCE,
        f"after {trained} steps at its full learning rate the loss has never come within "
        f"{p['min_ratio']:g}x of {said}: it started at {float(loss.iloc[0]):.4g} "
        f"({first:.3g}x chance), and at its best (step {step}) it was {ratio:.3g}x chance: "
        "wrong from the start, an init the model is not recovering from",
        int(loss.index[-1]),
        ratio,
        p["min_ratio"],
        "scale the output layer's init down (std 0.02 or 1/sqrt(width), or zeros; "
        "an output bias at the targets' mean), remove any multiplier on the outputs, or "
        "check the init of the layers before it",
    )


LOSS_FAR_ABOVE_CHANCE = Rule(
    "loss-far-above-chance",
    "A loss that never came within 3x of chance after training at its full learning rate",
    COVER_THOMAS,
    ("loss",),
    {"min_ratio": 3.0, "min_steps": 20},
    _loss_far_above_chance,
    reads=(
        Request(("loss", "lr", "loss_constant", "target_count", "target_mean", "target_var")),
        Request(LOGITS),
    ),
)

RULES = [LOSS_FAR_ABOVE_CHANCE]
