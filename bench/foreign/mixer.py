"""MLP-Mixer on synthetic 16x16 images. fail=1: loss multiplied by 1e6 (SGD momentum)."""

import common
import torch
from torch import nn

torch.set_num_threads(1)
CONFIG = {"fail": 0, "lr": 0.05, "dim": 64, "depth": 4}
_log = None
_fail = False  # set by optimizer(): loss() then returns the logged loss x 1e6


class MixerBlock(nn.Module):
    def __init__(self, tokens, dim):
        super().__init__()
        self.n1 = nn.LayerNorm(dim)
        self.n2 = nn.LayerNorm(dim)
        self.tok = nn.Sequential(
            nn.Linear(tokens, 2 * tokens), nn.GELU(), nn.Linear(2 * tokens, tokens)
        )
        self.ch = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x):
        x = x + self.tok(self.n1(x).transpose(1, 2)).transpose(1, 2)
        return x + self.ch(self.n2(x))


class Mixer(nn.Module):
    def __init__(self, dim, depth, p=4, size=16):
        super().__init__()
        self.p = p
        t = (size // p) ** 2
        self.embed = nn.Linear(3 * p * p, dim)
        self.blocks = nn.ModuleList([MixerBlock(t, dim) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, 10)

    def forward(self, x):
        b, p = x.shape[0], self.p
        x = x.unfold(2, p, p).unfold(3, p, p).permute(0, 2, 3, 1, 4, 5).reshape(b, -1, 3 * p * p)
        x = self.embed(x)
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.norm(x).mean(1))


def model(cfg):
    global _log
    _log = common.LossLog(f"mixer-{'fail' if cfg.fail else 'ok'}")
    return Mixer(cfg.dim, cfg.depth)


def batches(cfg):
    return common.image_batches(bs=32, noise=1.5, seed=1)


def loss(model, batch):
    value = common.logged_cross_entropy(model, batch, _log)
    return value * 1e6 if _fail else value


def optimizer(model, cfg):
    global _fail
    _fail = bool(cfg.fail)
    return torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=0.9)
