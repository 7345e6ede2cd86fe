"""Rule ``constant-prediction``: a run that reached its planned end predicting one
distribution whatever its input.

The logits probe records, at each recorded step, the mean entropy of each position's output
softmax, mean H(p_i), and the entropy of their mean, H(p̄). Their difference

    I = H(p̄) − mean H(p_i)

is the mutual information between the input and the prediction (Bridle, Heading and MacKay
1992): 0 exactly when every position gets the same distribution. Such a model can do no
better than the best constant predictor: an LM stuck at its data's unigram loss, a classifier
at its class frequencies, a contrastive model at ln(batch). For a model whose loss is the
cross-entropy of these logits, H(p̄) is then the loss of predicting p̄ everywhere, so the share
I / H(p̄) is, without labels, the share of that loss the model's input dependence can remove.

The rule fires when, at the last recorded steps of the run's second half, both say so:

- the prediction's information is under ``max_info_share`` (a tenth) of H(p̄), and
- the loss ends at ``min_loss_share`` (nine tenths) of H(p̄) or above. A calibrated model's
  loss is near mean H(p_i), so this agrees with the first; it keeps out outputs that are not
  the loss's logits (a regression's outputs, read as logits, can look near-uniform while its
  loss is small).

Judged only at the planned end (meta.json ``lr_plan.budget``; the forecast's bar, which a run
stopped early never reaches) of a run of at least ``min_steps`` steps: a smoke test of a few
dozen steps, or a run that is still learning its marginal, is not a verdict on training. And
only where the loss reads as a mean cross-entropy of the output head (``log_classes``).
Where the lr still rises at the end (its largest value first reached in the last tenth of
the steps, above where it started), the finding says so: the run never left its warm-up, a
warm-up longer than the run (or a smoke test cut inside the warm-up of a longer recipe).

What it catches is a symptom with many causes (an init too large or too small, a dead or
collapsed body, a learning rate decayed to nothing, an input that does not reach the model),
so its measure names none of them.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from ..store.findings import Finding
from .base import Rule, RunView, finding
from .forecast_features import ROOT
from .loss_divergence import MIN_WINDOW, finite_losses, loss_levels
from .lr_plan_check import largest_lr
from .output_features import LOGITS, log_classes
from .view import Request

BRIDLE = (
    "Bridle, Heading and MacKay 1992, Unsupervised Classifiers, Mutual Information and "
    "'Phantom Targets'"
)
ENTROPIES = ("pred_entropy", "pred_marginal_entropy")
#: How many of the last recorded steps the shares are the median of.
LAST = 3


def end_entropies(view: RunView, seen: int) -> tuple[float, float, int] | None:
    """(mean H(p_i), H(p̄), step of the last) over the last LAST recorded steps of the second
    half of the run: medians; None without a finite pair there."""
    rows = view.metrics(*ENTROPIES)
    rows = rows[(rows.module == ROOT) & (rows.step >= seen // 2)]
    table = rows.pivot_table(index="step", columns="metric", values="value", aggfunc="first")
    if not set(ENTROPIES) <= set(table.columns):
        return None
    table = table[list(ENTROPIES)].dropna()
    table = table[np.isfinite(table.to_numpy(float)).all(axis=1)].sort_index().tail(LAST)
    if table.empty:
        return None
    each, marginal = (float(np.median(table[m].to_numpy(float))) for m in ENTROPIES)
    return each, marginal, int(table.index[-1])


#: Added to the finding where the run ended inside its warm-up.
WARMING_UP = (
    "; its lr was still rising at the end: it never left its warm-up (a warm-up longer than "
    "the run, or a short test of a longer recipe)"
)


def _still_warming_up(view: RunView) -> bool:
    """Whether the largest group's lr, as recorded every step, first reaches its maximum in
    the last tenth of the steps and ends above where it started: the run ended inside its
    warm-up."""
    lr = largest_lr(view).to_numpy(float)  # (S,) by step
    if len(lr) < 2 or not lr[-1] > lr[0]:
        return False
    return int(np.argmax(lr)) >= len(lr) - max(1, len(lr) // 10)


def at_planned_end(view: RunView, min_steps: float) -> tuple[int, int] | None:
    """(the planned steps, the steps seen) of a run that reached its planned end
    (meta.json's ``lr_plan.budget``, or the last step of a training script that ran to its
    own end) and plans at least ``min_steps`` steps; None for a run not there yet, or too
    short to expect learning."""
    budget = view.meta.planned_end
    seen = view.until if view.until is not None else view.meta.steps
    if budget is None or seen < budget or budget < min_steps:
        return None
    return budget, seen


def _constant_prediction(view: RunView, p: dict[str, float]) -> Iterator[Finding]:
    end = at_planned_end(view, p["min_steps"])
    if end is None:
        return
    budget, seen = end
    if not isinstance(log_classes(view), tuple):
        return  # the loss is not read as a cross-entropy of the output head
    ends = end_entropies(view, seen)
    loss = finite_losses(view)
    if ends is None or loss is None:
        return
    each, marginal, step = ends
    if marginal <= 0:
        return  # a one-hot mean prediction: nothing to compare against
    info = max(marginal - each, 0.0)
    level = loss_levels(loss, MIN_WINDOW)[3]
    if info > p["max_info_share"] * marginal or level < p["min_loss_share"] * marginal:
        return
    # Near p̄'s own loss: it learned the marginal. Far above it: one distribution, confident
    # and wrong (a loss of 77 nats against p̄'s 6e-5: almost all mass on one class).
    learned = (
        f"{level / marginal:.0%} of the {marginal:.4g} nats of predicting p̄ everywhere: it "
        "learned its outputs' marginal and little more"
        if level <= 2 * marginal
        else "far above H(p̄): it puts its mass on the same outputs whatever the input, "
        "confidently, and they are wrong"
    )
    yield finding(
        CONSTANT_PREDICTION,
        "error",
        f"the run reached its planned end (step {budget}) predicting nearly one distribution "
        f"whatever its input: at step {step} its prediction carries {info:.3g} nats about the "
        f"input (H(p̄) {marginal:.4g} − mean H(p_i) {each:.4g}, {info / marginal:.1%} of "
        f"H(p̄)), and its loss ends at {level:.4g}, {learned}"
        + (WARMING_UP if _still_warming_up(view) else ""),
        module=None,
        step=step,
        value=info / marginal,
        threshold=p["max_info_share"],
        metric="pred_marginal_entropy",
        remedy="check the init scale (logits far from uniform at step 0, or a body whose "
        "outputs collapse to one vector), the learning rate and its schedule (too high "
        "kills units, decayed to ~0 freezes the model), and that the input reaches the "
        "model and the targets match it",
    )


CONSTANT_PREDICTION = Rule(
    "constant-prediction",
    "Predictions independent of the input at the planned end",
    BRIDLE,
    ENTROPIES,
    {"max_info_share": 0.1, "min_loss_share": 0.9, "min_steps": 100},
    _constant_prediction,
    reads=(Request(ENTROPIES), Request(("loss", "lr")), Request(LOGITS)),
    online=False,  # how the run ended: needs its planned end
)

RULES = [CONSTANT_PREDICTION]
