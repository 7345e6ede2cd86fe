"""Colour scales of the heatmaps: log where values span decades, ranges robust to outliers."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

F32 = np.float32
DECADES = 1.3  # a colour scale goes log past this many decades (a factor of 20)


def power_label(exponent: float) -> str:
    """10**exponent as 0.002, 50 or 2e-5, 1e6."""
    value = 10.0**exponent
    if -3 <= exponent < 3:
        return f"{value:.3g}"
    mantissa, power = f"{value:.0e}".split("e")
    return f"{mantissa}e{int(power)}"


@dataclass
class Scale:
    """Colour scale: log10 values for magnitudes that span decades, else linear."""

    log: bool
    lo: float
    hi: float

    def map(self, x: np.ndarray) -> np.ndarray:
        if not self.log:
            return x.astype(F32)
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.log10(np.maximum(x, 10**self.lo)).astype(F32)  # <= 0 shows as the floor

    def colorbar(self) -> dict:
        if not self.log:
            return {}
        decades = range(int(np.floor(self.lo)), int(np.ceil(self.hi)) + 1)
        # 1, 2, 5 per decade when the range spans few decades, every k-th decade when many
        marks = (1,) if len(decades) > 4 else (1, 2, 5)
        values = [d + float(np.log10(m)) for d in decades for m in marks]
        ticks = [v for v in values if self.lo <= v <= self.hi]
        ticks = ticks[:: max(1, len(ticks) // 8)]
        return {"tickvals": ticks, "ticktext": [power_label(t) for t in ticks]}


def scale_for(values: Sequence[np.ndarray], log: bool) -> Scale:
    """Range of the cells' colours across runs: 0.5 and 99.9 percentiles of the finite
    values, so one outlier does not flatten the rest (it shows at the end colour). A log
    scale only where the values are positive and span more than DECADES decades."""
    finite = np.concatenate([v[np.isfinite(v)].ravel() for v in values] or [np.zeros(0)])
    if not len(finite):
        return Scale(False, 0.0, 1.0)
    positive = finite[finite > 0]
    if log and len(positive):
        lo, hi = np.log10(np.percentile(positive, [0.5, 99.9]))
        if hi - lo >= DECADES:
            return Scale(True, float(lo), float(hi))
    lo, hi = np.percentile(finite, [0.5, 99.9])
    return Scale(False, float(lo), float(max(hi, lo + 1e-12 * max(1.0, abs(lo)))))
