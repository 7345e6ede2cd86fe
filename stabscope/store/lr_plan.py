"""meta.json's ``lr_plan``: the learning rate the run plans to use at each of its steps.

Written by the recorder (``stabscope.record.lr_plan`` steps the schedulers forward on their own and
puts them back), read by rules that look ahead. The entry::

    {"budget": N,            # planned total steps (steps 0 .. N-1), null when unknown
     "source": "scheduler",  # "scheduler", "constant" (no scheduler) or "unknown"
     "from_step": s0,        # the first planned step (the step the recorder started at)
     "steps": [...],         # chunk starts: chunk i holds steps[i] .. steps[i+1]-1 (last: N-1)
     "lr": [...],            # chunk i's max lr (over its steps and every param group)
     "lr_min": [...],        # chunk i's min over its steps (of the max over param groups)
     "peak": {"step": s, "lr": x},   # the exact maximum and its first step
     "note": "..."}          # why, when the source is "unknown"

A plan of at most ``MAX_POINTS`` steps holds every step (chunks of one step); a longer one
holds ``MAX_POINTS`` or fewer contiguous chunks, each with its max, so the max over any range
of steps read from it is never lower than the plan's. No torch here: the read side uses it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from .run_meta import RunMeta

#: The most chunks an ``lr_plan`` keeps: 100k-step budgets exist, and meta.json is rewritten
#: at every flush and must stay a few KB (it is the one file a full disk must still take).
MAX_POINTS = 100
SOURCES = ("scheduler", "constant", "unknown")
#: Part of an ``unknown`` plan's note when a scheduler follows a metric (ReduceLROnPlateau).
METRIC_DRIVEN = "changes the lr from a metric"


def chunk_starts(n: int, max_points: int = MAX_POINTS) -> np.ndarray:
    """Offsets (from the first planned step) of the chunks that cover ``n`` steps: every
    step when ``n <= max_points``, else contiguous chunks of ``ceil(n / max_points)`` steps."""
    size = max(1, math.ceil(n / max_points))
    return np.arange(0, n, size, dtype=np.int64)


def plan_entry(source: str, budget: int, from_step: int, lrs: Sequence[float]) -> dict[str, Any]:
    """The ``lr_plan`` of steps ``from_step .. budget-1`` whose lrs are ``lrs`` (one per
    step, each already the max over param groups)."""
    values = np.asarray(lrs, dtype=np.float64)  # (budget - from_step,)
    if len(values) != budget - from_step or not len(values):
        raise ValueError(f"{len(values)} lrs for steps {from_step} .. {budget - 1}")
    starts = chunk_starts(len(values))
    # fmax ignores a NaN unless the whole chunk is NaN (then the chunk says NaN).
    chunk_max = np.fmax.reduceat(values, starts)
    chunk_min = np.fmin.reduceat(values, starts)
    finite = np.isfinite(values)
    peak = None
    if finite.any():
        first = int(np.argmax(np.where(finite, values, -np.inf)))
        peak = {"step": from_step + first, "lr": float(values[first])}
    return {
        "budget": int(budget),
        "source": source,
        "from_step": int(from_step),
        "steps": [int(from_step + s) for s in starts],
        "lr": [float(v) for v in chunk_max],
        "lr_min": [float(v) for v in chunk_min],
        "peak": peak,
    }


def unknown_plan(budget: int | None, from_step: int, note: str) -> dict[str, Any]:
    """An ``lr_plan`` that says why the lr of the coming steps cannot be known."""
    return {
        "budget": budget,
        "source": "unknown",
        "from_step": int(from_step),
        "steps": [],
        "lr": [],
        "peak": None,
        "note": note,
    }


def planned_lr(meta: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray] | None:
    """``(steps, lr)`` of the run's plan: chunk starts (int64) and each chunk's max lr
    (float64; a chunk runs to the next start, the last to ``budget``). None when the run
    has no plan, its source is ``unknown``, or the entry is inconsistent."""
    plan = RunMeta.of(meta).lr_plan
    if not isinstance(plan, dict) or plan.get("source") not in ("scheduler", "constant"):
        return None
    steps, lrs, budget = plan.get("steps"), plan.get("lr"), plan.get("budget")
    if not isinstance(steps, list) or not isinstance(lrs, list) or not isinstance(budget, int):
        return None
    if not steps or len(steps) != len(lrs):
        return None
    try:
        # save_meta writes a non-finite lr as the string "nan"/"inf": float() reads it back.
        out_steps = np.asarray(steps, dtype=np.int64)
        out_lr = np.asarray([float(v) for v in lrs], dtype=np.float64)
    except (TypeError, ValueError):
        return None
    if np.any(np.diff(out_steps) <= 0) or out_steps[-1] >= budget:
        return None
    return out_steps, out_lr


def planned_lr_min(meta: Mapping[str, Any]) -> np.ndarray | None:
    """Each chunk's smallest planned lr (float64, as ``planned_lr``'s chunks); None without a
    plan, or for a plan written before chunks kept their minimum."""
    read = planned_lr(meta)
    low = (RunMeta.of(meta).lr_plan or {}).get("lr_min")
    if read is None or not isinstance(low, list) or len(low) != len(read[1]):
        return None
    try:
        return np.asarray([float(v) for v in low], dtype=np.float64)
    except (TypeError, ValueError):
        return None


def peak_lr_after(meta: Mapping[str, Any], step: int) -> tuple[int, float] | None:
    """The max planned lr at steps ``>= step`` and the first step it may be reached at;
    None without a plan or when no planned step is ``>= step``.

    Exact when the plan holds every step or the run's peak lies at or after ``step``. Else
    the max of the chunks that reach ``step``: never lower than the true max, and the step
    is the start of its chunk (or ``step`` itself, inside the chunk that holds it)."""
    read = planned_lr(meta)
    if read is None:
        return None
    steps, lrs = read
    plan = RunMeta.of(meta).lr_plan or {}
    peak = plan.get("peak")
    if isinstance(peak, dict) and isinstance(peak.get("step"), int) and peak["step"] >= step:
        return int(peak["step"]), float(peak["lr"])
    ends = np.append(steps[1:], plan["budget"])  # exclusive end of each chunk
    reach = np.flatnonzero(ends > step)
    if not len(reach):
        return None
    candidates = lrs[reach]
    if np.isnan(candidates).all():
        return None
    i = int(reach[np.nanargmax(candidates)])
    return max(int(steps[i]), int(step)), float(lrs[i])


__all__ = [
    "MAX_POINTS",
    "METRIC_DRIVEN",
    "SOURCES",
    "chunk_starts",
    "peak_lr_after",
    "plan_entry",
    "planned_lr",
    "planned_lr_min",
    "unknown_plan",
]
