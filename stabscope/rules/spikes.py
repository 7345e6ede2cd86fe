"""Loss and gradient-norm spikes: a z-score over a trailing window, every step.

A step is a spike when its value is more than ``z`` standard deviations above the mean of the
previous ``window`` finite values (population std, the value itself left out), and above
that mean by more than ``min_rise`` of it. The z threshold is OLMo-core's
``StabilityMonitorCallback`` (src/olmo_core/train/callbacks/stability_monitor.py: 6 standard
deviations above the mean of the previous 128 values); the window is llm.c's
``OutlierDetector`` (llmc/outlier_detector.h: the z-score over 64 values, used to skip
updates above ``-sl``/``-sg``, off by default). 64 rather than 128: a window that still holds
the loss's early fall has a wide spread; on the sample GPT one corrupt batch at step 150 is
z = 5.9 against 128 values and z = 32 against 64.
Checks start once ``min_steps`` previous values exist (the window fills up to ``window``), so
short runs are judged too. ``min_rise`` keeps a near-constant series (a converged loss whose
std is 1e-4) from calling a blip a spike. Non-finite values are the ``nonfinite`` rule's and
are left out of the window.

The gradient norm is the one before clipping where the run recorded it (``grad_norms.py``);
older runs give the norm at their recorded steps, after any clip. Its z-score is taken over
the logarithm (``log``), and ``mean`` is then the window's geometric mean: a norm is a
positive scale whose step-to-step noise is multiplicative, so on raw values a calm stretch
makes a 1.7x blip "7 standard deviations". Over the stored runs of the grid and the blind
trials (294 runs, benchmarks.md "Twenty-first pass"), raw z 6 with a 1.5x floor warned on
48 of 153 healthy runs and 63 of 141 failing ones, log z 6 with the same floor on 10 and 31.
A loss can be negative (a flow's NLL) and keeps the raw z-score.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pandas as pd

from ..store import RUN_MODULE
from ..store.findings import Finding
from ..wording import counted
from .base import Rule, RunView, finding
from .grad_norms import READS as GRAD_READS
from .grad_norms import grad_norm_rows, total_by_step
from .view import Request

SOURCES = (
    "Allen Institute for AI 2026, OLMo-core StabilityMonitorCallback (z 6); "
    "Karpathy 2024, llm.c OutlierDetector (z-score over 64 steps)"
)


def spikes(series: pd.Series, p: dict[str, float]) -> pd.DataFrame:
    """The spike steps of ``series`` (float values indexed by step, in step order): columns
    step, value, mean, z, and seen (how many previous values the window held: fewer than
    ``window`` early on). A previous window with zero spread and a rise gives z = inf. With
    ``p["log"]`` set, z is over the logarithms of the positive values and ``mean`` is their
    geometric mean."""
    values = series.to_numpy(float)
    logs = bool(p.get("log", 0))
    # Over logarithms only positive values count: a zero norm (no gradient) has no scale.
    finite = series[np.isfinite(values) & (values > 0)] if logs else series[np.isfinite(values)]
    scale = np.log(finite) if logs else finite
    # A window of at least 2 values; a configured window below min_steps checks once full.
    window = max(int(p["window"]), 2)
    prev = scale.shift(1).rolling(window, min_periods=min(max(int(p["min_steps"]), 2), window))
    centre, std = prev.mean(), prev.std(ddof=0)
    # The window's mean on the values' own scale: the geometric mean over logarithms.
    mean = np.exp(centre) if logs else centre
    rise = finite - mean
    with np.errstate(divide="ignore", invalid="ignore"):
        z = (scale - centre) / std
    z = z.where(std > 0, np.where(rise > 0, np.inf, 0.0))
    hit = (z > p["z"]) & (rise > p["min_rise"] * mean.abs()) & centre.notna()
    return pd.DataFrame(
        {
            "step": finite.index[hit],
            "value": finite[hit],
            "mean": mean[hit],
            "z": z[hit],
            "seen": prev.count()[hit],
        }
    )


def _rise(value: float, mean: float) -> str:
    """How far above the mean: a ratio where the mean is positive; a difference where it is
    not (a loss below zero, a flow's NLL: a ratio of -2x would read as a fall)."""
    return f"{value / mean:.2f}x" if mean > 0 else f"{value - mean:+.3g}"


def _finding(
    rule: Rule, what: str, found: pd.DataFrame, p: dict[str, float], remedy: str
) -> Finding:
    first = found.iloc[0]
    extra = len(found) - 1
    more = f"; {counted(extra, 'more spike step')}" if extra else ""
    return finding(
        rule,
        "warning",
        f"{what} {first.value:.4g} at step {int(first.step)} is {first.z:.3g} standard "
        f"deviations{' of its logarithm' if p.get('log') else ''} above the "
        f"{'geometric ' if p.get('log') else ''}mean {first['mean']:.4g} of the previous "
        f"{int(first['seen'])} steps ({_rise(first.value, first['mean'])}){more}",
        module=RUN_MODULE,
        step=int(first.step),
        value=float(first.z),
        threshold=p["z"],
        metric="loss" if rule is LOSS_SPIKE else "grad_norm",
        remedy=remedy,
    )


def _loss_spike(view: RunView, p: dict[str, float]) -> Iterator[Finding]:
    loss = view.metrics("loss")
    loss = loss[loss.module == RUN_MODULE]
    series = pd.Series(loss.value.to_numpy(float), index=loss.step.to_numpy()).sort_index()
    found = spikes(series, p)
    if not found.empty:
        yield _finding(
            LOSS_SPIKE,
            "loss",
            found,
            p,
            "look at the batch of that step and at grad_norm just before it; lower the "
            "learning rate, add warm-up or clip the gradient; a spike is a late symptom: check "
            "the earlier findings",
        )


def _grad_norm_spike(view: RunView, p: dict[str, float]) -> Iterator[Finding]:
    rows = grad_norm_rows(view)
    found = spikes(total_by_step(rows), p)
    if not found.empty:
        # "Before clipping" only where a clip ran: a run without one has one norm, and the
        # phrase would send the reader looking for a clip the script does not have.
        pre = (rows.metric.astype(str) == "grad_norm").all()
        clipped = pre and not view.metrics("grad_norm_clipped").empty
        yield _finding(
            GRAD_NORM_SPIKE,
            "the gradient norm before clipping" if clipped else "the gradient norm",
            found,
            p,
            "a gradient spike often comes before a loss spike: lower the learning rate, "
            "clip the gradient (max_norm near the typical grad_norm), or skip such steps",
        )


DEFAULTS = {"z": 6.0, "window": 64, "min_steps": 20}

LOSS_SPIKE = Rule(
    "loss-spike",
    "Loss spike (z-score over a trailing window)",
    SOURCES,
    ("loss",),
    {**DEFAULTS, "min_rise": 0.1},
    _loss_spike,
    "warning",
    (Request(("loss",)),),
)

GRAD_NORM_SPIKE = Rule(
    "grad-norm-spike",
    "Gradient-norm spike (z-score over a trailing window)",
    SOURCES,
    ("grad_norm", "param_grad_norm"),
    {**DEFAULTS, "min_rise": 0.5, "log": 1.0},
    _grad_norm_spike,
    "warning",
    (*GRAD_READS, Request(("grad_norm_clipped",))),
)

RULES = [LOSS_SPIKE, GRAD_NORM_SPIKE]
