"""A model script that diverges: an MLP regressing a fixed batch with plain SGD at a learning
rate far past stability. LayerNorm and tanh keep the hidden features bounded, so the output
layer is a linear regression stepped past 2/curvature: its weights grow geometrically, the
loss overflows to Inf after 14-16 steps at lr 5 (seeds 0-7), and NaN follows. A run that
goes non-finite partway, with a norm whose input the rules read.

    stabscope check tests/scripts/diverging_sgd.py --steps 30     # exit 1: nonfinite
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

CONFIG = {"width": 16, "inputs": 8, "outputs": 4, "batch_size": 64, "lr": 5.0}


def model(cfg) -> nn.Module:
    return nn.Sequential(
        nn.Linear(cfg.inputs, cfg.width),
        nn.LayerNorm(cfg.width),
        nn.Tanh(),
        nn.Linear(cfg.width, cfg.width),
        nn.Tanh(),
        nn.Linear(cfg.width, cfg.outputs),
    )


def batches(cfg):
    """The same (x, y) every step: full-batch gradient descent, so the divergence is the
    optimiser's and not an unlucky batch's."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(cfg.batch_size, cfg.inputs, generator=g)
    y = torch.randn(cfg.batch_size, cfg.outputs, generator=g)
    while True:
        yield x, y


def loss(model: nn.Module, batch) -> torch.Tensor:
    x, y = batch
    return F.mse_loss(model(x), y)


def optimizer(model: nn.Module, cfg) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=cfg.lr)
