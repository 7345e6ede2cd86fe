"""A regression loss that compared every output with every target (meta.json
``loss_broadcast``), read once from the first loss's autograd graph.

``F.mse_loss(output, target)`` with an output of shape ``(B, 1)`` and targets of shape
``(B,)`` broadcasts both to ``(B, B)``: each output is scored against every target of the
batch, so the best the model can do is predict the batch's mean for every input. PyTorch
warns ("Using a target size that is different to the input size"), once, among a script's
other output, and the run trains on. The saved tensors show it: the output is expanded
along one dim and the target along another (record/constant_loss.py's ``broadcast_dims``),
a cross product: the targets repeated along the batch dim, the outputs along another, and
the outputs differing from row to row. A one-sided broadcast (every output against one
target vector, or a per-row target against every position of its row) is not reported: it
can be meant; nor an output that is the same for every row (a zero-initialised head), whose
broadcast cannot be told from its values.
"""

from __future__ import annotations

from typing import Any

import torch

from .constant_loss import broadcast_dims, loss_node

#: The regression losses that broadcast their inputs, by autograd node.
NODES = {
    "MseLossBackward0": "mse_loss",
    "SmoothL1LossBackward0": "smooth_l1_loss",
    "HuberLossBackward0": "huber_loss",
}


def loss_broadcast(loss: torch.Tensor) -> dict[str, Any] | None:
    """``{"function", "shape", "output_dims", "target_dims"}`` where ``loss`` (times constants)
    is one of ``NODES`` whose output and target were each expanded along a dim the other
    spans; None otherwise, or where the graph's saved tensors are already freed."""
    found = loss_node(loss)
    if found is None:
        return None
    node = found[0]
    name = NODES.get(type(node).__name__)
    if name is None:
        return None
    try:
        output, target = node._saved_self, node._saved_target
    except (RuntimeError, AttributeError):  # freed by a backward
        return None
    if output.shape != target.shape:
        return None
    output = output.detach()
    out, tgt = broadcast_dims(output, target.detach())
    # A cross product: the targets repeated along the batch, the outputs along another dim,
    # and the outputs differ from row to row (a zero-initialised head is the same for all).
    if 0 not in tgt or not out or set(out) & set(tgt):
        return None
    if bool((output == output.narrow(0, 0, 1)).all()):
        return None
    return {"function": name, "shape": list(target.shape), "output_dims": out, "target_dims": tgt}
