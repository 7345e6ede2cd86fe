"""A data-parallel training loop recorded with stabscope.Recorder, run by torchrun on gloo/CPU.

    torchrun --standalone --nproc_per_node=2 tests/dist_scripts/train.py RUN_DIR [options]

``--mode ddp`` wraps the model in DistributedDataParallel (rank 0 hands the Recorder the
wrapper, the other ranks the inner model: both must give the same names); ``--mode fsdp``
shards every Linear and the root with FSDP2's ``fully_shard``. The tests import
``make_model``, ``batch`` and ``OPTIMIZER`` to recompute every step in one process.
"""

from __future__ import annotations

import argparse
import contextlib
import sys

import torch
import torch.distributed as dist
from torch import nn

import stabscope
from stabscope import Schedule

D_IN, HIDDEN, D_OUT, BATCH = 6, 12, 3, 8
LR = 1e-2


def make_model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(D_IN, HIDDEN),
        nn.ReLU(),
        nn.Linear(HIDDEN, HIDDEN),
        nn.Tanh(),
        nn.Linear(HIDDEN, D_OUT),
    )


def make_optimizer(model: nn.Module, lr: float = LR) -> torch.optim.Optimizer:
    return torch.optim.Adam(model.parameters(), lr=lr)


def batch(
    step: int, rank: int, scale_rank: int = -1, scale: float = 1.0, same_data: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's batch at ``step``: x (BATCH, D_IN), y (BATCH, D_OUT); the ``scale_rank``
    gets both multiplied by ``scale`` (a rank fed differently scaled data)."""
    g = torch.Generator().manual_seed(1000 * step + (0 if same_data else rank))
    x, y = torch.randn(BATCH, D_IN, generator=g), torch.randn(BATCH, D_OUT, generator=g)
    if rank == scale_rank:
        x, y = x * scale, y * scale
    return x, y


def train_loop(
    model: nn.Module,
    opt: torch.optim.Optimizer,
    rec: stabscope.Recorder,
    steps: int,
    rank: int,
    inf_step: int = -1,
    unsync_step: int = -1,
    **data: float | bool,
) -> None:
    """``steps`` steps of MSE regression on this rank's batches; ``inf_step`` puts an Inf
    into one input; at ``unsync_step`` DDP's gradient all-reduce is skipped (``no_sync``), so
    every rank applies its own gradient and the replicas part; ``data`` goes to ``batch``."""
    for step in range(steps):
        x, y = batch(step, rank, **data)  # type: ignore[arg-type]
        if step == inf_step:
            x[0, 0] = float("inf")
        sync = model.no_sync() if step == unsync_step else contextlib.nullcontext()
        with sync:
            loss = (model(x) - y).pow(2).mean()
            opt.zero_grad()
            loss.backward()
        opt.step()
        rec.step(loss=loss)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--mode", choices=("ddp", "fsdp"), default="ddp")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--scale-rank", type=int, default=-1)
    parser.add_argument("--scale", type=float, default=1.0)
    parser.add_argument("--same-data", action="store_true")
    parser.add_argument("--lr", type=float, default=LR)
    parser.add_argument("--inf-step", type=int, default=-1, help="put an Inf in x at this step")
    parser.add_argument("--unsync-step", type=int, default=-1, help="DDP only: no_sync() here")
    parser.add_argument("--force", action="store_true", help="replace a run already in OUT")
    parser.add_argument(
        "--check-refusal", action="store_true", help="then record into OUT again, without force"
    )
    args = parser.parse_args()

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    inner = make_model()
    if args.mode == "ddp":
        model: nn.Module = nn.parallel.DistributedDataParallel(inner)
        recorded = model if rank == 0 else inner
    else:
        from torch.distributed.fsdp import fully_shard

        for layer in inner:
            if isinstance(layer, nn.Linear):
                fully_shard(layer)
        model = recorded = fully_shard(inner)
    opt = make_optimizer(model, args.lr)
    schedule = Schedule(dense=args.steps, every=0)
    with stabscope.Recorder(recorded, args.out, schedule=schedule, force=args.force) as rec:
        data = {"scale_rank": args.scale_rank, "scale": args.scale, "same_data": args.same_data}
        train_loop(model, opt, rec, args.steps, rank, args.inf_step, args.unsync_step, **data)
        if args.check_refusal:
            try:  # rank 0 holds the directory's lock while the run is open: even --force fails
                stabscope.Recorder(recorded, args.out, force=True)
            except FileExistsError as err:
                sys.stdout.write(f"rank {rank} refused while open: {err}\n")
                sys.stdout.flush()
    if args.check_refusal:
        try:
            stabscope.Recorder(recorded, args.out)
        except FileExistsError as err:  # every rank, not only rank 0, must be refused
            sys.stdout.write(f"rank {rank} refused: {err}\n")  # one write: lines stay whole
            sys.stdout.flush()
    dist.barrier()  # no rank tears gloo down while a peer is mid-collective
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
