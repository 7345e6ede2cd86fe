"""Fine-tune an MLP classifier that model() first trains to convergence (unrecorded).
ok: Adam lr 1e-4 (flat loss, healthy). fail=1: SGD lr 3.0 (un-learns: the loss rises from
the converged level)."""

import common
import torch
import torch.nn.functional as F
from torch import nn

torch.set_num_threads(1)
CONFIG = {"fail": 0, "lr": 1e-4, "fail_lr": 3.0}
_log = None


def data(seed):
    """x (64, 32) ~ N(0, 1), label = argmax of a fixed random linear map."""
    w = torch.randn(32, 10, generator=torch.Generator().manual_seed(1234))
    g = torch.Generator().manual_seed(seed)
    while True:
        x = torch.randn(64, 32, generator=g)
        yield x, (x @ w).argmax(1)


def model(cfg):
    global _log
    torch.manual_seed(0)
    m = nn.Sequential(
        nn.Linear(32, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10)
    )
    opt = torch.optim.Adam(m.parameters(), lr=3e-3)
    it = data(99)
    for _ in range(600):  # pre-training, before the recorder sees the model
        x, y = next(it)
        value = F.cross_entropy(m(x), y)
        opt.zero_grad()
        value.backward()
        opt.step()
    _log = common.LossLog(f"finetune-{'fail' if cfg.fail else 'ok'}")
    return m


def batches(cfg):
    return data(0)


def loss(model, batch):
    return common.logged_cross_entropy(model, batch, _log)


def optimizer(model, cfg):
    if cfg.fail:
        return torch.optim.SGD(model.parameters(), lr=cfg.fail_lr)
    return torch.optim.Adam(model.parameters(), lr=cfg.lr)
