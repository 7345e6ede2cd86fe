"""A training loop built in process from one of the model scripts of ``tests/scripts`` (their
``model``, ``optimizer``, ``scheduler``, ``batches`` and ``loss``), for the tests that drive a
Recorder by hand over the same training the scripts run under ``stabscope profile``."""

from __future__ import annotations

from collections.abc import Callable
from types import ModuleType
from typing import Any

import torch


def script_training(script: ModuleType, cfg: Any) -> tuple[torch.nn.Module, Callable[[], Any]]:
    """The script's model (seeded as the script seeds it) and a function that runs one
    training step and returns its loss."""
    torch.manual_seed(0)
    net = script.model(cfg)
    opt = script.optimizer(net, cfg)
    sched = script.scheduler(opt, cfg)
    data = script.batches(cfg)

    def step() -> torch.Tensor:
        opt.zero_grad(set_to_none=True)
        loss = script.loss(net, next(data))
        loss.backward()
        opt.step()
        sched.step()
        return loss

    return net, step
