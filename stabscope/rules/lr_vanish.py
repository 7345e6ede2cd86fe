"""Rule ``lr-vanishes``: the learning rate falls to almost nothing while most of the run is
still to train at it.

Schedules end low on purpose, but briefly: a cosine decay to 0 is below 1/1000 of its peak
only over its last 2% of steps ((1 + cos πt)/2 < 1e-3 for t > 0.98), a linear decay over
its last 0.1%, and three x0.1 step decays (the ImageNet ResNet recipe) stop at 1/1000 itself.
Two bugs leave the lr at nothing for most of the run instead: a scheduler whose horizon is
shorter than the training (``num_training_steps``, ``T_max`` or ``total_steps`` set to an
epoch's batches, after which HF's linear schedule holds 0), and a per-epoch scheduler
(``StepLR``, ``ExponentialLR``) stepped every batch, which decays it ``batches per epoch``
times too fast. Either way the weights stop moving and the loss stands where it is.

An error when the lr is below ``floor`` (1/1000) of its peak, after the peak, for ``share``
(half) or more of the run:

- with a planned lr curve (meta.json ``lr_plan``, from the run's budget) that agrees with
  the lr the run used where the plan has already moved (``lr_plan_check``), over the planned
  steps: this judges a run at its first steps, before the lr has fallen;
- otherwise over the steps recorded so far, at least ``min_steps`` of them (the ``lr`` rows,
  the largest param group's lr at each step, float32: an lr counts as below when it is below
  by more than ``TOLERANCE``, so 1e-6 after a peak of 1e-3 does not). Not for a scheduler that
  follows a metric (``ReduceLROnPlateau``): lowering the lr when the loss has stopped falling
  is what it is for.

A run whose lr is 0 throughout has no peak; that is ``no-update``'s case.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pandas as pd

from ..store.findings import Finding
from ..store.lr_plan import METRIC_DRIVEN
from .base import Rule, RunView, finding
from .lr_negative import LR_NEGATIVE, negative_in_plan, negative_in_rows
from .lr_plan_check import checked_plan
from .view import Request

#: Relative margin below ``floor`` x peak for an lr row to count (float32 rows).
TOLERANCE = 1e-5

REMEDY = (
    "give the scheduler the number of optimizer steps the run trains for "
    "(num_training_steps, T_max, total_steps), and step a per-epoch scheduler once per epoch; "
    "a schedule written by hand that multiplies group['lr'] by its factor each step compounds "
    "the factors: set the lr from the base lr and the step instead"
)


def _below_in_plan(view: RunView, floor: float) -> tuple[int, int, int, float, int] | None:
    """(steps below ``floor`` x peak after the peak, planned steps, first such step, peak lr,
    peak step) of a trusted plan; None without one. A chunk counts when its max is below, so
    the count never exceeds the true one."""
    plan = checked_plan(view, moved=True)
    peak = (view.meta.lr_plan or {}).get("peak")
    if plan is None or not isinstance(peak, dict) or not peak.get("lr", 0) > 0:
        return None
    starts, chunk_max = plan  # (C,), (C,): chunk starts and each chunk's max lr
    budget = int((view.meta.lr_plan or {})["budget"])
    planned = budget - int(starts[0])  # the steps from the recorder's first on
    ends = np.append(starts[1:], budget)
    low = (starts > int(peak["step"])) & (chunk_max < floor * float(peak["lr"]))
    if not low.any():
        return 0, planned, -1, float(peak["lr"]), int(peak["step"])
    count = int((ends - starts)[low].sum())
    return count, planned, int(starts[low][0]), float(peak["lr"]), int(peak["step"])


def _below_in_rows(view: RunView, floor: float) -> tuple[int, int, int, float, int] | None:
    """The same over the recorded ``lr`` rows; None without them. Each param group is read
    against its own peak (an SGD pre-training at lr 0.1 handed to an Adam fine-tune at 1e-5
    is two scales, not a vanishing lr): a step counts when every group that stepped in it is
    past its own peak and below ``floor`` of it."""
    if not view.has("lr") or METRIC_DRIVEN in str((view.meta.lr_plan or {}).get("note", "")):
        return None
    rows = view.metrics("lr")
    rows = rows[np.isfinite(rows.value.to_numpy(float))]
    if rows.empty or not rows.value.max() > 0:
        return None
    rows = rows.sort_values(["index", "step"], kind="stable")
    by_group = rows.groupby("index").value
    peak = by_group.transform("max").to_numpy(float)  # (R,) each row's group peak
    peak_step = rows.step.where(rows.value.to_numpy(float) == peak)
    peak_step = peak_step.groupby(rows["index"]).transform("min").to_numpy(float)
    with np.errstate(invalid="ignore", divide="ignore"):
        low = (rows.step.to_numpy() > peak_step) & (
            rows.value.to_numpy(float) < floor * peak * (1 - TOLERANCE)
        )
    per_step = pd.Series(low).groupby(rows.step.to_numpy()).all()  # (S,) every group low
    steps = per_step.index.to_numpy(np.int64)
    first = int(steps[per_step.to_numpy()][0]) if per_step.any() else -1
    top = rows.loc[rows.value.idxmax()]
    return int(per_step.sum()), len(per_step), first, float(top.value), int(top.step)


def _lr_vanishes(view: RunView, p: dict[str, float]) -> Iterator[Finding]:
    floor, share = p["floor"], p["share"]
    planned = _below_in_plan(view, floor)
    found = planned or _below_in_rows(view, floor)
    if found is None:
        return
    count, total, first, peak, peak_step = found
    if planned is None and total < p["min_steps"]:
        return
    if count < share * total or first < 0:
        return
    whose = f"of the {total} planned steps" if planned else f"of the {total} steps so far"
    # A schedule that falls through 0 (a linear decay stepped past its horizon) does worse
    # than stop the weights: say so here too, since this rule may be the first to speak.
    tolerance = LR_NEGATIVE.defaults["tolerance"]
    negative = negative_in_rows(view, tolerance) or negative_in_plan(view, tolerance)
    below_zero = (
        f", below zero from step {negative[0]} ({negative[1]:.3g}: each step there goes up "
        "the loss; see lr-negative)"
        if negative is not None
        else ""
    )
    yield finding(
        LR_VANISHES,
        "error",
        f"the learning rate falls below {floor:g} of its peak ({peak:.3g} at step "
        f"{peak_step}) at step {first} and stays there for {count} {whose} "
        f"({count / total:.0%}){below_zero}: the weights stop "
        + ("learning" if negative is not None else "moving")
        + " long before the end",
        module="__run__",
        step=first,
        value=count / total,
        threshold=share,
        metric="lr",
        remedy=REMEDY,
    )


LR_VANISHES = Rule(
    "lr-vanishes",
    "The learning rate falls to almost nothing with most of the run still to come",
    "",
    ("lr",),
    {"floor": 1e-3, "share": 0.5, "min_steps": 20},
    _lr_vanishes,
    "error",
    (Request(("lr",)),),
)

RULES = [LR_VANISHES]
