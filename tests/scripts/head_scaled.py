"""A classifier whose output head starts ``head_scale`` times too large: 16 Gaussian clusters
in 8 dimensions, an MLP with a 16-way head, cross-entropy, Adam. The first loss sits far above
ln 16 (a uniform guess); at ``head_scale`` 30 Adam shrinks the head back to about ln 16 within
a few dozen steps, at 3000 it cannot in that time.

    stabscope profile tests/scripts/head_scaled.py --steps 40 --set head_scale=30 --out runs/h
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

CONFIG = {"classes": 16, "inputs": 8, "width": 32, "batch_size": 64, "lr": 1e-2,
          "head_scale": 30.0}  # fmt: skip


def model(cfg) -> nn.Module:
    net = nn.Sequential(
        nn.Linear(cfg.inputs, cfg.width), nn.ReLU(), nn.Linear(cfg.width, cfg.classes)
    )
    with torch.no_grad():
        net[2].weight.mul_(cfg.head_scale)
    return net


def batches(cfg):
    g = torch.Generator().manual_seed(0)
    centres = 3 * torch.randn(cfg.classes, cfg.inputs, generator=g)  # (C, inputs)
    while True:
        y = torch.randint(cfg.classes, (cfg.batch_size,), generator=g)
        yield centres[y] + torch.randn(cfg.batch_size, cfg.inputs, generator=g), y


def loss(net: nn.Module, batch) -> torch.Tensor:
    x, y = batch
    return F.cross_entropy(net(x), y)


def optimizer(net: nn.Module, cfg) -> torch.optim.Optimizer:
    return torch.optim.Adam(net.parameters(), lr=cfg.lr)
