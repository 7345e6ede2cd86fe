"""ViT-style patch transformer (Pre-LN, nn.MultiheadAttention) on synthetic images.
fail=1: Adam lr 0.3, no warm-up."""

import common
import torch
from torch import nn

torch.set_num_threads(1)
CONFIG = {"fail": 0, "fail_lr": 0.3, "lr": 1e-3, "dim": 64, "depth": 4, "heads": 4}
_log = None


class Block(nn.Module):
    def __init__(self, d, h):
        super().__init__()
        self.ln1 = nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, h, batch_first=True)
        self.ln2 = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x):
        y = self.ln1(x)
        x = x + self.attn(y, y, y, need_weights=False)[0]
        return x + self.mlp(self.ln2(x))


class ViT(nn.Module):
    def __init__(self, d, depth, h, p=4, size=16):
        super().__init__()
        self.p = p
        t = (size // p) ** 2
        self.embed = nn.Linear(3 * p * p, d)
        self.cls = nn.Parameter(torch.zeros(1, 1, d))
        self.pos = nn.Parameter(torch.randn(1, t + 1, d) * 0.02)
        self.blocks = nn.ModuleList([Block(d, h) for _ in range(depth)])
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, 10)

    def forward(self, x):
        b, p = x.shape[0], self.p
        x = x.unfold(2, p, p).unfold(3, p, p).permute(0, 2, 3, 1, 4, 5).reshape(b, -1, 3 * p * p)
        x = torch.cat([self.cls.expand(b, -1, -1), self.embed(x)], 1) + self.pos
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.norm(x[:, 0]))


def model(cfg):
    global _log
    _log = common.LossLog(f"vit-{'fail' if cfg.fail else 'ok'}")
    return ViT(cfg.dim, cfg.depth, cfg.heads)


def batches(cfg):
    return common.image_batches(bs=32, noise=1.5, seed=2)


def loss(model, batch):
    return common.logged_cross_entropy(model, batch, _log)


def optimizer(model, cfg):
    return torch.optim.Adam(model.parameters(), lr=cfg.fail_lr if cfg.fail else cfg.lr)
