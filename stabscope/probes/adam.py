"""``adam_sqrtv_over_eps``: per parameter, rms of sqrt(v̂) divided by Adam's eps, where
v̂ = exp_avg_sq / (1 − β₂^t) is the bias-corrected second moment Adam divides by.

Wortsman et al. (2023): when gradients get small enough that sqrt(v) approaches eps, Adam's
update shrinks (the denominator is dominated by eps) and training effectively stalls for
those parameters. A value near or below 1 flags them. Read after ``optimizer.step()`` from
the optimizer state, for any optimizer whose state has ``exp_avg_sq`` and whose param group
has ``eps`` (Adam, AdamW, NAdam, RAdam, ...).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from ..record.collector import Collector, Rows
from ..record.distributed import full_numel, local_tensor
from .base import BaseProbe, ProbeContext
from .kernels import host_params


class AdamEpsProbe(BaseProbe):
    needs_optimizer = True

    @classmethod
    def build(cls, ctx: ProbeContext) -> AdamEpsProbe:
        return cls(ctx.params)

    def __init__(self, params: list[tuple[int, nn.Parameter]]) -> None:
        self.params = params
        self._pending: list[tuple[np.ndarray, torch.Tensor]] = []

    def after_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        group_of = {id(p): g for g in optimizer.param_groups for p in g["params"]}
        codes, scale, squares = [], [], []
        for code, p in self.params:
            group = group_of.get(id(p), {})
            eps, betas = group.get("eps"), group.get("betas", (0.9, 0.999))
            state = optimizer.state.get(p, {})
            v = state.get("exp_avg_sq") if isinstance(state, dict) else None
            step = state.get("step") if isinstance(state, dict) else None
            if isinstance(eps, float) and eps > 0 and isinstance(v, torch.Tensor) and step:
                on_device = isinstance(step, torch.Tensor) and step.device.type != "cpu"
                # Fused/capturable Adam keeps `step` on the device: reading it would sync, so
                # those get no bias correction (it only matters for the first ~1/(1-β₂) steps).
                correction = 1.0 if on_device else 1.0 - float(betas[1]) ** float(step)
                codes.append(code)
                # A complex parameter's v holds its real and imaginary parts' second moments
                # (Adam steps the real view): two values an element.
                v = local_tensor(v.detach())
                pair = 2 if v.is_complex() else 1
                scale.append((full_numel(p) * pair * correction, eps))
                # The full parameter's count (FSDP: not the shard's), the sum the local shard's.
                squares.append(torch.view_as_real(v) if v.is_complex() else v)
        if squares:
            if host_params.usable(squares):  # one threaded pass over all of them
                sums = torch.from_numpy(host_params.totals(squares))
            elif squares[0].device.type == "cpu":  # per-tensor sums: 2x faster than foreach
                sums = torch.stack([s.sum(dtype=torch.float32) for s in squares])
            else:  # exp_avg_sq >= 0, so its L1 norm is its sum: one fused kernel on CUDA
                sums = torch.stack([s.float() for s in torch._foreach_norm(squares, 1)])
            self._pending.append((np.array(codes), np.array(scale, np.float64), sums))

    def end_step(self, collector: Collector) -> None:
        for codes, scale, sums in self._pending:

            def decode(v: np.ndarray, rows: Rows, codes=codes, scale=scale) -> None:
                rows.emit(
                    "train", codes, 0, "adam_sqrtv_over_eps", np.sqrt(v / scale[:, 0]) / scale[:, 1]
                )

            collector.add(sums, decode)
        self._pending = []
