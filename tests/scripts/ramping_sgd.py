"""A model script whose learning rate is planned to ramp past stability: the MLP regression of
diverging_sgd.py (full-batch SGD on a fixed batch), at a stable lr until ``ramp_at``, then
multiplied by ``ramp`` over the steps up to ``ramp_end`` (geometrically), held there.

At lr 0.05 the first steps are well inside the edge of stability (the stability index is far
below 1); ramp 1000 takes the lr to 50, past 2/λ of the output layer's regression, and the
loss blows up after the ramp. A forecast made from the steps before the ramp, with the planned
lr curve, can see it coming; ramp 2 stays stable.

    stabscope profile tests/scripts/ramping_sgd.py --steps 8 --budget 40 --out runs/ramp
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from diverging_sgd import batches, loss, model  # noqa: F401 (its entry points)

CONFIG = {"width": 16, "inputs": 8, "outputs": 4, "batch_size": 64, "lr": 0.05,
          "ramp": 1000.0, "ramp_at": 10, "ramp_end": 20}  # fmt: skip


def factor(step: int, cfg) -> float:
    frac = min(1.0, max(0.0, (step - cfg.ramp_at) / (cfg.ramp_end - cfg.ramp_at)))
    return cfg.ramp**frac


def optimizer(net: torch.nn.Module, cfg) -> torch.optim.Optimizer:
    return torch.optim.SGD(net.parameters(), lr=cfg.lr)


def scheduler(opt: torch.optim.Optimizer, cfg):
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: factor(s, cfg))
