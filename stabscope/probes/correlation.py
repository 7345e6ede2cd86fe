"""``token_corr``: mean correlation between token representations at each block output.

DeepScaleLM (Kedia et al. 2024) propagates the correlation r between tokens through every
component; r → 1 means all positions carry the same vector (rank collapse). Measured on a
sample: the first ``batch`` sequences, ``tokens`` positions evenly spaced, as the mean
off-diagonal of the Gram matrix over its mean diagonal (uncentred, as the moment-propagation
analysis assumes zero-mean features): r = mean_{i≠j} <x_i, x_j> / mean_i <x_i, x_i>.
"""

from __future__ import annotations

from functools import lru_cache

import torch
from torch import nn

from ..record.collector import Collector, ModuleScalars
from ..record.hook_context import primary_tensor
from ..record.hooks import ListenerHooks
from .base import BaseProbe, ProbeContext
from .kernels import host_kernels


def token_correlation(
    x: torch.Tensor, batch: int = 2, tokens: int = 64, seq_dim: int = 1
) -> torch.Tensor:
    """r of a (B, T, D) tensor (``seq_dim`` = 0 for (T, B, D)) as a 0-d float32 tensor."""
    x = x.detach()
    if host_kernels.host_readable([x]):  # one numba call instead of ~8 small torch ops
        from .kernels.residual_kernels import token_correlation as kernel

        b = min(batch, x.shape[1 - seq_dim])
        positions = _positions(x.shape[seq_dim], tokens, x.device).numpy()
        return torch.tensor(kernel(x.numpy(), positions, b, seq_dim), dtype=torch.float64)
    if seq_dim == 0:
        x = x.transpose(0, 1)
    b, t = min(batch, x.shape[0]), x.shape[1]
    s = x[:b, _positions(t, tokens, x.device)].float()  # (b, n, D)
    gram = s @ s.transpose(1, 2)  # (b, n, n)
    n = s.shape[1]
    diag = torch.diagonal(gram, dim1=1, dim2=2).sum()
    off = gram.sum() - diag
    return (off / max(b * n * (n - 1), 1)) / (diag / (b * n))


@lru_cache(maxsize=64)
def _positions(length: int, tokens: int, device: torch.device) -> torch.Tensor:
    """(n,) evenly spaced positions in [0, length): built once per shape, not per call (five
    small ops, ~0.1 ms a block on CPU)."""
    return torch.linspace(0, length - 1, min(tokens, length), device=device).round().long().unique()


def _seq_dim(block: nn.Module) -> int:
    """0 for (T, B, D) blocks: those whose nn.MultiheadAttention is not batch_first."""
    for m in block.modules():
        if isinstance(m, nn.MultiheadAttention) and not m.batch_first:
            return 0
    return 1


class CorrelationProbe(BaseProbe):
    @classmethod
    def build(cls, ctx: ProbeContext) -> CorrelationProbe | None:
        """At every residual block's output, where the structure is recognised."""
        if not ctx.structure.recognised:
            return None
        blocks = {b.name: ctx.modules[b.name] for b in ctx.structure.blocks}
        seq = {name: _seq_dim(m) for name, m in blocks.items()}
        return cls(blocks, ctx.codes, ctx.listeners, seq)

    def __init__(
        self,
        modules: dict[str, nn.Module],
        codes: dict[str, int],
        listeners: ListenerHooks,
        seq_dims: dict[str, int] | None = None,
    ) -> None:
        self.values = ModuleScalars("token_corr")
        seq_dims = seq_dims or {}
        for name, module in modules.items():
            listeners.add(
                module,
                post=lambda m, a, k, o, c=codes[name], d=seq_dims.get(name, 1): self._on(c, o, d),
            )

    def _on(self, code: int, output: object, seq_dim: int) -> None:
        x = primary_tensor(output)
        if (
            x is not None
            and x.dim() == 3
            and x.shape[seq_dim] >= 2
            and self.values.first_time(code)
        ):
            self.values.add(code, token_correlation(x, seq_dim=seq_dim))

    def end_step(self, collector: Collector) -> None:
        self.values.hand_over(collector)
