"""Ground truth of a foreign run from the script's own loss log, never from stabscope.

A run FAILED when, in order (the first rule that applies gives the reason):
  1. non-finite   a logged value is NaN or infinite (or nothing was logged at all);
  2. no progress  the tail mean is at least 95% of the start mean;
  3. baseline     the script's task has a trivial baseline (the loss of a context-free guess:
                  the unigram entropy of the text, ln 10 for 10 balanced classes) and the
                  tail mean is at least 97% of it;
  4. gave back    the tail mean exceeds 1.5 x the best value + 0.5: the run got somewhere and
                  climbed back well above it.
Otherwise HEALTHY. start = mean of the first 5 values, tail = mean of the last
max(10, n // 10), best = the smallest value. The log has one row per loss() call, which for a
model script includes stabscope's few probe forwards, so rows are not steps: the failure step
is the first non-finite row scaled to the run's steps, else the step budget.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

START, TAIL_MIN, TAIL_FRACTION = 5, 10, 10  # rows averaged: first 5; last max(10, n // 10)
PROGRESS = 0.95  # the tail must fall below 95% of the start
BASELINE = 0.97  # ... and below 97% of the trivial baseline, where there is one
GAVE_BACK_RATIO, GAVE_BACK_NATS = 1.5, 0.5  # tail > 1.5 x best + 0.5: climbed back


@dataclass
class Truth:
    failed: bool
    reason: str  # "" when healthy
    rows: int
    start: float
    tail: float
    best: float
    baseline: float | None
    first_nonfinite: int | None  # row index


def read_log(path: Path, key: str = "loss") -> list[float]:
    """The ``key`` column of a LossLog jsonl file ("nan"/"inf" strings parse as floats)."""
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [float(r[key]) for r in rows]


def judge(values: Sequence[float], baseline: float | None = None) -> Truth:
    """The verdict of the rules above on one logged series (lower is better)."""
    vals = [float(v) for v in values]
    n = len(vals)
    nonfinite = [i for i, v in enumerate(vals) if not math.isfinite(v)]
    finite = [v for v in vals if math.isfinite(v)]
    nan = float("nan")
    start = statistics.mean(vals[:START]) if n else nan
    tail = statistics.mean(vals[-max(TAIL_MIN, n // TAIL_FRACTION) :]) if n else nan
    best = min(finite) if finite else nan
    first = nonfinite[0] if nonfinite else None
    if not n:
        reason = "nothing logged"
    elif nonfinite:
        reason = f"non-finite from row {first}"
    elif tail >= PROGRESS * start:
        reason = "no progress from start"
    elif baseline is not None and tail >= BASELINE * baseline:
        reason = "no better than the trivial baseline"
    elif tail > GAVE_BACK_RATIO * best + GAVE_BACK_NATS:
        reason = "gave back its progress"
    else:
        reason = ""
    return Truth(bool(reason), reason, n, start, tail, best, baseline, first)


def failure_step(truth: Truth, steps: int) -> int:
    """The step a failed run failed at: the first non-finite row scaled to ``steps``, else
    the budget (the verdict is on the end of the run)."""
    if truth.first_nonfinite is None or not truth.rows:
        return steps
    return min(steps, truth.first_nonfinite * steps // truth.rows)


def to_json(truth: Truth, steps: int) -> dict:
    return {**asdict(truth), "failure_step": failure_step(truth, steps)}
