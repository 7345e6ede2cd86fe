"""Trend features of a run's first steps, the inputs of a failure forecast.

Each feature reads what every run records already (no new probe) through a ``RunView``, so a
verdict from the first K% of a run sees only the steps before ``view.until``. Conventions
(``rules.trends``):

- scale-free: a log10 ratio, or a dimensionless quantity (logits and losses are in nats);
- oriented so that what the literature calls a risk (growth, collapse, a loss that stalls or
  stays high) is larger;
- a non-finite input is +inf, with the first non-finite row as its evidence; NaN means
  undefined (not recorded, or a trend with fewer than two recorded steps).

"first" and "last" are the first and last recorded steps before ``until``, per module; the
window's end is its last 20% of steps (at least one); V is the output head's classes.

- ``init_logit_scale``: log10(logit_max - logit_min) of the output at the first step.
- ``init_loss_ratio``: log10(loss at the first step / ln V): 0 for a uniform prediction.
- ``attn_logit_growth``: max over attention modules of log10(max logit last / max(first, 1))
  (the floor of 1 nat: ``UNIT_LOGIT``).
- ``entropy_drop``: max over attention heads of log10(entropy first / last); +inf for a head
  whose entropy fell to exactly 0 (every query on one key).
- ``grad_norm_trend``: log10(global gradient norm last / first): ``grad_norm`` (before clipping)
  at the steps with parameter statistics, else sqrt(sum of squares of ``param_grad_norm``).
- ``residual_growth``: max of log10(rms last / max(first, 1)) over where the residual stream
  is seen un-normalised: residual blocks' outputs and norm layers' inputs (the floor of 1:
  ``UNIT_RMS``); without residual blocks, the same of every module's output.
- ``update_ratio_level``: log10 of the median update ratio of the weight matrices, last step.
- ``update_ratio_trend``: log10(that median at the last step / at the first).
- ``loss_stall``: mean loss at the window's end / loss at the first step.
- ``loss_level``: mean loss at the window's end / ln V.
"""

from __future__ import annotations

import pandas as pd

from ..store import RUN_MODULE
from . import output_features as out
from .grad_norms import READS as GRAD_READS
from .grad_norms import total_by_step
from .trends import Feature, log10, nonfinite, series, trend, undefined
from .view import Request, RunView

__all__ = ["READS", "Feature", "residual_stream", "trend_features"]

ROOT = "<root>"  # the model itself in the module table (module_table.ROOT_NAME; no torch here)
#: What ``trend_features`` reads, for the rule that uses it to plan in its one pass (every
#: step, every module: the same reads as the rules on these metrics, so they are shared).
READS: tuple[Request, ...] = (
    Request(("loss",)),
    Request(out.LOGITS),
    Request(("attn_logit_max", "attn_entropy")),
    *GRAD_READS,
    Request(("act_rms", "norm_input_rms")),
    Request(("update_ratio",)),
)


#: Attention logit growth is measured from the first max logit or from this, whichever is
#: larger (nats): below it the softmax is near uniform whatever the logits do. GPT-2's and
#: LLaMA's initializer_range 0.02 start the max logit near 0.1, and learning lifts it past 1
#: in a few steps; Wortsman et al. 2023 see divergence from logits in the tens and more.
UNIT_LOGIT = 1.0


def attn_logit_growth(view: RunView) -> Feature:
    """Wortsman et al. 2023: attention logits that grow early diverge later."""
    logits = view.metrics("attn_logit_max")
    what = f"attention max logit (from {UNIT_LOGIT:g} if below)"
    return trend("attn_logit_growth", logits, what, floor=UNIT_LOGIT)


def entropy_drop(view: RunView) -> Feature:
    """Zhai et al. 2023: attention entropy collapse, per head (the mean over calls)."""
    return trend(
        "entropy_drop",
        view.metrics("attn_entropy"),
        "attention entropy drop",
        key=lambda f: f.module + " head " + f["index"].astype(str),
        agg="mean",
        invert=True,
    )


def grad_norm_trend(view: RunView) -> Feature:
    """Before clipping where the run recorded it (``grad_norm``), at the steps that have
    parameter statistics: the steps the forecast was fitted on."""
    name, g = "grad_norm_trend", view.metrics("param_grad_norm")
    pre = view.metrics("grad_norm")
    pre = pre[pre.module == RUN_MODULE]
    if not pre.empty:
        g = pre[pre.step.isin(g.step)] if not g.empty else pre
    if g.empty:
        return undefined(name, "param_grad_norm not recorded")
    bad = nonfinite(name, g, "a gradient norm")
    if bad is not None:
        return bad
    return series(name, total_by_step(g), "total gradient norm")


#: The residual stream's growth is measured from its first rms or from this, whichever is
#: larger: the scale a norm hands on (LayerNorm and RMSNorm outputs have rms 1 before their
#: gain). A stream initialised far below it (GPT-2's and LLaMA's initializer_range 0.02 give
#: embeddings of rms ~0.03) grows to it as the model learns, which no norm or softmax feels.
UNIT_RMS = 1.0


def residual_stream(view: RunView) -> tuple[pd.DataFrame, str] | None:
    """The rms of the residual stream, where it is seen un-normalised: the residual blocks'
    outputs (Pre-LN) and every normalisation layer's input (Post-LN's blocks end in a norm:
    their outputs have unit rms whatever the stream does); with what it is, for evidence.
    None without residual blocks."""
    blocks = view.block_names
    if not blocks:
        return None
    act = view.metrics("act_rms")
    seen = [act[act.module.isin(blocks)], view.metrics("norm_input_rms")]
    return pd.concat([f for f in seen if not f.empty] or seen[:1]), "residual stream rms"


def residual_growth(view: RunView) -> Feature:
    """log10 growth of the residual stream (``residual_stream``); without residual blocks,
    of every module's output before the output head."""
    stream = residual_stream(view)
    if stream is None:
        # Measured from rms 1 as well: a plain net's features grow to unit scale as it learns
        # (a ReLU CNN's last conv from rms 0.04 to 14 while its loss falls 1.8 -> 0.16). The
        # head's output is the prediction: it grows to the targets' scale as a regression
        # learns (0.11 -> 68 on targets of std 280), which is no runaway; the logit signals
        # read it where it is logits.
        act = view.metrics("act_rms")
        act = act[~act.module.isin(out.after_the_head(view.meta) | {ROOT})]
        what = "module output rms before the head (no residual blocks found; "
        return trend("residual_growth", act, f"{what}from {UNIT_RMS:g} if below)", floor=UNIT_RMS)
    frame, what = stream
    return trend(
        "residual_growth", frame, f"{what} (from rms {UNIT_RMS:g} if below)", floor=UNIT_RMS
    )


def update_ratio(view: RunView) -> tuple[Feature, Feature]:
    """(level, trend) of the median update ratio ||Δθ||/||θ|| of the weight matrices (biases
    and gains start at 0 or 1: their ratio says little)."""
    names = ("update_ratio_level", "update_ratio_trend")
    u = view.metrics("update_ratio")
    u = u[u.module.isin(view.matrices)]
    if u.empty:
        why = "update_ratio of weight matrices not recorded"
        return undefined(names[0], why), undefined(names[1], why)
    bad = [nonfinite(n, u, "an update ratio") for n in names]
    if bad[0] is not None and bad[1] is not None:
        return bad[0], bad[1]
    median = u.groupby("step").value.median()
    step, last = int(median.index[-1]), float(median.iloc[-1])
    evidence = f"median update ratio {last:.3g} of {u.module.nunique()} matrices at step {step}"
    level = Feature(names[0], log10(last), evidence, step)
    return level, series(names[1], median, "median update ratio")


def trend_features(view: RunView) -> dict[str, Feature]:
    """Every feature of the run's steps before ``view.until``, by name (module docstring)."""
    found = [
        out.init_logit_scale(view),
        out.init_loss_ratio(view),
        attn_logit_growth(view),
        entropy_drop(view),
        grad_norm_trend(view),
        residual_growth(view),
        *update_ratio(view),
        out.loss_stall(view),
        out.loss_level(view),
    ]
    return {f.name: f for f in found}
