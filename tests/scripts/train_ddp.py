"""An ordinary DistributedDataParallel training script (gloo, CPU), without stabscope.

    torchrun --standalone --nproc_per_node=2 train_ddp.py --steps 4 --log-dir DIR

``--fsdp`` shards the model with FSDP2 (``fully_shard`` on each linear layer, then the root)
instead of wrapping it in DDP.

Each rank trains on its own batches and appends its losses to ``DIR/rank{R}.jsonl``. The tests
import ``make_model`` and ``batch`` to recompute the steps in one process.
"""

from __future__ import annotations

import argparse
import json
import os

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import fully_shard
from torch.nn.parallel import DistributedDataParallel

D_IN, HIDDEN, D_OUT, BATCH = 6, 12, 3, 8


def make_model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(D_IN, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, D_OUT))


def batch(step: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x (BATCH, D_IN), y (BATCH, D_OUT): different on every rank and step."""
    g = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randn(BATCH, D_IN, generator=g), torch.randn(BATCH, D_OUT, generator=g)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--log-dir", default=None)
    p.add_argument("--fsdp", action="store_true", help="FSDP2 fully_shard instead of DDP")
    p.add_argument("--fail-rank", type=int, default=-1, help="this rank raises ...")
    p.add_argument("--fail-at", type=int, default=-1, help="... before this step's forward")
    args = p.parse_args()
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    model = make_model()
    if args.fsdp:
        for layer in (model[0], model[2]):
            fully_shard(layer)
        fully_shard(model)
    else:
        model = DistributedDataParallel(model)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    for step in range(args.steps):
        if rank == args.fail_rank and step == args.fail_at:
            raise ValueError(f"rank {rank}'s data loader failed at step {step}")
        x, y = batch(step, rank)
        loss = nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()  # DDP averages the gradients over the ranks here (FSDP: shards)
        opt.step()
        if args.log_dir:
            with open(os.path.join(args.log_dir, f"rank{rank}.jsonl"), "a") as f:
                f.write(json.dumps({"step": step, "loss": loss.item()}) + "\n")
    dist.barrier()  # no rank tears gloo down while a peer is mid-collective
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
