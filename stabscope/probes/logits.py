"""Output logits (Wortsman et al. 2023): ``logit_lse_mean`` (mean log Z = logsumexp over the
last dimension), ``logit_max`` and ``logit_min`` of the model output (module ``<root>``).

Output-logit divergence shows as log Z drifting far from 0 and the extreme logits growing.

``pred_entropy`` and ``pred_marginal_entropy``: the mean entropy of each position's softmax,
H(p_i), and the entropy of their mean, H(p̄). Their difference is the mutual information
between the input and the prediction (Bridle, Heading and MacKay 1992): 0 when the model
predicts one distribution whatever its input, whatever that distribution is. A model that
only learned its data's marginal (the unigram of an LM) sits there; ``constant-prediction``
reads it at the planned end.
The logits are the ``logits`` entry of a dict-like output (HF ModelOutput), else the model's
first output tensor with at least two dimensions and more than one class: a model that
returns ``(loss, logits)`` (HF's ``return_dict=False`` order) has its logits read, not its
0-d loss. The classes are the last dim, or dim 1 where a convolution head wrote them in
torch's (N, C, ...) layout (``class_axis``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ..record.collector import Collector
from ..record.hook_context import primary_tensor
from ..record.hooks import ListenerHooks
from ..record.module_table import ROOT_NAME, unwrap_model
from .base import BaseProbe, ProbeContext


def output_logits(output: Any) -> torch.Tensor | None:
    """The logits in a model's output, or None."""
    if isinstance(output, Mapping) and isinstance(output.get("logits"), torch.Tensor):
        return output["logits"]
    return primary_tensor(output, _class_scores)


def _class_scores(t: torch.Tensor) -> bool:
    """Whether ``t`` can hold logits: (..., classes) with two classes or more."""
    return t.dim() >= 2 and t.shape[-1] > 1


def logit_stats(z: torch.Tensor) -> torch.Tensor:
    """[mean logsumexp, max, min] of (..., classes) logits, float32."""
    z = z.detach().float()
    return torch.stack((torch.logsumexp(z, -1).mean(), z.amax(), z.amin()))


#: The positions the prediction entropies read, evenly spaced over the flattened leading
#: dims: an LM's (B·T, 50257) logits cost (4096, 50257) here. The mean of 4096 softmaxes is
#: the batch's mean prediction to well under a percent of its entropy.
ENTROPY_ROWS = 4096


def prediction_entropies(z: torch.Tensor) -> torch.Tensor:
    """[mean over positions of H(softmax z_i), H(mean over positions of softmax z_i)] of
    (..., classes) logits, in nats, float32; entr(0) = 0, so a masked class (-inf) adds
    nothing, and a non-finite logit gives NaN (data, not an error)."""
    rows = z.detach().reshape(-1, z.shape[-1])  # (positions, classes)
    if rows.shape[0] > ENTROPY_ROWS:
        # Row k of ENTROPY_ROWS: k·(n − 1) // (ENTROPY_ROWS − 1), exact in integers.
        pick = torch.arange(ENTROPY_ROWS, device=rows.device) * (rows.shape[0] - 1)
        rows = rows[pick // (ENTROPY_ROWS - 1)]
    p = torch.softmax(rows.float(), dim=-1)  # (n, classes)
    each = torch.special.entr(p).sum(-1).mean()
    marginal = torch.special.entr(p.mean(0)).sum()
    return torch.stack((each, marginal))


#: The rows this probe writes, in the order of its value tensor.
NAMES = ("logit_lse_mean", "logit_max", "logit_min", "pred_entropy", "pred_marginal_entropy")


def head_widths(root: nn.Module) -> tuple[set[int], set[int]]:
    """(out_features of every Linear, out_channels of every convolution) in ``root``."""
    linear = {m.out_features for m in root.modules() if isinstance(m, nn.Linear)}
    conv = {m.out_channels for m in root.modules() if isinstance(m, nn.modules.conv._ConvNd)}
    return linear, conv


def class_axis(z: torch.Tensor, linear: set[int], conv: set[int]) -> int:
    """The classes' dim of output logits: the last, (..., classes), unless a convolution head
    wrote them in torch's (N, C, d1, ...) layout (a WaveNet's (B, 256, T), a segmentation
    net's (N, C, H, W), the layout ``cross_entropy`` takes): dim 1 is a convolution's channel
    count and the last dim is no linear layer's width."""
    conv_layout = z.dim() >= 3 and 1 < z.shape[1] != z.shape[-1] and z.shape[1] in conv
    return 1 if conv_layout and z.shape[-1] not in linear else -1


class LogitProbe(BaseProbe):
    @classmethod
    def build(cls, ctx: ProbeContext) -> LogitProbe:
        return cls(unwrap_model(ctx.model), ctx.codes[ROOT_NAME], ctx.listeners)

    def __init__(self, root: nn.Module, code: int, listeners: ListenerHooks) -> None:
        self.code = code
        self._value: torch.Tensor | None = None
        self._widths = head_widths(root)
        listeners.add(root, post=lambda m, a, k, o: self._on(o))

    def _on(self, output: Any) -> None:
        z = output_logits(output)
        if z is not None and self._value is None:
            z = z.movedim(class_axis(z, *self._widths), -1)  # (..., classes)
            self._value = torch.cat((logit_stats(z), prediction_entropies(z)))

    def end_step(self, collector: Collector) -> None:
        if self._value is None:
            return
        value, self._value = self._value, None
        code = self.code

        def decode(v, rows) -> None:  # type: ignore[no-untyped-def]
            for name, x in zip(NAMES, v):
                rows.emit("train", code, 0, name, x)

        collector.add(value, decode)
