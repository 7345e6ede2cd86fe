"""The forecast's look-ahead signals: the stability index now, and where the planned lr takes it.

The recorder measures S = λ_max(M^½ H M^½) at steps 2, 4, 8, ... (``stability_index``: the
top eigenvalue of the optimizer-preconditioned Hessian in units of the optimizer's stability
threshold, Cohen et al. 2021 and 2022); S > 1 means the next step overshoots along the sharpest
direction. With the planned lr curve (meta.json ``lr_plan``) the forecast keeps the curvature
fixed and scales S by the lr: S(s) = S_now x lr_plan(s) / lr_now. Curvature does adapt (at the
edge of stability training pushes S back towards 1), which is why these are signals with a
calibrated weight in the forecast, not verdicts on their own.

Every signal is a log10 (S is scale-free already); NaN when the run did not measure it.
``stability_forecast`` is also NaN when the plan has no rise ahead to extrapolate along (a
constant lr, a warm-up, a decay, an unknown plan): the index as it is reads as
``stability_now``, and the forecast speaks only of a planned rise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

from ..store import RUN_MODULE
from .lr_plan_check import checked_plan
from .trends import Feature
from .view import Request, RunView

READS = (Request(("stability_index", "stability_lr")), Request(("grad_norm", "grad_norm_clipped")))
FLOOR = 1e-3  # S below this is "far from the edge": log10 floors at -3
#: Not a signal: the first planned step whose forecast S reaches 1 (Feature.step; None when
#: the plan never takes S there), computed from the raw S and lr, not the floored log.
CROSSING = "crossing_step"


def _log(x: float) -> float:
    return math.log10(max(x, FLOOR)) if math.isfinite(x) else (math.inf if x > 0 else math.nan)


def _budget_why(counts: object) -> str:
    """Why no index was measured, from meta.json's ``stability_index`` counts: a time budget
    that skipped every scheduled measurement (a callback's default 5% of a short plan) is not
    a probe that failed, and the user can lift it."""
    if isinstance(counts, dict) and not counts.get("measured") and counts.get("skipped"):
        return (
            f"stability index not measured: {counts['skipped']} scheduled measurement(s) "
            f"skipped to keep its time within {counts.get('budget'):.3g} of the training time "
            "(sharpness_budget; sharpness_budget=inf measures every one)"
        )
    return "stability index not measured"


def stability_features(view: RunView) -> dict[str, Feature]:
    """``stability_now``, ``stability_peak``, ``stability_forecast`` (module docstring), plus
    ``CROSSING``: the first planned step whose forecast S reaches 1."""
    note = next(
        (n for n in view.meta.get("notes", []) if str(n).startswith("stability_index not")),
        None,
    )
    why = str(note).replace("_", " ", 1) if note else _budget_why(view.meta.get("stability_index"))
    nan = {
        name: Feature(name, math.nan, why)
        for name in ("stability_now", "stability_peak", "stability_forecast", CROSSING)
    }
    if not view.has("stability_index"):
        return nan
    df = view.metrics("stability_index", "stability_lr")
    s = df[df.metric == "stability_index"].set_index("step").value.sort_index()
    lr = df[df.metric == "stability_lr"].set_index("step").value
    s = s[np.isfinite(s.to_numpy(float))]
    if s.empty:
        return nan
    factors = clip_factors(view, s.index)
    s = (s * factors).dropna()  # a measurement whose clip factor has not landed yet waits
    if s.empty:
        why = "stability index: the clip's factor at its measured steps has not landed yet"
        return {name: Feature(name, math.nan, why) for name in nan}
    last = int(s.index[-1])
    # The last two measurements, geometric mean: one Lanczos estimate on one probe batch
    # wobbles by a factor ~2 from step to step near the edge. Raw, not floored: the crossing
    # step scales it by lr ratios of 1e4 and more (a flat start before a ramp).
    tiny = np.finfo(float).tiny  # S <= 0 (no positive curvature): as stable as it gets
    now = float(np.exp(np.log(np.maximum(s.iloc[-2:].to_numpy(float), tiny)).mean()))
    peak_step = int(s.idxmax())
    clipped = ""  # where the script clipped: say the index was read at the clipped step
    if (factors < 1).any():
        clipped = f" (scaled by the clip's factor, {float(factors.iloc[-1]):.3g} at step {last})"
    out = {
        "stability_now": Feature(
            "stability_now", _log(now), f"stability index {now:.3g} at step {last}{clipped}", last
        ),
        "stability_peak": Feature(
            "stability_peak",
            _log(float(s.max())),
            f"stability index peaked at {float(s.max()):.3g} at step {peak_step}",
            peak_step,
        ),
    }
    lr_now = float(lr.get(last, math.nan))
    plan = checked_plan(view)  # None where the scripts' schedulers step at another pace
    if plan is None or not (lr_now > 0):
        why = f"no planned lr curve: no rise to extrapolate the index ({now:.3g}) along"
        out["stability_forecast"] = Feature("stability_forecast", math.nan, why, last)
        out[CROSSING] = nan[CROSSING]
        return out
    ahead = lr_growth_ahead(*plan, last, lr_now)
    out[CROSSING] = crossing(now, ahead, *plan)
    said = f"stability index {now:.3g} at step {last} with lr {lr_now:.3g}; {ahead.words}"
    if ahead.factor <= 1:  # no rise to extrapolate along: stability_now reads the index
        out["stability_forecast"] = Feature("stability_forecast", math.nan, said, last)
        return out
    fc = now * ahead.factor
    out["stability_forecast"] = Feature(
        "stability_forecast", _log(fc), f"{said}: index {fc:.3g} if the curvature stays", ahead.step
    )
    return out


def clip_factors(view: RunView, steps: pd.Index) -> pd.Series:
    """(len(steps),) the factor the script's gradient clip scaled each of ``steps``' update
    by: the norm after the clip over the norm before it (``grad_norm_clipped`` /
    ``grad_norm``, at most 1); 1 at a step without a clip; NaN at a step whose norms have not
    landed yet in a run that clips. The index is the step's size in
    units of the edge, and a clip shrinks the step: under SGD by the factor itself; under
    Adam its moments hold clipped gradients, so the measured index (the state's √v against
    the probe batch's unclipped Hessian) reads 1/factor too high, and the factor puts it
    back. A clip to 0.05 of a recurrent net's gradients of norm ~17 read an index of 310
    for a run that trains (0.9 scaled)."""
    g = view.metrics("grad_norm", "grad_norm_clipped")
    g = g[g.module == RUN_MODULE]
    if not (g.metric.astype(str) == "grad_norm_clipped").any():
        return pd.Series(1.0, index=steps)  # no clip seen
    landed = int(g.step.max())
    wide = g[g.step.isin(steps)].pivot_table(
        index="step", columns="metric", values="value", aggfunc="mean"
    )
    factors = pd.Series(np.nan, index=steps)
    if "grad_norm_clipped" in wide and "grad_norm" in wide:
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = (wide["grad_norm_clipped"] / wide["grad_norm"]).to_numpy(float)
        ratio = np.where(np.isfinite(ratio) & (ratio > 0), np.minimum(ratio, 1.0), 1.0)
        factors = pd.Series(ratio, index=wide.index).reindex(steps)
    # A step after the last whose norms have landed (a run judged while it trains: a step's
    # norms reach host memory at the next sync) has a factor not known yet: NaN, and the
    # measurement waits. One up to it without a clip's norms (no clip that step, or a run
    # that wrote its norms only at its recorded steps) had no clip seen: 1.
    late = np.asarray(steps) > landed
    return factors.where(factors.notna() | late, 1.0)


def crossing(now: float, ahead: Ahead, steps: np.ndarray, lrs: np.ndarray) -> Feature:
    """The first planned step after ``ahead.base_step`` at which S_now x lr(s) / base reaches
    1 (``now``: the raw index, never floored; ``steps``, ``lrs``: the plan, (P,) each); none
    when S_now is already past 1: no step of the plan is where it gets there."""
    if now >= 1:  # no planned step takes it past 1: it is there (an lr held, or a bad init)
        return Feature(CROSSING, math.nan, f"the index is already past 1 ({now:.3g})")
    over = np.flatnonzero((steps > ahead.base_step) & (now * lrs / ahead.base >= 1))
    if not len(over):
        return Feature(CROSSING, math.nan, "the planned lr keeps the index under 1")
    at = int(steps[over[0]])
    said = f"the planned lr ({float(lrs[over[0]]):.3g}) takes the index past 1 at step {at}"
    return Feature(CROSSING, float(at), said, at)


def warmup_end(steps: np.ndarray, lrs: np.ndarray) -> int:
    """The step where the plan's opening rise (the warm-up) peaks; its first step if the plan
    does not open with a rise."""
    falls = np.flatnonzero(lrs[1:] <= lrs[:-1])
    return int(steps[falls[0]] if len(falls) else steps[-1])


@dataclass(frozen=True)
class Ahead:
    """The planned lr's rise that the forecast extrapolates S along: from ``base`` (the lr at
    ``base_step``) up to ``peak`` at ``step``."""

    step: int
    peak: float
    base: float
    base_step: int
    words: str

    @property
    def factor(self) -> float:
        return max(self.peak / self.base, 1.0)


#: The relative rounding of a float32 row (the stored lr), with a margin.
F32_ROUNDING = 4 * float(np.finfo(np.float32).eps)


def lr_growth_ahead(steps: np.ndarray, lrs: np.ndarray, last: int, lr_now: float) -> Ahead:
    """How far the planned lr rises above the one S was measured with (``lr_now`` at
    ``last``).

    During a warm-up the curvature falls as the lr rises (Kalra and Barkeshli 2024, "Why
    warmup the learning rate?": the warm-up's sharpness reduction is what lets the larger lr
    train), so extrapolating S at fixed curvature along the warm-up predicts failures that
    do not happen; only a rise beyond the warm-up's peak is extrapolated, from that peak.
    After the warm-up, a later rise counts from the lr now, or from the largest lr the plan
    has already trained at when that is larger: a restart of a cyclic or warm-restart
    schedule (SGDR, Loshchilov and Hutter 2017) returns to an lr the run has trained at,
    and S measured at the bottom of a cycle, scaled up to its top, would read the restart
    as a ramp into the unknown."""
    end = warmup_end(steps, lrs)
    if last + 1 < end:  # inside the warm-up: only a rise beyond its peak
        base, base_step = float(lrs[np.searchsorted(steps, end)]), end
        words = "warm-up in progress (not extrapolated); "
    else:
        trained = lrs[steps <= last]
        base = max(lr_now, float(np.nanmax(trained))) if len(trained) else lr_now
        base_step = last
        above = base > lr_now * (1 + F32_ROUNDING)  # not the float32 row's rounding
        words = f"the plan has trained at lr {base:.3g}; " if above else ""
    ahead = steps > base_step
    # lr_now comes from a float32 row: a plan that holds it reads up to one float32 rounding
    # above it (0.03 -> 0.029999999), and that is no rise.
    if not ahead.any() or not np.nanmax(lrs[ahead]) > base * (1 + F32_ROUNDING):
        return Ahead(last, base, base, base_step, words + "the planned lr rises no further")
    i = int(np.flatnonzero(ahead)[np.nanargmax(lrs[ahead])])
    peak, at = float(lrs[i]), int(steps[i])
    return Ahead(
        at, peak, base, base_step, words + f"the planned lr reaches {peak:.3g} at step {at}"
    )


__all__ = [
    "CROSSING",
    "FLOOR",
    "READS",
    "Ahead",
    "clip_factors",
    "crossing",
    "lr_growth_ahead",
    "stability_features",
    "warmup_end",
]
