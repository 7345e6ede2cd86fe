"""A model script that diverges: a tanh MLP regressing a fixed batch with plain SGD at a
learning rate far past stability. The output layer's weights grow geometrically (tanh keeps
the hidden activations bounded, so nothing saturates the growth): the loss overflows to Inf
and then NaN after 15-21 steps at lr 5 (seeds 0-7), a run that goes non-finite partway.

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
