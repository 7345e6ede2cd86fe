"""``norm_input_rms``: rms of every normalisation layer's input (Xiong et al. 2020, Lemma 3).

A LayerNorm's Jacobian scales like sqrt(d)/||x||: when the input grows far beyond unit rms,
gradients flowing through the norm shrink by the same factor.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from ..record.collector import Collector, ModuleScalars
from ..record.hooks import ListenerHooks
from ..structure import is_norm
from ..structure.trace import main_input
from .base import BaseProbe, ProbeContext


class NormInputProbe(BaseProbe):
    @classmethod
    def build(cls, ctx: ProbeContext) -> NormInputProbe:
        """Every norm (the structure's, else every norm layer) but those whose input the
        residual probe reads whole anyway and emits."""
        modules = ctx.modules
        norms = ctx.structure.norms or [n for n, m in modules.items() if is_norm(m)]
        read = ctx.shared.get("norms_read", set())
        unread = {n: modules[n] for n in norms if n in modules and n not in read}
        return cls(unread, ctx.codes, ctx.listeners)

    def __init__(
        self, modules: dict[str, nn.Module], codes: dict[str, int], listeners: ListenerHooks
    ) -> None:
        self.values = ModuleScalars("norm_input_rms", np.sqrt)  # mean square -> rms
        for name, module in modules.items():
            listeners.add(module, post=lambda m, a, k, o, c=codes[name]: self._on(c, a, k))

    def _on(self, code: int, args: tuple, kwargs: dict) -> None:
        x = main_input(tuple(args), dict(kwargs or {}))
        if x is not None and self.values.first_time(code):
            v = x.detach().reshape(-1).float()
            self.values.add(code, torch.dot(v, v) / v.numel())

    def end_step(self, collector: Collector) -> None:
        self.values.hand_over(collector)
