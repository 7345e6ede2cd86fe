"""The planned lr curve, checked against the lr the run used before a rule trusts it.

The plan (meta.json ``lr_plan``) is made before the first optimizer step by stepping the
schedulers once per training step. A script that steps its scheduler once per epoch, or
every k steps, trains on another curve: a per-epoch ``StepLR(gamma=0.7)`` over 30 batches an
epoch is planned 30x too steep. Such a plan would read a healthy per-epoch decay as the lr
vanishing, and a per-epoch warm-up as a rise far past the catapult. The ``lr`` rows say what
each step used, so the plan is read only where it agrees with them: at every recorded step
the lr used lies between the smallest and the largest planned lr over that step and its
neighbours (each chunk's ``lr_min`` and ``lr``, ``store/lr_plan.py``; a neighbour allows for
a scheduler stepped before the optimizer rather than after it), with a relative tolerance
``TOLERANCE`` (the rows are float32). A plan written before chunks kept their minimum has
only the upper bound, and the lower one where it holds single steps (budgets up to 100).

Agreement is only evidence where the plan moved within the rows: a plan still flat over the
steps recorded so far (its first change further on, or the rows not yet written while the
run trains) cannot tell a per-epoch scheduler from a per-step one. ``checked_plan(moved=True)``
asks for that evidence: a recorded step at which the plan differs from its first step's lr,
and both bounds.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from ..store.lr_plan import planned_lr, planned_lr_min
from .view import RunView

TOLERANCE = 1e-4


def largest_lr(view: RunView) -> pd.Series:
    """The largest param group's recorded lr at each step, by step; a step whose largest is
    not finite is left out."""
    if not view.has("lr"):
        return pd.Series(dtype=float)
    used = view.metrics("lr").groupby("step").value.max()  # (S,) NaN rows skipped
    return used[np.isfinite(used.to_numpy(float))]


def _budget(view: RunView) -> int:
    return int((view.meta.lr_plan or {})["budget"])


def _used(view: RunView, starts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(steps, lr) of the recorded ``lr`` rows inside the plan: the largest group's lr."""
    used = largest_lr(view)  # (S,) by step
    steps, lr = used.index.to_numpy(np.int64), used.to_numpy(float)
    keep = (steps >= starts[0]) & (steps < _budget(view))
    return steps[keep], lr[keep]


def _bounds(
    starts: np.ndarray, high: np.ndarray, low: np.ndarray | None, budget: int, steps: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """(upper, lower) planned bounds at each of ``steps`` (S,): over the chunks that hold the
    step before, the step and the step after. Without chunk minima the lower bound is the
    chunk max where chunks are single steps, else 0."""
    if low is None:
        single = bool(np.all(np.diff(np.append(starts, budget)) == 1))
        low = high if single else np.zeros_like(high)
    last = len(starts) - 1
    at = [np.clip(np.searchsorted(starts, steps + d, "right") - 1, 0, last) for d in (-1, 0, 1)]
    upper = np.nanmax(np.stack([high[i] for i in at]), axis=0)
    lower = np.nanmin(np.stack([low[i] for i in at]), axis=0)
    return upper, lower


def plan_conflict(view: RunView) -> str | None:
    """Where the plan disagrees with the lr the run used, in words; None when it agrees, or
    when there is no plan or no ``lr`` row to compare."""
    read = planned_lr(view.meta)
    return None if read is None else _conflict(view, *read, *_used(view, read[0]))


def _conflict(
    view: RunView, starts: np.ndarray, chunk_max: np.ndarray, steps: np.ndarray, lr: np.ndarray
) -> str | None:
    """``plan_conflict`` of the plan's (C,) chunk starts and maxima against the (S,) steps
    and lrs the run used."""
    if not len(steps):
        return None
    budget = _budget(view)
    upper, lower = _bounds(starts, chunk_max, planned_lr_min(view.meta), budget, steps)
    off = (lr > upper * (1 + TOLERANCE)) | (lr < lower * (1 - TOLERANCE))
    if not off.any():
        return None
    i = int(np.flatnonzero(off)[0])
    planned = float(chunk_max[np.searchsorted(starts, steps[i], "right") - 1])
    return (
        f"the planned lr ({planned:.3g} at step {int(steps[i])}) is not the lr the run used "
        f"({lr[i]:.3g}): a scheduler stepped other than once per training step (per epoch, "
        "or every few steps)"
    )


def _moved(starts: np.ndarray, chunk_max: np.ndarray, steps: np.ndarray) -> bool:
    """Whether one of the recorded ``steps`` lies where the plan's lr differs from its first
    step's."""
    chunk = np.searchsorted(starts, steps, "right") - 1  # (S,) the chunk of each step
    return bool(len(steps)) and bool(np.any(chunk_max[chunk] != chunk_max[0]))


def checked_plan(view: RunView, moved: bool = False) -> tuple[np.ndarray, np.ndarray] | None:
    """``planned_lr`` of the run when it agrees with the lr rows (and, with ``moved``, when
    the rows reach a step where the plan changed and the plan has both bounds); else None."""
    read = planned_lr(view.meta)
    if read is None:
        return None
    steps, lr = _used(view, read[0])
    if _conflict(view, *read, steps, lr) is not None:
        return None
    if moved:
        chunked = len(read[0]) < _budget(view) - int(read[0][0])
        if (chunked and planned_lr_min(view.meta) is None) or not _moved(*read, steps):
            return None
    return read


__all__ = ["TOLERANCE", "checked_plan", "largest_lr", "plan_conflict"]
