"""The loss a constant prediction scores on a step's own targets: the bar a regression or a
classifier has to get under (the run's ``loss_constant``, every step).

A model that outputs the same value for every input, the targets' mean, scores the targets'
variance under a mean squared error, the entropy of each label's base rate under a binary
cross-entropy, and the entropy of the labels' frequencies under a cross-entropy. Any model
with an output bias can learn that constant, so a trained model whose loss ends above it has
learned less than nothing (rule ``loss-above-constant``). The softmax cross-entropy has such
a bar by definition (ln V, ``loss-above-uniform``); these losses need the targets, and the
targets are in the loss's autograd graph only until its backward frees what it saved. So the
loss of each backward call is read here just before its backward runs (by ``stabscope
profile``: a training script's backward calls, a model script's loss; a library-mode
``rec.step(loss)`` comes too late, after the backward):

- the loss must be one ``mse_loss``, ``binary_cross_entropy(_with_logits)`` or
  ``cross_entropy`` (``nll_loss``; a mean or a sum over its elements, without per-element or
  per-class weights, label smoothing or soft targets), times constants: an
  accumulation's ``loss / k``, a scale. A sum of several terms (a VAE's reconstruction plus
  its KL, a classifier plus an auxiliary loss) has no such bar and is not read;
- for a mean squared error the constant is one value for every element, the targets' mean:
  which dim is the batch is not known (an LSTM's default layout puts time first, and a mean
  over time would use the future). Its squared error is the targets' variance with Bessel's
  correction, the unbiased estimate of what the population's mean scores. A mean squared
  error that broadcasts its output against its target (an output ``(B, 1)`` against a
  target ``(B,)`` is read over ``(B, B)``, a classic bug) counts each target once;
- for a binary cross-entropy the constant is each label's rate over the batch (dim 0),
  with the Miller-Madow correction (+1 / 2B nats where the rate is not 0 or 1), the
  plug-in entropy's bias (Miller 1955); soft targets (label smoothing, a teacher's
  probabilities) are not read: their own entropy is a floor no model goes below;
- it is put in the loss's own units: under the loss's own reduction it is; through a
  scaling (``loss / k``) it is the loss times constant / model, both read from the same saved
  tensors, so the scale is kept without knowing it.

A step's constant is the sum over its backward calls, as its loss is (drivers/zerocode/
losses.py): a step any of whose calls could not be read has none.

With it come the targets' count, mean and variance (``target_count``, ``target_mean``,
``target_var``; a binary cross-entropy's only where it has one label: its rate) over the
step's calls, merged with Chan, Golub and LeVeque's (1979) pairwise update. A batch's own
mean is the best constant for that batch alone, and batches that are not random draws of
the data (one group or one entity per batch, a series in time order) each spread less:
from these moments the rules pool the constant over a window of steps, one value for all of
them, as a model with an output bias could learn it (rules/above_constant.py). It is the run's
``loss_constant`` row of that step, every step (the targets' spread can change as training
goes: a value network's bootstrapped targets grow with it), kept on the device with the loss
until the loss's next host sync. A handful of kernels a step over the targets (two
reductions of the output's size), and a walk of at most ``MAX_SCALINGS`` autograd nodes.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from .loss_function import saved_int

#: Rows per label seen, at least, for a batch's label entropy to stand for the constant.
SAMPLED = 5
#: Nodes that only multiply or divide the loss by a constant (one input with a graph).
SCALINGS = frozenset({"MulBackward0", "DivBackward0"})
#: How many scalings between the loss and its loss function are followed.
MAX_SCALINGS = 4
_MEAN_REDUCTIONS = (1, 2)  # torch's Reduction enum: 1 mean, 2 sum (0 none is not read)
#: A reader's (constant, the loss function's own value where the loss scales it, the
#: targets' (count, mean, variance) as a (3,) tensor or None).
_Read = tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]


#: What ``constant_read`` returns, in this order: the constant's loss, then the targets'
#: moments (NaN where the loss has none: a cross-entropy, several binary labels).
READ_FIELDS = ("loss_constant", "target_count", "target_mean", "target_var")


def constant_loss(loss: torch.Tensor) -> torch.Tensor | None:
    """The loss a constant prediction scores on this loss's own targets (module docstring),
    in its units, as a 0-d float32 tensor on its device: NaN where the estimate is not sound
    for this batch; None where ``loss`` is not one mean squared error, binary cross-entropy
    or cross-entropy times constants, or its graph's saved tensors are already freed."""
    read = constant_read(loss)
    return None if read is None else read[0]


def constant_read(loss: torch.Tensor) -> torch.Tensor | None:
    """``constant_loss`` and the targets' moments: a ``(4,)`` float32 tensor on the loss's
    device, laid out as ``READ_FIELDS`` (no host sync); None as for ``constant_loss``."""
    found = loss_node(loss)
    if found is None:
        return None
    node, scaled = found
    read = _READERS.get(type(node).__name__)
    if read is None:
        return None
    try:
        got = read(node, scaled)
    except (RuntimeError, AttributeError):  # freed by a backward, or another torch's node
        return None
    if got is None:
        return None
    constant, model, moments = got
    if model is None:  # the loss is the loss function's own value: already in its units
        value = torch.where(torch.isfinite(constant), constant, math.nan)
    else:
        value = loss.detach().reshape(()).float() * (constant / model)
        # A perfect fit (model 0) or a non-finite read is NaN: that step is left out.
        value = torch.where(torch.isfinite(value) & (model > 0), value, math.nan)
    if moments is None:
        moments = torch.full((3,), math.nan, device=value.device)
    return torch.cat([value.reshape(1), moments.float()])


def merge_reads(reads: list[torch.Tensor]) -> torch.Tensor:
    """One step's read from those of its backward calls (each laid out as ``READ_FIELDS``):
    the constants' sum, as the step's loss is the calls' sum, and the targets' moments of
    all the calls together (Chan, Golub and LeVeque 1979's pairwise update; NaN where any
    call had none). On the device, no host sync."""
    merged = reads[0]
    for read in reads[1:]:
        n_a, mean_a, var_a = merged[1], merged[2], merged[3]
        n_b, mean_b, var_b = read[1], read[2], read[3]
        n = n_a + n_b
        delta = mean_b - mean_a
        # Sums of squared deviations, (n - 1) · var, merged with the means' difference.
        spread = var_a * (n_a - 1) + var_b * (n_b - 1) + delta.square() * n_a * n_b / n
        merged = torch.stack([merged[0] + read[0], n, mean_a + delta * n_b / n, spread / (n - 1)])
    return merged


def loss_node(loss: torch.Tensor) -> tuple[Any, bool] | None:
    """The autograd node under ``loss`` past at most ``MAX_SCALINGS`` scalings by constants,
    and whether any was passed; None where the graph is a product of two graphs there."""
    node = getattr(loss, "grad_fn", None)
    scaled = False
    for _ in range(MAX_SCALINGS):
        if node is None or type(node).__name__ not in SCALINGS:
            break
        children = [c for c, _ in node.next_functions if c is not None]
        if len(children) != 1:
            return None  # a product of two graphs, not a scaling
        node, scaled = children[0], True
    return node, scaled


def _saved(node: Any) -> tuple[torch.Tensor, torch.Tensor, int] | None:
    """(prediction, target, reduction) of a loss node with a mean or sum reduction, where the
    target has the prediction's shape and at least one dim."""
    output, target = node._saved_self, node._saved_target
    reduction = int(node._saved_reduction)
    if reduction not in _MEAN_REDUCTIONS or target.shape != output.shape or target.dim() == 0:
        return None
    return output.detach().float(), target.detach().float(), reduction


def _reduce(values: torch.Tensor, reduction: int) -> torch.Tensor:
    return values.mean() if reduction == 1 else values.sum()


def _mse(node: Any, scaled: bool) -> _Read | None:
    saved = _saved(node)
    if saved is None:
        return None
    output, target, reduction = saved
    # One constant for every element: which dim is the batch is not known (an LSTM's
    # default layout puts time first, and a mean over time would use the future), and a
    # per-output constant is finer than the model may be able to learn from the stream.
    # Bessel's correction over the distinct target values (a broadcast repeats them).
    draws = math.prod(n for n, stride in zip(target.shape, target.stride()) if stride != 0)
    if draws < 2:
        return None
    mean = target.mean()  # a broadcast repeats every value equally often: their mean
    centred = target - mean
    # Bessel's correction: the unbiased estimate of what the population's mean scores.
    constant = _reduce(centred.square(), reduction) * (draws / (draws - 1))
    variance = centred.square().mean() * (draws / (draws - 1))
    moments = torch.stack([torch.full_like(mean, draws), mean, variance])  # a fill: no copy
    if not scaled:
        return constant, None, moments
    return constant, _reduce((output - target).square(), reduction), moments


def broadcast_dims(output: torch.Tensor, target: torch.Tensor) -> tuple[list[int], list[int]]:
    """(the dims along which the output was expanded, those along which the target was) of
    two tensors a loss broadcast to one shape and saved; both empty where neither was.

    Autograd saves the broadcast tensors: an output ``(B, 1)`` against a target ``(B,)`` is
    saved as two ``(B, B)`` tensors, the output's expanded (stride 0) along dim 1, the
    target's along dim 0. A cast under autocast copies the output, so where the target is
    expanded along the batch dim the output's other dims are also checked by value (one
    host sync, only in this case; a per-row target spread over a row's positions, ``(B, 1)``
    against ``(B, T)``, is read from strides alone)."""
    sized = [d for d in range(target.dim()) if target.shape[d] > 1]
    out = [d for d in sized if output.stride(d) == 0]
    tgt = [d for d in sized if target.stride(d) == 0]
    if 0 in tgt:  # the same targets for every row: the (B, 1) against (B,) case
        for d in sized:
            if d not in out and d not in tgt and bool((output == output.narrow(d, 0, 1)).all()):
                out.append(d)
    return sorted(out), tgt


def _bce(node: Any, logits: bool, scaled: bool) -> _Read | None:
    if getattr(node, "_saved_weight", None) is not None:
        return None  # per-element or per-class weights move the bar
    if logits and getattr(node, "_saved_pos_weight", None) is not None:
        return None
    saved = _saved(node)
    if saved is None or len(saved[1]) < 2:  # a rate needs two rows
        return None
    output, target, reduction = saved
    # Soft targets (label smoothing, a teacher's probabilities) carry their own entropy,
    # which no model goes below: no bar is read for them (NaN, decided on the device).
    hard = ((target == 0) | (target == 1)).all()
    rows = target.shape[0]
    rate = target.mean(dim=0, keepdim=True).clamp(0.0, 1.0)  # (1, ...): each label's rate
    entropy = -(torch.xlogy(rate, rate) + torch.xlogy(1 - rate, 1 - rate))
    # Miller-Madow: the plug-in entropy of a rate seen in B draws is low by about 1 / 2B.
    mixed = (rate > 0) & (rate < 1)
    entropy = entropy + mixed.float() / (2 * rows)
    constant = torch.where(hard, _reduce(entropy.expand_as(target), reduction), math.nan)
    moments = None
    if target.numel() == rows:  # one label: its rate is the targets' mean
        spread = rate.reshape(()) * (1 - rate.reshape(())) * (rows / (rows - 1))
        count = torch.full_like(spread, rows)
        moments = torch.where(hard, torch.stack([count, rate.reshape(()), spread]), math.nan)
    if not scaled:
        return constant, None, moments
    if logits:
        model = F.binary_cross_entropy_with_logits(output, target, reduction="none")
    else:
        model = F.binary_cross_entropy(output.clamp(0.0, 1.0), target, reduction="none")
    return constant, _reduce(model, reduction), moments


def _nll(node: Any, scaled: bool) -> _Read | None:
    """A cross-entropy (``nll_loss`` of log-probabilities): the best constant prediction
    is the batch's label frequencies, scoring their entropy. Read only where that estimate
    is sound, decided on the device (no host sync): every candidate the target of exactly
    one row (a contrastive loss over the batch, InfoNCE: exactly ln N), or at least
    ``SAMPLED`` rows per label seen (the plug-in entropy with the Miller-Madow correction);
    a language model's thousands of rare tokens in one batch would read far too low."""
    if getattr(node, "_saved_weight", None) is not None:
        return None  # class weights move the bar
    reduction = int(node._saved_reduction)
    if reduction not in _MEAN_REDUCTIONS:
        return None
    logp, target = node._saved_self.detach(), node._saved_target.detach()
    ignore = saved_int(node._saved_ignore_index)
    classes = int(logp.shape[1] if logp.dim() > 1 else logp.shape[0])
    labels = target.reshape(-1)
    valid = (labels != ignore).float()
    counts = torch.bincount(labels.clamp(0, classes - 1), weights=valid, minlength=classes)
    rows = counts.sum()
    seen = (counts > 0).sum()
    rate = counts / rows.clamp(min=1)
    plug_in = -torch.xlogy(rate, rate).sum() + (seen - 1) / (2 * rows.clamp(min=1))
    exact = (rows == classes) & (counts == 1).all()
    entropy = torch.where(
        exact, rows.clamp(min=1).log(), torch.where(rows >= SAMPLED * seen, plug_in, math.nan)
    )
    constant = entropy if reduction == 1 else entropy * rows
    if not scaled:
        return constant, None, None
    model = F.nll_loss(
        logp.float(), target, ignore_index=ignore, reduction="mean" if reduction == 1 else "sum"
    )
    return constant, model, None


_READERS: dict[str, Any] = {
    "NllLossBackward0": _nll,
    "NllLoss2DBackward0": _nll,
    "MseLossBackward0": _mse,
    "BinaryCrossEntropyWithLogitsBackward0": lambda node, scaled: _bce(node, True, scaled),
    "BinaryCrossEntropyBackward0": lambda node, scaled: _bce(node, False, scaled),
}
