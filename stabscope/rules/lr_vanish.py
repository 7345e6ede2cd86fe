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

from ..store.findings import Finding
from ..store.lr_plan import METRIC_DRIVEN
from .base import Rule, RunView, finding
from .lr_plan_check import checked_plan
from .view import Request

#: Relative margin below ``floor`` x peak for an lr row to count (float32 rows).
TOLERANCE = 1e-5

REMEDY = (
    "give the scheduler the number of optimizer steps the run trains for "
    "(num_training_steps, T_max, total_steps), and step a per-epoch scheduler once per epoch"
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
    """The same over the recorded ``lr`` rows; None without them."""
    if not view.has("lr") or METRIC_DRIVEN in str((view.meta.lr_plan or {}).get("note", "")):
        return None
    used = view.metrics("lr").groupby("step").value.max()  # (S,) by step
    lr, steps = used.to_numpy(float), used.index.to_numpy(np.int64)
    finite = np.isfinite(lr)
    if not finite.any() or not np.nanmax(lr) > 0:
        return None
    top = int(np.nanargmax(np.where(finite, lr, -np.inf)))
    low = (np.arange(len(lr)) > top) & finite & (lr < floor * lr[top] * (1 - TOLERANCE))
    first = int(steps[low][0]) if low.any() else -1
    return int(low.sum()), len(lr), first, float(lr[top]), int(steps[top])


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
    yield finding(
        LR_VANISHES,
        "error",
        f"the learning rate falls below {floor:g} of its peak ({peak:.3g} at step "
        f"{peak_step}) at step {first} and stays there for {count} {whose} "
        f"({count / total:.0%}): the weights stop moving long before the end",
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
