"""Log-probabilities normalised over the wrong dim (meta.json ``log_softmax_dim``), read once
from the first loss's autograd graph.

``F.nll_loss`` takes log-probabilities over its classes at dim 1 of an ``(N, C, ...)`` input,
``F.ctc_loss`` over the last dim of its ``(T, N, C)`` input. A ``log_softmax`` over another
dim (``dim=1`` of a batch-first ``(N, T, C)`` before the transpose CTC needs, ``dim=0`` of
``(N, C)``) hands them values that sum to 1 over frames or examples, not over classes: the
loss trains on something that is no distribution over what it scores, and no run of it
learns the task (a CTC recogniser ended at 6.7 where its twin reached 0.04).

The graph shows it without reading a value: the loss function's node has as its input, past
shape-only nodes (the transpose, a view), a ``LogSoftmaxBackward0``, whose normalised size
autograd keeps (``loss_function._normalised_size``); the first node under the loss function
keeps the shape the loss received. Read: the normalised size is not the class dim's and is
another dim's of that input (the frames, the batch). A dim of the same size as the classes
(T = C) is not told apart; a vocabulary normalised whole and then narrowed to some of its
columns (a size no dim has) is not reported.
"""

from __future__ import annotations

from typing import Any

import torch

from .loss_function import _normalised_size, walk
from .squashed_logits import _producer

#: The loss functions that take log-probabilities: node -> (name, class dim of its input;
#: None: dim 1, or 0 for an unbatched 1-D input).
TAKES_LOG_PROBS: dict[str, tuple[str, int | None]] = {
    "NllLossBackward0": ("nll_loss", None),
    "NllLoss2DBackward0": ("nll_loss", None),
    "CtcLossBackward0": ("ctc_loss", -1),
}


def wrong_log_softmax_dim(loss: torch.Tensor) -> dict[str, Any] | None:
    """``{"function", "shape", "class_dim", "classes", "normalised"}`` where the
    ``log_softmax`` before an ``nll_loss`` or ``ctc_loss`` normalised a dim of another size
    than the input's class dim; None otherwise or where it cannot be read."""
    return walk(loss, _visit)


def _visit(node: Any) -> tuple[dict[str, Any] | None, Any]:
    taken = TAKES_LOG_PROBS.get(type(node).__name__)
    if taken is None:
        return None, None
    return _check(node, *taken), ()  # under the loss function is the model's graph


def _check(node: Any, function: str, class_dim: int | None) -> dict[str, Any] | None:
    producer = _producer(node)
    if type(producer).__name__ != "LogSoftmaxBackward0":
        return None
    shape = _received_shape(node)
    normalised = _normalised_size(producer)
    if shape is None or normalised is None or not shape:
        return None
    dim = (1 if len(shape) > 1 else 0) if class_dim is None else class_dim % len(shape)
    classes = int(shape[dim])
    # The normalised dim must be one the loss received, beside the classes: a log_softmax
    # over a whole vocabulary whose columns were then selected (a candidate subset, by
    # index or slice) normalised a size no dim has, and is a likelihood, not this slip.
    others = [int(size) for k, size in enumerate(shape) if k != dim]
    if normalised == classes or normalised not in others:
        return None
    return {
        "function": function,
        "shape": [int(s) for s in shape],
        "class_dim": dim,
        "classes": classes,
        "normalised": int(normalised),
    }


def _received_shape(node: Any) -> tuple[int, ...] | None:
    """The shape of the tensor the loss function received as its first input: the output of
    the node right under it, as autograd keeps it."""
    inputs = getattr(node, "next_functions", ())
    first = inputs[0][0] if inputs else None
    try:
        return tuple(first._input_metadata[0].shape)  # type: ignore[union-attr]
    except (AttributeError, IndexError, TypeError, RuntimeError):
        return None
