"""A plain deep MLP classifier with in-place ReLUs, on synthetic Gaussian clusters.

stabscope is not transformer-only: this model has no attention and no residual stream, and
its in-place activations are the case that breaks full backward hooks.

    stabscope profile sample_models/mlp.py --set depth=16 --set act=tanh
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

CONFIG = {
    "depth": 8,
    "width": 128,
    "inputs": 32,
    "classes": 10,
    "act": "relu",  # relu (in place) | tanh
    "batch_size": 64,
    "lr": 1e-3,
    "task_seed": 7,
}


def model(cfg) -> nn.Module:
    layers: list[nn.Module] = [nn.Linear(cfg.inputs, cfg.width)]
    for _ in range(cfg.depth - 1):
        layers.append(nn.ReLU(inplace=True) if cfg.act == "relu" else nn.Tanh())
        layers.append(nn.Linear(cfg.width, cfg.width))
    layers += [
        nn.ReLU(inplace=True) if cfg.act == "relu" else nn.Tanh(),
        nn.Linear(cfg.width, cfg.classes),
    ]
    return nn.Sequential(*layers)


def batches(cfg):
    """Endless (x, y): x ~ N(centre[y], 1) with class centres fixed by task_seed."""
    centres = (
        torch.randn(cfg.classes, cfg.inputs, generator=torch.Generator().manual_seed(cfg.task_seed))
        * 1.5
    )
    g = torch.Generator().manual_seed(torch.initial_seed())
    while True:
        y = torch.randint(cfg.classes, (cfg.batch_size,), generator=g)
        x = centres[y] + torch.randn(cfg.batch_size, cfg.inputs, generator=g)
        yield x, y


def loss(model: nn.Module, batch) -> torch.Tensor:
    x, y = batch
    return F.cross_entropy(model(x), y)
