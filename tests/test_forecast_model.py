"""The forecast's monotone logistic model against Newton's method and analytic cases."""

from __future__ import annotations

import math

import numpy as np
import pytest

from stabscope.rules.forecast_model import ForecastModel, fit, load_default


def data(n: int = 400, seed: int = 0) -> tuple[list[dict], list[bool], np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 2))
    p = 1 / (1 + np.exp(-(0.5 + 2.0 * x[:, 0] + 0.7 * x[:, 1])))
    y = rng.random(n) < p
    return [{"a": a, "b": b} for a, b in x], list(y), x


def newton(z: np.ndarray, y: np.ndarray, l2: float) -> tuple[np.ndarray, float]:
    """Unconstrained L2-penalised logistic regression (bias unpenalised) by Newton's method."""
    n = len(y)
    a = np.hstack([z, np.ones((n, 1))])
    theta = np.zeros(a.shape[1])
    pen = np.diag([l2] * z.shape[1] + [0.0])
    for _ in range(50):
        p = 1 / (1 + np.exp(-a @ theta))
        grad = a.T @ (p - y) / n + pen @ theta / n
        hess = (a.T * (p * (1 - p))) @ a / n + pen / n
        theta -= np.linalg.solve(hess, grad)
    return theta[:-1], float(theta[-1])


@pytest.mark.slow
def test_fit_equals_newton_when_the_optimum_is_monotone() -> None:
    rows, y, x = data()
    model = fit(rows, y, ("a", "b"), l2=1.0, iterations=20000)
    # The model's own design: each signal's excess over the healthy median, over its scale.
    z = np.maximum(x - np.array(model.fill), 0) / np.array(model.scale)
    w, b = newton(z, np.array(y, float), 1.0)
    assert (w > 0).all()  # both true effects are positive: the constraint is not active
    np.testing.assert_allclose(model.weights, w, rtol=1e-3)
    assert model.bias == pytest.approx(b, rel=1e-3)


@pytest.mark.slow
def test_a_protective_signal_gets_no_weight() -> None:
    rows, y, _ = data()
    flipped = [{"a": r["a"], "b": -r["b"]} for r in rows]  # b now lowers the risk
    model = fit(flipped, y, ("a", "b"), iterations=20000)
    assert model.weights[1] == 0.0
    assert model.weights[0] > 0


def test_missing_and_extreme_values() -> None:
    rows, y, _ = data()
    model = fit(rows, y, ("a", "b"), iterations=5000)
    healthy_b = np.median([r["b"] for r, bad in zip(rows, y) if not bad])
    assert model.fill[1] == pytest.approx(healthy_b)
    # A missing signal counts as the healthy median: no contribution either way.
    assert model.contributions({"a": 1.0})["b"] == 0.0
    assert model.contributions({"a": 1.0, "b": math.nan})["b"] == 0.0
    # Beyond the grid's range, the score is the one at its edge: no extrapolation.
    top = max(r["a"] for r in rows)
    assert model.probability({"a": math.inf, "b": 0}) == model.probability({"a": top, "b": 0})
    assert model.probability({"a": 1e9, "b": 0}) == model.probability({"a": top, "b": 0})


def test_json_round_trip_and_the_shipped_model() -> None:
    rows, y, _ = data()
    model = fit(rows, y, ("a", "b"), iterations=200)
    again = ForecastModel.from_json(model.to_json())
    assert again == model
    shipped = load_default()
    assert all(w >= 0 for w in shipped.weights)
    assert len(shipped.features) == len(shipped.weights) == len(shipped.fill)


def test_only_warning_signs_count_and_a_risk_needs_a_second_signal() -> None:
    rows, y, _ = data()
    model = fit(rows, y, ("a", "b"), iterations=5000, risks=("b",))
    low_a = min(r["a"] for r in rows)
    # Calmer than the healthy median is no evidence: the term is 0, never negative.
    assert model.contributions({"a": low_a, "b": 0.0})["a"] == 0.0
    top_b = max(r["b"] for r in rows)
    alone = model.contributions({"a": low_a, "b": top_b})
    assert alone["b"] == 0.0  # the risk alone adds nothing
    a_term = model.contributions({"a": model.fill[0] + 0.5 * model.scale[0]})["a"]
    both = model.contributions({"a": model.fill[0] + 0.5 * model.scale[0], "b": top_b})
    assert both["b"] == pytest.approx(a_term)  # capped by the other signal's term
    assert a_term == pytest.approx(0.5 * model.weights[0])
