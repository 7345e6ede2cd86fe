"""The planned lr curve, checked against the lr the run used before a rule trusts it.

The plan (meta.json ``lr_plan``) is made before the first optimizer step by stepping the
schedulers once per training step. A script that steps its scheduler once per epoch, or
every k steps, trains on another curve: a per-epoch ``StepLR(gamma=0.7)`` over 30 batches an
epoch is planned 30x too steep. Such a plan would read a healthy per-epoch decay as the lr
vanishing, and a per-epoch warm-up as a rise far past the catapult. The ``lr`` rows say what
each step used, so the plan is read only where it agrees with them:

- at no recorded step may the lr used exceed the plan's largest lr over that step and its
  neighbours (a chunk's max, ``store/lr_plan.py``; a neighbour allows for a scheduler
  stepped before the optimizer rather than after it);
- where the plan holds single steps, the lr used may not fall below the plan's smallest
  over the same three steps either.

Relative tolerance ``TOLERANCE``: the rows are float32.

Agreement is only evidence where the plan moved within the rows: a plan still flat over the
steps recorded so far (its first change further on, or the rows not yet written while the
run trains) cannot tell a per-epoch scheduler from a per-step one. ``moved=True`` asks for
that evidence: a recorded step at which the plan differs from its first step's lr.
"""

from __future__ import annotations

import numpy as np

from ..store.lr_plan import planned_lr
from .view import RunView

TOLERANCE = 1e-4


def _used(view: RunView, starts: np.ndarray, budget: int) -> tuple[np.ndarray, np.ndarray]:
    """(steps, lr) of the recorded ``lr`` rows inside the plan: the largest group's lr."""
    if not view.has("lr"):
        return np.zeros(0, np.int64), np.zeros(0)
    used = view.metrics("lr").groupby("step").value.max()  # (S,) by step
    steps = used.index.to_numpy(np.int64)
    keep = (steps >= starts[0]) & (steps < budget)
    return steps[keep], used.to_numpy(float)[keep]


def plan_conflict(view: RunView) -> str | None:
    """Where the plan disagrees with the lr the run used, in words; None when it agrees, or
    when there is no plan or no ``lr`` row to compare."""
    read = planned_lr(view.meta)
    if read is None:
        return None
    starts, chunk_max = read  # (C,) int64 chunk starts, (C,) float64 chunk max lr
    budget = int((view.meta.lr_plan or {})["budget"])
    steps, lr = _used(view, starts, budget)
    if not len(steps):
        return None
    ends = np.append(starts[1:], budget)  # (C,) exclusive chunk ends
    single = bool(np.all(ends - starts == 1))
    for step, value in zip(steps, lr):
        near = np.flatnonzero((ends > step - 1) & (starts <= step + 1))  # chunks of s-1..s+1
        high, low = float(np.nanmax(chunk_max[near])), float(np.nanmin(chunk_max[near]))
        if value > high * (1 + TOLERANCE) or (single and value < low * (1 - TOLERANCE)):
            planned = float(chunk_max[np.searchsorted(starts, step, "right") - 1])
            return (
                f"the planned lr ({planned:.3g} at step {step}) is not the lr the run used "
                f"({value:.3g}): a scheduler stepped other than once per training step "
                "(per epoch, or every few steps)"
            )
    return None


def _moved(view: RunView, starts: np.ndarray, chunk_max: np.ndarray) -> bool:
    """Whether a recorded step lies where the plan's lr differs from its first step's."""
    budget = int((view.meta.lr_plan or {})["budget"])
    steps, _ = _used(view, starts, budget)
    chunk = np.searchsorted(starts, steps, "right") - 1  # (S,) the chunk of each step
    return bool(len(steps)) and bool(np.any(chunk_max[chunk] != chunk_max[0]))


def checked_plan(view: RunView, moved: bool = False) -> tuple[np.ndarray, np.ndarray] | None:
    """``planned_lr`` of the run when it agrees with the lr rows (and, with ``moved``, when
    the rows reach a step where the plan changed); else None."""
    read = planned_lr(view.meta)
    if read is None or plan_conflict(view) is not None:
        return None
    return None if moved and not _moved(view, *read) else read


__all__ = ["TOLERANCE", "checked_plan", "plan_conflict"]
