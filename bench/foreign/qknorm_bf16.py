"""Pre-LN transformer LM with QK-norm, forward under torch.autocast(cpu, bfloat16), on a
successor-table walk (vocab 32, 2 successors: optimal ln 2 = 0.69, unigram ~2.85).
fail=1: Adam lr 0.3 (no warm-up)."""

import common
import torch
import torch.nn.functional as F
from torch import nn

torch.set_num_threads(1)
CONFIG = {"fail": 0, "lr": 2e-3, "fail_lr": 0.3, "depth": 3, "width": 64}
_log = None


class Attn(nn.Module):
    def __init__(self, d, h=4):
        super().__init__()
        self.h = h
        self.qkv = nn.Linear(d, 3 * d)
        self.o = nn.Linear(d, d)
        self.qn = nn.LayerNorm(d // h)
        self.kn = nn.LayerNorm(d // h)

    def forward(self, x):
        b, t, d = x.shape
        # q, k, v: (b, heads, t, d / heads)
        q, k, v = (
            z.view(b, t, self.h, d // self.h).transpose(1, 2) for z in self.qkv(x).chunk(3, -1)
        )
        q, k = self.qn(q), self.kn(k)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o(y.transpose(1, 2).reshape(b, t, d))


class Block(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.ln1 = nn.LayerNorm(d)
        self.attn = Attn(d)
        self.ln2 = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class LM(nn.Module):
    def __init__(self, d, depth):
        super().__init__()
        self.tok = nn.Embedding(32, d)
        self.pos = nn.Embedding(32, d)
        self.blocks = nn.ModuleList([Block(d) for _ in range(depth)])
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, 32)

    def forward(self, idx):
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1]))
        for b in self.blocks:
            x = b(x)
        return self.head(self.ln(x))


def model(cfg):
    global _log
    _log = common.LossLog(f"qknorm_bf16-{'fail' if cfg.fail else 'ok'}")
    return LM(cfg.width, cfg.depth)


def batches(cfg):
    g = torch.Generator().manual_seed(0)
    table = common.successor_table(32)
    while True:
        yield common.successor_walk(g, table, 16, 33)


def loss(model, batch):
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(batch[:, :-1])
    value = F.cross_entropy(logits.float().reshape(-1, 32), batch[:, 1:].reshape(-1))
    _log(value)
    return value


def optimizer(model, cfg):
    return torch.optim.Adam(model.parameters(), lr=cfg.fail_lr if cfg.fail else cfg.lr)
