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

from ..collector import Collector, Rows
from ..distributed import local_tensor
from . import host_params


class AdamEpsProbe:
    def __init__(self, params: list[tuple[int, nn.Parameter]]) -> None:
        self.params = params
        self._pending: list[tuple[np.ndarray, np.ndarray, torch.Tensor]] = []

    def states(
        self, optimizer: torch.optim.Optimizer
    ) -> dict[int, tuple[float, float, torch.Tensor]]:
        """Per index into ``params``: (numel × bias correction, eps, local ``exp_avg_sq``) of
        the parameters whose optimizer state has an ``exp_avg_sq`` and whose group an ``eps``."""
        group_of = {id(p): g for g in optimizer.param_groups for p in g["params"]}
        found = {}
        for i, (_, p) in enumerate(self.params):
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
                # numel is the full tensor's (a DTensor's), the sum the local shard's.
                found[i] = (v.numel() * correction, eps, local_tensor(v.detach()))
        return found

    def after_optimizer_step(
        self,
        optimizer: torch.optim.Optimizer,
        states: dict[int, tuple[float, float, torch.Tensor]] | None = None,
        sums: dict[int, float] | None = None,
    ) -> None:
        """Queue this step's values. ``states``: ``self.states(optimizer)`` if already taken;
        ``sums``: the sums of some of their ``exp_avg_sq``, already read by the parameter
        probe's post-step pass (``ParameterProbe.after_optimizer_step``)."""
        states = self.states(optimizer) if states is None else states
        if not states:
            return
        index = sorted(states)
        codes = np.array([self.params[i][0] for i in index])
        scale = np.array([states[i][:2] for i in index], np.float64)
        sums = sums or {}
        missing = [states[i][2] for i in index if i not in sums]
        if not missing:
            totals = torch.tensor([sums[i] for i in index], dtype=torch.float64)
        else:
            totals = _totals(missing)
            if sums:  # some read already, the rest just now
                read = iter(totals.tolist())
                both = [sums[i] if i in sums else next(read) for i in index]
                totals = torch.tensor(both, dtype=torch.float64)
        self._pending.append((codes, scale, totals))

    def end_step(self, collector: Collector) -> None:
        for codes, scale, sums in self._pending:

            def decode(v: np.ndarray, rows: Rows, codes=codes, scale=scale) -> None:
                rows.emit(
                    "train", codes, 0, "adam_sqrtv_over_eps", np.sqrt(v / scale[:, 0]) / scale[:, 1]
                )

            collector.add(sums, decode)
        self._pending = []


def _totals(squares: list[torch.Tensor]) -> torch.Tensor:
    """The sum of each ``exp_avg_sq``, on the tensors' device (no sync)."""
    if host_params.usable(squares):  # one threaded pass over all of them
        return torch.from_numpy(host_params.totals(squares))
    if squares[0].device.type == "cpu":  # per-tensor sums: 2x faster than foreach
        return torch.stack([s.sum(dtype=torch.float32) for s in squares])
    # exp_avg_sq >= 0, so its L1 norm is its sum: one fused kernel on CUDA
    return torch.stack([s.float() for s in torch._foreach_norm(squares, 1)])
