"""``adam_sqrtv_over_eps``: per parameter, rms of sqrt(exp_avg_sq) divided by Adam's eps.

Wortsman et al. (2023): when gradients get small enough that sqrt(v) approaches eps, Adam's
update shrinks (the denominator is dominated by eps) and training effectively stalls for
those parameters. A value near or below 1 flags them. Read after ``optimizer.step()`` from
the optimizer state, for any optimizer whose state has ``exp_avg_sq`` and whose param group
has ``eps`` (Adam, AdamW, NAdam, RAdam, ...).
"""

from __future__ import annotations

import torch
from torch import nn

from ..collector import Collector, ModuleScalars


class AdamEpsProbe:
    def __init__(self, params: list[tuple[int, nn.Parameter]]) -> None:
        self.params = params
        self.values = ModuleScalars("adam_sqrtv_over_eps")

    def after_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        eps_of = {id(p): g.get("eps") for g in optimizer.param_groups for p in g["params"]}
        for code, p in self.params:
            eps = eps_of.get(id(p))
            state = optimizer.state.get(p, {})
            v = state.get("exp_avg_sq") if isinstance(state, dict) else None
            if not isinstance(eps, float) or eps <= 0 or not isinstance(v, torch.Tensor):
                continue
            flat = v.detach().reshape(-1).float()
            self.values.add(code, (flat.sum() / flat.numel()).sqrt() / eps)

    def end_step(self, collector: Collector) -> None:
        self.values.hand_over(collector)
