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
names it, a cross-entropy first. Nothing is read where the loss has no graph (a float, a
detached tensor).

A cross-entropy over other classes than the head's outputs is no cross-entropy of the head:
a contrastive loss (SimCLR's, InfoNCE) takes ``cross_entropy`` of a batch-by-batch similarity
matrix, its classes the batch's candidates, while the model's output is a projection whose
width the rules would read as V. So the number of classes the ``log_softmax`` normalised is
kept beside the name (meta.json ``loss_classes``).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable
from typing import Any

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
#: Loss functions whose input is itself a ``log_softmax`` (``F.ctc_loss`` takes log
#: probabilities): the walk does not look below them for a cross-entropy.
NO_CROSS_ENTROPY_BELOW = frozenset({"CtcLossBackward0"})
#: How many autograd nodes are looked at, at most.
NODES = 256
#: Where the graph was walked and held none of the loss functions above.
OTHER = "other"
#: Where the first loss came without a graph (a float, a detached tensor): nothing to read.
UNKNOWN = "unknown"


def loss_function(loss: torch.Tensor) -> tuple[str, int | None] | None:
    """``("cross_entropy", classes)``, ``(name of another loss function, None)``,
    ``("other", None)`` where the walk found none of them, or None where ``loss`` has no
    graph. A cross-entropy anywhere within ``NODES`` wins over another loss (a classifier's
    loss plus an auxiliary ``mse_loss``); its ``classes`` are the size of the dim its
    ``log_softmax`` normalised (None where that cannot be read): a contrastive loss's are the
    batch's candidates, not the head's outputs."""
    if getattr(loss, "grad_fn", None) is None:
        return None
    met: dict[str, str] = {}  # "cross_entropy" once a node of one was met; the first other

    def visit(node: Any) -> tuple[tuple[str, int | None] | None, Iterable[Any] | None]:
        name = type(node).__name__
        if name == "LogSoftmaxBackward0":
            return ("cross_entropy", _normalised_size(node)), ()
        if name in CROSS_ENTROPY:
            met["cross_entropy"] = name
        elif name in OTHERS:
            met.setdefault("other", OTHERS[name])
        # CTC's input is a log_softmax over the classes at every frame: that node is the
        # loss's input, no cross-entropy of its own (a CTC model read against ln V would be
        # judged on a loss that has no such bar).
        return None, (() if name in NO_CROSS_ENTROPY_BELOW else None)

    found = walk(loss, visit)
    if found is not None:
        return found  # type: ignore[no-any-return]
    if "cross_entropy" in met:
        return "cross_entropy", None
    return met.get("other", OTHER), None


#: What a visitor of ``walk`` returns: a result that ends the walk (None: go on), and the
#: nodes to go on to from this one (None: all of its inputs).
Visit = Callable[[Any], tuple[Any, Iterable[Any] | None]]


def walk(loss: torch.Tensor, visit: Visit) -> Any:
    """Breadth-first over ``loss``'s autograd graph, at most ``NODES`` nodes, each node once:
    the first result ``visit`` returns, or None (also where ``loss`` has no graph)."""
    start = getattr(loss, "grad_fn", None)
    if start is None:
        return None
    queue, seen = deque([start]), {start}
    while queue and len(seen) <= NODES:
        node = queue.popleft()
        result, children = visit(node)
        if result is not None:
            return result
        if children is None:
            children = (child for child, _ in getattr(node, "next_functions", ()))
        for child in children:
            if child is not None and child not in seen:
                seen.add(child)
                queue.append(child)
    return None


def _normalised_size(node: object) -> int | None:
    """The size of the dim a ``LogSoftmaxBackward0`` node normalised, from the input shape
    autograd keeps for it (also after the backward freed its saved result); None where this
    torch does not keep it where it is read here."""
    try:
        shape = node._input_metadata[0].shape  # type: ignore[attr-defined]
        dim = saved_int(node._saved_dim)  # type: ignore[attr-defined]
    except (AttributeError, IndexError, TypeError, RuntimeError):
        return None
    return int(shape[dim]) if -len(shape) <= dim < len(shape) else None


def saved_int(value: object) -> int:
    """An integer autograd saved on a node (a dim, an ``ignore_index``): a negative one comes
    back as its unsigned 64-bit value."""
    number = int(value)  # type: ignore[call-overload]
    return number - 2**64 if number >= 2**63 else number
