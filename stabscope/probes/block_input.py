"""``block_in_rms``: rms of every residual block's input, the stream as it enters the block.

On a Pre-LN stack every branch adds to the stream, so its rms grows with depth (Xiong et al.
2020): this row per block shows how much, and the norm inside each block is what keeps the
branches' inputs at unit scale. Read in a forward pre-hook (before the block can change its
input in place), as the mean square of the block's main input on the device; the square root
is taken at the step's host sync.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from ..record.collector import Collector, ModuleScalars
from ..record.hooks import ListenerHooks
from ..structure.trace import main_input
from .base import BaseProbe, ProbeContext


class BlockInputProbe(BaseProbe):
    @classmethod
    def build(cls, ctx: ProbeContext) -> BlockInputProbe | None:
        """On the structure's residual blocks, where it is recognised."""
        if not ctx.structure.recognised:
            return None
        blocks = {b.name: ctx.modules[b.name] for b in ctx.structure.blocks}
        return cls(blocks, ctx.codes, ctx.listeners)

    def __init__(
        self, blocks: dict[str, nn.Module], codes: dict[str, int], listeners: ListenerHooks
    ) -> None:
        self.values = ModuleScalars("block_in_rms", np.sqrt)  # mean square -> rms
        for name, block in blocks.items():
            listeners.add(block, pre=lambda m, a, k, c=codes[name]: self._on(c, a, k))

    def _on(self, code: int, args: Any, kwargs: Any) -> None:
        x = main_input(tuple(args), dict(kwargs or {}))
        if x is not None and self.values.first_time(code):
            v = x.detach().reshape(-1).float()  # (numel,)
            self.values.add(code, torch.dot(v, v) / v.numel())

    def end_step(self, collector: Collector) -> None:
        self.values.hand_over(collector)
