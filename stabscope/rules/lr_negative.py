"""Rule ``lr-negative``: a learning rate below zero.

An optimizer steps against the gradient by lr times its update direction; at a negative lr
every step goes up the loss instead, undoing what was learned at the rate it was learned
(SGD, Adam and AdamW alike: torch checks ``lr >= 0`` only when the optimizer is built, and a
scheduler or a hand-written schedule may set any value afterwards). The usual cause is a
schedule formula missing its offset: a cosine written ``peak * cos(pi * t)`` instead of
``peak * (1 + cos(pi * t)) / 2`` crosses zero at mid-training and is negative after it.

An error at the first step where a param group's recorded lr (the ``lr`` rows) is below
``-tolerance`` times the run's largest lr (a schedule computed to 0 may land a rounding
error below it). A warning where only the planned lr curve (meta.json ``lr_plan``, trusted
only where it agrees with the lr the run used and has moved within the recorded steps:
``lr_plan_check``) is below that for every param group, ahead of the steps recorded: found
at a run's first steps, before the lr has turned, but a budget past the scheduler's own
horizon plans below zero too (a linear decay to 0 stepped beyond its total, a budget counted
in batches under gradient accumulation), and the run may end before it gets there.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from ..store import RUN_MODULE
from ..store.findings import Finding
from ..store.lr_plan import planned_lr_min
from .base import Rule, RunView, finding
from .lr_plan_check import checked_plan
from .view import Request

REMEDY = (
    "fix the schedule's formula (a cosine decay is peak * (1 + cos(pi * t)) / 2, which "
    "ends at 0, not peak * cos(pi * t)), or clamp the lr at 0"
)


def negative_in_rows(view: RunView, tolerance: float) -> tuple[int, float, int] | None:
    """(first step, lr, param group) where a recorded lr is below ``-tolerance`` x the
    largest recorded lr; None where none is."""
    if not view.has("lr"):
        return None
    rows = view.metrics("lr")
    rows = rows[np.isfinite(rows.value.to_numpy(float))]
    if rows.empty:
        return None
    scale = float(rows.value.abs().max())
    low = rows[rows.value.to_numpy(float) < -tolerance * scale]
    if low.empty:
        return None
    first = low.sort_values(["step", "index"]).iloc[0]
    return int(first.step), float(first.value), int(first["index"])


def negative_in_plan(view: RunView, tolerance: float) -> tuple[int, float] | None:
    """(first planned step, its lr) where the trusted plan's lr is below ``-tolerance`` x its
    peak for every param group; None where it never is, or without a trusted plan."""
    plan = checked_plan(view, moved=True)
    low_lr = planned_lr_min(view.meta)
    if plan is None or low_lr is None:
        return None
    starts, chunk_max = plan  # (C,), (C,)
    scale = float(np.nanmax(np.abs(np.concatenate([chunk_max, low_lr]))))
    below = np.flatnonzero(low_lr < -tolerance * scale)
    if not len(below):
        return None
    return int(starts[below[0]]), float(low_lr[below[0]])


def _lr_negative(view: RunView, p: dict[str, float]) -> Iterator[Finding]:
    tolerance = p["tolerance"]
    used, planned = negative_in_rows(view, tolerance), negative_in_plan(view, tolerance)
    if used is not None and (planned is None or used[0] <= planned[0]):
        step, lr, group = used
        severity = "error"
        what = f"the learning rate of param group {group} is {lr:.3g} at step {step}"
    elif planned is not None:
        step, lr = planned
        severity = "warning"
        what = (
            f"the planned learning rate turns negative at step {step} ({lr:.3g}), if the run "
            "trains that far (a budget past the scheduler's own horizon plans this too)"
        )
    else:
        return
    yield finding(
        LR_NEGATIVE,
        severity,
        f"{what}: below zero, every optimizer step goes up the loss, undoing what the run learned",
        module=RUN_MODULE,
        step=step,
        value=lr,
        threshold=0.0,
        metric="lr",
        remedy=REMEDY,
    )


LR_NEGATIVE = Rule(
    "lr-negative",
    "A learning rate below zero",
    "",
    ("lr",),
    {"tolerance": 1e-6},
    _lr_negative,
    "error",
    (Request(("lr",)),),
)

RULES = [LR_NEGATIVE]
