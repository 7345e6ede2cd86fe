"""Ground truth of a grid run from its loss curve alone (no stabscope verdict involved).

With B the planned steps, ``base`` the task's unigram baseline (tasks.unigram_baseline) and
the threshold ``thr = base * (1 - MARGIN)``:

    failed        a non-finite loss or activation at any step, or the final loss (mean of
                  the last 10% of steps) above thr: no better than predicting token
                  frequencies, by less than MARGIN of the baseline
    failure step  non-finite: the first non-finite step
                  learned, then lost it: the first step after which the smoothed loss (trailing
                  mean over B/20 steps) stays above thr
                  never got below thr: B (nothing before the end marks the failure)
    kind          nonfinite | collapsed | stood-still | healthy

A run is ambiguous when its final gap to the baseline, (base - final) / base, lies within
BAND of MARGIN: its verdict could flip with the seed, so the grid drops or redesigns it.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

MARGIN = 0.10  # final loss must beat the baseline by 10% of it
BAND = 0.05  # gaps in [MARGIN - BAND, MARGIN + BAND] are too close to call
TAIL = 0.10  # the final loss: mean over the last 10% of steps
SMOOTH = 0.05  # the failure step's trailing mean: 5% of the budget


@dataclass
class Truth:
    failed: bool
    failure_step: int
    kind: str
    final_loss: float
    baseline: float
    gap: float  # (baseline - final) / baseline; nan when non-finite
    ambiguous: bool
    first_loss: float
    min_loss: float

    def to_json(self) -> dict:
        return {k: (v if not isinstance(v, float) or math.isfinite(v) else repr(v))
                for k, v in asdict(self).items()}  # fmt: skip


def trailing_mean(values: np.ndarray, window: int) -> np.ndarray:
    """mean(values[max(0, t-window+1) : t+1]) for every t. (N,) -> (N,)"""
    sums = np.concatenate([[0.0], np.cumsum(values)])
    t = np.arange(len(values))
    lo = np.maximum(0, t - window + 1)
    return (sums[t + 1] - sums[lo]) / (t + 1 - lo)


def judge(loss: np.ndarray, baseline: float, budget: int, nonfinite_step: int | None) -> Truth:
    """``loss``: the loss of steps 0..n-1 (n <= budget); ``nonfinite_step``: the first step
    with a non-finite activation seen by other means (None when none)."""
    loss = np.asarray(loss, dtype=float)
    bad = np.flatnonzero(~np.isfinite(loss))
    first_bad = min([int(bad[0])] if len(bad) else [], default=None)
    if nonfinite_step is not None:
        first_bad = nonfinite_step if first_bad is None else min(first_bad, nonfinite_step)
    finite = loss[np.isfinite(loss)]
    first = float(loss[0]) if len(loss) else math.nan
    low = float(finite.min()) if len(finite) else math.nan
    if first_bad is not None or len(loss) == 0:
        step = first_bad if first_bad is not None else 0
        return Truth(True, step, "nonfinite", math.nan, baseline, math.nan, False, first, low)
    final = float(loss[-max(1, round(TAIL * len(loss))) :].mean())
    gap = (baseline - final) / baseline
    ambiguous = abs(gap - MARGIN) <= BAND
    thr = baseline * (1 - MARGIN)
    if final <= thr:
        return Truth(False, budget, "healthy", final, baseline, gap, ambiguous, first, low)
    smooth = trailing_mean(loss, max(1, round(SMOOTH * budget)))
    below = np.flatnonzero(smooth <= thr)
    if len(below):
        kind, step = "collapsed", int(below[-1]) + 1
    else:
        kind, step = "stood-still", budget
    return Truth(True, step, kind, final, baseline, gap, ambiguous, first, low)
