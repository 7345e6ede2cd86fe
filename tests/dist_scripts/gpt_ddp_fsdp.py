"""The sample GPT trained twice on the same data, under DDP and under FSDP2, each recorded
with the ``full`` preset (transformer probes, Adam's eps ratio, model update, parameter
means): the merged statistics of the sharded run must equal those of the replicated one.

    torchrun --standalone --nproc_per_node=2 tests/dist_scripts/gpt_ddp_fsdp.py OUT

writes OUT/ddp and OUT/fsdp.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

import stabscope
from stabscope import Schedule
from stabscope.drivers.script import load_script

STEPS = 4
SIZE = {"depth": "2", "width": "32", "seq_len": "16", "batch_size": "4"}


def wrap(model: nn.Module, mode: str) -> nn.Module:
    if mode == "ddp":
        return nn.parallel.DistributedDataParallel(model)
    from torch.distributed.fsdp import fully_shard

    for block in model.blocks:
        fully_shard(block)
    return fully_shard(model)


def main() -> None:
    out = Path(sys.argv[1])
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    script = load_script(Path(__file__).parents[2] / "sample_models/gpt.py", SIZE)
    for mode in ("ddp", "fsdp"):
        torch.manual_seed(0)
        model = wrap(script.model(script.config), mode)
        opt = script.optimizer(model, script.config)
        torch.manual_seed(1 + rank)  # each rank its own batches, the same in both modes
        data = script.batches(script.config)
        probe = next(data)
        with stabscope.Recorder(
            model,
            out / mode,
            preset="full",
            schedule=Schedule(dense=STEPS, every=0),
            forward=lambda m, probe=probe: script.loss(m, probe),
        ) as rec:
            for _ in range(STEPS):
                loss = script.loss(model, next(data))
                opt.zero_grad()
                loss.backward()
                opt.step()
                rec.step(loss=loss)
    dist.barrier()  # no rank tears gloo down while a peer is mid-collective
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
