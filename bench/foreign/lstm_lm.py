"""Char-level LSTM LM on Python stdlib sources. fail=1: SGD lr 40 without clipping."""

import common
import torch
import torch.nn.functional as F
from torch import nn

torch.set_num_threads(1)
CONFIG = {"fail": 0, "lr": 3e-3, "hidden": 256, "seq": 64, "bs": 32}
_log = None


class LSTMLM(nn.Module):
    def __init__(self, h):
        super().__init__()
        self.emb = nn.Embedding(128, 64)
        self.lstm = nn.LSTM(64, h, batch_first=True)
        self.head = nn.Linear(h, 128)

    def forward(self, x):
        y, _ = self.lstm(self.emb(x))
        return self.head(y)


def model(cfg):
    global _log
    _log = common.LossLog(f"lstm_lm-{'fail' if cfg.fail else 'ok'}")
    return LSTMLM(cfg.hidden)


def batches(cfg):
    data = common.text_bytes()
    g = torch.Generator().manual_seed(0)
    while True:
        ix = torch.randint(len(data) - cfg.seq - 1, (cfg.bs,), generator=g)
        yield torch.stack([data[i : i + cfg.seq + 1] for i in ix])


def loss(model, batch):
    logits = model(batch[:, :-1])
    value = F.cross_entropy(logits.reshape(-1, 128), batch[:, 1:].reshape(-1))
    _log(value)
    return value


def optimizer(model, cfg):
    if cfg.fail:
        return torch.optim.SGD(model.parameters(), lr=40.0)
    return torch.optim.Adam(model.parameters(), lr=cfg.lr)
