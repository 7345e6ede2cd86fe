"""A loss that takes logits handed probabilities (meta.json ``squashed_logits``), read once
from the first loss's autograd graph.

``F.cross_entropy`` and ``F.binary_cross_entropy_with_logits`` apply their own softmax or
sigmoid to their input. A model whose output already went through one (``nn.Softmax`` as
the last layer, a ``sigmoid`` in ``forward`` for a decoder's pixels) hands them values in
[0, 1]: the loss squashes them a second time, so no prediction can be confident whatever the
model learns. Over V classes with inputs in [0, 1] the largest probability the loss can see
is e / (e + V - 1): its cross-entropy is at least ln(1 + (V - 1) / e), 1.46 for V = 10
against ln 10 = 2.30 for knowing nothing; a binary cross-entropy is at least
ln(1 + 1/e) = 0.31 for a positive label and ln 2 = 0.69 for a negative one. The gradients
shrink with the squashing's slope too (at most 1/4 for a sigmoid). ``F.nll_loss`` takes
log-probabilities; handed probabilities it returns -p, which is no log-likelihood.

The graph shows it: the loss function's node (``LogSoftmaxBackward0`` under a cross-entropy,
``BinaryCrossEntropyWithLogitsBackward0``, ``NllLossBackward0``) has as its input, past
shape-only nodes (a ``view``, a ``permute``) and a ``stack`` or ``cat`` of outputs that one
such node made each (a decoder's, one step at a time), a ``SoftmaxBackward0``, ``SigmoidBackward0``
or ``TanhBackward0``. A softmax that is a *target* (distillation's soft labels) enters the
loss through a product with the log-probabilities, never as the normalised input, so it is
not read. A ``log_softmax`` before ``cross_entropy`` is harmless (a log-softmax of
log-probabilities returns them) and a ``sigmoid`` before ``binary_cross_entropy`` is how it
is meant: neither is reported. The graph is walked breadth-first from the loss, at most
``NODES`` nodes, so a loss that sums several terms (a VAE's reconstruction and KL) is read
too.
"""

from __future__ import annotations

from typing import Any

import torch

from ..theory.loss_floors import binary_floors, cross_entropy_floor
from .loss_function import _normalised_size, walk

#: The loss functions that take logits (or log-probabilities), by the autograd node whose
#: first input is what the model handed them.
TAKES_LOGITS = {
    "LogSoftmaxBackward0": "cross_entropy",
    "BinaryCrossEntropyWithLogitsBackward0": "binary_cross_entropy_with_logits",
    "NllLossBackward0": "nll_loss",
    "NllLoss2DBackward0": "nll_loss",
}
#: The squashing activations, by node, with the interval of their outputs.
SQUASHING = {
    "SoftmaxBackward0": ("softmax", (0.0, 1.0)),
    "SigmoidBackward0": ("sigmoid", (0.0, 1.0)),
    "TanhBackward0": ("tanh", (-1.0, 1.0)),
}
#: Nodes that move or select values without changing them: looked through.
SHAPE_ONLY = frozenset(
    {
        "ViewBackward0",
        "UnsafeViewBackward0",
        "ReshapeAliasBackward0",
        "SqueezeBackward0",
        "SqueezeBackward1",
        "SqueezeBackward2",
        "UnsqueezeBackward0",
        "PermuteBackward0",
        "TransposeBackward0",
        "TBackward0",
        "ExpandBackward0",
        "SelectBackward0",
        "SliceBackward0",
        "CloneBackward0",
        "ToCopyBackward0",
        "AliasBackward0",
        "IndexBackward0",
        "FlattenBackward0",
    }
)
#: How many shape-only nodes are looked through between the loss and its input's producer.
MAX_SHAPE_HOPS = 8
#: Nodes that join several tensors into one: looked through where one kind of node made all.
JOINS = frozenset({"StackBackward0", "CatBackward0"})
#: How many joined tensors are read (a decoder of 4,096 steps: its first ones).
MAX_JOINED = 256


def squashed_logits(loss: torch.Tensor) -> dict[str, Any] | None:
    """``{"function", "activation", "low", "high", "floor", "classes"}`` where a loss function
    that takes logits was handed the outputs of a softmax, sigmoid or tanh (``floor``: the
    least loss those inputs allow, per element, None where it depends on what is unknown;
    ``classes``: a cross-entropy's, where read); None otherwise or where ``loss`` has no
    graph."""
    return walk(loss, _visit)


def _visit(node: Any) -> tuple[dict[str, Any] | None, Any]:
    function = TAKES_LOGITS.get(type(node).__name__)
    if function is None:
        return None, None
    producer = _producer(node)
    name = type(producer).__name__
    if name in SQUASHING:
        return _describe(function, SQUASHING[name], node), ()
    # Under the loss function is the model's graph: only a cross-entropy's own log-softmax
    # under its nll_loss is still the loss's.
    return None, ((producer,) if name == "LogSoftmaxBackward0" else ())


def _producer(node: Any) -> Any:
    """The node that computed the first input of ``node``, past shape-only nodes (None where
    there is none, or more than ``MAX_SHAPE_HOPS`` of them), and past a ``stack`` or ``cat``
    of tensors that one kind of node computed each (a decoder's outputs, one per step)."""
    inputs = getattr(node, "next_functions", ())
    return _made_by(inputs[0][0] if inputs else None, MAX_SHAPE_HOPS)


def _made_by(current: Any, hops: int) -> Any:
    for _ in range(hops):
        name = type(current).__name__
        if current is None or name not in SHAPE_ONLY | JOINS:
            return current
        if name in JOINS:
            # The joined tensors' producers: one kind of node for all of them is the
            # producer; anything else leaves the join itself.
            parts = [_made_by(f, hops - 1) for f, _ in current.next_functions[:MAX_JOINED]]
            kinds = {type(p).__name__ for p in parts}
            return parts[0] if parts and len(kinds) == 1 and parts[0] is not None else current
        current = current.next_functions[0][0] if current.next_functions else None
    return None


def _describe(function: str, found: tuple[str, tuple[float, float]], node: Any) -> dict[str, Any]:
    activation, (low, high) = found
    classes = _normalised_size(node) if function == "cross_entropy" else None
    floor: float | None = None
    if function == "cross_entropy" and classes is not None and classes > 1:
        floor = cross_entropy_floor(classes, low, high)
    elif function == "binary_cross_entropy_with_logits":
        floor = min(binary_floors(low, high))  # the smaller of the two bounds every element
    return {
        "function": function,
        "activation": activation,
        "low": low,
        "high": high,
        "floor": floor,
        "classes": classes,
    }
