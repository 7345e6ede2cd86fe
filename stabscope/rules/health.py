"""Rules on any model: non-finite values, loss spikes, update size, Adam's epsilon, logits."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from ..report.findings import Finding
from ..store import RUN_MODULE, count_rows
from .base import Rule, RunView, finding, finding_at
from .view import MATRICES, Request


def _nonfinite(view: RunView, p: dict[str, float]) -> Iterator[Finding]:
    flags = view.metrics("act_nonfinite", "grad_nonfinite")
    bad = flags[flags.value > 0]
    loss = view.metrics("loss")
    bad_loss = loss[~np.isfinite(loss.value)]
    if bad.empty and bad_loss.empty:
        return
    first = view.meta.get("first_nonfinite") or {}
    where = "; ".join(
        f"first in {d} order: {w['module']} at step {w['step']}" for d, w in first.items()
    )
    step = int(
        min(
            bad.step.min() if not bad.empty else np.inf,
            bad_loss.step.min() if not bad_loss.empty else np.inf,
        )
    )
    module = (first.get("forward") or first.get("backward") or {}).get("module")
    yield finding(
        NONFINITE,
        "error",
        f"NaN/Inf from step {step} ({len(bad)} module outputs or gradients"
        f"{', and the loss' if not bad_loss.empty else ''}){': ' + where if where else ''}",
        module=module,
        step=step,
        value=float(len(bad)),
        threshold=0.0,
        metric="act_nonfinite",
        remedy="look at the first module in forward order; lower the learning rate, "
        "add warm-up or gradient clipping, or compute that module in float32",
    )


NONFINITE = Rule(
    "nonfinite",
    "Non-finite values",
    "",
    ("act_nonfinite", "grad_nonfinite", "loss"),
    {},
    _nonfinite,
)


def _run_status(view: RunView, p: dict[str, float]) -> Iterator[Finding]:
    """A gate must not pass a run that failed, or one with nothing in it."""
    status = view.meta.get("status")
    steps = int(view.meta.get("recorded_steps") or 0)
    if status == "failed":
        error = view.meta.get("error") or {}
        what = f"{error.get('type', 'error')}: {error.get('message', '')}".strip(": ")
        yield finding(
            RUN_STATUS,
            "error",
            f"the run ended as failed after {steps} recorded steps ({what or 'no error saved'})",
            value=float(steps),
            remedy="fix the error in meta.json's `error` entry, then profile again",
        )
    elif count_rows(view.run_dir) == 0:
        yield finding(
            RUN_STATUS,
            "error",
            f"nothing was recorded (status {status}): the run has no readable rows",
            value=0.0,
            remedy="profile at least one step; check the module filters (--include/--exclude)",
        )
    elif status == "running":
        yield finding(
            RUN_STATUS,
            "warning",
            f"the run has not finished (status running, {steps} recorded steps): still being "
            "written, or its process was killed; the rules saw the parts written so far",
            value=float(steps),
            remedy="check it again once training ends",
        )


RUN_STATUS = Rule("run-status", "Failed, empty or unfinished run", "", (), {}, _run_status)


def _loss_spike(view: RunView, p: dict[str, float]) -> Iterator[Finding]:
    loss = view.metrics("loss")
    series = loss[loss.module == RUN_MODULE].sort_values("step")
    values, steps = series.value.to_numpy(float), series.step.to_numpy()
    window = int(p["window"])
    # A spike must also be large against the starting loss: near convergence a loss of 0.03
    # after 0.01 is three times the median but no instability.
    floor = p["min_rise"] * abs(values[0]) if len(values) else 0.0
    for i in range(window, len(values)):
        ref = np.nanmedian(values[i - window : i])
        if (
            np.isfinite(values[i])
            and ref > 0
            and values[i] > p["factor"] * ref
            and values[i] - ref > floor
        ):
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
