"""A run that trains well, then diverges to NaN near step 100: the MLP regression of
diverging_sgd.py (full-batch SGD on a fixed batch) at a stable lr 0.05, multiplied by
``factor`` from step ``jump`` on. At factor 1000 (lr 50, far past 2/curvature of the output
layer's regression) the loss overflows a few steps after the jump and NaN follows; factor 1
stays healthy to the end.

Both kinds of script:

    stabscope profile tests/scripts/diverging_late.py --steps 200 --on-error stop   # exit 1
    stabscope profile tests/scripts/diverging_late.py --run-script --on-error stop -- --steps 200
    python tests/scripts/diverging_late.py --steps 200 --factor 1                   # healthy
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from diverging_sgd import batches, loss, model

CONFIG = {"width": 16, "inputs": 8, "outputs": 4, "batch_size": 64, "lr": 0.05,
          "jump": 95, "factor": 1000.0}  # fmt: skip

#: The first step at which ``loss-divergence`` holds on the losses so far, at CONFIG: the
#: loss is 0.87 at step 95, then x8, x8e3, x3e4 a step; at step 98 the median of the last
#: five gives back far more than half of what was learned (tests/test_online_cadence.py).
DIVERGES_AT = 98


def optimizer(net: torch.nn.Module, cfg) -> torch.optim.Optimizer:
    return torch.optim.SGD(net.parameters(), lr=cfg.lr)


def scheduler(opt: torch.optim.Optimizer, cfg):
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 if s < cfg.jump else cfg.factor)


def main(argv: list[str]) -> None:
    """The same training as a plain loop: ``--steps``, ``--jump``, ``--factor``."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--jump", type=int, default=CONFIG["jump"])
    ap.add_argument("--factor", type=float, default=CONFIG["factor"])
    cfg = argparse.Namespace(**{**CONFIG, **vars(ap.parse_args(argv))})
    torch.manual_seed(0)
    net = model(cfg)
    opt = optimizer(net, cfg)
    sched = scheduler(opt, cfg)
    data = batches(cfg)
    for _ in range(cfg.steps):
        opt.zero_grad(set_to_none=True)
        loss(net, next(data)).backward()
        opt.step()
        sched.step()


if __name__ == "__main__":
    main(sys.argv[1:])
