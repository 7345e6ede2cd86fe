"""What the plain test scripts share, imported the way a script imports its neighbour."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable

import torch
from torch import nn


def parser(doc: str | None, steps: int) -> argparse.ArgumentParser:
    """The flags every test script takes: ``--steps`` and ``--log FILE``."""
    p = argparse.ArgumentParser(description=doc)
    p.add_argument("--steps", type=int, default=steps)
    p.add_argument("--log", default=None, help="append one JSON line per optimizer step")
    return p


def log_step(path: str | None, **record: float) -> None:
    if path:
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")


def regression_batch(step: int, d_in: int, d_out: int, size: int) -> tuple[torch.Tensor, ...]:
    """Inputs (size, d_in) and targets (size, d_out), the same for the same step."""
    g = torch.Generator().manual_seed(step)
    return torch.randn(size, d_in, generator=g), torch.randn(size, d_out, generator=g)


def regression_loop(
    model: nn.Module,
    opt: torch.optim.Optimizer,
    batch: Callable[[int], tuple[torch.Tensor, torch.Tensor]],
    steps: int,
    log: str | None,
    mse: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = nn.functional.mse_loss,
) -> None:
    """The loop of a tutorial: forward, MSE (``mse``, e.g. a compiled one), zero_grad,
    backward, step."""

    def loss_of(step: int) -> torch.Tensor:
        x, y = batch(step)
        return mse(model(x), y)

    loss_loop(opt, loss_of, steps, log)


def loss_loop(
    opt: torch.optim.Optimizer, loss_of: Callable[[int], torch.Tensor], steps: int, log: str | None
) -> None:
    """``steps`` steps of: the step's loss (computed in the loop, outside any model),
    zero_grad, backward, step."""
    for step in range(steps):
        loss = loss_of(step)
        opt.zero_grad()
        loss.backward()
        opt.step()
        log_step(log, step=step, loss=loss.item())
