"""A pretraining and a fine-tune in one script, as people write them without a hub: an MLP
learns task A with Adam over the whole model, the optimizer is deleted, and a new Adam over a
fresh head alone fine-tunes it on task B, whose targets the body's features do not give at
once. ``--keep`` keeps the first optimizer alive (it stops stepping); ``--same`` rebuilds the
optimizer over the same parameters instead (no new phase). Prints ``step K loss V``.
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

p = argparse.ArgumentParser()
p.add_argument("--pre", type=int, default=60)
p.add_argument("--steps", type=int, default=60)
p.add_argument("--keep", action="store_true")
p.add_argument("--same", action="store_true")
args = p.parse_args()
torch.manual_seed(0)
body = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh())
model = nn.Sequential(body, nn.Linear(32, 1))
wa, wb = torch.randn(8), torch.randn(8)


def batch(step: int, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(step)
    x = torch.randn(64, 8, generator=g)
    return x, (2 * torch.tanh(x @ w / 3))[:, None]


def train(opt: torch.optim.Optimizer, first: int, steps: int, w: torch.Tensor) -> int:
    """``steps`` steps from step ``first`` on targets of ``w``; the next step's number."""
    for step in range(first, first + steps):
        x, y = batch(step, w)
        loss = nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        print(f"step {step} loss {loss.item()!r}", flush=True)
    return first + steps


opt = torch.optim.Adam(model.parameters(), lr=1e-2)
step = train(opt, 0, args.pre, wa)
if args.same:
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)  # rebuilt: the same parameters
else:
    kept = opt if args.keep else None  # alive, silent from here on
    del opt
    model[1] = nn.Linear(32, 1)  # a fresh head for task B
    opt = torch.optim.Adam(model[1].parameters(), lr=1e-2)
train(opt, step, args.steps, wb if not args.same else wa)
