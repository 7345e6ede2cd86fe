"""meta.json's ``optimizers``: each owned optimizer's class and its param groups' settings, as
they were when the optimizer first stepped.

Rules read the settings that decide whether an update stays bounded (Adam's betas and eps,
SGD's momentum, how weight decay applies) without torch: ``rules/optimizer_settings.py``,
``rules/weight_decay.py``. Per group only plain numbers are kept (and Adam's
``decoupled_weight_decay`` flag): a setting that is a device tensor (a tensor lr on an
accelerator) would cost a host sync to read inside the user's ``optimizer.step()`` and is
left out, as is anything else that is not a number.
"""

from __future__ import annotations

import math
from typing import Any

import torch

#: The group settings kept, where the group has them (torch's names).
SETTINGS = ("lr", "momentum", "dampening", "eps", "weight_decay")


def describe(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """``{"class": name, "groups": [{"params": count, setting: value, "betas": [b1, b2]}]}``."""
    groups = []
    for group in optimizer.param_groups:
        entry: dict[str, Any] = {"params": len(group["params"])}
        for key in SETTINGS:
            value = _number(group.get(key))
            if value is not None:
                entry[key] = value
        betas = group.get("betas")
        if isinstance(betas, (tuple, list)) and len(betas) == 2:
            pair = [_number(b) for b in betas]
            if None not in pair:
                entry["betas"] = pair
        if group.get("decoupled_weight_decay") is True:  # Adam's, torch >= 2.5: AdamW's decay
            entry["decoupled_weight_decay"] = True
        groups.append(entry)
    return {"class": type(optimizer).__name__, "groups": groups}


def host_value(value: Any) -> Any:
    """A param-group setting as the host may read it inside ``optimizer.step()``: a
    one-element CPU tensor as its Python number, a device tensor as None (reading it would
    sync), anything else as it is."""
    if isinstance(value, torch.Tensor):
        if value.device.type != "cpu" or value.numel() != 1:
            return None
        return value.detach().item()
    return value


def _number(value: Any) -> float | None:
    """A finite float, or None (a device tensor, not a number, NaN or Inf)."""
    value = host_value(value)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


__all__ = ["SETTINGS", "describe", "host_value"]
