"""The forecast's features of the model's output: its logits at init and its loss.

V, the number of classes, comes from the output head in meta's module table
(``output_classes``); a feature that needs it is NaN when the table does not say.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from ..store import RUN_MODULE, RunMeta
from .trends import Feature, log10, nonfinite, undefined
from .view import RunView

LOGITS = ("logit_max", "logit_min", "logit_lse_mean")
TAIL = 0.2  # the share of the window that is its end
# HF's Conv1D stores its weight as (in, out); the other heads as (out, in, ...).
TRANSPOSED = {"Conv1D"}


def first_logits(view: RunView) -> pd.DataFrame:
    z = view.metrics(*LOGITS)
    return z[z.step == z.step.min()] if len(z) else z


def output_head(meta: RunMeta) -> dict | None:
    """meta's module record of the output head: the last linear or conv module to finish its
    forward (None when no such module ran)."""
    ran = [
        m
        for m in meta.modules
        if m.get("forward_order") is not None and m.get("role") in ("linear", "conv")
    ]
    return max(ran, key=lambda m: m["forward_order"]) if ran else None


def after_the_head(meta: RunMeta) -> set[str]:
    """The modules whose output is the model's prediction or made from it: the head, what
    runs after it, and the containers around it (they finish their forward after it)."""
    head = output_head(meta)
    if head is None:
        return set()
    last = head["forward_order"]
    return {
        m["name"]
        for m in meta.modules
        if m.get("forward_order") is not None and m["forward_order"] >= last
    }


def output_classes(meta: RunMeta) -> tuple[int, str] | None:
    """(V, head) for the output head: the last linear or conv module to finish its forward,
    V its weight's output dimension. A head tied to the embedding has no weight of its own in
    the parameter table (it is listed once, under the embedding): V is then its bias's length,
    or without a bias the rows of the one embedding weight of the head's size (``_tied``).
    None when the model has no such module or the tie cannot be read."""
    head = output_head(meta)
    if head is None:
        return None
    shapes = {p["name"]: p["shape"] for p in meta.parameters}
    shape = shapes.get(f"{head['name']}.weight")
    if not shape:
        return _tied(meta, head, shapes)
    if len(shape) < 2:
        return None
    return int(shape[-1] if head.get("type") in TRANSPOSED else shape[0]), head["name"]


def _tied(meta: RunMeta, head: dict, shapes: dict[str, list[int]]) -> tuple[int, str] | None:
    """(V, where) for a head whose weight is another module's (weight tying, Press and Wolf
    2017): its bias has one entry per output; without one listed under its name, its
    parameter count (the module table counts the tied weight) is an embedding weight's of
    shape (V, d), or that plus a bias of V listed beside the head (HF RoBERTa registers its
    head's bias as ``lm_head.bias``, its ``lm_head.decoder.bias`` being the same tensor).
    A match with such a bias wins over a bare one: the (V + 2, d) position table of a tiny
    RoBERTa has the head's count too."""
    bias = shapes.get(f"{head['name']}.bias")
    if bias is not None and len(bias) == 1:
        return int(bias[0]), f"{head['name']}, tied"
    embeddings = {m["name"] for m in meta.modules if m.get("role") == "embedding"}
    parent = head["name"].rsplit(".", 1)[0] + "." if "." in head["name"] else ""
    beside = {tuple(s) for n, s in shapes.items() if n.startswith(parent) and len(s) == 1}
    tables = [
        (name, shape)
        for name, shape in shapes.items()
        if name.rsplit(".", 1)[0] in embeddings and len(shape) == 2
    ]
    count = head.get("params")
    with_bias = [(n, s) for n, s in tables if math.prod(s) + s[0] == count and (s[0],) in beside]
    bare = [(n, s) for n, s in tables if math.prod(s) == count]
    same = with_bias if len(with_bias) == 1 else bare
    if len(same) != 1:
        return None
    name, shape = same[0]
    return int(shape[0]), f"{head['name']}, tied to {name}"


#: How far above its bound (logit span + ln V) a first loss may sit and still be read as a
#: mean cross-entropy: the logits' extremes may come from another forward than the loss's.
MEAN_CE_SLACK = 2.0


def log_classes(view: RunView, checked: bool = False) -> tuple[float, str] | str:
    """(ln V, where it comes from), or why the loss cannot be read against it. The head is
    checked against the logits at the first step: per row, max z <= logsumexp z <= max z +
    ln V and ln V + min z <= logsumexp z, so the mean logsumexp bounds ln V from both sides.
    The loss is checked to be a mean cross-entropy of those logits: a token's is
    logsumexp z - z_target <= max z - min z + ln V (with label smoothing or masked tokens
    too). A loss summed over tokens, or scaled, sits far above that (x512 for a sum over
    512 tokens), and a ratio to ln V would read it as a bad init. ``checked``: only where
    those checks ran (the logits were recorded, finite); otherwise the module table alone
    gives V, which a head that is no classifier (a VAE's decoder) also has."""
    classes = output_classes(view.meta)
    if classes is None:
        return "the output head's classes are not in the module table"
    v, head = classes
    if v < 2:
        return f"the output head ({head}) has one output: no classes to read the loss against"
    function = view.meta.doc.get("loss_function")
    if function not in (*UNREAD, "cross_entropy"):  # read from the loss's own graph
        return f"the loss is {function}, not a softmax cross-entropy of the output head"
    normalised = view.meta.doc.get("loss_classes")
    if isinstance(normalised, int) and normalised != v:  # a contrastive loss over the batch
        return (
            f"the loss is a cross-entropy over {normalised} classes, not over the {v} outputs "
            f"of {head}"
        )
    z = first_logits(view).groupby("metric").value.max()
    measured = set(LOGITS) <= set(z.index) and np.isfinite(z.to_numpy(float)).all()
    if checked and not measured:
        return f"the output logits of {head} were not recorded finite at the first step"
    if measured:
        lse = z["logit_lse_mean"]
        tol = 1e-3 * (1 + abs(lse))
        if not lse - z["logit_max"] - tol <= math.log(v) <= lse - z["logit_min"] + tol:
            return f"{head} ({v} outputs) does not match the output logits"
        bound = z["logit_max"] - z["logit_min"] + math.log(v)
        first = losses(view).iloc[:1]
        if len(first) and float(first.value.iloc[0]) > MEAN_CE_SLACK * bound:
            return (
                f"the loss is not a mean cross-entropy of {head}'s outputs: "
                f"{float(first.value.iloc[0]):.4g} at step {int(first.step.iloc[0])}, over "
                f"{MEAN_CE_SLACK:g}x the most one can be ({bound:.3g}: the logits' span + "
                "ln V); summed over tokens, or scaled?"
            )
        if checked and len(first):
            outside = _outside_ce_range(float(first.value.iloc[0]), z, head)
            if outside is not None:
                return outside
    return math.log(v), f"ln V = {math.log(v):.3g} (V = {v}, {head})"


#: How far (a share of the range's width) a first loss may sit outside the range a mean
#: cross-entropy of the first logits lies in: the extremes may come from another forward.
CE_RANGE_SLACK = 0.25


def _outside_ce_range(loss: float, z: pd.Series, head: str) -> str | None:
    """Why ``loss``, the first step's, is no mean cross-entropy of logits whose first step
    had the extremes and mean logsumexp ``z``; None where it can be one. A token's is
    lse - z_target, between lse - max z and lse - min z (label smoothing too: a mix of such
    terms), so the mean is in [mean lse - max z, mean lse - min z]. A regression's outputs
    read as logits start near-uniform, a narrow range around ln V that its loss (a mean
    squared error of its targets' scale) has no reason to fall in: 0.99 against [0.62, 0.80]
    for a 2-D denoiser."""
    low = float(z["logit_lse_mean"] - z["logit_max"])
    high = float(z["logit_lse_mean"] - z["logit_min"])
    tol = CE_RANGE_SLACK * (high - low) + 1e-3 * (1 + abs(float(z["logit_lse_mean"])))
    if low - tol <= loss <= high + tol:
        return None
    return (
        f"the first loss ({loss:.4g}) is outside [{low:.4g}, {high:.4g}], where a mean "
        f"cross-entropy of {head}'s first logits lies: not their cross-entropy"
    )


#: meta.json's ``loss_function`` of a regression: its model's outputs are values in the
#: targets' units, not logits.
REGRESSION_LOSSES = frozenset({"mse_loss", "l1_loss", "smooth_l1_loss", "huber_loss"})


def regression(view: RunView) -> bool:
    """Whether the run's loss, read from its graph, is a regression's."""
    return view.meta.doc.get("loss_function") in REGRESSION_LOSSES


#: meta.json's ``loss_function`` where it was not read: a run recorded before the key, a
#: first loss without a graph (``unknown``).
UNREAD = (None, "unknown")
#: The loss functions that take the model's outputs as logits.
LOGIT_LOSSES = ("cross_entropy", "binary_cross_entropy_with_logits")


def takes_logits(view: RunView) -> bool:
    """Whether the run's outputs are logits as far as its loss says: a loss that takes them,
    or a loss not read."""
    return view.meta.doc.get("loss_function") in (*UNREAD, *LOGIT_LOSSES)


def init_logit_scale(view: RunView) -> Feature:
    """How far the output softmax is from uniform at init: the logits' span, in nats. Not
    read for a regression: its outputs span its targets' units (raw targets near 1000 make
    outputs near 1000 that match them), which says nothing of a softmax, and the forecast
    was fitted on logits only."""
    name = "init_logit_scale"
    if regression(view):
        return undefined(name, "a regression's outputs are in its targets' units, not logits")
    z = first_logits(view)
    z = z[z.metric.isin(["logit_max", "logit_min"])]
    if z.empty:
        return undefined(name, "output logits not recorded")
    bad = nonfinite(name, z, "an output logit")
    if bad is not None:
        return bad
    top, low = (float(z[z.metric == m].value.max()) for m in ("logit_max", "logit_min"))
    step = int(z.step.iloc[0])
    evidence = f"output logits span {top - low:.4g} nats at step {step} ({low:.4g} to {top:.4g})"
    return Feature(name, log10(top - low), evidence, step)


def losses(view: RunView) -> pd.DataFrame:
    loss = view.metrics("loss")
    return loss[loss.module == RUN_MODULE].sort_values("step", kind="stable")


def tail(loss: pd.DataFrame) -> tuple[float, str]:
    """The mean loss over the last ``TAIL`` of the window (at least one step), and where."""
    end = loss.iloc[-max(1, math.ceil(TAIL * len(loss))) :]
    steps = end.step.to_numpy()
    return float(end.value.to_numpy(float).mean()), f"steps {steps[0]}-{steps[-1]}"


def against_classes(
    view: RunView, name: str, loss: pd.DataFrame, what: str
) -> tuple[float, str] | Feature:
    """(ln V, its words) for a loss-over-ln V feature, or the feature's value when that ratio
    has none: no loss rows, a non-finite one (+inf), or V unknown."""
    if loss.empty:
        return undefined(name, "loss not recorded")
    bad = nonfinite(name, loss, what)
    if bad is not None:
        return bad
    classes = log_classes(view)
    return undefined(name, classes) if isinstance(classes, str) else classes


def init_loss_ratio(view: RunView) -> Feature:
    """log10(first loss / ln V): 0 for a uniform prediction; a bad init, 3 and more."""
    name = "init_loss_ratio"
    first = losses(view).iloc[:1]
    classes = against_classes(view, name, first, "the first loss")
    if isinstance(classes, Feature):
        return classes
    l0, step = float(first.value.iloc[0]), int(first.step.iloc[0])
    evidence = f"loss {l0:.4g} at step {step}; {classes[1]}"
    return Feature(name, log10(l0 / classes[0]), evidence, step)


def loss_stall(view: RunView) -> Feature:
    """Mean loss at the window's end / the first loss: 1 when it did not move."""
    name = "loss_stall"
    loss = losses(view)
    bad = nonfinite(name, loss, "the loss")
    if bad is not None:
        return bad
    if len(loss) < 2:
        return undefined(name, "fewer than 2 losses")
    (end, where), l0, step = tail(loss), float(loss.value.iloc[0]), int(loss.step.iloc[0])
    if l0 <= 0:
        return undefined(name, f"loss {l0:.4g} at step {step} is not positive")
    evidence = f"mean loss {end:.4g} over {where} against {l0:.4g} at step {step}"
    return Feature(name, end / l0, evidence, int(loss.step.iloc[-1]))


def loss_level(view: RunView) -> Feature:
    """Mean loss at the window's end / ln V: about 1 for a model that learned nothing from a
    sane init, far above 1 after a bad init or a divergence."""
    name = "loss_level"
    loss = losses(view)
    classes = against_classes(view, name, loss, "the loss")
    if isinstance(classes, Feature):
        return classes
    end, where = tail(loss)
    evidence = f"mean loss {end:.4g} over {where}; {classes[1]}"
    return Feature(name, end / classes[0], evidence, int(loss.step.iloc[-1]))
