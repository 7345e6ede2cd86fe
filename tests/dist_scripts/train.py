"""A data-parallel training loop recorded with stabscope.Recorder, run by torchrun on gloo/CPU.

    torchrun --standalone --nproc_per_node=2 tests/dist_scripts/train.py RUN_DIR [options]

``--mode ddp`` wraps the model in DistributedDataParallel (rank 0 hands the Recorder the
wrapper, the other ranks the inner model: both must give the same names); ``--mode fsdp``
shards every Linear and the root with FSDP2's ``fully_shard``; ``--mode fsdp1`` wraps every
Linear and the root in FSDP1's ``FullyShardedDataParallel`` (FULL_SHARD, on CPU).
``--clip MAX_NORM`` clips before every optimizer step (FSDP1: the wrapper's own
``clip_grad_norm_``; otherwise ``torch.nn.utils.clip_grad_norm_``) and rank 0 writes the
norms the clip returned, the full norm over all ranks, to ``OUT-clips.json`` (``clips_file``).
The tests import ``make_model``, ``batch`` and ``make_optimizer`` to recompute every step in
one process.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path

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


def clips_file(out: str | Path) -> Path:
    """Where a run in ``out`` made with ``--clip`` has the norms its clip returned."""
    return Path(f"{out}-clips.json")


def clip(model: nn.Module, max_norm: float) -> float:
    """Clips the gradients as the script's mode does; the total norm before clipping (over
    every rank's shard: FSDP1 all-reduces it, FSDP2's is a DTensor made whole here)."""
    if hasattr(model, "_fsdp_wrapped_module"):  # FSDP1: only its own clip sees every shard
        total = model.clip_grad_norm_(max_norm)
    else:
        total = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    full_tensor = getattr(total, "full_tensor", None)  # FSDP2: a DTensor, partial per rank
    return float(full_tensor() if callable(full_tensor) else total)


def train_loop(
    model: nn.Module,
    opt: torch.optim.Optimizer,
    rec: stabscope.Recorder,
    steps: int,
    rank: int,
    inf_step: int = -1,
    unsync_step: int = -1,
    max_norm: float | None = None,
    **data: float | bool,
) -> list[float]:
    """``steps`` steps of MSE regression on this rank's batches; ``inf_step`` puts an Inf
    into one input; at ``unsync_step`` DDP's gradient all-reduce is skipped (``no_sync``), so
    every rank applies its own gradient and the replicas part; with ``max_norm`` the
    gradients are clipped (``clip``); ``data`` goes to ``batch``. Returns the clip's norms."""
    clipped = []
    for step in range(steps):
        x, y = batch(step, rank, **data)  # type: ignore[arg-type]
        if step == inf_step:
            x[0, 0] = float("inf")
        sync = model.no_sync() if step == unsync_step else contextlib.nullcontext()
        with sync:
            loss = (model(x) - y).pow(2).mean()
            opt.zero_grad()
            loss.backward()
        if max_norm is not None:
            clipped.append(clip(model, max_norm))
        opt.step()
        rec.step(loss=loss)
    return clipped


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--mode", choices=("ddp", "fsdp", "fsdp1"), default="ddp")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--scale-rank", type=int, default=-1)
    parser.add_argument("--scale", type=float, default=1.0)
    parser.add_argument("--same-data", action="store_true")
    parser.add_argument("--lr", type=float, default=LR)
    parser.add_argument("--clip", type=float, default=None, help="clip to this max norm")
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
    elif args.mode == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for layer in inner:
            if isinstance(layer, nn.Linear):
                fully_shard(layer)
        model = recorded = fully_shard(inner)
    elif args.mode == "fsdp1":
        from torch.distributed.fsdp import FullyShardedDataParallel, ShardingStrategy
        from torch.distributed.fsdp.wrap import ModuleWrapPolicy

        model = recorded = FullyShardedDataParallel(
            inner,
            device_id=torch.device("cpu"),  # without it FSDP1 asks for an accelerator
            sharding_strategy=ShardingStrategy.FULL_SHARD,
            auto_wrap_policy=ModuleWrapPolicy({nn.Linear}),
        )
    opt = make_optimizer(model, args.lr)
    schedule = Schedule(dense=args.steps, every=0)
    with stabscope.Recorder(recorded, args.out, schedule=schedule, force=args.force) as rec:
        data = {"scale_rank": args.scale_rank, "scale": args.scale, "same_data": args.same_data}
        clipped = train_loop(
            model, opt, rec, args.steps, rank, args.inf_step, args.unsync_step, args.clip, **data
        )
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
    if args.clip is not None and rank == 0:
        clips_file(args.out).write_text(json.dumps(clipped))
    dist.barrier()  # no rank tears gloo down while a peer is mid-collective
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
