"""Output logits (Wortsman et al. 2023): ``logit_lse_mean`` (mean log Z = logsumexp over the
last dimension), ``logit_max`` and ``logit_min`` of the model output (module ``<root>``).

Output-logit divergence shows as log Z drifting far from 0 and the extreme logits growing.
The logits are the ``logits`` entry of a dict-like output (HF ModelOutput), else the model's
first output tensor with at least two dimensions and more than one class: a model that
returns ``(loss, logits)`` (HF's ``return_dict=False`` order) has its logits read, not its
0-d loss.
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


class LogitProbe(BaseProbe):
    @classmethod
    def build(cls, ctx: ProbeContext) -> LogitProbe:
        return cls(unwrap_model(ctx.model), ctx.codes[ROOT_NAME], ctx.listeners)

    def __init__(self, root: nn.Module, code: int, listeners: ListenerHooks) -> None:
        self.code = code
        self._value: torch.Tensor | None = None
        listeners.add(root, post=lambda m, a, k, o: self._on(o))

    def _on(self, output: Any) -> None:
        z = output_logits(output)
        if z is not None and self._value is None:
            self._value = logit_stats(z)

    def end_step(self, collector: Collector) -> None:
        if self._value is None:
            return
        value, self._value = self._value, None
        code = self.code

        def decode(v, rows) -> None:  # type: ignore[no-untyped-def]
            for name, x in zip(("logit_lse_mean", "logit_max", "logit_min"), v):
                rows.emit("train", code, 0, name, x)

        collector.add(value, decode)
