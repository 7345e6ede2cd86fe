"""The forecast's look-ahead signals: the stability index now, and where the planned lr takes it.

The recorder measures S = λ_max(M^½ H M^½) at steps 2, 4, 8, ... (``stability_index``: the
top eigenvalue of the optimizer-preconditioned Hessian in units of the optimizer's stability
threshold, Cohen et al. 2021 and 2022); S > 1 means the next step overshoots along the sharpest
direction. With the planned lr curve (meta.json ``lr_plan``) the forecast keeps the curvature
fixed and scales S by the lr: S(s) = S_now x lr_plan(s) / lr_now. Curvature does adapt (at the
edge of stability training pushes S back towards 1), which is why these are signals with a
calibrated weight in the forecast, not verdicts on their own.

Every signal is a log10 (S is scale-free already); NaN when the run did not measure it.
"""

from __future__ import annotations

import math

import numpy as np

from ..store.lr_plan import peak_lr_after
from .trends import Feature
from .view import Request, RunView

READS = (Request(("stability_index", "stability_lr")),)
FLOOR = 1e-3  # S below this is "far from the edge": log10 floors at -3


def _log(x: float) -> float:
    return math.log10(max(x, FLOOR)) if math.isfinite(x) else (math.inf if x > 0 else math.nan)


def stability_features(view: RunView) -> dict[str, Feature]:
    """``stability_now``, ``stability_peak``, ``stability_forecast`` (module docstring), plus
    ``crossing_step``'s evidence: the first planned step whose forecast S reaches 1."""
    nan = {
        name: Feature(name, math.nan, "stability index not measured")
        for name in ("stability_now", "stability_peak", "stability_forecast")
    }
    if not view.has("stability_index"):
        return nan
    df = view.metrics("stability_index", "stability_lr")
    s = df[df.metric == "stability_index"].set_index("step").value.sort_index()
    lr = df[df.metric == "stability_lr"].set_index("step").value
    s = s[np.isfinite(s.to_numpy(float))]
    if s.empty:
        return nan
    last = int(s.index[-1])
    # The last two measurements, geometric mean: one Lanczos estimate on one probe batch
    # wobbles by a factor ~2 from step to step near the edge.
    now = float(np.exp(np.log(np.maximum(s.iloc[-2:].to_numpy(float), FLOOR)).mean()))
    peak_step = int(s.idxmax())
    out = {
        "stability_now": Feature(
            "stability_now", _log(now), f"stability index {now:.3g} at step {last}", last
        ),
        "stability_peak": Feature(
            "stability_peak",
            _log(float(s.max())),
            f"stability index peaked at {float(s.max()):.3g} at step {peak_step}",
            peak_step,
        ),
    }
    lr_now = float(lr.get(last, math.nan))
    ahead = peak_lr_after(view.meta, last + 1)
    if ahead is None or not (lr_now > 0):
        out["stability_forecast"] = Feature(
            "stability_forecast",
            _log(now),
            f"no planned lr curve: the lr is taken to stay at {lr_now:.3g}",
            last,
        )
        return out
    at, lr_peak = ahead
    fc = now * lr_peak / lr_now
    out["stability_forecast"] = Feature(
        "stability_forecast",
        _log(fc),
        f"stability index {now:.3g} at step {last} with lr {lr_now:.3g}; the planned lr "
        f"reaches {lr_peak:.3g} at step {at}: index {fc:.3g} if the curvature stays",
        at,
    )
    return out


__all__ = ["FLOOR", "READS", "stability_features"]
