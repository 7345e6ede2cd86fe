"""Rules on any model: run status, non-finite values (``nonfinite.py``), loss spikes, update
size, Adam's epsilon, logits."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from ..store import RUN_MODULE
from ..store.findings import Finding
from .base import Rule, RunView, finding, finding_at
from .nonfinite import NONFINITE
from .run_status import RUN_STATUS
from .view import MATRICES, Request


def _loss_spike(view: RunView, p: dict[str, float]) -> Iterator[Finding]:
    loss = view.metrics("loss")
    series = loss[loss.module == RUN_MODULE].sort_values("step")
    values, steps = series.value.to_numpy(float), series.step.to_numpy()
    window = int(p["window"])
    # A spike must also be large against the starting loss (the first finite one): near
    # convergence a loss of 0.03 after 0.01 is three times the median but no instability.
    finite = values[np.isfinite(values)]
    floor = p["min_rise"] * abs(finite[0]) if len(finite) else 0.0
    for i in range(window, len(values)):
        # Finite losses only, here and before: an Inf or NaN one is the nonfinite rule's.
        before = values[i - window : i]
        before = before[np.isfinite(before)]
        if not np.isfinite(values[i]) or not len(before):
            continue
        ref = np.median(before)
        if ref > 0 and values[i] > p["factor"] * ref and values[i] - ref > floor:
            yield finding(
                LOSS_SPIKE,
                "warning",
                f"loss {values[i]:.4g} at step {steps[i]} is {values[i] / ref:.1f}x the "
                f"median of the previous {window} steps",
                module=RUN_MODULE,
                step=int(steps[i]),
                value=float(values[i] / ref),
                threshold=p["factor"],
                metric="loss",
                remedy="lower the learning rate or add warm-up; a spike is a late "
                "symptom: check the earlier findings",
            )
            return


LOSS_SPIKE = Rule(
    "loss-spike",
    "Loss spike (baseline detector)",
    "",
    ("loss",),
    {"factor": 3.0, "window": 20, "min_rise": 0.1},
    _loss_spike,
    "warning",
)


def _update_ratio(view: RunView, p: dict[str, float]) -> Iterator[Finding]:
    ratios = view.metrics("update_ratio")
    # Weight matrices only: biases and gains start at zero or one, so their ratio says little.
    ratios = ratios[ratios.module.isin(view.matrices) & np.isfinite(ratios.value)]
    big = ratios[ratios.value > p["max_ratio"]]
    if big.empty:
        return
    worst = big.loc[big.value.idxmax()]
    yield finding_at(
        UPDATE_RATIO,
        "warning",
        f"{big.module.nunique()} parameters had updates larger than "
        f"{p['max_ratio']:g} of their norm in one step; largest {worst.value:.3g} "
        f"({worst.module}, step {int(worst.step)})",
        worst,
        threshold=p["max_ratio"],
        metric="update_ratio",
        remedy="lower the learning rate or add warm-up for these parameters",
    )


UPDATE_RATIO = Rule(
    "update-ratio",
    "Update too large for the parameter",
    "",
    ("update_ratio",),
    {"max_ratio": 0.1},
    _update_ratio,
    "warning",
)

WORTSMAN = (
    "Wortsman et al. 2023, Small-scale proxies for large-scale Transformer training instabilities"
)


def _adam_eps(view: RunView, p: dict[str, float]) -> Iterator[Finding]:
    ratio = view.metrics("adam_sqrtv_over_eps", step="last", modules=view.matrices)
    # Weight matrices only: some biases get exactly zero gradient (a key bias shifts every
    # logit of a query equally, which softmax ignores), and that is not a stall.
    ratio = ratio[ratio.module.isin(view.matrices)]
    # The last step with finite values: after a divergence v̂ is NaN, which says nothing here.
    ratio = ratio[np.isfinite(ratio.value.to_numpy(float))]
    last = ratio[ratio.step == ratio.step.max()]
    low = last[last.value < p["min_ratio"]]
    if low.empty:
        return
    worst = low.loc[low.value.idxmin()]
    yield finding_at(
        ADAM_EPS,
        "warning",
        f"{len(low)} parameters have gradient rms (sqrt of Adam's v) within "
        f"{p['min_ratio']:g}x of eps at step {int(worst.step)}; lowest "
        f"{worst.value:.3g} ({worst.module}): their updates are damped",
        worst,
        threshold=p["min_ratio"],
        metric="adam_sqrtv_over_eps",
        remedy="lower Adam's eps (e.g. 1e-15) or rescale these parameters",
    )


ADAM_EPS = Rule(
    "adam-epsilon",
    "Gradient rms near Adam's epsilon",
    WORTSMAN,
    ("adam_sqrtv_over_eps",),
    {"min_ratio": 10.0},
    _adam_eps,
    "warning",
    (Request(("adam_sqrtv_over_eps",), step="last", modules=MATRICES),),
)


def _logits(view: RunView, p: dict[str, float]) -> Iterator[Finding]:
    z = view.metrics("logit_max", "logit_min", "logit_lse_mean")
    ext = z[z.metric.isin(["logit_max", "logit_min"])]
    # Finite logits only: a NaN or Inf output is the nonfinite rule's error, not a magnitude.
    ext = ext[np.isfinite(ext.value.to_numpy(float))]
    if ext.empty:
        return
    row = ext.loc[ext.value.abs().idxmax()]
    if abs(row.value) > p["max_abs_logit"]:
        yield finding_at(
            LOGITS,
            "warning",
            f"output logit {row.value:.4g} at step {int(row.step)} exceeds "
            f"{p['max_abs_logit']:g} in magnitude: output-logit divergence",
            row,
            value=abs(row.value),
            threshold=p["max_abs_logit"],
            metric=str(row.metric),
            remedy="add a z-loss (1e-4·log²Z) or weight decay on the output layer",
        )


LOGITS = Rule(
    "output-logit-divergence",
    "Output-logit divergence",
    WORTSMAN,
    ("logit_max", "logit_min"),
    {"max_abs_logit": 1000.0},
    _logits,
    "warning",
    (Request(("logit_max", "logit_min", "logit_lse_mean")),),
)

RULES = [RUN_STATUS, NONFINITE, LOSS_SPIKE, UPDATE_RATIO, ADAM_EPS, LOGITS]
