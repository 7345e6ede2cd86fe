"""A model script whose loss diverges without ever going non-finite: a linear regression on
fresh Gaussian batches, stepped by SGD past stability from step ``jump`` on.

With x ~ N(0, I) the Hessian of the mean squared error is close to (2 / outputs) I: every
direction has curvature lam = 2 / outputs. Until ``jump`` the lr gives lr * lam = 0.25
(stable: the loss falls from ~8 to the noise floor, 0.01); from ``jump`` on it is ``factor``
times that, and past lr * lam = 2 the error along every direction grows by |1 - lr * lam| a
step: at factor 8.4 (lr * lam = 2.1) the loss grows ~1.2x a step, x1e4 in 50 steps, and
stays finite for hundreds of steps. Factor 1 stays healthy.

``load_ms`` makes each batch take that long to load, as a real data loader does (the
process sleeps, the GIL free): a run of 80 steps takes a few seconds, as a small model's
does on a real dataset. ``loss-divergence`` first holds at step 61 (jump 40).

    stabscope profile tests/scripts/diverging_finite.py --steps 80 --on-error stop   # exit 1
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from torch import nn

CONFIG = {"inputs": 8, "outputs": 4, "batch_size": 256, "lr": 0.5, "jump": 40, "factor": 8.4,
          "load_ms": 30.0}  # fmt: skip


def model(cfg) -> nn.Module:
    return nn.Linear(cfg.inputs, cfg.outputs)


def batches(cfg):
    g = torch.Generator().manual_seed(1)
    true = torch.randn(cfg.inputs, cfg.outputs, generator=g)
    while True:
        time.sleep(cfg.load_ms / 1000)
        x = torch.randn(cfg.batch_size, cfg.inputs, generator=g)  # (batch, inputs)
        yield x, x @ true + 0.1 * torch.randn(cfg.batch_size, cfg.outputs, generator=g)


def loss(net: nn.Module, batch) -> torch.Tensor:
    x, y = batch
    return F.mse_loss(net(x), y)


def optimizer(net: nn.Module, cfg) -> torch.optim.Optimizer:
    return torch.optim.SGD(net.parameters(), lr=cfg.lr)


def scheduler(opt: torch.optim.Optimizer, cfg):
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 if s < cfg.jump else cfg.factor)
