"""Rule ``negligible-updates``: a run whose planned updates cannot move its weights.

The update ratio ||Δθ|| / ||θ|| of a weight matrix is how far one step moves it; about 1e-3
a step is the usual working range (Karpathy 2016, CS231n notes: "somewhere around 1e-3").
Over the planned run the weights move by about the sum of the ratios over its steps. With an
optimizer whose step is proportional to the learning rate (Adam's is, SGD's at a given
gradient), the ratio measured at step t, r_t, and the planned lr give that sum ahead of
time:

    total = r_t · Σ_s lr(s) / lr(t)      (s over the planned steps, from the run's start)

A total under ``max_total`` (1e-3: the weights end within 0.1% of where they started), with
a loss that has not fallen by ``max_loss_fall`` (2%) of where it started, means training
cannot change the model: an lr orders of magnitude too small, a clip so tight that every
step is a sliver. The loss condition keeps out runs that are meant to move the weights
little and do learn: a toy fine-tune at lr 5e-7 over 200 steps, as preference tuning (DPO)
uses, read a total of 8e-4. It is judged from the first recorded steps on, where the plan is
known and agrees with the lr the run used (``lr_plan_check``), on the median ratio over the
trainable weight matrices at the latest recorded step, the largest of the last ``LAST``
recorded steps' medians (one step the optimizer skipped, an AMP scaler's, reads 0), times
momentum SGD's steady-state gain 1/(1 - μ) (its first steps are that much shorter). A ratio
of exactly 0 is ``no-update``'s case. Over the 361 stored runs with a truth (195 healthy),
no healthy run's total read under 1e-2 at a tenth, a quarter or the end of its plan.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from ..store.findings import Finding
from .base import Rule, RunView, finding
from .clip_throttle import momentum_gain
from .loss_divergence import MIN_WINDOW, finite_losses, loss_levels
from .lr_plan_check import checked_plan, largest_lr
from .view import MATRICES, Request

KARPATHY = "Karpathy 2016, CS231n course notes, Neural Networks Part 3 (the update ratio)"
#: How many of the latest recorded steps the ratio is the largest median of.
LAST = 3


def _ratio_now(view: RunView) -> tuple[float, int] | None:
    """(the median update ratio over the trainable weight matrices, its step): the largest
    such median over the last LAST recorded steps that have one."""
    rows = view.metrics("update_ratio")
    rows = rows[rows.module.isin(view.matrices & view.meta.trainable)]
    rows = rows[np.isfinite(rows.value.to_numpy(float))]
    if rows.empty:
        return None
    medians = rows.groupby("step").value.median().sort_index().tail(LAST)
    if len(medians) < LAST:
        return None  # not judged on the first step or two alone
    step = int(medians.idxmax())
    return float(medians.max()), step


def _planned_sum(plan: tuple[np.ndarray, np.ndarray], budget: int) -> float:
    """Σ lr(s) over the planned steps, each chunk counted at its largest lr (an upper bound:
    the total it gives is never too small)."""
    starts, peak = plan  # (C,), (C,)
    ends = np.append(starts[1:], budget)
    return float(np.sum((ends - starts).clip(min=0) * peak))


def _loss_fall(view: RunView) -> float | None:
    """How far the loss has fallen so far, as a share of where it started (the start and end
    levels of ``loss-divergence``: medians over a few steps); None with too few losses."""
    loss = finite_losses(view)
    if loss is None:
        return None
    start, _, _, end, _ = loss_levels(loss, MIN_WINDOW)
    return (start - end) / abs(start) if start != 0 else None


def _negligible_updates(view: RunView, p: dict[str, float]) -> Iterator[Finding]:
    budget = view.meta.budget
    plan = checked_plan(view)
    now = _ratio_now(view)
    if budget is None or plan is None or now is None:
        return
    ratio, step = now
    lr = largest_lr(view)
    lr_then = float(lr.get(step, np.nan))
    if not (ratio > 0 and lr_then > 0):
        return  # a ratio of 0 is no-update's case; no lr to scale by
    # Momentum SGD's early steps are short of its steady state by up to (1 - μ): counted as
    # if every step were that long, so the total is never read too small.
    total = ratio * momentum_gain(view) * _planned_sum(plan, budget) / lr_then
    if not total < p["max_total"]:
        return
    fall = _loss_fall(view)
    if fall is None or not fall < p["max_loss_fall"]:
        return  # the loss is falling: small steps that work (a fine-tune at a tiny lr)
    yield finding(
        NEGLIGIBLE_UPDATES,
        "error",
        f"at step {step} a step moves the weight matrices by {ratio:.2g} of their norm "
        f"(median update ratio, at lr {lr_then:.3g}); along the planned lr, the {budget} "
        f"steps move them by about {total:.2g} in all ({total:.2%}), and the loss has not "
        f"fallen ({fall:+.1%} of where it started): training cannot change the model",
        module=None,
        step=step,
        value=total,
        threshold=p["max_total"],
        metric="update_ratio",
        remedy="raise the learning rate (an update ratio near 1e-3 a step is the usual "
        "range), or loosen a gradient clip that scales every step down to a sliver",
    )


NEGLIGIBLE_UPDATES = Rule(
    "negligible-updates",
    "Planned updates too small to move the weights",
    KARPATHY,
    ("update_ratio",),
    {"max_total": 1e-3, "max_loss_fall": 0.02},
    _negligible_updates,
    reads=(Request(("update_ratio",), modules=MATRICES), Request(("lr", "loss"))),
)

RULES = [NEGLIGIBLE_UPDATES]
