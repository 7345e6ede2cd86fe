"""A tabular regression script as people write them: argparse, a loop, no stabscope.

An MLP fits y = 250 + 80 · (w · x) / |w| + noise by mean squared error. Its targets have
mean 250 and variance 80² + 20² = 6,800 in raw units; ``--standardize`` trains on
(y - 250) / 80 (variance 1 + 0.25²). Raw, the outputs start near 0 and Adam at lr 1e-2
moves each weight by about 1e-2 a step: after 120 steps the outputs are still far short of
250, and the loss is several times the targets' variance.
``--no-signal`` draws the inputs apart from the targets (nothing to learn but their mean).
``--grouped`` makes each micro-batch one group (a store, a patient, a file of an iterable
dataset) whose targets share an offset of sd ``GROUP_SD`` that no input reveals.
``--accum`` splits each step into micro-batches (``loss / k``); ``--two-optimizers`` trains the
head with its own optimizer. ``--log FILE`` appends one JSON line per step with its loss.
"""

from __future__ import annotations

import argparse
import json

import torch
from torch import nn

FEATURES, BATCH, MEAN, SD, NOISE, GROUP_SD = 6, 32, 250.0, 80.0, 20.0, 160.0


def data(
    step: int, micro: int, signal: bool = True, grouped: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """x (BATCH, FEATURES), raw y (BATCH, 1)."""
    g = torch.Generator().manual_seed(7919 * step + micro)
    w = torch.arange(1.0, FEATURES + 1)
    x = torch.randn(BATCH, FEATURES, generator=g)
    y = MEAN + SD * (x @ w / w.norm()) + NOISE * torch.randn(BATCH, generator=g)
    if grouped:
        y = y + GROUP_SD * torch.randn(1, generator=g)
    if not signal:
        x = torch.randn(BATCH, FEATURES, generator=g)
    return x, y[:, None]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--steps", type=int, default=120)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--accum", type=int, default=1)
    p.add_argument("--standardize", action="store_true")
    p.add_argument("--two-optimizers", action="store_true")
    p.add_argument("--no-signal", action="store_true")
    p.add_argument("--grouped", action="store_true")
    p.add_argument("--log", default=None)
    args = p.parse_args()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(FEATURES, 32), nn.ReLU(), nn.Linear(32, 1))
    if args.two_optimizers:
        optimizers = [
            torch.optim.Adam(model[0].parameters(), lr=args.lr),
            torch.optim.Adam(model[2].parameters(), lr=args.lr),
        ]
    else:
        optimizers = [torch.optim.Adam(model.parameters(), lr=args.lr)]
    for step in range(args.steps):
        for opt in optimizers:
            opt.zero_grad()
        step_loss = 0.0
        for micro in range(args.accum):
            x, y = data(step, micro, signal=not args.no_signal, grouped=args.grouped)
            if args.standardize:
                y = (y - MEAN) / SD
            loss = nn.functional.mse_loss(model(x), y) / args.accum
            loss.backward()
            step_loss += loss.item()
        for opt in optimizers:
            opt.step()
        if args.log:
            with open(args.log, "a") as f:
                f.write(json.dumps({"step": step, "loss": step_loss}) + "\n")


if __name__ == "__main__":
    main()
