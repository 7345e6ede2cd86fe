"""Which loss function a training loss is, read once from its autograd graph.

The rules that read the loss against ln V (``constant-prediction``, ``loss-above-uniform``)
assume it is a softmax cross-entropy of the output head: the uniform prediction then scores
ln V. A regression head's mean squared error has no such bar, and a noisy regression that fits
as well as it can (its outputs small, its error the noise's variance) looks, read against its
two outputs as logits, like a model stuck at its marginal. The loss's own graph says which it
is: ``F.cross_entropy`` leaves ``NllLossBackward0`` (after ``LogSoftmaxBackward0``) just under
the loss, ``F.mse_loss`` leaves ``MseLossBackward0``. The graph is walked breadth-first from
the loss, at most ``NODES`` nodes (the loss function sits a few nodes under the loss; the
model's own graph below it is not needed), once per run; the first loss-function node found
names it. Nothing is read where the loss has no graph (a float, a detached tensor).
"""

from __future__ import annotations

from collections import deque

import torch

#: The autograd nodes of a softmax cross-entropy (``cross_entropy`` is ``log_softmax`` then
#: ``nll_loss``; a hand-written one keeps the ``log_softmax``).
CROSS_ENTROPY = frozenset({"NllLossBackward0", "NllLoss2DBackward0", "LogSoftmaxBackward0"})
#: The nodes of other loss functions, by the name their ``torch.nn.functional`` call has.
OTHERS = {
    "MseLossBackward0": "mse_loss",
    "L1LossBackward0": "l1_loss",
    "SmoothL1LossBackward0": "smooth_l1_loss",
    "HuberLossBackward0": "huber_loss",
    "BinaryCrossEntropyWithLogitsBackward0": "binary_cross_entropy_with_logits",
    "BinaryCrossEntropyBackward0": "binary_cross_entropy",
    "CtcLossBackward0": "ctc_loss",
    "KlDivBackward0": "kl_div",
}
#: How many autograd nodes are looked at, at most.
NODES = 256


def loss_function(loss: torch.Tensor) -> str | None:
    """``"cross_entropy"``, the name of another loss function (``"mse_loss"``), or None
    where the graph under ``loss`` holds none of them within ``NODES`` nodes."""
    start = getattr(loss, "grad_fn", None)
    if start is None:
        return None
    queue, seen = deque([start]), {start}
    while queue and len(seen) <= NODES:
        node = queue.popleft()
        name = type(node).__name__
        if name in CROSS_ENTROPY:
            return "cross_entropy"
        if name in OTHERS:
            return OTHERS[name]
        for child, _ in getattr(node, "next_functions", ()):
            if child is not None and child not in seen:
                seen.add(child)
                queue.append(child)
    return None
