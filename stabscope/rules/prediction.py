"""Rule prediction-mismatch: the measured profile at init against the theory's prediction.

``stabscope profile`` stores what DeepScaleLM moment propagation (Kedia et al. 2024) predicts
for the model as built (``RUN_DIR/prediction.json``, see docs/theory.md). At the first recorded
step, each block output's activation second moment (act_rms²), gradient second moment
relative to the last block's (grad_rms²), and token correlation are compared with it. A large
gap means the model does something its weights and structure do not say (a scale inside
``forward``, tied or re-initialised weights, a component the theory does not model), or that
the stored prediction was made for another init.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pandas as pd

from ..store.findings import Finding
from ..theory.prediction import KEDIA, Prediction, stored_prediction
from .base import Rule, RunView, finding
from .view import Request

METRICS = ("act_rms", "grad_rms", "token_corr")


@dataclass
class Gap:
    """One layer's measured and predicted value of one quantity and their relative error."""

    module: str
    quantity: str
    measured: float
    predicted: float
    error: float
    step: int


def compare(view: RunView, prediction: Prediction) -> list[Gap]:
    """Per block and quantity, measured at the first recorded step against the prediction.

    Quantities: ``act_rms2`` and ``grad_rms2`` (symmetric relative error of the second moments;
    the gradient taken relative to the last block's, as predicted) and ``token_corr`` (absolute
    difference: a correlation near 0 has no meaningful relative error).
    """
    found = prediction.module_names(view.block_names)
    names = [n for n in found if n is not None]
    frame = view.metrics(*METRICS, step="first")
    if frame.empty or len(names) < len(found):  # a block the prediction has no module for
        return []
    step = int(frame.step.min())
    first = frame[(frame.step == step) & (frame.call == 0) & frame.module.isin(names)]
    table = first.pivot_table(index="module", columns="metric", values="value", aggfunc="first")
    table = table.reindex(names)
    gaps: list[Gap] = []
    last = names[-1]
    for name, layer in zip(names, prediction.layers):
        row = table.loc[name]
        gaps += _gap(name, "act_rms2", row.get("act_rms", np.nan) ** 2, layer.act_rms**2, step)
        grad = row.get("grad_rms", np.nan) ** 2 / table.loc[last].get("grad_rms", np.nan) ** 2
        gaps += _gap(name, "grad_rms2", grad, layer.grad_rms_rel**2, step)
        measured_corr = row.get("token_corr", np.nan)
        if np.isfinite(measured_corr):
            diff = abs(measured_corr - layer.token_corr)
            gaps.append(Gap(name, "token_corr", measured_corr, layer.token_corr, diff, step))
    return gaps


def _gap(module: str, quantity: str, measured: float, predicted: float, step: int) -> list[Gap]:
    """Symmetric relative error max(m/p, p/m) − 1: a value 3x too small counts like 3x too large."""
    if not (np.isfinite(measured) and np.isfinite(predicted) and predicted > 0 and measured > 0):
        return []
    error = max(measured / predicted, predicted / measured) - 1.0
    return [Gap(module, quantity, measured, predicted, error, step)]


def _mismatch(view: RunView, p: dict[str, float]) -> Iterator[Finding]:
    prediction = stored_prediction(view.run_dir)
    if prediction is None:
        return
    tolerance = {"act_rms2": p["act"], "grad_rms2": p["grad"], "token_corr": p["corr"]}
    gaps = compare(view, prediction)
    frame = pd.DataFrame([vars(g) for g in gaps])
    if frame.empty:
        return
    frame["excess"] = frame.error / frame.quantity.map(tolerance)
    over = frame[frame.excess > 1.0]
    if over.empty:
        return
    worst = over.loc[over.excess.idxmax()]
    kinds = ", ".join(f"{q} in {n} blocks" for q, n in over.groupby("quantity").size().items())
    yield finding(
        MISMATCH,
        "warning",
        f"{worst.module} at step {int(worst.step)}: {worst.quantity} {worst.measured:.4g} "
        f"against {worst.predicted:.4g} predicted at init (error {worst.error:.3g} > "
        f"{tolerance[worst.quantity]:g}); off: {kinds}. The model does something its weights "
        "and structure do not say, or the prediction was made for another init",
        module=str(worst.module),
        step=int(worst.step),
        value=float(worst.measured),
        threshold=float(worst.predicted),
        metric=str(worst.quantity),
        remedy="look for a scale inside forward (embeddings × sqrt(d), a residual multiplier), "
        "weights tied or re-initialised after construction, or a component the theory does "
        "not model; compare `stabscope predict SCRIPT` with the intended init",
    )


MISMATCH = Rule(
    "prediction-mismatch",
    "Measured profile against the theory's prediction",
    KEDIA,
    METRICS,
    {"act": 0.5, "grad": 4.0, "corr": 0.35},
    _mismatch,
    "warning",
    (Request(METRICS, step="first"),),
)

RULES = [MISMATCH]
