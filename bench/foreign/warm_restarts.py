"""Small CNN classifier, SGD momentum, cosine schedule with warm restarts every 60 steps
(healthy loss bumps). fail=1: a schedule bug multiplies each restart's peak lr by 10
(diverges after a restart)."""

import math

import common
import torch
from torch import nn

torch.set_num_threads(1)
CONFIG = {"fail": 0, "lr": 0.1, "period": 60}
_log = None


def model(cfg):
    global _log
    _log = common.LossLog(f"warm_restarts-{'fail' if cfg.fail else 'ok'}")
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(32, 10),
    )  # fmt: skip


def batches(cfg):
    return common.image_batches(bs=32, noise=1.5, seed=3, size=16)


def loss(model, batch):
    return common.logged_cross_entropy(model, batch, _log)


def optimizer(model, cfg):
    return torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=0.9)


def scheduler(opt, cfg):
    def factor(s):
        cycle, t = divmod(s, cfg.period)
        peak = 10.0**cycle if cfg.fail else 1.0
        return peak * 0.5 * (1 + math.cos(math.pi * t / cfg.period))

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)
