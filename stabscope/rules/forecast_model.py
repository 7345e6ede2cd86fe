"""The forecast's score: a monotone logistic model of the signals, fitted on a grid of runs.

    p = σ(b + Σ_i w_i · (clip(x_i) − fill_i) / scale_i),   every w_i >= 0

Every signal is oriented so that larger is worse, and the weights are constrained to be
non-negative: more of a warning sign never lowers the probability, on models the grid never
had. ``fill`` is the median over the grid's healthy runs, and only a signal's excess over it
counts: a signal a run did not record, or one at or below a typical healthy value, adds
nothing. Being calmer than a typical grid run is no evidence on a model whose signals live on
another scale (a regression head's "logits", a task with a lower loss), so it cannot cancel a
warning sign elsewhere. ``clip`` keeps each signal inside the
range the grid spanned, so an unseen extreme (an index of 1e9) cannot outvote the rest by
extrapolation. ``scale`` is the signal's standard deviation on the grid.

p reads "fails by the planned end with probability p" at the base rate of the grid it was
fitted on (bench/grid: about half its runs fail); docs/benchmarks.md gives the grid, the fit
and its leave-one-family-out scores. The fitted numbers ship in forecast_weights.json and are
refitted with ``python -m bench.grid.fit``.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

WEIGHTS_FILE = Path(__file__).with_name("forecast_weights.json")


@dataclass(frozen=True)
class ForecastModel:
    features: tuple[str, ...]
    weights: tuple[float, ...]
    bias: float
    fill: tuple[float, ...]
    scale: tuple[float, ...]
    low: tuple[float, ...]
    high: tuple[float, ...]
    #: Risk factors: signals that raise p only as far as the others already do (their term
    #: is at most the sum of the other signals' positive terms), so that a risk alone never
    #: makes a verdict. Token correlation near 1 at init is one: deep Post-LN models start
    #: there and may or may not train (Kedia et al. 2024; the grid has both).
    risks: tuple[str, ...] = ()

    def standardised(self, values: dict[str, float]) -> np.ndarray:
        """(F,) each signal clipped to the grid's range, its excess over the healthy median,
        over its scale: 0 for a missing or NaN signal and for one at or below that median."""
        x = np.array([values.get(f, math.nan) for f in self.features], float)
        x = np.where(np.isnan(x), self.fill, x)
        x = np.clip(x, self.low, self.high)
        return np.maximum(x - np.array(self.fill), 0.0) / np.array(self.scale)

    def contributions(self, values: dict[str, float]) -> dict[str, float]:
        """Each signal's term w_i · z_i of the log-odds; a risk factor's capped by the sum of
        the other signals' positive terms."""
        z = self.standardised(values)
        terms = {f: float(w * v) for f, w, v in zip(self.features, self.weights, z)}
        support = sum(max(t, 0.0) for f, t in terms.items() if f not in self.risks)
        for f in self.risks:
            if f in terms:
                terms[f] = min(terms[f], support)
        return terms

    def probability(self, values: dict[str, float]) -> float:
        logit = self.bias + sum(self.contributions(values).values())
        return float(1 / (1 + math.exp(-logit))) if logit > -700 else 0.0

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    @classmethod
    def from_json(cls, text: str) -> ForecastModel:
        raw = json.loads(text)
        fields: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in raw.items()}
        return cls(**fields)


def load_default() -> ForecastModel:
    return ForecastModel.from_json(WEIGHTS_FILE.read_text())


def fit(
    rows: list[dict[str, float]],
    failed: list[bool],
    features: tuple[str, ...],
    l2: float = 1.0,
    iterations: int = 4000,
    risks: tuple[str, ...] = (),
) -> ForecastModel:
    """Fit the monotone logistic model: maximum likelihood with an L2 penalty ``l2``·|w|²/2
    (the bias unpenalised), weights projected onto w >= 0 after each gradient step. The
    ``risks`` cap is applied when scoring, not in the fit (the fit stays convex)."""
    y = np.array(failed, float)
    raw = np.array([[r.get(f, math.nan) for f in features] for r in rows], float)
    healthy = raw[y == 0] if (y == 0).any() else raw
    fill = np.array([_median(healthy[:, j], raw[:, j]) for j in range(len(features))])
    x = np.where(np.isnan(raw), fill, raw)
    finite = np.where(np.isfinite(x), x, np.nan)
    low = np.nanmin(finite, axis=0)
    high = np.nanmax(finite, axis=0)
    low, high = np.where(np.isnan(low), fill, low), np.where(np.isnan(high), fill, high)
    x = np.clip(x, low, high)
    scale = x.std(axis=0)
    scale = np.where(scale > 0, scale, 1.0)
    z = np.maximum(x - fill, 0.0) / scale  # (N, F): warning signs only
    w, b = np.zeros(len(features)), 0.0
    n = len(y)
    # Gradient descent with step 1/L: the logistic loss's Hessian is at most |z|²/4n + l2/n.
    lipschitz = (np.linalg.norm(z, 2) ** 2) / (4 * n) + l2 / n + 1e-12
    step = 1.0 / lipschitz
    for _ in range(iterations):
        p = 1 / (1 + np.exp(-(z @ w + b)))
        w = np.maximum(w - step * (z.T @ (p - y) / n + l2 * w / n), 0.0)
        b -= step * float(np.mean(p - y))
    return ForecastModel(
        tuple(features),
        tuple(float(v) for v in w),
        float(b),
        tuple(float(v) for v in fill),
        tuple(float(v) for v in scale),
        tuple(float(v) for v in low),
        tuple(float(v) for v in high),
        tuple(risks),
    )


def _median(preferred: np.ndarray, fallback: np.ndarray) -> float:
    for column in (preferred, fallback):
        finite = column[np.isfinite(column)]
        if len(finite):
            return float(np.median(finite))
    return 0.0


__all__ = ["WEIGHTS_FILE", "ForecastModel", "fit", "load_default"]
