"""Small ResNet on synthetic 16x16 images, 10 classes. fail=1: dead ReLUs (BN beta init -10)."""

import common
import torch
import torch.nn.functional as F
from torch import nn

torch.set_num_threads(1)
CONFIG = {"fail": 0, "lr": 1e-3, "width": 32, "blocks": 4}
_log = None


class Block(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.c1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.b1 = nn.BatchNorm2d(c)
        self.c2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.b2 = nn.BatchNorm2d(c)

    def forward(self, x):
        h = F.relu(self.b1(self.c1(x)))
        return F.relu(x + self.b2(self.c2(h)))


class ResNet(nn.Module):
    def __init__(self, c, n):
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(c)
        self.blocks = nn.Sequential(*[Block(c) for _ in range(n)])
        self.fc = nn.Linear(c, 10)

    def forward(self, x):
        x = F.relu(self.bn(self.stem(x)))
        x = self.blocks(x)
        return self.fc(x.mean((2, 3)))


def model(cfg):
    global _log
    _log = common.LossLog(f"resnet_cnn-{'fail' if cfg.fail else 'ok'}")
    m = ResNet(cfg.width, cfg.blocks)
    if cfg.fail:
        for mod in m.modules():
            if isinstance(mod, nn.BatchNorm2d):
                nn.init.constant_(mod.bias, -10.0)
    return m


def batches(cfg):
    return common.image_batches(bs=32, noise=1.5)


def loss(model, batch):
    x, y = batch
    value = F.cross_entropy(model(x), y)
    _log(value)
    return value
