"""Rules on any model: run status, non-finite values (``nonfinite.py``), loss and gradient-norm
spikes (``spikes.py``), update size, Adam's epsilon, logits."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pandas as pd

from ..store.findings import Finding
from ..wording import counted
from .base import Rule, RunView, finding_at
from .negligible_updates import KARPATHY
from .nonfinite import NONFINITE
from .output_features import regression, takes_logits
from .run_status import RUN_STATUS
from .spikes import GRAD_NORM_SPIKE, LOSS_SPIKE
from .view import MATRICES, Request


def _update_ratio(view: RunView, p: dict[str, float]) -> Iterator[Finding]:
    ratios = view.metrics("update_ratio")
    # Weight matrices only: biases and gains start at zero or one, so their ratio says little.
    ratios = ratios[ratios.module.isin(view.matrices) & np.isfinite(ratios.value)]
    ratios = ratios[~_growing_from_small(view, ratios, p["max_ratio"])]
    big = ratios[ratios.value > p["max_ratio"]]
    if big.empty:
        return
    worst = big.loc[big.value.idxmax()]
    yield finding_at(
        UPDATE_RATIO,
        "warning",
        f"{counted(big.module.nunique(), 'parameter')} had updates larger than "
        f"{p['max_ratio']:g} of their norm in one step; largest {worst.value:.3g} "
        f"({worst.module}, step {int(worst.step)})",
        worst,
        threshold=p["max_ratio"],
        metric="update_ratio",
        remedy="lower the learning rate or add warm-up for these parameters",
    )


def _growing_from_small(view: RunView, ratios: pd.DataFrame, max_ratio: float) -> pd.Series:
    """Rows of matrices initialised at zero or far below the usual scale, at steps where their
    ratio is large by construction. Zero: LoRA's B, adaLN-Zero, a zero-init output
    projection. Far below: an rms under ``SMALL_INIT`` of PyTorch's default for the shape,
    1/√(3·fan_in) (kaiming-uniform with a = √5, ``nn.Linear`` and ``nn.Conv*``'s), as the
    0.01-gain policy head that PPO implementations use (Andrychowicz et al. 2021, What Matters
    in On-Policy Reinforcement Learning?; a blind trial's PPO: 1.45 at step 0). Grown from
    (near) zero by k steps of one size u, ||θ|| is k·u when the steps align and about √k·u
    when they do not, so the ratio u/||θ|| stays above ``max_ratio`` for up to 1/max_ratio²
    steps (100 at 0.1) in a healthy run: those steps say nothing about the lr."""
    first = view.metrics("param_norm", step="first", modules=view.matrices)
    first = first[first.step == 0]
    shapes = {p["name"]: p.get("shape") for p in view.meta.doc.get("parameters") or []}
    small = set()
    for name, norm in zip(first.module, first.value.to_numpy(float)):
        shape = shapes.get(name) or []
        numel = int(np.prod(shape)) if len(shape) >= 2 else 0
        usual = 1.0 / np.sqrt(3.0 * numel / shape[0]) if numel else np.nan
        if norm == 0 or norm / np.sqrt(numel or 1) < SMALL_INIT * usual:
            small.add(name)
    return ratios.module.isin(small) & (ratios.step < 1.0 / max_ratio**2)


#: An init rms under this share of PyTorch's default for the shape is a small init by design.
SMALL_INIT = 0.1


ANDRYCHOWICZ = (
    "Andrychowicz et al. 2021, What Matters in On-Policy Reinforcement Learning? "
    "A Large-Scale Empirical Study"
)

UPDATE_RATIO = Rule(
    "update-ratio",
    "Update too large for the parameter",
    f"{KARPATHY}; {ANDRYCHOWICZ}",
    ("update_ratio",),
    {"max_ratio": 0.1},
    _update_ratio,
    "warning",
    reads=(Request(("update_ratio",)), Request(("param_norm",), step="first", modules=MATRICES)),
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
    # sqrt(v) exactly 0: no gradient ever reached the matrix (dead ReLUs, a detached branch;
    # no-update says so): there is no update for eps to damp.
    ratio = ratio[ratio.value.to_numpy(float) > 0]
    last = ratio[ratio.step == ratio.step.max()]
    low = last[last.value < p["min_ratio"]]
    if low.empty:
        return
    worst = low.loc[low.value.idxmin()]
    lowest = float(worst.value)
    if lowest < 1:  # eps above the gradient rms: the step is lr·g/eps, an SGD step
        effect = (
            f"eps is {1 / lowest:.3g}x its gradient rms, so Adam's step there is lr·g/eps, "
            f"an SGD step about {1 / lowest:.3g}x smaller than Adam's"
        )
    else:
        effect = "their updates are damped"
    # Most matrices under eps: Adam's per-coordinate scaling is gone from the run, and its
    # steps shrink to about sqrt(v)/eps of their size (Wortsman et al. 2023, section 3.4:
    # the update collapses as the gradient rms falls under eps). Over the grid and ten blind
    # trials, no healthy run's median ratio at its last recorded step went under 10; the two
    # runs with eps = 1 sat at 1e-3, at 10% of their steps as at the end.
    median = float(last.value.median())
    severity, threshold, most = "warning", p["min_ratio"], ""
    if median < p["error_median"]:
        severity, threshold = "error", p["error_median"]
        most = (
            f"; the median over the {len(last)} weight matrices is {median:.3g}: eps sets the "
            "step of most of the model, which trains as SGD at lr/eps"
        )
    yield finding_at(
        ADAM_EPS,
        severity,
        f"{len(low)} weight matrices have a gradient rms (the square root of Adam's v) "
        f"under {p['min_ratio']:g}x Adam's eps at step {int(worst.step)}; the lowest ratio "
        f"sqrt(v)/eps is {lowest:.3g} ({worst.module}): {effect}{most}",
        worst,
        threshold=threshold,
        metric="adam_sqrtv_over_eps",
        remedy="lower Adam's eps (e.g. 1e-15) or rescale these parameters",
    )


ADAM_EPS = Rule(
    "adam-epsilon",
    "Gradient rms near Adam's epsilon",
    WORTSMAN,
    ("adam_sqrtv_over_eps",),
    {"min_ratio": 10.0, "error_median": 1.0},
    _adam_eps,
    "error",
    (Request(("adam_sqrtv_over_eps",), step="last", modules=MATRICES),),
)


def _logits(view: RunView, p: dict[str, float]) -> Iterator[Finding]:
    if regression(view):
        return  # its outputs are values in its targets' units (raw targets near 1000), no logits
    z = view.metrics("logit_max", "logit_min", "logit_lse_mean")
    ext = z[z.metric.isin(["logit_max", "logit_min"])]
    # Finite logits only: a NaN or Inf output is the nonfinite rule's error, not a magnitude.
    ext = ext[np.isfinite(ext.value.to_numpy(float))]
    if ext.empty:
        return
    row = ext.loc[ext.value.abs().idxmax()]
    if abs(row.value) > p["max_abs_logit"]:
        # Logits where the loss takes them (or is not known); else the outputs are what the
        # loss compares (an embedding a triplet or contrastive loss reads), and a z-loss,
        # which bounds a softmax's normaliser, has nothing to bound.
        logits = takes_logits(view)
        yield finding_at(
            LOGITS,
            "warning",
            f"output {'logit ' if logits else 'value '}{row.value:.4g} at step "
            f"{int(row.step)} exceeds {p['max_abs_logit']:g} in magnitude: "
            + ("output-logit divergence" if logits else "the model's outputs diverge"),
            row,
            value=abs(row.value),
            threshold=p["max_abs_logit"],
            metric=str(row.metric),
            remedy="add a z-loss (1e-4·log²Z) or weight decay on the output layer"
            if logits
            else "lower the learning rate or add warm-up; bound the outputs the loss compares "
            "(L2-normalise embeddings) or put weight decay on the output layer",
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

RULES = [RUN_STATUS, NONFINITE, LOSS_SPIKE, GRAD_NORM_SPIKE, UPDATE_RATIO, ADAM_EPS, LOGITS]
