"""Rules ``loss-above-constant`` and ``no-better-than-constant``: a regression or classifier
that reached its planned end with a loss above that of a constant prediction of its targets,
or within 5% of it.

A model that outputs the targets' mean for every input scores their variance under a mean
squared error (the mean is the constant that minimises it), and the entropy of each label's
base rate under a binary cross-entropy, and that of the labels' frequencies under a
cross-entropy (Cover and Thomas 2006, ch. 2; the plug-in entropy's
bias that the bar corrects: Miller 1955). A model with an
output bias can learn that constant in a few steps, so one whose loss ends above it does
worse than ignoring its inputs: targets left in raw units (a mean of 250 against outputs
near 0, its lr too small to get there), targets that do not match their inputs, dropout or
noise so strong that training outputs are noise, an init it never recovered from.

The bar is the run's ``loss_constant``, every step: read by ``stabscope profile`` from the
targets the loss saved in its graph, in the loss's own units (record/constant_loss.py; a
loss of several terms is not read). Each step's loss is read against its own step's bar, so a batch
of spread-out targets raises both and cancels, and targets whose spread changes as training
goes (a value network's) are read against their spread at the end. Judged only

- at the planned end (``lr_plan.budget``) of a run of at least ``min_steps`` steps: at init a
  regression's loss is often far above its bar;
- for a run with one optimizer: a GAN's or an actor-critic's step sums the losses of two
  players, each of which may end above its own bar by design;
- against one constant for the whole window (``pooling``): each batch's own mean is the best
  constant for that batch alone, and batches that are not random draws (one group or one
  entity per batch, a series in time order) each spread less than the data do; from the
  targets' moments of every step (``target_mean``, ``target_var``, ``target_count``) the
  bar is raised to what one constant scores over the window. Random batches read the same;
- over the run's last tenth (at least ``min_bar_steps`` steps with a bar), from the sum of
  the losses over the sum of their bars (a ratio estimator: unbiased where a mean or median
  of per-step ratios is not, for small batches), which must clear its threshold by two
  standard errors of that ratio besides (the residuals loss - ratio · bar), so that noise
  does not decide.

``loss-above-constant`` fires at ``min_ratio`` 1.05: worse than ignoring the inputs.
``no-better-than-constant`` fires at ``min_share`` 0.95 below that: the model explains under
5% of its targets' spread, the regression counterpart of ``constant-prediction`` (a model
that learned nothing sits at 1.00: a target drawn afresh each step, an lr too small to move).
A task whose best model leaves much of the spread unexplained stays well under it: a toy
diffusion model's noise prediction ends near 0.55 of its targets' variance, flow matching
between two independent standard Gaussians near 0.79 (π/4) at best.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pandas as pd

from ..store import RUN_MODULE
from ..store.findings import Finding
from .above_uniform import COVER_THOMAS
from .base import Rule, RunView, loss_finding
from .constant_prediction import at_planned_end
from .loss_divergence import finite_losses
from .view import Request


@dataclass(frozen=True)
class EndRatio:
    """Σ loss / Σ ``loss_constant`` over the last steps, two standard errors of it, how many
    steps, the planned end and the last step with a finite loss."""

    ratio: float
    noise: float
    steps: int
    budget: int
    step: int

    @property
    def said(self) -> str:
        """What both rules' findings open with."""
        return (
            f"the run reached its planned end (step {self.budget}) with its loss "
            f"{self.ratio:.3g}x the loss of predicting its targets' mean for every input "
            f"(its last {self.steps} steps' losses over their own batches' bars)"
        )


#: Standard errors of the ratio it must also clear.
SEMS = 2.0


def end_ratio(view: RunView, min_steps: float, min_bar_steps: float) -> EndRatio | None:
    """The loss over the constant prediction's at the end of a run that reached its planned
    end with one optimizer; None where it cannot be read (module docstring)."""
    end = at_planned_end(view, min_steps)
    if end is None:
        return None  # not at the planned end: early on a healthy regression is above its bar
    if len(view.meta.doc.get("optimizers") or []) != 1:
        return None
    loss = finite_losses(view)
    if loss is None:
        return None
    bars = view.metrics("loss_constant")
    bars = bars[bars.module == RUN_MODULE].groupby("step").value.mean()
    last = loss.iloc[-max(int(min_bar_steps), len(loss) // 10) :]
    pairs = np.stack([last.to_numpy(float), bars.reindex(last.index).to_numpy(float)])
    kept = np.isfinite(pairs).all(axis=0) & (pairs[1] > 0)
    losses, bar = pairs[:, kept]  # (n,) each: the steps with a loss and a bar
    n = len(losses)
    if n < min_bar_steps:
        return None
    # The ratio of the sums: a mean of per-step ratios would read 1 / (a batch's variance),
    # which is (B - 1) / (B - 3) times too large on average for batches of B; the median
    # of the ratios reads a model that learned nothing at about 1 - 0.55 / B.
    # One constant for the whole window, not each batch's own (module docstring).
    bar = bar * pooling(view, last.index[kept], str(view.meta.doc.get("loss_function")))
    ratio = float(losses.sum() / bar.sum())
    spread = float(np.sqrt(np.sum((losses - ratio * bar) ** 2) / (n - 1)))
    noise = SEMS * spread / (math.sqrt(n) * float(bar.mean()))  # the ratio estimator's SE
    return EndRatio(ratio, noise, n, end[0], int(loss.index[-1]))


def pooling(view: RunView, steps: pd.Index, function: str) -> float:
    """How much more a constant pooled over ``steps`` scores than each batch's own, on
    average (1 where the targets' moments are missing for any of them: a cross-entropy,
    several binary labels, a run recorded before they were).

    For a mean squared error the pooled constant is the mean of all the window's targets,
    and its loss their variance (Bessel-corrected, as each batch's bar is): the variance
    within the batches plus that of the batch means about theirs (the law of total
    variance), over the batches' own. For a binary cross-entropy it is the entropy of the
    pooled rate over the mean of the batches' own (Miller-Madow-corrected) entropies:
    entropy is concave, so the pooled one is the larger. 1 where the batches' means vary no
    more than random batches' do (var / n each, within two standard errors of a sample
    variance: the one-way analysis of variance's test, Searle, Casella and McCulloch 1992,
    ch. 3), which leaves random batches as they are read."""
    moments = {}
    for name in ("target_count", "target_mean", "target_var"):
        rows = view.metrics(name)
        moments[name] = rows[rows.module == RUN_MODULE].groupby("step").value.mean()
    table = pd.DataFrame(moments).reindex(steps)
    if table.isna().to_numpy().any() or len(table) < 2:
        return 1.0
    count, mean, var = (table[c].to_numpy(float) for c in moments)
    chance = float((var / count).mean())  # the variance a random batch's mean has
    spread = float(mean.var(ddof=1))
    # Batch means that vary no more than chance allows (two standard errors of a sample
    # variance of k draws, sqrt(2 / (k - 1))): random batches, read as they are.
    if spread <= chance * (1.0 + SEMS * math.sqrt(2.0 / (len(mean) - 1))):
        return 1.0
    if function == "mse_loss":
        # The Bessel-corrected variance of all the window's targets together (sums of
        # squared deviations within the batches, and of the batch means about theirs).
        centre = float(np.sum(count * mean) / count.sum())
        squares = np.sum((count - 1) * var) + np.sum(count * (mean - centre) ** 2)
        within = float(var.mean())
        return float(squares / (count.sum() - 1)) / within if within > 0 else 1.0
    if function.startswith("binary_cross_entropy"):
        own = float((entropy(mean) + ((mean > 0) & (mean < 1)) / (2 * count)).mean())
        pooled = float(entropy(np.array([np.sum(count * mean) / count.sum()]))[0])
        return max(pooled / own, 1.0) if own > 0 else 1.0
    return 1.0


def entropy(rate: np.ndarray) -> np.ndarray:
    """The entropy in nats of a binary label at each ``rate``."""
    inner = np.clip(rate, 1e-300, 1.0)
    outer = np.clip(1.0 - rate, 1e-300, 1.0)
    return -(rate * np.log(inner) + (1.0 - rate) * np.log(outer))


def _loss_above_constant(view: RunView, p: dict[str, float]) -> Iterator[Finding]:
    read = end_ratio(view, p["min_steps"], p["min_bar_steps"])
    if read is None or not read.ratio >= p["min_ratio"] + read.noise:
        return
    yield loss_finding(
        LOSS_ABOVE_CONSTANT,
        f"{read.said}: it does worse than ignoring its inputs",
        read.step,
        read.ratio,
        p["min_ratio"],
        "look for what keeps the outputs from reaching the targets: targets in raw "
        "units far from the outputs' scale (standardise them, or start the output bias at "
        "their mean), a learning rate too small to move there, targets that do not match "
        "the inputs, dropout or noise so strong that training outputs are noise",
    )


def _no_better_than_constant(view: RunView, p: dict[str, float]) -> Iterator[Finding]:
    read = end_ratio(view, p["min_steps"], p["min_bar_steps"])
    if read is None or not read.ratio >= p["min_share"] + read.noise:
        return
    above = LOSS_ABOVE_CONSTANT.defaults["min_ratio"]
    if read.ratio >= above + read.noise:
        return  # worse than the constant: loss-above-constant's case
    yield loss_finding(
        NO_BETTER_THAN_CONSTANT,
        f"{read.said}: it explains under {1 - p['min_share']:.0%} of its targets' spread, "
        "and predicts little more than their mean",
        read.step,
        read.ratio,
        p["min_share"],
        "check that the inputs reach the model and that the targets depend on them "
        "(a target drawn afresh, shuffled against its inputs), the learning rate and its "
        "schedule (too small to move, decayed to ~0), and the init (a dead or saturated "
        "body)",
    )


LOSS_ABOVE_CONSTANT = Rule(
    "loss-above-constant",
    "A regression's or classifier's loss above a constant prediction's, at the end",
    f"{COVER_THOMAS}; Miller 1955, Note on the bias of information estimates",
    ("loss",),
    {"min_ratio": 1.05, "min_steps": 100, "min_bar_steps": 16},
    _loss_above_constant,
    reads=(Request(("loss", "loss_constant", "target_count", "target_mean", "target_var")),),
    online=False,  # how the run ended: needs its planned end
)

NO_BETTER_THAN_CONSTANT = Rule(
    "no-better-than-constant",
    "A regression's or classifier's loss no better than a constant prediction's",
    COVER_THOMAS,
    ("loss",),
    {"min_share": 0.95, "min_steps": 100, "min_bar_steps": 16},
    _no_better_than_constant,
    reads=(Request(("loss", "loss_constant", "target_count", "target_mean", "target_var")),),
    online=False,  # how the run ended: needs its planned end
)

RULES = [LOSS_ABOVE_CONSTANT, NO_BETTER_THAN_CONSTANT]
